"""Keep the best weights and stop when the monitored metric stops improving."""
from __future__ import annotations

import math
from pathlib import Path

from ..callback import Callback, CancelFitException
from ..weights import load_weights, save_weights
from .metrics import MetricsCallback


def _improved(value: float, best: float, mode: str, min_delta: float) -> bool:
    return value < best - min_delta if mode == "min" else value > best + min_delta


class _Monitor(Callback):
    """Reads one metric (e.g. `valid_loss`, `valid_accuracy`) from the MetricsCallback after each epoch."""

    order = 40  # after MetricsCallback (10) has written the epoch's record

    def __init__(self, monitor: str = "valid_loss", mode: str | None = None, min_delta: float = 0.0):
        self.monitor, self.min_delta = monitor, min_delta
        self.mode = mode or ("max" if "acc" in monitor else "min")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.best = math.inf if self.mode == "min" else -math.inf

    def current(self, learn) -> float:
        metrics = learn.get_cb(MetricsCallback)
        if metrics is None or not metrics.history:
            raise RuntimeError(f"{self.name} needs a MetricsCallback to read {self.monitor!r} from")
        record = metrics.history[-1]
        if record.get(self.monitor) is None:
            raise KeyError(f"{self.name}: no {self.monitor!r} in the epoch record; available: {sorted(record)}")
        return record[self.monitor]


class SaveBest(_Monitor):
    """Save the weights whenever the monitored metric improves; `load_best` at the end puts them back."""

    def __init__(self, path: str | Path, monitor: str = "valid_loss", mode: str | None = None,
                 min_delta: float = 0.0, load_best: bool = True):
        super().__init__(monitor, mode, min_delta)
        self.path, self.load_best = Path(path), load_best
        self.best_epoch: int | None = None

    def after_epoch(self, learn) -> None:
        value = self.current(learn)
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch = value, learn.epoch
            save_weights(learn.model, self.path)

    def after_fit(self, learn) -> None:
        if self.load_best and self.best_epoch is not None:
            load_weights(learn.model, self.path)


class EarlyStopping(_Monitor):
    """Stop the fit after `patience` epochs without improvement of the monitored metric."""

    def __init__(self, monitor: str = "valid_loss", mode: str | None = None, min_delta: float = 0.0, patience: int = 3):
        super().__init__(monitor, mode, min_delta)
        self.patience, self.wait = patience, 0
        self.stopped_epoch: int | None = None

    def before_fit(self, learn) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf
        self.wait, self.stopped_epoch = 0, None

    def after_epoch(self, learn) -> None:
        value = self.current(learn)
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = learn.epoch
            raise CancelFitException()
