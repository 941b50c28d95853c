"""Keep the best weights, stop when the monitored metric stops improving, and write checkpoints to resume from."""
from __future__ import annotations

import math
from pathlib import Path

from .. import distributed
from ..callback import Callback, CancelFitException
from ..checkpoint import BEST, checksum_path, encode, step_name, sweep_temporary, write_bytes
from ..errors import ConfigError, agree_stop, check_number, request_stop, stop_requested, stops_at_boundaries
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
    announce = True  # print the direction in force at before_fit

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
        if self.announce:
            print(f"{self.name}: monitoring {self.monitor}, {better} is better ({why})")
        self.best = -math.inf if self.direction == "max" else math.inf

    def improved(self, value: float) -> bool:
        if self.direction == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self) -> dict:
        return {"best": self.best, "direction": self.direction}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.direction = state["best"], state["direction"]

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

    def state_dict(self) -> dict:
        return {**super().state_dict(), "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.best_epoch = state["best_epoch"]

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

    def state_dict(self) -> dict:
        return {**super().state_dict(), "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.wait = state["wait"]

    def after_epoch(self, learn) -> None:
        value = self.current(learn)
        if self.improved(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = learn.epoch
            print(f"{self.name}: {self.monitor} has not improved for {self.wait} epoch(s) (best {self.best:.4g}); "
                  f"stopping after epoch {learn.epoch + 1} of {learn.n_epochs}")
            raise CancelFitException()


class Checkpoint(_Monitor):
    """Write checkpoints of the whole fit into `folder`, so that it can resume exactly where it stopped
    (`Learner.fit(..., resume_from=folder)`, `deepscope train --resume RUN_DIR`).

    When: after every `every` training steps (None: never mid-epoch), at the end of each epoch (unless
    `at_epoch_end` is False), and when a stop is asked for. While it is active, the first Ctrl-C or SIGTERM
    stops the fit at the next training-batch boundary (or the end of the epoch, when it arrives during
    validation) after writing a checkpoint there; a second one stops at once (errors.stops_at_boundaries).
    The last `keep_last` step checkpoints are kept (`step-<steps>.safetensors`); with `monitor` (a key of
    MetricsCallback's epoch record, as for SaveBest; None: no best), the end-of-epoch checkpoint of the best
    epoch is also kept as `best.safetensors`. A checkpoint is skipped at a batch whose gradients are kept for
    the next one (gradient accumulation): they are not part of the state.

    What a checkpoint holds is `Learner.state_dict`'s contract (model, optimizer, schedule position, every
    random stream, data order, callbacks' states: metrics, losses, statistics...); `extra` (a dict of
    JSON-able values, e.g. the run's config) is stored with it. Files are written atomically with a SHA-256
    beside them (deepscope.checkpoint). Temporary files left by a killed write are removed at before_fit.

    After the fit: `last` is the newest checkpoint written (None if none), `stopped_at` the checkpoint written
    for a stop (None if no stop), `best_path` the best one's path (None if none).
    """

    order = 99  # after MetricsCallback (10), schedules, monitors, TensorBoard (90): their states are this step's
    in_lr_sweep = False
    announce = False

    def __init__(self, folder: str | Path, every: int | None = None, keep_last: int = 2,
                 monitor: str | None = "valid_loss", mode: str | None = None, min_delta: float = 0.0,
                 at_epoch_end: bool = True, extra: dict | None = None, stop_at_boundaries: bool = True):
        super().__init__(monitor or "valid_loss", mode, min_delta)
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ConfigError(f"Checkpoint: every must be a positive number of training steps or None, got {every!r}")
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ConfigError(f"Checkpoint: keep_last must be a positive integer, got {keep_last!r}")
        self.folder, self.every, self.keep_last = Path(folder), every, keep_last
        self.monitoring = monitor is not None
        self.at_epoch_end, self.extra, self.stop_at_boundaries = at_epoch_end, dict(extra or {}), stop_at_boundaries
        self.kept: list[str] = []  # step checkpoints on disk, oldest first
        self.best_name: str | None = None
        self.last: Path | None = None
        self.stopped_at: Path | None = None
        self._stops = None

    @property
    def best_path(self) -> Path | None:
        return self.folder / BEST if self.best_name is not None else None

    def before_fit(self, learn) -> None:
        self.kept, self.best_name, self.last, self.stopped_at = [], None, None, None
        if self.monitoring:
            super().before_fit(learn)
        if distributed.is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            sweep_temporary(self.folder)
        if self.stop_at_boundaries:
            self._stops = stops_at_boundaries()
            self._stops.__enter__()

    def cleanup_batch(self, learn) -> None:
        if not learn.training or learn.error is not None or learn.lr_sweep:
            return
        done = learn.train_iter + 1
        due = self.every is not None and done % self.every == 0
        stop = self._agreed_stop()
        if (due or stop) and not learn.gradients_pending:
            self._write(learn, "batch", done)
            if stop:
                self.stopped_at = self.last

    def cleanup_epoch(self, learn) -> None:
        if learn.error is not None or learn.lr_sweep or learn.gradients_pending:
            return
        stop = self._agreed_stop()
        improved = False
        metrics = learn.get_cb(MetricsCallback)
        measured = metrics is not None and metrics.history and metrics.history[-1].get("epoch") == learn.epoch + 1
        if self.monitoring and measured:
            improved = self.improved(self.current(learn))
            if improved:
                self.best, self.best_name = self.current(learn), BEST
        if self.at_epoch_end or stop or improved:
            data = self._write(learn, "epoch", learn.train_iter)
            if improved and data:
                write_bytes(self.folder / BEST, data)
            if stop:
                self.stopped_at = self.last

    @staticmethod
    def _agreed_stop() -> bool:
        """Whether a stop was asked for; under DDP, on any rank (one small host-side collective per step, no GPU
        synchronisation), so that every rank stops, and takes its part of the checkpoint, at the same boundary."""
        asked = stop_requested()
        if not distributed.active():
            return asked is not None
        signum = distributed.any_rank(asked or 0)
        if signum:
            request_stop(signum)
            agree_stop()
        return bool(signum)

    def cleanup_fit(self, learn) -> None:
        if self._stops is not None:
            self._stops.__exit__(None, None, None)
            self._stops = None

    def _write(self, learn, at: str, steps: int) -> bytes:
        name = step_name(steps)
        if name not in self.kept:
            self.kept.append(name)
        old, self.kept = self.kept[:-self.keep_last], self.kept[-self.keep_last:]
        state = learn.state_dict(at, extra=self.extra)  # holds this callback's state, `kept` included
        self.last = self.folder / name
        if not distributed.is_main():  # under DDP every rank takes its part of the state; rank 0 writes it
            return b""
        data = encode(state)
        write_bytes(self.folder / name, data)
        for gone in old:
            for path in (self.folder / gone, checksum_path(self.folder / gone)):
                path.unlink(missing_ok=True)
        return data

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kept": list(self.kept), "best_name": self.best_name}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kept, self.best_name = list(state["kept"]), state["best_name"]
