"""Activation layers that are not in torch.nn, written to be read and tested against torch.

`GeneralRelu` is the generalised ReLU of fast.ai's Deep Learning from the Foundations (2019 part 2,
lesson 10; used again for init in lesson 11): a leaky ReLU whose output is shifted down so its mean
sits nearer zero, optionally clamped from above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeneralRelu(nn.Module):
    """ReLU with an optional leaky slope, a constant subtracted, and an optional upper clamp.

    A plain ReLU outputs only non-negative values, so its mean is about 0.4 for unit-normal input;
    subtracting `sub` recentres it, and a small `leak` keeps gradients alive for negative inputs.
    """

    def __init__(self, leak: float | None = None, sub: float | None = None, maxv: float | None = None) -> None:
        super().__init__()
        self.leak = leak
        self.sub = sub
        self.maxv = maxv

    @property
    def negative_slope(self) -> float:
        """The slope for negative inputs (0 for a plain ReLU); Kaiming init reads it for its gain."""
        return float(self.leak) if self.leak is not None else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(x, self.leak) if self.leak is not None else F.relu(x)
        if self.sub is not None:
            x = x - self.sub
        if self.maxv is not None:
            x = x.clamp_max(self.maxv)
        return x

    def extra_repr(self) -> str:
        return f"leak={self.leak}, sub={self.sub}, maxv={self.maxv}"
