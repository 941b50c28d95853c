"""Softmax, log-softmax, negative log-likelihood and cross-entropy written out (fast.ai lessons 9-10).

The naive log-softmax computes exp(x) directly and overflows for logits above ~88 (float32); the
log-sum-exp trick subtracts the row maximum first, which changes nothing mathematically:
log sum exp(x) = m + log sum exp(x - m).
"""
from __future__ import annotations

import torch


def softmax(x: torch.Tensor) -> torch.Tensor:
    """exp(x) / sum exp(x) along the last axis, shifted by the maximum so exp never overflows."""
    shifted = x - x.max(dim=-1, keepdim=True).values   # (N, C), every entry <= 0
    e = shifted.exp()                                   # (N, C) in (0, 1]
    return e / e.sum(dim=-1, keepdim=True)              # (N, C), rows sum to 1


def log_softmax_naive(x: torch.Tensor) -> torch.Tensor:
    """log(exp(x) / sum exp(x)) exactly as written: inf/nan once exp(x) overflows."""
    return (x.exp() / x.exp().sum(dim=-1, keepdim=True)).log()   # (N, C)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log sum exp(x) along the last axis, computed as m + log sum exp(x - m)."""
    m = x.max(dim=-1, keepdim=True).values                       # (N, 1)
    return m.squeeze(-1) + (x - m).exp().sum(dim=-1).log()       # (N,)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """x - logsumexp(x), the stable log-softmax.

    Written as (x - m) - log sum exp(x - m) rather than x - (m + ...), so the large m cancels exactly
    before any rounding: with float32 logits near 1000 the other order loses ~3e-5.
    """
    shifted = x - x.max(dim=-1, keepdim=True).values             # (N, C), max entry is exactly 0
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()  # (N, C) - (N, 1)


def nll(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of -log_probs[i, target[i]]; assumes its input already is log-probabilities."""
    picked = log_probs[torch.arange(len(target)), target]        # (N,) by integer-array indexing
    return -picked.mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nll(log_softmax(logits)): takes raw scores, as `F.cross_entropy` does."""
    return nll(log_softmax(logits), target)
