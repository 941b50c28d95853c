"""Model builders: the course's CNN of stride-2 conv blocks, and a small ResNet.

Modules are named (`block0.conv`, `block0.norm`, `block0.act`, ..., `head`) so statistics, plots and
diagnosis can say *where* something happens.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

from torch import nn

from .errors import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
ActSpec = str | Callable[[], nn.Module] | None
NormSpec = str | Callable[[int], nn.Module] | None


def make_act(act: ActSpec) -> nn.Module | None:
    if act is None or act == "none":
        return None
    if callable(act):
        return act()
    if act == "general_relu":
        from .layers import GeneralRelu

        return GeneralRelu(leak=0.1, sub=0.4)  # lesson 11's choice: a leaky slope, recentred mean
    try:
        return ACTIVATIONS[act]()
    except KeyError:
        raise ConfigError(f"unknown activation {act!r}; choose one of {sorted([*ACTIVATIONS, 'general_relu'])}") from None


def make_norm2d(norm: NormSpec, nf: int) -> nn.Module | None:
    """`batch` is torch's BatchNorm2d (fast); the other kinds are deepscope's hand-written layers."""
    if norm is None or norm == "none":
        return None
    if callable(norm):
        return norm(nf)
    if norm == "batch":
        return nn.BatchNorm2d(nf)
    from .norms import make_norm

    return make_norm(norm, nf)


def conv_block(ni: int, nf: int, ks: int = 3, stride: int = 2, act: ActSpec = "relu", norm: NormSpec = None) -> nn.Sequential:
    """Conv -> optional norm -> optional activation. The conv has no bias when a norm follows (its shift
    would be cancelled by the norm's mean subtraction)."""
    norm_layer = make_norm2d(norm, nf)
    parts: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(ni, nf, ks, stride, padding=ks // 2, bias=norm_layer is None))]
    if norm_layer is not None:
        parts.append(("norm", norm_layer))
    act_layer = make_act(act)
    if act_layer is not None:
        parts.append(("act", act_layer))
    return nn.Sequential(OrderedDict(parts))


def _check_nfs(nfs: Sequence[int]) -> None:
    if not nfs or any(not isinstance(n, int) or n <= 0 for n in nfs):
        raise ConfigError(f"nfs must be a non-empty list of positive channel counts, got {list(nfs)}")


def cnn(nfs: Sequence[int] = (8, 16, 32, 64), n_in: int = 1, n_out: int = 10, act: ActSpec = "relu",
        norm: NormSpec = None, first_ks: int = 5, first_stride: int = 2) -> nn.Sequential:
    """The course's CNN: a first conv with a wide kernel, then stride-2 3x3 conv blocks doubling channels,
    global average pooling and a linear head. Each stride-2 block quarters the spatial size, so
    28x28 -> 14 -> 7 -> 4 -> 2 with the default `first_stride=2` (use 1 for the lesson's exact layout)."""
    _check_nfs(nfs)
    blocks = [("block0", conv_block(n_in, nfs[0], ks=first_ks, stride=first_stride, act=act, norm=norm))]
    blocks += [(f"block{i + 1}", conv_block(ni, nf, act=act, norm=norm)) for i, (ni, nf) in enumerate(zip(nfs[:-1], nfs[1:]))]
    return nn.Sequential(OrderedDict([*blocks, ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                                      ("head", nn.Linear(nfs[-1], n_out))]))


class ResBlock(nn.Module):
    """Two 3x3 convs with a shortcut (He et al. 2016). The shortcut pools and projects when the shape
    changes, so the block's output is act(convs(x) + shortcut(x))."""

    def __init__(self, ni: int, nf: int, stride: int = 1, act: ActSpec = "relu", norm: NormSpec = None):
        super().__init__()
        self.conv1 = conv_block(ni, nf, stride=stride, act=act, norm=norm)
        self.conv2 = conv_block(nf, nf, stride=1, act=None, norm=norm)
        shortcut: list[tuple[str, nn.Module]] = []
        if stride != 1:
            shortcut.append(("pool", nn.AvgPool2d(stride, ceil_mode=True)))
        if ni != nf:
            shortcut.append(("proj", nn.Conv2d(ni, nf, 1, bias=False)))
        self.shortcut = nn.Sequential(OrderedDict(shortcut))
        self.act = make_act(act) or nn.Identity()

    def forward(self, x):
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


def resnet(nfs: Sequence[int] = (16, 32, 64, 128), n_in: int = 1, n_out: int = 10, act: ActSpec = "relu",
           norm: NormSpec = "batch", first_ks: int = 5) -> nn.Sequential:
    """A small ResNet: a stride-2 stem conv, then one stride-2 residual block per further channel count."""
    _check_nfs(nfs)
    blocks = [("stem", conv_block(n_in, nfs[0], ks=first_ks, stride=2, act=act, norm=norm))]
    blocks += [(f"res{i + 1}", ResBlock(ni, nf, stride=2, act=act, norm=norm)) for i, (ni, nf) in enumerate(zip(nfs[:-1], nfs[1:]))]
    return nn.Sequential(OrderedDict([*blocks, ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                                      ("head", nn.Linear(nfs[-1], n_out))]))


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn": cnn, "resnet": resnet}


def get_model(name: str, **kwargs) -> nn.Module:
    try:
        builder = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return builder(**kwargs)
