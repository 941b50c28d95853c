"""What diagnosis records: plain numbers and names, no tensors, so analysis can be tested with made-up values."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerWeight:
    """A weight matrix or kernel (a parameter named `weight` with 2+ dimensions) at the start."""
    module: str
    shape: tuple[int, ...]
    constant: bool  # every element equal
    value: float  # the first element (the constant, when constant)


@dataclass
class SetupRecord:
    """The model, one batch and the loss before training (recorded by preflight.inspect_setup)."""
    loss_kind: str | None = None  # "cross_entropy", "nll", "mse", "l1", "bce", "bce_logits" or None
    batch_size: int = 0
    last_batch_size: int | None = None  # the size of the epoch's last (partial) batch, when it can be known
    x_float: bool = True
    x_mean: float = 0.0
    x_std: float = 1.0
    x_finite: bool = True
    y_dtype: str = ""
    y_shape: tuple[int, ...] = ()
    y_min: float | None = None
    y_max: float | None = None
    out_shape: tuple[int, ...] | None = None  # None when the forward pass failed
    out_float: bool = True
    out_min: float | None = None
    out_max: float | None = None
    out_row_sum_dev: float | None = None  # max |sum over classes - 1|
    out_row_lse_dev: float | None = None  # max |logsumexp over classes|
    out_col_sum_dev: float | None = None  # max |sum over the batch (dim 0) - 1|: softmax taken over the batch
    out_col_lse_dev: float | None = None  # max |logsumexp over the batch|: log_softmax over the batch
    out_module: str = ""  # the leaf module whose output the model returned ("" if none or unknown)
    weights: list[LayerWeight] = field(default_factory=list)  # in registration order
    batchnorms: list[str] = field(default_factory=list)  # BatchNorm modules in training mode
    error: dict | None = None  # {"where", "type", "message"} when the forward pass or the loss raised


@dataclass
class ModuleRecord:
    """One leaf module's output over the recorded steps."""
    name: str
    type: str
    order: int  # position in the first forward pass
    steps: list[int] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)
    saturated: list[float] = field(default_factory=list)  # share of outputs at a sigmoid/tanh limit
    active: list[float] = field(default_factory=list)  # per channel: summed share of outputs that are "on"
    n_active: int = 0  # how many recorded steps are summed in `active`


@dataclass
class ProbeRecord:
    """What the instrumented run saw (recorded by probe.Probe)."""
    steps: int = 0  # training steps recorded
    input_std: float | None = None  # std of the first recorded input batch
    batch_sizes: list[int] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    modules: dict[str, ModuleRecord] = field(default_factory=dict)  # leaves, by name
    output_module: str | None = None  # the leaf whose output the model returned
    params: dict[str, str] = field(default_factory=dict)  # trainable parameter -> owning module
    grad_seen: dict[str, bool] = field(default_factory=dict)  # parameter -> ever got a gradient
    grad_nonzero: dict[str, bool] = field(default_factory=dict)  # parameter -> ever got a non-zero gradient
    update_ratios: dict[str, list[float]] = field(default_factory=dict)  # weight -> ||dW||/||W|| per step
    nonfinite_forward: dict | None = None  # {"module", "step", "data": bool}
    nonfinite_backward: dict | None = None  # {"module", "step", "how"}
    nonfinite_loss: dict | None = None  # {"step", "loss"}
    saved: str | None = None  # where the offending batch was saved
    error: dict | None = None  # {"where", "type", "message", "step"}
