import math

import pytest
import torch
import torch.nn.functional as F

from deepscope.foundations import (
    compare_loss_combinations,
    cross_entropy,
    format_combinations,
    log_softmax,
    log_softmax_naive,
    logsumexp,
    nll,
    softmax,
)
from deepscope.foundations.bench import pinned_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads buy nothing, and on shared cores they made these tests ~5x slower."""
    with pinned_threads(1):
        yield


def test_stable_versions_match_torch_on_ordinary_logits():
    x = torch.randn(8, 10, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (8,))
    torch.testing.assert_close(softmax(x), F.softmax(x, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(log_softmax(x), F.log_softmax(x, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(log_softmax_naive(x), F.log_softmax(x, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(logsumexp(x), torch.logsumexp(x, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(nll(F.log_softmax(x, -1), y), F.nll_loss(F.log_softmax(x, -1), y), atol=1e-6, rtol=0)
    torch.testing.assert_close(cross_entropy(x, y), F.cross_entropy(x, y), atol=1e-6, rtol=0)


def test_large_logits_break_the_naive_version_but_not_the_stable_one():
    x = torch.tensor([[1000.0, 999.0, 0.0], [-5.0, 100.0, 90.0]])  # float32 exp overflows above ~88.7
    y = torch.tensor([0, 1])
    naive = log_softmax_naive(x)
    assert not torch.isfinite(naive).all()
    torch.testing.assert_close(log_softmax(x), F.log_softmax(x, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(softmax(x), F.softmax(x, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(cross_entropy(x, y), F.cross_entropy(x, y), atol=1e-6, rtol=0)
    assert math.isclose(float(log_softmax(x)[0, 0]), -math.log1p(math.exp(-1)), rel_tol=1e-6)


def test_log_softmax_is_idempotent():
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(log_softmax(log_softmax(x)), log_softmax(x))


def test_measured_poll_of_the_four_combinations():
    results = {r.name: r for r in compare_loss_combinations()}
    good_nll, good_ce = results["FC+LogSoftmax+NLL"], results["FC+LogSoftmax+CE"]
    softmax_nll, double_softmax = results["FC+Softmax+NLL"], results["FC+Softmax+CE"]

    # The correct pair fits the separable data, and they are the same loss (log_softmax is idempotent).
    assert good_nll.accuracy > 0.95 and good_nll.true_ce < 0.1
    assert math.isclose(good_nll.final_loss, good_ce.final_loss, rel_tol=1e-4)
    # Softmax + NLL reports a negative "loss" bounded by -1: -p_target, not a log-likelihood.
    assert -1.0 <= softmax_nll.final_loss < 0
    # Both wrong combinations lag far behind after the same steps from the same start.
    for wrong in (softmax_nll, double_softmax):
        assert wrong.true_ce > 10 * good_nll.true_ce
        assert wrong.accuracy < good_nll.accuracy - 0.3
    # The double softmax cannot bring its own loss near zero: the inner softmax squeezes logits into
    # [0, 1], so with 10 classes the target gets at most e / (e + 9) of the outer softmax.
    assert double_softmax.final_loss > math.log(math.e + 9) - 1
    assert "FC+Softmax+CE" in format_combinations(list(results.values()))
