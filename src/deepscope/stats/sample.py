"""A fixed-size sample of each watched module's values per step, summarised for all modules at once.

Why sample: exact statistics of every value cost more than a training step can spare on a CPU: the
exact mean, std, extremes, dead count, histogram and norm need several passes over each tensor, each a
launch per module, about 1.6x the default CNN's step (benchmarks/stats_overhead.py). Here each hook copies
at most `size` values into one (tensors, steps, size) buffer with a single strided copy, and a dozen
launches per block of steps then summarise every module together.

A tensor with at most `size` values is copied whole, so its statistics are exact. A larger one is
sampled systematically: runs of RUN neighbours in memory order, k values apart, from a random start, k
being the largest prime that fits `size` values into the tensor. A prime step cannot lock onto a channel
or row period (that would need the period to be a multiple of k), and the random start, drawn on the
host from a generator of its own, moves the lattice every step without a device op and without touching
torch's global random state, so training is the same with or without statistics. Below two values per
slot, where the runs cannot spread, positions are drawn at random instead. With 4096 values, a fraction
such as the dead fraction is within about a point.

Unused slots of a module's row (when it has fewer than `size` values) are read as zeros: they add
nothing to sums and norms, and the host subtracts them from the dead count and the first histogram bin
(`DeviceRows.read`), where the counts are known without a sync.
"""
from __future__ import annotations

import random
from functools import lru_cache

import torch

from .collect import flat, gather_values

# Values are copied in runs of RUN neighbours (32 bytes in float32): reading 4096 values one by one from
# a tensor bigger than the L2 cache costs 4096 cache-line fetches (~19 us on this 2-core CPU), in runs of
# 8 it costs 512 (~4 us). Neighbours (8 channels of one pixel in channels_last, 8 pixels of a row
# otherwise) are somewhat alike, which widens the sampling error a little; sample.py's tests bound it.
RUN = 8


@lru_cache(maxsize=256)
def largest_prime_at_most(n: int) -> int:
    """The largest prime <= n (n >= 2)."""
    for k in range(n, 1, -1):
        if all(k % d for d in range(2, int(k ** 0.5) + 1)):
            return k
    raise ValueError(f"no prime <= {n}")


def memory_order(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`(base, offset)` such that base.as_strided((n,), (1,), offset) lists t's values in memory order
    (which does not matter to a statistic): `t` itself for contiguous and channels_last layouts, with no
    launch at all, else collect.flat's 1-D view (or copy)."""
    if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
        t = flat(t)
    return t, t.storage_offset()


class SampleBlock:
    """Samples of N watched tensors over up to `steps` recorded steps, summarised all together.

    The first H tensors are activations (histogram, off count by `rules`, extremes); the others gradients (sum,
    norm and non-finite count only). `values` (N, K, S): values[i, k] holds S values of tensor i at
    the k-th pending step. Per step, `open()` it and `put()` each tensor; `summarise()` the pending steps
    when `full`, or whenever their rows are needed: K steps cost the same few launches as one.
    A tensor of at most S values is copied whole, the rest of its slot left at zero: zeros add nothing
    to sums and norms, the caller subtracts them from the dead count and first bin (`put` says how
    many), and the min and max of such a tensor are taken exactly when it is put.
    """

    def __init__(self, n_tensors: int, n_activations: int, size: int, device: torch.device, *,
                 rules: list, hist_range: tuple[float, float], bins: int, steps: int = 8, seed: int = 0):
        N, H, K, S = n_tensors, n_activations, steps, size
        self.size, self.steps, self.pending, self.n_activations = size, steps, 0, n_activations
        self.hist_range, self.bins = hist_range, bins
        # each activation's off rule (dead.OffRule, one per activation) as (H, 1, 1) tensors
        column = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device).view(H, 1, 1)
        self._center, self._sign = column([r.center for r in rules]), column([r.sign for r in rules])
        self._bound, self._absolute = column([r.bound for r in rules]), column([r.absolute for r in rules], torch.bool)
        self.values = torch.zeros(N, K, S, device=device)
        # views made once, so a hook costs two launches (as_strided, copy_)
        self._slots = [[self.values[i, k] for i in range(N)] for k in range(K)]
        self._runs = [[v.view(S // RUN, RUN) for v in slot] for slot in self._slots] if S % RUN == 0 else None
        self._filled = [[S] * N for _ in range(K)]  # values in each slot; the rest are zeros
        # min and max of the activations copied whole, per pending step, and which they are
        self._extremes = torch.zeros(2, K, H, device=device)
        self._whole: list[tuple[int, int]] = []
        # work buffers: a big CPU tensor freshly allocated costs page faults at every use
        self._abs = torch.empty(H, K, S, device=device)
        self._dead = torch.empty(H, K, S, dtype=torch.bool, device=device)
        self._diff = torch.empty(N - H, K, S, device=device)
        self._slot_index = torch.empty(H * K * S, dtype=torch.long, device=device)
        low, high = hist_range
        self._scale = bins / (high - low)
        shift = low * self._scale
        # where the counts of each (tensor, step) start in the flat histogram counts: added as integers after
        # the bin is found, so a value's bin does not depend on its slot (a float offset of thousands would
        # round values near a bin edge differently in different slots)
        self._hist_start = (torch.arange(H * K, device=device) * (bins + 1)).view(H, K, 1)
        self._bin_offset = 1.0 - shift  # bin numbers start at 1 (0 holds the non-finite count)
        self._hist_zeros = torch.zeros(H * K * (bins + 1), device=device)
        self._hist_ones = torch.ones(H * K * S, device=device)
        self._host_rng = random.Random(seed)
        self._lattices: dict[int, tuple[int, int] | None] = {}  # by tensor size: (prime step, start positions)
        self._generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def full(self) -> bool:
        return self.pending == self.steps

    def state_dict(self) -> dict:
        """The sampler's random streams and lattices, for a checkpoint (taken with no step pending)."""
        return {"host_rng": self._host_rng.getstate(), "generator": self._generator.get_state(),
                "lattices": dict(self._lattices)}

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import _as_python_state

        self._host_rng.setstate(_as_python_state(state["host_rng"]))
        self._generator.set_state(state["generator"].cpu())
        self._lattices = {int(k): tuple(v) if v is not None else None for k, v in state["lattices"].items()}

    def open(self) -> None:
        """Start the next step (the block must not be full)."""
        self.pending += 1

    def put(self, i: int, tensors: list[torch.Tensor]) -> tuple[int, int]:
        """Take tensor i's values at the open step; returns (values summarised, values it had). When the
        first is below `size`, the slot's other values are zeros."""
        k = self.pending - 1
        base, offset = memory_order(tensors[0].detach()) if len(tensors) == 1 else (gather_values(tensors), 0)
        n, size = base.numel(), self.size
        if n <= size:                                # copied whole
            slot, x = self._slots[k][i], base.as_strided((n,), (1,), offset)
            slot[:n].copy_(x)
            if self._filled[k][i] > n:
                slot[n:].zero_()
            self._filled[k][i] = n
            if i < self.n_activations:               # an activation: its zeros must not count as min or max
                if x.dtype == self._extremes.dtype:
                    torch.aminmax(x, out=(self._extremes[0, k, i], self._extremes[1, k, i]))
                else:  # a float16/bfloat16 output under autocast: aminmax writes only its own dtype
                    self._extremes[:, k, i].copy_(torch.stack(torch.aminmax(x)))
                self._whole.append((k, i))
            return n, n
        lattice = self._lattices.get(n)
        if lattice is None and n >= 2 * size and self._runs is not None:
            runs = size // RUN
            step = largest_prime_at_most(n // runs)   # >= RUN, so runs never overlap
            lattice = self._lattices[n] = (step, n - (runs - 1) * step - RUN + 1)  # (step, start positions)
        if lattice is not None:
            step, starts = lattice
            start = int(self._host_rng.random() * starts)
            self._runs[k][i].copy_(base.as_strided((size // RUN, RUN), (step, 1), offset + start))
        else:
            positions = torch.randint(n, (size,), device=base.device, generator=self._generator)  # (S,)
            self._slots[k][i].copy_(base.as_strided((n,), (1,), offset)[positions])
        self._filled[k][i] = size
        return size, n

    def drop_last(self) -> None:
        """Forget the open step (it was cut short)."""
        if self.pending:
            self.pending -= 1
            self._whole = [(k, i) for k, i in self._whole if k < self.pending]

    def drop_all(self) -> None:
        """Forget every pending step."""
        self.pending, self._whole = 0, []

    def summarise(self, out: torch.Tensor, hist_out: torch.Tensor) -> None:
        """Reduce the K' pending steps into `out` (K', N, 6) of collect.TENSOR_COLUMNS and `hist_out`
        (K', H, B+1), laid out as collect.abs_histogram does (non-finite count first); empty the block."""
        K, H = min(self.pending, len(out)), hist_out.shape[1]
        out, hist_out = out[:K], hist_out[:K]        # rows past the steps held stay "not measured" (NaN)
        x = self.values[:, :K]                       # (N, K', S)
        acts = x[:H]                                 # (H, K', S)
        a, dead = self._abs[:, :K], self._dead[:, :K]
        # off values by each module's rule (dead.py): v = sign * |x - center|, or x itself; off when v <= bound
        torch.sub(acts, self._center, out=a).abs_().mul_(self._sign)
        torch.where(self._absolute, a, acts, out=a)
        torch.le(a, self._bound, out=dead)
        torch.abs(acts, out=a)
        grads, diff = x[H:], self._diff[:, :K]       # x - x: 0, or NaN exactly where x is NaN or inf
        torch.nan_to_num_(torch.sub(grads, grads, out=diff), nan=1.0)
        dead_count = dead.view(torch.uint8).sum(-1, dtype=torch.int32).float()
        act_stats = torch.stack([acts.amin(-1), acts.amax(-1), dead_count], dim=-1)  # (H, K', 3)
        out[..., 0:2].copy_(torch.stack([x.sum(-1), torch.linalg.vector_norm(x, dim=-1)], dim=-1).transpose(0, 1))
        out[:, :H, 2:5].copy_(act_stats.transpose(0, 1))
        out[:, H:, 5].copy_(diff.sum(-1).transpose(0, 1))
        hist = self._histograms(a)                   # (H, K', B+1), the non-finite count first
        out[:, :H, 5].copy_(hist[..., 0].transpose(0, 1))
        hist_out.copy_(hist.transpose(0, 1))
        for k, i in self._whole:                     # activations copied whole: their exact extremes
            if k < K:
                out[k, i, 2:4].copy_(self._extremes[:, k, i])
        self._whole.clear()
        self.pending = 0

    def _histograms(self, a: torch.Tensor) -> torch.Tensor:
        """(H, K', B + 1) for the (H, K', S) |values| `a`: per slot the non-finite count, then the bins.
        Overwrites `a`. One bincount for all on the CPU; on CUDA, where bincount reads its size back to
        the host, one scatter."""
        H, K, S = a.shape
        bins, low = self.bins, self.hist_range[0]
        shift = low * self._scale
        if low > 0:
            a.clamp_(min=low)
        a.mul_(self._scale)                          # fractional bin number + shift
        marker = shift - 0.5                         # non-finite: half a bin below the first, slot 0
        torch.nan_to_num_(a, nan=marker, posinf=marker)
        a.clamp_(max=bins - 0.5 + shift).add_(self._bin_offset)  # the bin number, 0 for non-finite
        index = self._slot_index[:H * K * S]
        index.copy_(a.reshape(-1))                   # float -> long truncates: the bin
        index.view(H, K, S).add_(self._hist_start[:, :K])  # then the slot's place in the flat counts
        if a.is_cuda:
            counts = self._hist_zeros.clone().scatter_add_(0, index, self._hist_ones[:H * K * S])
        else:
            counts = torch.bincount(index, minlength=len(self._hist_zeros)).float()
        return counts.view(H, self.steps, bins + 1)[:, :K]   # counts laid out for a full block
