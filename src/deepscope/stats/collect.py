"""On-device reductions of one step's tensors, written into preallocated rows (no host synchronisation).

Every function here only queues tensor ops: nothing reads a value back to the host, so on a GPU the
statistics cost kernel time, never a stall of the training loop. These are the exact reductions, over
every value of a tensor (`ActivationStats(subsample=None)`); `sample.py` summarises fixed-size samples of
all modules at once, which is what the default uses.
"""
from __future__ import annotations

from functools import lru_cache

import torch

# Columns of the raw row of every watched tensor (a module's output, or the gradient of that output).
# Only sums are taken on the device; mean, std and the dead fraction are derived on the host when a block
# is read (rows.DeviceRows.read), where the number of values is known for free.
TENSOR_COLUMNS = ("sum", "norm", "min", "max", "dead", "nonfinite")  # norm: L2, the root of the sum of squares
# The activation histogram row holds the non-finite count first, then the B bins.

# On the CPU, each pass over a big tensor costs about as much as the next, so the reductions here take as
# few as they can and avoid the slow ones (benchmarks/stats_overhead.py prints the time of each op):
# - a comparison written into bool is ~5x slower than one written straight into float32, and counting the
#   bools slower than summing floats, so counts are float sums of 0/1 (exact up to 2^24, the float32 row's
#   own precision);
# - bincount stalls whenever neighbouring values fall into the same bin (a ReLU's zeros): each increment
#   waits for the last. Counting into LANES interleaved copies of the bins, value k of every run of LANES
#   into copy k, and adding the copies up makes it ~40% faster on activations.
LANES = 4
_PERIOD = 1024  # the lane offsets are added to (n // _PERIOD, _PERIOD) views: a contiguous inner loop


@lru_cache(maxsize=16)
def _lane_offsets(bins: int, device: torch.device) -> torch.Tensor:
    """(_PERIOD,) int32: value k of each run of LANES counts into copy k of the bins + 1 counters."""
    return (torch.arange(_PERIOD, dtype=torch.int32, device=device) % LANES) * (bins + 1)


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in memory order, so channels_last activations are not copied; a
    dense 1-D copy of any other (expanded, sliced) tensor."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    permuted = t.permute(order)
    if permuted.is_contiguous():
        return permuted.view(-1)
    # an expanded tensor (stride 0: the gradient of x.sum() is one value broadcast) or another strided
    # view: reshape may keep stride 0, so make the values dense
    return t.reshape(-1).contiguous()


def gather_values(tensors: list[torch.Tensor]) -> torch.Tensor:
    """All the floating values of a module's output(s) as one detached 1-D tensor."""
    parts = [flat(t.detach()) for t in tensors]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def abs_histogram(a: torch.Tensor, hist_range: tuple[float, float], bins: int) -> torch.Tensor:
    """(bins + 1,) counts: the non-finite values of `a` (>= 0), then a histogram of the others over
    `hist_range`, values beyond it clamped into the end bins. Overwrites `a`.

    On the CPU one integer bincount does both (torch.histc is ~8x slower there): each value becomes its bin
    number plus one, NaN/inf become 0, counted in LANES interleaved copies (see above). On CUDA, bincount
    reads its maximum back to the host to size its output, so the histogram is torch.histc there and
    non-finite values are counted apart (x - x is NaN exactly for them)."""
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
    index = a.clamp_(max=bins + 0.5).int()           # (N,) truncates: the bin + 1
    whole = index.numel() - index.numel() % _PERIOD  # the few values past the last period stay in lane 0
    index[:whole].view(-1, _PERIOD).add_(_lane_offsets(bins, index.device))
    return torch.bincount(index, minlength=LANES * (bins + 1)).view(LANES, bins + 1).sum(0)  # (bins + 1,)


def activation_stats(x: torch.Tensor, rule, hist_range: tuple[float, float],
                     out: torch.Tensor, hist_out: torch.Tensor) -> None:
    """Write TENSOR_COLUMNS of the 1-D `x` into `out` (6,) (dead: count of the values off by `rule`, a
    dead.OffRule), and the non-finite count and histogram of |x| over `hist_range` (see abs_histogram)
    into `hist_out` (B+1,)."""
    x = x.float()                                    # (N,) half-precision outputs are reduced in float32
    lo, hi = torch.aminmax(x)
    a = x.abs()                                      # (N,) a new tensor, free to overwrite
    if not rule.absolute:
        v = x
    elif rule.center == 0.0 and rule.sign == 1.0:
        v = a
    else:
        v = (x - rule.center).abs_().mul_(rule.sign)
    dead = torch.le(v, rule.bound, out=torch.empty_like(a)).sum()  # a float sum of 0/1 (see above)
    hist_out.copy_(abs_histogram(a, hist_range, hist_out.numel() - 1))
    torch.stack([x.sum(), torch.linalg.vector_norm(x), lo, hi, dead, hist_out[0]], out=out)


def gradient_stats(g: torch.Tensor, out: torch.Tensor) -> None:
    """Write the sum, L2 norm and non-finite count of the 1-D gradient `g` into their TENSOR_COLUMNS of
    `out` (6,); min, max and dead are left as they are (not measured for gradients)."""
    g = g.float()                                    # (N,)
    nonfinite = torch.nan_to_num_(g - g, nan=1.0).sum()  # x - x is NaN exactly where x is NaN or inf, else 0
    out[:2].copy_(torch.stack([g.sum(), torch.linalg.vector_norm(g)]))
    out[5].copy_(nonfinite)
