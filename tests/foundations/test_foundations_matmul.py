import pytest
import torch

from deepscope.foundations import matmul_ladder, matmul_python_lists, numba_matmul


@pytest.mark.parametrize("n, k, m", [(5, 784, 10), (3, 7, 4), (1, 1, 1)])
def test_every_rung_equals_torch_matmul(n, k, m):
    a, b = torch.randn(n, k, dtype=torch.float64), torch.randn(k, m, dtype=torch.float64)
    expected = a @ b
    ladder = matmul_ladder()
    if n * k * m > 1000:  # the tensor-index loops take seconds on the MNIST shape; checked on the small ones
        ladder.pop("tensor loops")
    for name, fn in ladder.items():
        torch.testing.assert_close(fn(a, b), expected, msg=f"{name} differs from torch.matmul")


def test_python_lists_version_works_on_plain_lists():
    a, b = [[1.0, 2.0], [3.0, 4.0]], [[5.0], [6.0]]
    assert matmul_python_lists(a, b) == [[17.0], [39.0]]


def test_ladder_is_ordered_slowest_first_and_ends_with_torch():
    names = list(matmul_ladder())
    assert names[0] == "python lists" and names[-1] == "torch.matmul"


def test_numba_version_matches_when_installed():
    fn = numba_matmul()
    if fn is None:
        pytest.skip("numba is not installed; the numba rung is optional")
    a, b = torch.randn(4, 9, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    torch.testing.assert_close(fn(a, b), a @ b)
