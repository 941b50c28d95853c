"""On-device reductions of one step's tensors, written into preallocated rows (no host synchronisation).

Every function here only queues tensor ops: nothing reads a value back to the host, so on a GPU the
statistics cost kernel time, never a stall of the training loop. On the CPU, where there is no stall to
avoid, the cost is memory passes, so each statistic uses the cheapest reduction that is exact enough
(a shifted sum and dot product for mean/std, one bincount for the histogram and non-finite count).
"""
from __future__ import annotations

import torch

# Columns of the raw rows, per module. Only sums are taken on the device; mean, std and the dead fraction
# are derived on the host when a block is read (rows.DeviceRows.read), where numel() is known for free:
# that keeps each module to a handful of kernel launches, which is what costs on the CPU.
ACT_COLUMNS = ("sum", "norm", "min", "max", "dead")   # norm: L2 norm, the root of the sum of squares
GRAD_COLUMNS = ("sum", "sample_norm", "norm", "nonfinite")  # sample_norm: of the values summed
# The activation histogram row holds the non-finite count first, then the B bins.


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in memory order, so channels_last activations are not copied."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else t.reshape(-1)


def gather_values(tensors: list[torch.Tensor], subsample: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """All the floating values of a module's output(s) as one detached 1-D tensor, optionally a random
    subsample of `subsample` of them (drawn with replacement, on the tensors' device)."""
    parts = [flat(t.detach()) for t in tensors]
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    if subsample is not None and x.numel() > subsample:
        idx = torch.randint(x.numel(), (subsample,), device=x.device, generator=generator)
        x = x[idx]
    return x


def abs_histogram(a: torch.Tensor, hist_range: tuple[float, float], bins: int) -> torch.Tensor:
    """(bins + 1,) counts: the non-finite values of `a` (>= 0), then a histogram of the others over
    `hist_range`, values beyond it clamped into the end bins. Overwrites `a`.

    On the CPU one integer bincount does both (torch.histc is ~8x slower there): each value becomes its bin
    number plus one, NaN/inf become 0. On CUDA, bincount reads its maximum back to the host to size its
    output, so the histogram is torch.histc there and non-finite values are counted apart (x - x is NaN
    exactly for them)."""
    low, high = hist_range
    if a.is_cuda:
        nonfinite = torch.count_nonzero(a - a).float()
        hist = torch.histc(a.clamp(low, high), bins=bins, min=low, max=high)  # histc ignores NaN
        return torch.cat([nonfinite.view(1), hist])
    scale = bins / (high - low)
    if low > 0:
        a.clamp_(min=low)
    a.mul_(scale).add_(1.0 - low * scale)            # (N,) bin number + 1, fractional
    torch.nan_to_num_(a, nan=0.0, posinf=0.0)        # non-finite -> 0, out of the bins
    return torch.bincount(a.clamp_(max=bins + 0.5).int(), minlength=bins + 1)  # (bins + 1,)


def activation_stats(x: torch.Tensor, dead_threshold: float, hist_range: tuple[float, float],
                     out: torch.Tensor, hist_out: torch.Tensor) -> None:
    """Write ACT_COLUMNS of the 1-D `x` into `out` (5,) (dead: count of |x| <= dead_threshold), and the
    non-finite count and histogram of |x| over `hist_range` (see abs_histogram) into `hist_out` (B+1,)."""
    x = x.float()                                    # (N,) half-precision outputs are reduced in float32
    lo, hi = torch.aminmax(x)
    torch.stack([x.sum(), torch.linalg.vector_norm(x), lo, hi], out=out[:4])
    a = x.abs()                                      # (N,) a new tensor, free to overwrite
    out[4].copy_(torch.count_nonzero(a <= dead_threshold))
    hist_out.copy_(abs_histogram(a, hist_range, hist_out.numel() - 1))


def gradient_stats(g: torch.Tensor, sample: torch.Tensor, out: torch.Tensor) -> None:
    """Write GRAD_COLUMNS into `out` (4,): sum, L2 norm and non-finite count of `sample` (the 1-D output
    gradient `g` itself, or a subsample of it), and the L2 norm of all of `g`, which is never subsampled
    because gradient norms are compared across layers and steps."""
    sample = sample.float()                          # (n,)
    sample_norm = torch.linalg.vector_norm(sample)
    norm = sample_norm if sample is g else torch.linalg.vector_norm(g.float())
    torch.stack([sample.sum(), sample_norm, norm], out=out[:3])
    out[3].copy_(torch.count_nonzero(sample - sample))  # x - x is NaN exactly where x is NaN or inf


def group_norms(tensors: list[torch.Tensor], group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """L2 norm of each group of tensors, (n_groups,): e.g. all the parameters of one module together.
    `group[i]` is the group of `tensors[i]`. One fused norm over the list, whatever its length."""
    norms = torch._foreach_norm(tensors)             # the fused kernel torch's clip_grad_norm_ uses
    squares = torch.stack(norms).float().square()    # (n_tensors,)
    return torch.zeros(n_groups, device=squares.device).index_add_(0, group, squares).sqrt_()
