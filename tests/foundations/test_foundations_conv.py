import pytest
import torch
import torch.nn.functional as F

from deepscope.foundations import conv2d_loops, conv2d_unfold, conv_output_size
from deepscope.foundations.bench import pinned_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads buy nothing, and on shared cores they made these tests ~5x slower."""
    with pinned_threads(1):
        yield

SHAPES = [  # (batch, c_in, c_out, h, w, kernel, stride, padding, bias)
    (1, 1, 1, 5, 5, 3, 1, 0, False),
    (2, 3, 4, 7, 6, 3, 1, 1, True),
    (2, 2, 3, 9, 8, 3, 2, 1, True),
    (1, 3, 2, 6, 6, 2, 2, 0, True),
    (3, 1, 5, 8, 7, 5, 1, 2, False),
]


@pytest.mark.parametrize("n, c_in, c_out, h, w, k, stride, padding, with_bias", SHAPES)
def test_hand_written_convolutions_equal_conv2d(n, c_in, c_out, h, w, k, stride, padding, with_bias):
    x = torch.randn(n, c_in, h, w, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, k, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64) if with_bias else None
    expected = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    torch.testing.assert_close(conv2d_loops(x, weight, bias, stride, padding), expected)
    torch.testing.assert_close(conv2d_unfold(x, weight, bias, stride, padding), expected)


def test_output_size_matches_torch():
    for size, k, s, p in [(28, 3, 1, 1), (28, 3, 2, 1), (7, 5, 2, 0), (10, 4, 3, 2)]:
        out = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, k, k), stride=s, padding=p)
        assert out.shape[-1] == conv_output_size(size, k, s, p)
