"""Mean, variance, covariance and correlation from their definitions (fast.ai lesson 10 maths review).

All reduce over every element of 1-D tensors and use the population convention (divide by n), as the
lesson does; `torch.var(..., unbiased=False)` and `np.var` are the references.
"""
from __future__ import annotations

import torch


def mean(x: torch.Tensor) -> torch.Tensor:
    return x.sum() / x.numel()


def variance(x: torch.Tensor) -> torch.Tensor:
    """Two-pass definition E[(X - E[X])^2]: subtracting the mean first keeps the numbers small."""
    return ((x - mean(x)) ** 2).sum() / x.numel()


def variance_one_pass(x: torch.Tensor) -> torch.Tensor:
    """E[X^2] - E[X]^2: one pass over the data, but numerically fragile.

    When the mean is large next to the spread, E[X^2] and E[X]^2 are two nearly equal big numbers and
    their difference cancels catastrophically: for float32 data at 1e4 + N(0, 1), E[X^2] ~ 1e8 where
    float32 values are 8 apart, so its rounding error alone exceeds the variance (~1). Use it only with
    float64 or centred data.
    """
    return mean(x * x) - mean(x) ** 2


def std(x: torch.Tensor) -> torch.Tensor:
    return variance(x).sqrt()


def mean_absolute_deviation(x: torch.Tensor) -> torch.Tensor:
    """E|X - E[X]|: a spread measure less swayed by outliers than std, since it does not square."""
    return (x - mean(x)).abs().sum() / x.numel()


def covariance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E[(X - E[X]) (Y - E[Y])]: positive when x and y tend to move together."""
    return ((x - mean(x)) * (y - mean(y))).sum() / x.numel()


def correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson's r: covariance rescaled by both spreads into [-1, 1], independent of units."""
    return covariance(x, y) / (std(x) * std(y))
