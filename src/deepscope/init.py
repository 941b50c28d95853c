"""Weight initialisation: Kaiming (He et al. 2015) from its formula, and LSUV (Mishkin & Matas 2015).

Both aim at the same thing, activations that neither shrink nor explode with depth (fast.ai Deep
Learning from the Foundations, 2019 part 2, lessons 8-11). Kaiming gets there from the fan and the
activation's slope; LSUV measures the real activations on a batch and rescales each layer until they
have unit variance.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import torch
from torch import nn

from deepscope.errors import ConfigError

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
INIT_KINDS: tuple[str, ...] = ("kaiming_normal", "kaiming_uniform")


def fan(weight: torch.Tensor, mode: str = "fan_in") -> int:
    """Inputs (fan_in) or outputs (fan_out) feeding each unit: channels times kernel area."""
    if weight.dim() < 2:
        raise ValueError(f"fan needs a weight with at least 2 dims, got shape {tuple(weight.shape)}")
    receptive = math.prod(weight.shape[2:])  # kernel area; 1 for Linear
    if mode == "fan_in":
        return weight.shape[1] * receptive
    if mode == "fan_out":
        return weight.shape[0] * receptive
    raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")


def kaiming_gain(a: float = 0.0, nonlinearity: str = "relu") -> float:
    """sqrt(2 / (1 + a²)) keeps the variance through a leaky ReLU of slope a; 1 for a linear layer.

    As in torch, `a` is read only for "leaky_relu"; "relu" is the slope-0 case.
    """
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1 + a * a))
    if nonlinearity == "linear":
        return 1.0
    raise ValueError(f"nonlinearity must be 'relu', 'leaky_relu' or 'linear', got {nonlinearity!r}")


def kaiming_std(weight: torch.Tensor, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu") -> float:
    """The standard deviation Kaiming init targets: gain / sqrt(fan)."""
    return kaiming_gain(a, nonlinearity) / math.sqrt(fan(weight, mode))


@torch.no_grad()
def kaiming_normal_(weight: torch.Tensor, a: float = 0.0, mode: str = "fan_in",
                    nonlinearity: str = "relu") -> torch.Tensor:
    """Fill `weight` in place from N(0, std²), std = gain / sqrt(fan)."""
    return weight.normal_(0.0, kaiming_std(weight, a, mode, nonlinearity))


@torch.no_grad()
def kaiming_uniform_(weight: torch.Tensor, a: float = 0.0, mode: str = "fan_in",
                     nonlinearity: str = "relu") -> torch.Tensor:
    """Fill `weight` in place from U(-b, b), b = sqrt(3) * std, since U(-b, b) has std b / sqrt(3)."""
    bound = math.sqrt(3.0) * kaiming_std(weight, a, mode, nonlinearity)
    return weight.uniform_(-bound, bound)


def _slope(module: nn.Module) -> float | None:
    """The negative slope of a ReLU-family activation, or None for anything else."""
    if isinstance(module, nn.ReLU):
        return 0.0
    slope = getattr(module, "negative_slope", None)  # GeneralRelu, nn.LeakyReLU
    return float(slope) if isinstance(slope, (int, float)) else None


def following_slopes(model: nn.Module) -> dict[nn.Module, float | None]:
    """For each conv/linear layer, the slope of the first ReLU-family activation after it, else None.

    "After" means in registration order (`model.modules()`), which is the execution order for
    `nn.Sequential`-style models; the search stops at the next conv/linear layer.
    """
    modules = list(model.modules())
    slopes: dict[nn.Module, float | None] = {}
    for i, layer in enumerate(modules):
        if not isinstance(layer, WEIGHT_LAYERS):
            continue
        slopes[layer] = None
        for later in modules[i + 1:]:
            if isinstance(later, WEIGHT_LAYERS):
                break
            if (s := _slope(later)) is not None:
                slopes[layer] = s
                break
    return slopes


@torch.no_grad()
def init_model(model: nn.Module, kind: str = "kaiming_normal", leak: float | None = None) -> nn.Module:
    """Kaiming-initialise every Conv1d/2d/3d and Linear weight in `model` and zero their biases.

    With `leak` given, every layer uses the leaky-ReLU gain for that slope. With `leak=None` each layer
    takes the slope of the ReLU/LeakyReLU/GeneralRelu that follows it, and a layer with none after it
    (such as the output layer) gets the linear gain 1.
    """
    if kind not in INIT_KINDS:
        raise ConfigError(f"unknown init kind {kind!r}; choose one of {', '.join(INIT_KINDS)}")
    fill = kaiming_normal_ if kind == "kaiming_normal" else kaiming_uniform_
    for layer, slope in following_slopes(model).items():
        a = leak if leak is not None else slope
        fill(layer.weight, a=a or 0.0, nonlinearity="linear" if a is None else "leaky_relu")
        if layer.bias is not None:
            layer.bias.zero_()
    return model


class LayerStats(NamedTuple):
    """A layer's output statistics after LSUV, and how many rescaling rounds it took."""

    mean: float
    std: float
    iterations: int


def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, b in model.named_buffers():
        if name in saved:
            b.copy_(saved[name])


def _measure(model: nn.Module, layer: nn.Module, xb: torch.Tensor,
             buffers: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Run `xb` through `model` and return the mean and std of `layer`'s output.

    The hook always goes, and buffers are put back after every pass, so that each measurement sees the
    same model state (a RunningBatchNorm would otherwise drift with every pass and never settle).
    """
    stats: list[tuple[float, float]] = []
    handle = layer.register_forward_hook(lambda m, i, out: stats.append((out.mean().item(), out.std().item())))
    try:
        model(xb)
    finally:
        handle.remove()
        _restore_buffers(model, buffers)
    if not stats:
        raise ValueError(f"{type(layer).__name__} was not called when the batch ran through the model")
    return stats[-1]


@torch.no_grad()
def lsuv_(model: nn.Module, xb: torch.Tensor, modules: Iterable[nn.Module] | None = None, tol: float = 1e-3,
          max_iters: int = 10) -> dict[str, LayerStats]:
    """Layer-sequential unit-variance init (Mishkin & Matas 2015; fast.ai 2019 part 2, lesson 11).

    Layer by layer, in order, measure the layer's *own* output on `xb` (before its activation) and set
    weight ← weight / std and bias ← (bias - mean) / std, which makes that output exactly zero-mean and
    unit-std on this batch. Mishkin & Matas only rescale; the bias shift is the lesson's addition. It
    repeats until |mean| < tol (when the layer has a bias) and |std - 1| < tol, or `max_iters` rounds.
    `modules` defaults to every conv/linear layer. The model runs in train mode, as training will see
    it (dropout's randomness can then keep a layer from meeting `tol`); every buffer (such as batch norm
    running stats) is restored after each pass, and every module's mode at the end.
    Returns, per layer name, the final mean, std and the number of rounds.
    """
    targets = list(modules) if modules is not None else [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    names = {m: name for name, m in model.named_modules()}
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    results: dict[str, LayerStats] = {}
    try:
        model.train()
        for layer in targets:
            has_bias = getattr(layer, "bias", None) is not None
            rounds = 0
            mean, std = _measure(model, layer, xb, buffers)
            while rounds < max_iters and (abs(std - 1) >= tol or (has_bias and abs(mean) >= tol)) and std > 0:
                layer.weight.div_(std)
                if has_bias:
                    layer.bias.sub_(mean).div_(std)
                rounds += 1
                mean, std = _measure(model, layer, xb, buffers)
            results[names.get(layer, type(layer).__name__)] = LayerStats(mean, std, rounds)
    finally:
        for m, training in modes.items():
            m.train(training)
        _restore_buffers(model, buffers)
    return results
