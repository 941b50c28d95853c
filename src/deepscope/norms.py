"""Normalisation layers written by hand, each mirroring its torch.nn counterpart, and a factory.

Every layer takes inputs shaped `(N, C, *spatial)`: `(N, C)` after a linear layer, `(N, C, L)` or
`(N, C, H, W)` after a convolution. They differ only in which axes the mean and variance are taken over:

| layer            | statistics over          | source                                   |
|------------------|--------------------------|------------------------------------------|
| BatchNorm        | N and spatial, per C     | Ioffe & Szegedy 2015                     |
| LayerNorm        | the trailing dims         | Ba, Kiros & Hinton 2016                  |
| InstanceNorm     | spatial, per N and C     | Ulyanov, Vedaldi & Lempitsky 2016        |
| GroupNorm        | C/G channels and spatial | Wu & He 2018                             |
| RunningBatchNorm | running sums over batches| fast.ai 2019 part 2, lesson 10           |

Autograd derives the backward passes; tests check them against torch's fused kernels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from deepscope.errors import ConfigError

NORM_KINDS: tuple[str, ...] = ("none", "batch", "layer", "instance", "group", "running_batch")


def _per_channel(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a `(C,)` tensor so it broadcasts over `x` shaped `(N, C, *spatial)`."""
    return p.view(1, -1, *([1] * (x.dim() - 2)))


def _batch_dims(x: torch.Tensor) -> list[int]:
    """Every axis except the channel axis 1."""
    return [0, *range(2, x.dim())]


class BatchNorm(nn.Module):
    """Batch normalisation (Ioffe & Szegedy 2015) for `(N, C)` and `(N, C, *spatial)` inputs.

    Training normalises with the batch's mean and biased variance; evaluation with running estimates.
    `momentum` follows torch's convention, it is the weight of the *new* batch:
    `running = (1 - momentum) * running + momentum * batch`, and the running variance uses the unbiased
    batch variance, as torch does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            dims = _batch_dims(x)
            n = x.numel() // x.shape[1]  # values per channel
            if n < 2:
                raise ValueError(f"BatchNorm needs more than one value per channel in training, "
                                 f"got shape {tuple(x.shape)}")
            mean = x.mean(dims)  # (C,)
            var = x.var(dims, unbiased=False)  # (C,)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x = (x - _per_channel(mean, x)) / torch.sqrt(_per_channel(var, x) + self.eps)
        if self.weight is not None:
            x = x * _per_channel(self.weight, x) + _per_channel(self.bias, x)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}"


class LayerNorm(nn.Module):
    """Layer normalisation (Ba et al. 2016): each sample normalised over its trailing `normalized_shape` dims.

    Same in training and evaluation; the affine weight and bias have `normalized_shape`, as in torch.
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = nn.Parameter(torch.ones(shape)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(shape)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            x = x * self.weight + self.bias
        return x

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class InstanceNorm(nn.Module):
    """Instance normalisation (Ulyanov et al. 2016): each sample's channel over its spatial axes.

    Defaults match `torch.nn.InstanceNorm2d`: no affine, no running statistics, so evaluation also uses
    the instance's own statistics. With `track_running_stats=True` training updates running estimates with
    the batch-average of the per-instance mean and unbiased variance, and evaluation uses them.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"InstanceNorm needs (N, C, *spatial) input, got shape {tuple(x.shape)}")
        if self.track_running_stats and not self.training:
            mean, var = _per_channel(self.running_mean, x), _per_channel(self.running_var, x)
        else:
            dims = tuple(range(2, x.dim()))
            mean = x.mean(dims, keepdim=True)  # (N, C, 1, ..)
            var = x.var(dims, unbiased=False, keepdim=True)  # (N, C, 1, ..)
            if self.track_running_stats:
                n = math.prod(x.shape[2:])
                with torch.no_grad():
                    self.running_mean.lerp_(mean.flatten(2).mean((0, 2)), self.momentum)
                    self.running_var.lerp_((var * n / (n - 1)).flatten(2).mean((0, 2)), self.momentum)
        x = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            x = x * _per_channel(self.weight, x) + _per_channel(self.bias, x)
        return x

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}, "
                f"track_running_stats={self.track_running_stats}")


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018): channels split into groups, each normalised per sample.

    One group is layer norm over `(C, *spatial)`; `num_channels` groups is instance norm. The affine
    weight and bias are per channel, as in torch. Independent of batch size, same in train and eval.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.reshape(x.shape[0], self.num_groups, -1)  # (N, G, C/G * spatial)
        mean = g.mean(-1, keepdim=True)
        var = g.var(-1, unbiased=False, keepdim=True)
        x = ((g - mean) / torch.sqrt(var + self.eps)).view_as(x)
        if self.weight is not None:
            x = x * _per_channel(self.weight, x) + _per_channel(self.bias, x)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


class RunningBatchNorm(nn.Module):
    """Batch norm that normalises with running statistics in training too (fast.ai 2019 part 2, lesson 10).

    It keeps exponentially weighted sums of x and x² and a weighted count of the values summed, so
    mean = sums / count and var = sqrs / count - mean². Because the sums and the count both start at
    zero and decay alike, dividing by the count removes the start-up bias (the debiasing) without a
    separate factor. Statistics pool many batches, so batch size 2 or even 1 works, and evaluation
    computes exactly what training computes, with nothing to jump when the mode changes.

    A batch of `bs` samples gets the weight `1 - (1 - momentum) / sqrt(bs - 1)` (lesson 10's rule): a big
    batch's own statistics dominate, as in BatchNorm (0.94 at 256 with momentum 0.1), while tiny batches
    are averaged over several steps (0.1 at batch size 2). The current batch's share keeps its gradient.
    For the first `warmup_batches` batches the variance is floored at `min_var`, because a few tiny batches
    can give an estimate near zero that would blow activations up.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 warmup_batches: int = 20, min_var: float = 0.01) -> None:
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.warmup_batches, self.min_var = warmup_batches, min_var
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("sums", torch.zeros(num_features))
        self.register_buffer("sqrs", torch.zeros(num_features))
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    def _folded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running sums, sums of squares and count with this batch folded in. The history is a buffer
        (no gradient), but this batch's share keeps its gradient, as in the lesson: the layer still
        learns, like BatchNorm, that shifting or scaling its input changes the statistics it divides by."""
        dims = _batch_dims(x)
        w = 1 - (1 - self.momentum) / math.sqrt(max(x.shape[0] - 1, 1))  # this batch's weight
        sums = torch.lerp(self.sums, x.sum(dims), w)
        sqrs = torch.lerp(self.sqrs, (x * x).sum(dims), w)
        count = torch.lerp(self.count, self.count.new_tensor(x.numel() / x.shape[1]), w)
        return sums, sqrs, count

    @torch.no_grad()
    def update_stats(self, x: torch.Tensor) -> None:
        """Fold one batch into the running sums (what a training forward pass does)."""
        self._store(*self._folded(x))

    @torch.no_grad()
    def _store(self, sums: torch.Tensor, sqrs: torch.Tensor, count: torch.Tensor) -> None:
        self.sums.copy_(sums)
        self.sqrs.copy_(sqrs)
        self.count.copy_(count)
        self.batches += 1

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current mean and variance per channel, shape `(C,)` each."""
        return self._mean_var(self.sums, self.sqrs, self.count)

    def _mean_var(self, sums: torch.Tensor, sqrs: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0 and count is self.count:  # never trained: behave like an identity normalisation
            return torch.zeros_like(sums), torch.ones_like(sqrs)
        mean = sums / count
        var = (sqrs / count - mean * mean).clamp_min(0.0)
        if self.batches < self.warmup_batches:
            var = var.clamp_min(self.min_var)
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            sums, sqrs, count = self._folded(x)
            mean, var = self._mean_var(sums, sqrs, count)
            self._store(sums, sqrs, count)
        else:
            mean, var = self.stats()
        x = (x - _per_channel(mean, x)) / torch.sqrt(_per_channel(var, x) + self.eps)
        return x * _per_channel(self.weight, x) + _per_channel(self.bias, x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"


def group_count(num_channels: int, max_groups: int = 32) -> int:
    """Groups for `make_norm("group")`: the largest divisor of C that is ≤ min(32, C // 2).

    32 groups is Wu & He's default; capping at C // 2 keeps at least two channels per group so that a
    narrow layer does not silently become instance norm.
    """
    cap = max(1, min(max_groups, num_channels // 2))
    return max(g for g in range(1, cap + 1) if num_channels % g == 0)


def make_norm(kind: str, num_channels: int, ndim: int = 2) -> nn.Module | None:
    """The normalisation layer named `kind` for `(N, C, *spatial)` features with `ndim` spatial axes.

    `ndim` is 2 for `(N, C, H, W)` conv maps, 1 for `(N, C, L)`, 0 for `(N, C)` linear features.
    `"layer"` is GroupNorm with one group: layer norm over `(C, *spatial)` with a per-channel affine,
    so it needs no spatial size up front (torch's LayerNorm([C, H, W]) would). `"none"` gives None.
    """
    if kind not in NORM_KINDS:
        raise ConfigError(f"unknown norm kind {kind!r}; choose one of {', '.join(NORM_KINDS)}")
    if kind == "none":
        return None
    if kind == "batch":
        return BatchNorm(num_channels)
    if kind == "layer":
        return GroupNorm(1, num_channels)
    if kind == "instance":
        if ndim < 1:
            raise ConfigError("norm kind 'instance' needs spatial axes (ndim >= 1); use 'layer' or 'batch'")
        return InstanceNorm(num_channels)
    if kind == "group":
        return GroupNorm(group_count(num_channels), num_channels)
    return RunningBatchNorm(num_channels)
