"""Foundations: the course's path from pure Python to PyTorch, written to be read and checked against torch.

matmul (lesson 8) -> backprop by hand (lesson 8) -> softmax / NLL / cross-entropy and the statistics
review (lesson 10) -> convolution by hand -> why zero initialisation fails. Timing lives in `bench`.
"""
from .backprop import MLP, MSE, Linear, ReLU, finite_difference_grad, train_mlp
from .bench import BenchRow, bench_conv, bench_matmul, format_table, time_fn, time_interleaved
from .conv import conv2d_loops, conv2d_unfold, conv_output_size
from .loss_combinations import COMBINATIONS, CombinationResult, compare_loss_combinations, format_combinations
from .matmul import (
    matmul_broadcast,
    matmul_einsum,
    matmul_elementwise,
    matmul_ladder,
    matmul_loops,
    matmul_python_lists,
    matmul_torch,
    numba_matmul,
)
from .softmax import cross_entropy, log_softmax, log_softmax_naive, logsumexp, nll, softmax
from .statistics import (
    correlation,
    covariance,
    mean,
    mean_absolute_deviation,
    std,
    variance,
    variance_one_pass,
)
from .zero_init import ZeroInitResult, run_zero_init_experiment, zero_init_mlp

__all__ = [
    "Linear", "ReLU", "MSE", "MLP", "train_mlp", "finite_difference_grad",
    "BenchRow", "time_fn", "time_interleaved", "bench_matmul", "bench_conv", "format_table",
    "conv2d_loops", "conv2d_unfold", "conv_output_size",
    "COMBINATIONS", "CombinationResult", "compare_loss_combinations", "format_combinations",
    "matmul_python_lists", "matmul_loops", "matmul_elementwise", "matmul_broadcast", "matmul_einsum",
    "matmul_torch", "numba_matmul", "matmul_ladder",
    "softmax", "log_softmax_naive", "logsumexp", "log_softmax", "nll", "cross_entropy",
    "mean", "variance", "variance_one_pass", "std", "mean_absolute_deviation", "covariance", "correlation",
    "ZeroInitResult", "zero_init_mlp", "run_zero_init_experiment",
]
