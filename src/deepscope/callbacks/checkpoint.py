"""Keep the best weights and stop when the monitored metric stops improving."""
from __future__ import annotations

import math
from pathlib import Path

from ..callback import Callback, CancelFitException
from ..errors import ConfigError, check_number
from ..weights import load_weights, save_weights
from .metrics import MetricsCallback


class _Monitor(Callback):
    """Reads one value of the MetricsCallback's epoch record (`valid_loss`, `valid_f1`, ...) after each epoch.

    `mode` says which way is better: "min", "max", or None to infer it where a type says so: a loss is
    minimised, and a torchmetrics metric given to the MetricsCallback has `higher_is_better`; anything
    else is a ConfigError asking for `mode`. The direction in force is printed once at before_fit and kept
    in `direction`. Each fit starts afresh: `best` is this fit's (epoch numbers restart with every fit).
    """

    order = 40  # after MetricsCallback (10) has written the epoch's record
    in_lr_sweep = False  # a sweep has no epoch records, and must not save, restore or stop anything

    def __init__(self, monitor: str = "valid_loss", mode: str | None = None, min_delta: float = 0.0):
        if mode not in (None, "min", "max"):
            raise ConfigError(f"mode must be 'min', 'max' or None (inferred), got {mode!r}")
        check_number(type(self).__name__, "min_delta", min_delta, inclusive=True)
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.direction: str | None = mode
        self.best = math.nan

    def before_fit(self, learn) -> None:
        metrics = learn.get_cb(MetricsCallback)
        if metrics is None:
            raise ConfigError(f"{self.name} reads {self.monitor!r} from a MetricsCallback; add one to the learner")
        inferred, why = metrics.direction(self.monitor)
        if self.mode is None and inferred is None:
            raise ConfigError(f"{self.name}: {why}; say which way {self.monitor} should go with mode='max' or "
                              f"mode='min'")
        if self.mode is not None:
            opposite = inferred is not None and inferred != self.mode
            why = f"mode={self.mode!r} as given" + (f"; note: {why} says the opposite" if opposite else "")
        self.direction = self.mode or inferred
        better = "higher" if self.direction == "max" else "lower"
        print(f"{self.name}: monitoring {self.monitor}, {better} is better ({why})")
        self.best = -math.inf if self.direction == "max" else math.inf

    def improved(self, value: float) -> bool:
        if self.direction == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def current(self, learn) -> float:
        value = learn.get_cb(MetricsCallback).history[-1].get(self.monitor)
        if value is None:
            raise ConfigError(f"{self.name}: {self.monitor} was not measured in epoch {learn.epoch + 1}; did its pass "
                              f"run (fit(valid=False) skips validation)?")
        return value


class SaveBest(_Monitor):
    """Save the weights to `path` whenever the monitored value improves.

    With `load_best`, the best weights of the fit are put back when it ends normally *or* is cancelled
    (EarlyStopping's stop, SingleBatch): this happens in `cleanup_fit`, which a cancel does not skip. When
    an error ends the fit (KeyboardInterrupt too), the model keeps the weights it had then, so the failure
    can be inspected, and no file is read while the error propagates; `restore(learn)` loads the best
    ones afterwards. Each fit starts afresh: `best` and `best_epoch` (0-based) are this fit's.
    """

    def __init__(self, path: str | Path, monitor: str = "valid_loss", mode: str | None = None,
                 min_delta: float = 0.0, load_best: bool = True):
        super().__init__(monitor, mode, min_delta)
        self.path, self.load_best = Path(path), load_best
        self.best_epoch: int | None = None

    def before_fit(self, learn) -> None:
        self.best_epoch = None  # first: if the rest fails, an earlier fit's file must not be restored
        super().before_fit(learn)

    def after_epoch(self, learn) -> None:
        value = self.current(learn)
        if self.improved(value):
            self.best, self.best_epoch = value, learn.epoch
            save_weights(learn.model, self.path)

    def cleanup_fit(self, learn) -> None:
        if self.load_best and learn.error is None:
            self.restore(learn)

    def restore(self, learn) -> bool:
        """Load the best weights of the latest fit into the model; False when none were saved."""
        if self.best_epoch is None:
            return False
        load_weights(learn.model, self.path)
        return True


class EarlyStopping(_Monitor):
    """Stop the fit after `patience` epochs without improvement of the monitored value.

    It runs last at after_epoch (order 100), so every other callback (SaveBest, TensorBoard, ...) has seen
    the epoch before the stop skips the rest of the fit. Each fit starts afresh (`best`, `wait`).
    """

    order = 100

    def __init__(self, monitor: str = "valid_loss", mode: str | None = None, min_delta: float = 0.0, patience: int = 3):
        super().__init__(monitor, mode, min_delta)
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ConfigError(f"EarlyStopping: patience must be a positive number of epochs, got {patience!r}")
        self.patience, self.wait = patience, 0
        self.stopped_epoch: int | None = None

    def before_fit(self, learn) -> None:
        self.wait, self.stopped_epoch = 0, None
        super().before_fit(learn)

    def after_epoch(self, learn) -> None:
        value = self.current(learn)
        if self.improved(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = learn.epoch
            raise CancelFitException()
