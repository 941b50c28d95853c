"""Log a fit to TensorBoard: loss and lr every few steps, the epoch metrics, weight histograms and, when
an `ActivationStats` callback runs too, each layer's latest activation statistics.

tensorboard is an optional dependency (`pip install deepscope[tensorboard]`), imported only when a fit
starts, so importing deepscope never needs it.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from .callback import Callback
from .callbacks.metrics import MetricsCallback
from .errors import ConfigError
from .stats import ActivationStats


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"TensorBoard logging needs the tensorboard package ({e}); "
                          f"install it with: pip install deepscope[tensorboard]") from None
    return SummaryWriter


def latest_layer_stats(stats_cb) -> dict[str, dict[str, float]]:
    """{module: {"mean", "std", "dead"}} at the latest step an ActivationStats callback recorded (its
    `stats()` reads the device rows back once); empty when it has recorded nothing yet."""
    try:
        stats = stats_cb.stats()
    except (AttributeError, TypeError, RuntimeError):  # not an ActivationStats, or nothing recorded yet
        return {}
    if len(stats.steps) == 0:
        return {}
    return {name: {"mean": float(stats.act_mean[-1, i]), "std": float(stats.act_std[-1, i]),
                   "dead": float(stats.act_dead[-1, i])} for i, name in enumerate(stats.modules)}


class TensorBoardCallback(Callback):
    """Write scalars and histograms to `log_dir` with torch's SummaryWriter.

    Every `every` training steps: `train/loss` (read with `.item()` only then) and `train/lr`. Every epoch:
    `epoch/<key>` for each value of the MetricsCallback record, `weights/<parameter>` histograms (when
    `histograms`), and `activations/<module>/{mean,std,dead}` from `stats` (an ActivationStats callback;
    found among the learner's callbacks when not given). The writer is closed in `cleanup_fit`. It sits
    out the LR finder's sweep, so the log holds the fit's steps only.
    """

    order = 90  # after MetricsCallback (10) has appended the epoch's record
    in_lr_sweep = False

    def __init__(self, log_dir: str | Path, *, stats: Callback | None = None, every: int = 50, histograms: bool = True):
        if every < 1:
            raise ConfigError(f"every must be a positive number of steps, got {every}")
        self.log_dir, self.stats, self.every, self.histograms = Path(log_dir), stats, every, histograms
        self.writer = None
        self.failed: Exception | None = None  # the error that stopped the logging, if one did

    def _stats_cb(self, learn):
        return self.stats if self.stats is not None else learn.get_cb(ActivationStats)

    def _give_up(self, error: Exception) -> None:
        """A log that cannot be written (full disk, permissions) must not cost the training: stop logging,
        keep the error in `failed` and say so once."""
        self.failed = error
        print(f"deepscope: warning: TensorBoard logging stopped ({type(error).__name__}: {error}); training goes on",
              file=sys.stderr)
        try:
            if self.writer is not None:
                self.writer.close()
        except Exception:  # noqa: BLE001 - closing a broken writer may fail the same way
            pass
        self.writer = None

    def before_fit(self, learn) -> None:
        writer_class = _summary_writer_class()  # a missing package is a ConfigError, not a silent skip
        self.failed = None
        try:
            self.writer = writer_class(log_dir=str(self.log_dir))
        except OSError as e:
            self._give_up(e)

    def after_batch(self, learn) -> None:
        self._write(self._log_batch, learn)

    def after_epoch(self, learn) -> None:
        self._write(self._log_epoch, learn)

    def _write(self, log, learn) -> None:
        if self.writer is None:
            return
        try:
            log(learn)
        except OSError as e:
            self._give_up(e)

    def _log_batch(self, learn) -> None:
        step = learn.train_iter  # index of this training batch in the fit (counted up after the batch)
        if learn.training and step % self.every == 0:
            self.writer.add_scalar("train/loss", learn.loss.item(), step)
            self.writer.add_scalar("train/lr", learn.lr, step)

    def _log_epoch(self, learn) -> None:
        epoch = learn.epoch + 1
        metrics = learn.get_cb(MetricsCallback)
        if metrics is not None and metrics.history:
            for key, value in metrics.history[-1].items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, epoch)
        if self.histograms:
            for name, p in learn.model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), epoch)
        stats_cb = self._stats_cb(learn)
        if stats_cb is not None:
            for module, values in latest_layer_stats(stats_cb).items():
                for key, value in values.items():
                    self.writer.add_scalar(f"activations/{module}/{key}", value, epoch)
        self.writer.flush()

    def cleanup_fit(self, learn) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                self._give_up(e)
            self.writer = None
