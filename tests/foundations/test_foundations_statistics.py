import numpy as np
import torch

from deepscope.foundations import (
    correlation,
    covariance,
    mean,
    mean_absolute_deviation,
    std,
    variance,
    variance_one_pass,
)


def test_statistics_match_torch_and_numpy():
    x = torch.randn(1000, dtype=torch.float64) * 2 + 3
    y = 0.5 * x + torch.randn(1000, dtype=torch.float64)
    xn, yn = x.numpy(), y.numpy()
    assert np.isclose(float(mean(x)), xn.mean())
    assert np.isclose(float(variance(x)), xn.var())
    assert np.isclose(float(variance_one_pass(x)), xn.var())
    torch.testing.assert_close(variance(x), x.var(unbiased=False))
    assert np.isclose(float(std(x)), xn.std())
    assert np.isclose(float(mean_absolute_deviation(x)), np.abs(xn - xn.mean()).mean())
    assert np.isclose(float(covariance(x, y)), np.cov(xn, yn, bias=True)[0, 1])
    assert np.isclose(float(correlation(x, y)), np.corrcoef(xn, yn)[0, 1])
    torch.testing.assert_close(correlation(x, y), torch.corrcoef(torch.stack([x, y]))[0, 1])


def test_correlation_is_plus_minus_one_for_exact_lines():
    x = torch.randn(50, dtype=torch.float64)
    assert np.isclose(float(correlation(x, 3 * x + 1)), 1.0)
    assert np.isclose(float(correlation(x, -2 * x)), -1.0)


def test_one_pass_variance_loses_precision_with_a_large_offset():
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(10_000, generator=g)          # float32: mean 1e4, true variance ~1
    reference = float(np.var(x.numpy().astype(np.float64)))
    two_pass, one_pass = float(variance(x)), float(variance_one_pass(x))
    assert abs(two_pass - reference) / reference < 1e-3
    assert abs(one_pass - reference) / reference > 0.5  # catastrophic cancellation
