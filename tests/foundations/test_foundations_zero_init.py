import pytest

from deepscope.foundations import run_zero_init_experiment
from deepscope.foundations.bench import pinned_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads buy nothing, and on shared cores they made these tests ~5x slower."""
    with pinned_threads(1):
        yield


def test_one_zero_layer_at_the_end_still_learns():
    result = run_zero_init_experiment(zero_layers=(1,))
    assert result.grad_norms["first"][0] == 0.0       # w2 = 0 blocks the path back to w1 at step one...
    assert result.grad_norms["last"][0] > 0.0         # ...but h != 0, so w2 gets a gradient
    assert result.grad_norms["first"][-1] > 0.0       # once w2 moved, w1 learns too
    assert all(result.weights_moved.values())
    assert result.final_loss < 0.3 * result.initial_loss


def test_two_zero_layers_in_a_row_never_learn():
    result = run_zero_init_experiment(zero_layers=(0, 1))
    for name, norms in result.grad_norms.items():
        assert all(n == 0.0 for n in norms), f"{name} got a gradient"
    assert not any(result.weights_moved.values())
    # only the output bias learns (it fits the mean target), so the loss barely moves
    assert result.final_loss > 0.95 * result.initial_loss


def test_random_init_learns_as_the_baseline():
    result = run_zero_init_experiment(zero_layers=())
    assert result.final_loss < 0.3 * result.initial_loss


def test_zero_first_layer_stalls_because_relu_derivative_at_zero_is_zero():
    result = run_zero_init_experiment(zero_layers=(0,))
    assert all(n == 0.0 for norms in result.grad_norms.values() for n in norms)
