"""A preallocated block of statistics rows on the device, filled during steps and read back in one go.

One row per recorded step, laid out as one (R, W) tensor so starting a row is a single fill and reading
the block back is a single copy (the only host synchronisation, once per `flush_every` recorded steps).
"""
from __future__ import annotations

import numpy as np
import torch

from .collect import ACT_COLUMNS, GRAD_COLUMNS
from .params import PARAM_COLUMNS

ACT_FIELDS = ("act_mean", "act_std", "act_min", "act_max", "act_dead", "act_nonfinite", "act_hist")
GRAD_FIELDS = ("grad_mean", "grad_std", "grad_norm", "grad_nonfinite")
PARAM_FIELDS = ("weight_norm", "param_grad_norm", "update_ratio")


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

    Views into the one buffer: `act` (R, M, 5), `hist` (R, M, B+1: non-finite count, then the bins),
    `grad` (R, M, 4), `param` (R, P, 3); the columns are collect.ACT_COLUMNS, GRAD_COLUMNS, PARAM_COLUMNS.
    Element counts per module live on the host (`numel()` costs nothing there), to turn sums into means,
    standard deviations and fractions when the block is read.
    """

    def __init__(self, capacity: int, n_modules: int, n_bins: int, n_params: int, device: torch.device):
        M, B, P = n_modules, n_bins, n_params
        sizes = [M * len(ACT_COLUMNS), M * (B + 1), M * len(GRAD_COLUMNS), P * len(PARAM_COLUMNS)]
        self.buffer = torch.full((capacity, sum(sizes)), float("nan"), device=device)  # (R, W)
        self._ends = np.cumsum([0, *sizes])
        self._shapes = [(M, len(ACT_COLUMNS)), (M, B + 1), (M, len(GRAD_COLUMNS)), (P, len(PARAM_COLUMNS))]
        self.act, self.hist, self.grad, self.param = self._split(self.buffer)
        self.act_numel = np.zeros((capacity, M))
        self.grad_numel = np.zeros((capacity, M))
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.n = 0

    def _split(self, rows):
        """The four views (act, hist, grad, param) of a (R, W) tensor or array."""
        e = self._ends
        return [rows[:, e[k]:e[k + 1]].reshape(len(rows), *shape) for k, shape in enumerate(self._shapes)]

    @property
    def full(self) -> bool:
        return self.n == len(self.steps)

    def start_row(self, step: int) -> int:
        """Clear the next row to NaN ("not measured") and return its index."""
        r = self.n
        self.buffer[r].fill_(float("nan"))
        self.act_numel[r] = self.grad_numel[r] = 0
        self.steps[r] = step
        return r

    def finish_row(self) -> None:
        self.n += 1

    def read(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Copy the filled rows to the host, as `steps` and the saved fields, and empty the block."""
        n = self.n
        act, hist, grad, param = self._split(self.buffer[:n].cpu().numpy())  # the one sync per block
        act_mean, act_std = moments(act[..., 0], act[..., 1], self.act_numel[:n])
        grad_mean, grad_std = moments(grad[..., 0], grad[..., 1], self.grad_numel[:n])
        with np.errstate(invalid="ignore", divide="ignore"):
            fields = {
                "act_mean": act_mean, "act_std": act_std, "act_min": act[..., 2], "act_max": act[..., 3],
                "act_dead": act[..., 4] / self.act_numel[:n], "act_nonfinite": hist[..., 0], "act_hist": hist[..., 1:],
                "grad_mean": grad_mean, "grad_std": grad_std, "grad_norm": grad[..., 2], "grad_nonfinite": grad[..., 3],
                "weight_norm": param[..., 0], "param_grad_norm": param[..., 1], "update_ratio": param[..., 2],
            }
        fields = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in fields.items()}
        steps = self.steps[:n].copy()
        self.n = 0
        return steps, fields
