"""The one definition of "off" and "dead", used by the statistics, diagnosis, plots and the ablation.

A value is *off* when its unit sits where the activation passes (almost) no signal, judged from the
activation's own parameters (lesson 10 of the fast.ai course: "dead" units are those stuck at the
activation's floor):

- floor: ReLU, ReLU6 and GeneralRelu without a leak have a floor, f(x) for x <= 0 (0 for ReLU, `-sub` for
  GeneralRelu). A value at the floor (within `tolerance`) is off, and its gradient is exactly zero.
- negative: leaky ReLU, PReLU, RReLU, GeneralRelu with a leak, ELU, SELU, CELU, GELU, SiLU, Mish, Softplus:
  a value at or below f(0) (its unit's input was <= 0) is off, but a gradient still passes, so such a
  unit is off, never dead.
- saturating: sigmoid, tanh, hardtanh, hardsigmoid, softsign: a value within SATURATION_MARGIN of the
  range's ends is off (saturated: the slope there is ~0).
- zero: every other module (Linear, convolution, norms, pooling): a value with |x| <= `tolerance` is off.

A *unit* (a channel of a convolution, a feature of a Linear or an embedding, see `unit_axis`) is *dead*
when it is off for all but DEAD_UNIT_ON_FRACTION of its values: it passes almost no gradient to the weights
that feed it and cannot recover by itself. Only floor activations can have dead units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import norms
from .layers import GeneralRelu

# Off within this distance of the floor, or of zero for modules without one. Above float rounding noise
# of activations of scale ~1, far below any value that passes a useful signal.
DEAD_TOLERANCE = 1e-3
# Saturating activations: within 1% of their range's ends, where the local slope is below ~0.04 (sigmoid)
# or ~0.02 (tanh), so gradients through the unit all but vanish.
SATURATION_MARGIN = 0.01
# A unit on for fewer than 1% of its values (inputs and positions) over a stretch of steps is dead.
DEAD_UNIT_ON_FRACTION = 0.01

_FLOOR = (nn.ReLU, nn.ReLU6)
_NEGATIVE = (nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Softplus)
_SATURATING = {nn.Sigmoid: (0.0, 1.0), nn.Tanh: (-1.0, 1.0), nn.Hardsigmoid: (0.0, 1.0), nn.Softsign: (-1.0, 1.0)}


@dataclass(frozen=True)
class OffRule:
    """When a module's output value is off: `v <= bound`, where v is the value itself, or, when
    `absolute`, `sign * |x - center|`. `kind` is one of "floor", "negative", "saturating", "zero"."""
    kind: str
    bound: float
    center: float = 0.0
    sign: float = 1.0
    absolute: bool = False
    text: str = ""  # the rule in words, for plots and findings

    @property
    def can_die(self) -> bool:
        """Whether a unit off for good gets no gradient at all (only at a floor)."""
        return self.kind == "floor"

    def off(self, x: torch.Tensor) -> torch.Tensor:
        """Bool tensor of x's shape: which values are off."""
        v = (x - self.center).abs() * self.sign if self.absolute else x
        return v <= self.bound

    @property
    def zero_is_off(self) -> bool:
        v = abs(0.0 - self.center) * self.sign if self.absolute else 0.0
        return v <= self.bound


def _at_zero(module: nn.Module) -> float:
    """f(0) of an activation module (the output of a unit whose input is 0), from its `forward`, so no
    hook of the module runs; 0 when its forward cannot take one value (a per-channel PReLU: f(0) = 0)."""
    try:
        with torch.no_grad():
            return float(module.forward(torch.zeros(1, device=_device(module))).flatten()[0])
    except (RuntimeError, ValueError, TypeError, IndexError):
        return 0.0


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def off_rule(module: nn.Module, tolerance: float = DEAD_TOLERANCE) -> OffRule:
    """The rule for `module`'s output values (see the module docstring); `tolerance` >= 0."""
    if isinstance(module, GeneralRelu) and module.leak is None or isinstance(module, _FLOOR):
        floor = _at_zero(module)
        return OffRule("floor", floor + tolerance, text=f"at the floor {floor:g} (within {tolerance:g})")
    if isinstance(module, GeneralRelu) or isinstance(module, _NEGATIVE):
        at_zero = _at_zero(module)
        return OffRule("negative", at_zero, text=f"at or below f(0) = {at_zero:g} (input <= 0)")
    limits = next((v for t, v in _SATURATING.items() if isinstance(module, t)), None)
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh too, but was matched above
        limits = (float(module.min_val), float(module.max_val))
    if limits is not None:
        lo, hi = limits
        half, margin = (hi - lo) / 2, SATURATION_MARGIN * (hi - lo)
        return OffRule("saturating", -(half - margin), center=(lo + hi) / 2, sign=-1.0, absolute=True,
                       text=f"within {margin:g} of {lo:g} or {hi:g} (saturated)")
    return OffRule("zero", tolerance, absolute=True, text=f"|a| <= {tolerance:g}")


# Layers whose output holds its units (channels) on dim 1: (N, C, ...) convolutions and the norms made for them.
CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm,
                  norms.BatchNorm, norms.InstanceNorm, norms.GroupNorm, norms.RunningBatchNorm)
# Layers whose output holds its units (features) last: (N, F), (N, L, F), (L, N, F).
FEATURES_LAST = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
                 nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.modules.rnn.RNNBase)


def unit_axis(module: nn.Module, out: torch.Tensor, previous: int | None = None) -> int:
    """The dim of `out` that holds the module's units: 1 for convolutions and their norms, the last dim
    for Linear, Embedding, attention and RNN outputs, so an (N, L, C) sequence is judged per feature C,
    never per position L. A module that keeps its input's layout (an activation, dropout, LayerNorm,
    which may follow a convolution or a Linear) inherits `previous`, the axis of the layer that ran before
    it; with none known, dim 1 for images (N, C, H, W) and the last dim otherwise."""
    if isinstance(module, CHANNELS_FIRST):
        return 1
    if isinstance(module, FEATURES_LAST):
        return -1
    if previous is not None:
        return previous
    return 1 if out.dim() == 4 else -1


def on_share_per_unit(out: torch.Tensor, rule: OffRule, axis: int) -> torch.Tensor:
    """(C,) float: the share of each unit's values (over the batch and positions) that are on.
    `out` has at least 2 dims; C = out.shape[axis]."""
    on = ~rule.off(out.detach().float())
    return on.movedim(axis, 0).reshape(out.shape[axis], -1).float().mean(1)


def dead_share(on_share: torch.Tensor) -> float:
    """The share of units whose on-share is below DEAD_UNIT_ON_FRACTION (NaN for no units)."""
    if on_share.numel() == 0:
        return math.nan
    return float((on_share < DEAD_UNIT_ON_FRACTION).float().mean())
