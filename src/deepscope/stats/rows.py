"""A preallocated block of statistics rows on the device, filled during steps and read back in one go.

One row per recorded step, laid out as one (R, W) tensor so starting a row is a single fill and reading
the block back is a single copy (the only host synchronisation, once per `flush_every` recorded steps).
"""
from __future__ import annotations

import numpy as np
import torch

from .collect import TENSOR_COLUMNS
from .params import PARAM_COLUMNS

ACT_FIELDS = ("act_mean", "act_std", "act_min", "act_max", "act_dead", "act_nonfinite", "act_hist")
GRAD_FIELDS = ("grad_mean", "grad_std", "grad_norm", "grad_nonfinite")
PARAM_FIELDS = ("weight_norm", "param_grad_norm", "update_ratio")
_SUM, _NORM, _MIN, _MAX, _DEAD, _NONFINITE = range(len(TENSOR_COLUMNS))


def moments(total: np.ndarray, norm: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased std from a sum and an L2 norm over n values (NaN where n = 0).
    In float64 here; the device sums are float32, so the std loses precision when |mean| >> std."""
    total, sq = total.astype(np.float64), norm.astype(np.float64) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.where(n > 0, n, np.nan)
        mean = total / n
        var = (sq - total * mean) / np.where(n > 1, n - 1, np.nan)
    return mean, np.sqrt(np.maximum(var, 0.0))


class DeviceRows:
    """`capacity` rows for M watched modules, B histogram bins and P parameter-owning modules.

    Views into the one buffer: `tensors` (R, 2M, 6): TENSOR_COLUMNS of each module's output (rows 0..M-1)
    and of the gradient of that output (rows M..2M-1); `hist` (R, M, B+1: non-finite count, then the
    bins); `param` (R, P, 3) of PARAM_COLUMNS. On the host, per row and watched tensor: `numel`, the
    values summarised (0: the module did not run), and `norm_scale`, what turns a sample's norm into an
    estimate of the whole tensor's. With a `sample_size` (sample.py), a tensor summarised from fewer
    values had zeros in the rest of its slot: they counted as dead and in the first bin, and `read`
    subtracts them.
    """

    def __init__(self, capacity: int, n_modules: int, n_bins: int, n_params: int, device: torch.device, *,
                 sample_size: int | None = None, zero_off=None):
        M, B, P = n_modules, n_bins, n_params
        self.n_modules, self.sample_size = M, sample_size
        # per module, whether a padding zero counts as off by its rule (dead.OffRule.zero_is_off)
        self.zero_off = np.ones(M) if zero_off is None else np.asarray(zero_off, dtype=np.float64)
        sizes = [2 * M * len(TENSOR_COLUMNS), M * (B + 1), P * len(PARAM_COLUMNS)]
        self.buffer = torch.full((capacity, sum(sizes)), float("nan"), device=device)  # (R, W)
        self._ends = np.cumsum([0, *sizes])
        self._shapes = [(2 * M, len(TENSOR_COLUMNS)), (M, B + 1), (P, len(PARAM_COLUMNS))]
        self.tensors, self.hist, self.param = self._split(self.buffer)
        self.numel = np.zeros((capacity, 2 * M))
        self.norm_scale = np.ones((capacity, 2 * M))
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.n = 0
        self._combined = False  # the filled rows were combined across ranks (combine_across_ranks)

    def _split(self, rows):
        """The three views (tensors, hist, param) of a (R, W) tensor or array."""
        e = self._ends
        return [rows[:, e[k]:e[k + 1]].reshape(len(rows), *shape) for k, shape in enumerate(self._shapes)]

    @property
    def full(self) -> bool:
        return self.n == len(self.steps)

    def start_row(self, step: int) -> int:
        """The index of the next row, which holds NaN ("not measured") until written."""
        r = self.n
        self.numel[r] = 0
        self.norm_scale[r] = 1
        self.steps[r] = step
        return r

    def finish_row(self) -> None:
        self.n += 1

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The filled rows as they are (raw sums, not yet combined or read: buffer, numel, norm_scale, steps)
        on the host, and the block emptied: for rows kept aside until every rank can combine them."""
        n = self.n
        raw = (self.buffer[:n].cpu().numpy().copy(), self.numel[:n].copy(), self.norm_scale[:n].copy(),
               self.steps[:n].copy())
        self.buffer[:n].fill_(float("nan"))
        self.n, self._combined = 0, False
        return raw

    def put(self, buffer: np.ndarray, numel: np.ndarray, norm_scale: np.ndarray, steps: np.ndarray) -> None:
        """Fill the (empty) block with rows `take` returned (at most `capacity` of them)."""
        n = len(steps)
        self.buffer[:n].copy_(torch.from_numpy(np.ascontiguousarray(buffer)))
        self.numel[:n], self.norm_scale[:n], self.steps[:n] = numel, norm_scale, steps
        self.n, self._combined = n, False

    def combine_across_ranks(self, world_size: int) -> None:
        """Under DistributedDataParallel: make the filled rows describe the whole global batch of each step,
        on every rank. Sums, dead and non-finite counts, histogram bins and the values counted add; squared
        norms add; min and max are reduced; a sample's norm is first scaled to its tensor's. Each rank's
        output gradients come from the mean loss over its 1/world_size of the batch, so they are
        world_size times those of the whole batch's mean loss: their sums and norms are divided by it.
        Parameter rows are left alone (the weights, and the averaged gradients, are the same on every
        rank). Every rank must call it with the same rows filled. A collective; see deepscope.distributed."""
        from .. import distributed

        n, M = self.n, self.n_modules
        if not n:
            return
        t, hist = self.tensors[:n], self.hist[:n]
        count = torch.as_tensor(self.numel[:n], dtype=t.dtype, device=t.device)  # (n, 2M)
        ran = count > 0
        if self.sample_size:  # a slot's padding zeros (see read) come out here, before counts are added
            padding = torch.where(ran, self.sample_size - count, torch.zeros_like(count))
            hist[..., 1] -= padding[:, :M]
            zero_off = torch.as_tensor(self.zero_off, dtype=t.dtype, device=t.device)
            t[:, :M, _DEAD] -= padding[:, :M] * zero_off
        self._combined = True  # read() has no padding left to take out
        t[..., _NORM] *= torch.as_tensor(self.norm_scale[:n], dtype=t.dtype, device=t.device)
        self.norm_scale[:n] = 1
        mask = ran[..., None]
        additive = torch.stack([t[..., _SUM], t[..., _NORM].square(), t[..., _DEAD], t[..., _NONFINITE]], -1)
        additive = torch.where(mask, additive, torch.zeros_like(additive))
        hist_sum = torch.where(ran[:, :M, None], hist, torch.zeros_like(hist))
        low = torch.where(ran, t[..., _MIN], torch.full_like(count, float("inf")))
        high = torch.where(ran, t[..., _MAX], torch.full_like(count, float("-inf")))
        packed = torch.cat([additive.flatten(), hist_sum.flatten(), count.flatten()])
        distributed.all_reduce_(packed, "sum")
        distributed.all_reduce_(low, "min")
        distributed.all_reduce_(high, "max")
        k = additive.numel()
        additive = packed[:k].view_as(additive)
        hist.copy_(packed[k:k + hist_sum.numel()].view_as(hist))
        count = packed[k + hist_sum.numel():].view_as(count)
        t[..., _SUM], t[..., _NORM] = additive[..., 0], additive[..., 1].sqrt()
        t[..., _DEAD], t[..., _NONFINITE] = additive[..., 2], additive[..., 3]
        t[..., _MIN], t[..., _MAX] = low, high
        t[:, M:, _SUM] /= world_size
        t[:, M:, _NORM] /= world_size
        self.numel[:n] = count.cpu().numpy()

    def read(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Copy the filled rows to the host, as `steps` and the saved fields, and empty the block."""
        n, M = self.n, self.n_modules
        block = self.buffer[:n].cpu().numpy().astype(np.float64)  # the one sync per block
        self.buffer[:n].fill_(float("nan"))          # after the copy, so the rows start empty again
        tensors, hist, param = self._split(block)
        count = self.numel[:n]
        padded = self.sample_size and not self._combined
        padding = np.where(count > 0, self.sample_size - count, 0) if padded else np.zeros_like(count)
        self._combined = False
        tensors = np.where((count == 0)[..., None], np.nan, tensors)  # a module that did not run: no statistics
        mean, std = moments(tensors[..., _SUM], tensors[..., _NORM], count)
        hist[..., 1] -= padding[:, :M]               # a slot's zeros beyond the values: first bin, dead
        hist = np.where((count[:, :M] == 0)[..., None], np.nan, hist)
        act, grad = slice(0, M), slice(M, 2 * M)
        with np.errstate(invalid="ignore", divide="ignore"):
            dead = (tensors[:, act, _DEAD] - padding[:, act] * self.zero_off) / count[:, act]
        fields = {
            "act_mean": mean[:, act], "act_std": std[:, act], "act_min": tensors[:, act, _MIN],
            "act_max": tensors[:, act, _MAX], "act_dead": dead,
            "act_nonfinite": tensors[:, act, _NONFINITE], "act_hist": hist[..., 1:],
            "grad_mean": mean[:, grad], "grad_std": std[:, grad],
            "grad_norm": tensors[:, grad, _NORM] * self.norm_scale[:n, grad],
            "grad_nonfinite": tensors[:, grad, _NONFINITE],
            "weight_norm": param[..., 0], "param_grad_norm": param[..., 1], "update_ratio": param[..., 2],
        }
        fields = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in fields.items()}
        steps = self.steps[:n].copy()
        self.n = 0
        return steps, fields
