"""Log a fit to TensorBoard: loss and lr, every layer's recorded statistics as per-step scalars and
activation histograms, the epoch metrics, weight histograms, the diagnosis's findings as text and the
run's hyper-parameters for the HParams dashboard.

tensorboard is an optional dependency (`pip install deepscope[tensorboard]`), imported only when a fit
starts, so importing deepscope never needs it.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .callback import Callback
from .callbacks.metrics import MetricsCallback
from .errors import ConfigError
from .stats import ActivationStats

# Epoch metrics named as hyper-parameter metrics (the HParams dashboard's columns), when the run has them.
HPARAM_METRICS = ("valid_loss", "valid_accuracy")


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"TensorBoard logging needs the tensorboard package ({e}); "
                          f"install it with: pip install deepscope[tensorboard]") from None
    return SummaryWriter


def _read_stats(stats_cb):
    """The `Stats` an ActivationStats callback recorded so far (its `stats()` reads the device rows back
    once), or None when it is not one or has recorded nothing yet."""
    try:
        return stats_cb.stats()
    except (AttributeError, TypeError, RuntimeError):  # not an ActivationStats, or nothing recorded yet
        return None


def latest_layer_stats(stats_cb) -> dict[str, dict[str, float]]:
    """{module: {"mean", "std", "dead"}} at the latest step an ActivationStats callback recorded; empty
    when it has recorded nothing yet."""
    stats = _read_stats(stats_cb)
    if stats is None or len(stats.steps) == 0:
        return {}
    return {name: {"mean": float(stats.act_mean[-1, i]), "std": float(stats.act_std[-1, i]),
                   "dead": float(stats.act_dead[-1, i])} for i, name in enumerate(stats.modules)}


def hparam_value(value) -> bool | float | str:
    """A value the HParams plugin shows: bools and strings as they are, other numbers as floats (finite
    ones; NaN and infinities as text), anything else (None, lists, paths) as its `str`."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    return str(value)


def _tag_name(module: str) -> str:
    return module or "model"  # "" is the model itself


def findings_markdown(findings, summary: str | None = None) -> str:
    """Findings as markdown, one list item each in the order given (Diagnose's: causes first, each followed
    by the symptoms it explains, indented), then the analysis's summary line."""
    lines = []
    for f in findings:
        where = f"`{f.module}`" if f.module else "model/loss/data"
        if f.caused_by:
            lines.append(f"    - {f.severity.upper()} **{f.kind}** in {where} (caused by {f.caused_by}): {f.message}")
        else:
            fix = f" Fix: {f.fix}" if f.fix else ""
            lines.append(f"- **{f.severity.upper()}** **{f.kind}** in {where}: {f.message}{fix}")
    if not findings:
        lines.append("No findings: nothing looks wrong.")
    if summary:
        lines += ["", summary]
    return "\n".join(lines)


def _hparams_summaries(hparams: dict, metric_tags: list[str], start_time: float, success: bool) -> list:
    """The HParams plugin's three summaries (experiment, session start, session end) for one session:
    this run's folder. A metric's values are the run's scalars of that tag; no scalar is duplicated."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    infos, start = [], plugin_data_pb2.SessionStartInfo(start_time_secs=start_time)
    for key, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value, kind = value, "DATA_TYPE_BOOL"
        elif isinstance(value, float):
            start.hparams[key].number_value, kind = value, "DATA_TYPE_FLOAT64"
        else:
            start.hparams[key].string_value, kind = value, "DATA_TYPE_STRING"
        infos.append(api_pb2.HParamInfo(name=key, type=api_pb2.DataType.Value(kind)))
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metric_tags]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics, time_created_secs=start_time)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value("STATUS_SUCCESS" if success else "STATUS_FAILURE"),
                                         end_time_secs=time.time())
    parts = ((metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
             (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
             (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)))
    return [Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                         tensor=metadata.NULL_TENSOR)]) for tag, data in parts]


class TensorBoardCallback(Callback):
    """Write what deepscope records to `log_dir` with torch's SummaryWriter, as TensorBoard shows it.

    Steps are global: a second `fit` with the same callback continues where the first ended (the
    learner's `train_iter` restarts at 0 in each fit; `step_offset` holds the training steps of the
    earlier fits, `epoch_offset` their epochs), so nothing is written twice at one step. A new callback
    (a new process) on the same folder starts at 0 again. Each fit writes its own event file in `log_dir`
    (a fit continued within a second of the last one's start waits for the next second, so that the
    files' names sort in the order TensorBoard must read them).

    Every `every` training steps: `train/loss` (read with `.item()` only then) and `train/lr`.

    From `stats` (an ActivationStats callback; found among the learner's callbacks when not given), at
    each epoch end and at the end of the fit, for the steps recorded since the last write (at most one
    recorded step in each window of `every` steps, the first; every one with `ActivationStats(every=k)`,
    k >= `every`), at the step it was recorded:
      `layers/<module>/act_mean`, `act_std`, `off_fraction` (the fraction of values off by the module's
      rule, deepscope.dead) and `grad_norm` (of the module's output gradient) for each watched module;
      `layers/<module>/param_grad_norm` and `update_ratio` for each module owning parameters;
      `layers/<module>/nonfinite`: how many of that module's values at the step were NaN/inf and so left
      out (NaN also marks "not measured": a step the loss scaler skipped, an output without gradient),
      written only when not 0;
      `activations/<module>`: the histogram of |activation| in the recorder's bins (`hist_edges`; values
      beyond the range counted in the last bin; its sum and sum of squares estimated from bin centres).
    (The module "" - the model itself - is named `model`.) ActivationStats keeps its last `recent` rows
    exactly and merges older ones, so within a long epoch the rows are also read every `recent * its
    every / 2` training steps (one device read-back each), before any of them is merged.

    Every epoch: `epoch/<key>` for each value of the MetricsCallback record and (when `histograms`)
    `weights/<parameter>` histograms, at the global step the epoch ended on (the per-step tags' x axis), with
    `epoch/epoch` the epoch's number (1-based, continued by later fits).

    At the end of each fit: `diagnosis` text (one markdown line per finding of the learner's `Diagnose`,
    causes first, and its analysis's summary), and once per callback, when `hparams` is given, the HParams
    plugin's records for this folder: `hparams` values as they are when numbers, strings or bools, as text
    otherwise (see `hparam_value`), with the metrics `epoch/valid_loss` and `epoch/valid_accuracy` where the
    run logged them (the dashboard shows their last value: the last epoch's).

    `histograms=False` leaves out both kinds of histogram. The writer is closed in `cleanup_fit`. It sits
    out the LR finder's sweep, so the log holds the fit's steps only. A log that cannot be written stops
    the logging, not the training: the error is kept in `failed`.
    """

    order = 90  # after MetricsCallback (10) has appended the epoch's record, after Diagnose (30)
    in_lr_sweep = False

    def __init__(self, log_dir: str | Path, *, stats: Callback | None = None, every: int = 50, histograms: bool = True,
                 hparams: Mapping | None = None):
        if every < 1:
            raise ConfigError(f"every must be a positive number of steps, got {every}")
        if hparams is not None and not isinstance(hparams, Mapping):
            raise ConfigError(f"hparams must be a dict of names to values, got {type(hparams).__name__}")
        self.log_dir, self.stats, self.every, self.histograms = Path(log_dir), stats, every, histograms
        self.hparams = None if hparams is None else {str(k): hparam_value(v) for k, v in hparams.items()}
        self.writer = None
        self.failed: Exception | None = None  # the error that stopped the logging, if one did
        self.step_offset = 0    # global step of this fit's train_iter 0: training steps of the earlier fits
        self.epoch_offset = 0   # epochs the earlier fits logged
        self._steps_done = self._epochs_done = 0
        self._written = -1      # last step of this fit (train_iter) whose layer statistics were read
        self._window = -1       # last window of `every` global steps with a layer row written
        self._read_at = 0       # train_iter of the last read of the statistics
        self._hparams_written = False
        self._opened_second: int | None = None  # when this callback last opened an event file
        self._learn = None  # the learner, from before_fit to cleanup_fit
        self._start_time = time.time()

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
        self.step_offset, self.epoch_offset = self._steps_done, self._epochs_done
        self._written, self._read_at = -1, 0
        if not self._hparams_written:
            self._start_time = time.time()
        if self._opened_second is not None and time.time() < self._opened_second + 1:
            # A new event file per fit, named by the second it opens: TensorBoard reads a folder's files in
            # name order, so a continued fit must not open its file within the second the last one opened.
            time.sleep(self._opened_second + 1.01 - time.time())
        # A resumed fit hides what the stopped process logged after its checkpoint (TensorBoard's purge_step:
        # events at or after that global step, in earlier files, are dropped), so no step appears twice.
        purge = self.step_offset + learn.resuming["train_iter"] if learn.resuming is not None else None
        self._learn = learn  # for state_dict, which is called without it
        try:
            self.writer = writer_class(log_dir=str(self.log_dir), purge_step=purge)
            self._opened_second = int(time.time())
        except OSError as e:
            self._give_up(e)

    _STATE = ("step_offset", "epoch_offset", "_steps_done", "_epochs_done", "_written", "_window", "_read_at",
              "_hparams_written", "_start_time")

    def state_dict(self) -> dict:
        """Where the log is (global step offsets, the last statistics written), for a checkpoint. The layer
        statistics recorded so far are written first, so that what a resumed fit logs starts at the
        checkpoint's step, the step it hides any later events from (purge_step)."""
        if self._learn is not None and self.writer is not None:
            self._write(self._log_layers, self._learn)
            self._write(lambda learn: self.writer.flush(), self._learn)
        return {name.lstrip("_"): getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            setattr(self, name, state[name.lstrip("_")])

    def after_batch(self, learn) -> None:
        self._write(self._log_batch, learn)

    def cleanup_batch(self, learn) -> None:
        # ActivationStats keeps `recent` rows exactly: read them before it merges them, even in a long epoch
        # (after its own cleanup_batch has closed the step's row; a read costs one device read-back).
        if learn.training and self.writer is not None:
            stats_cb = self._stats_cb(learn)
            recent, every = getattr(stats_cb, "recent", None), getattr(stats_cb, "every", None)
            if isinstance(recent, int) and isinstance(every, int) \
                    and learn.train_iter - self._read_at >= recent * every // 2:
                self._write(self._log_layers, learn)

    def after_epoch(self, learn) -> None:
        self._epochs_done = self.epoch_offset + learn.epoch + 1
        self._write(self._log_epoch, learn)

    def _write(self, log, learn) -> None:
        if self.writer is None:
            return
        try:
            log(learn)
        except OSError as e:
            self._give_up(e)

    def _log_batch(self, learn) -> None:
        step = self.step_offset + learn.train_iter  # this training batch's global step
        if learn.training and step % self.every == 0:
            self.writer.add_scalar("train/loss", learn.loss.item(), step)
            self.writer.add_scalar("train/lr", learn.lr, step)

    def _log_epoch(self, learn) -> None:
        # at the global training step the epoch ended on, so epoch metrics share the x axis of the per-step
        # tags (`epoch/epoch` says which epoch it was)
        step = self.step_offset + learn.train_iter
        metrics = learn.get_cb(MetricsCallback)
        if metrics is not None and metrics.history:
            self.writer.add_scalar("epoch/epoch", self._epochs_done, step)
            for key, value in metrics.history[-1].items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, step)
        if self.histograms:
            for name, p in learn.model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
        self._log_layers(learn)
        self.writer.flush()

    def _log_layers(self, learn) -> None:
        """Write the layer statistics of the steps recorded since the last write (see the class docstring)."""
        self._read_at = learn.train_iter
        stats_cb = self._stats_cb(learn)
        stats = _read_stats(stats_cb) if stats_cb is not None else None
        if stats is None or len(stats.steps) == 0:
            return
        steps = np.asarray(stats.steps)
        rows = []
        for r in np.flatnonzero(steps > self._written):
            step = self.step_offset + int(steps[r])
            if step // self.every > self._window:
                self._window = step // self.every
                rows.append((int(r), step))
        self._written = max(self._written, int(steps.max()))
        if not rows:
            return
        per_module = (("act_mean", stats.act_mean), ("act_std", stats.act_std), ("off_fraction", stats.act_dead),
                      ("grad_norm", stats.grad_norm))
        per_param = (("param_grad_norm", stats.param_grad_norm), ("update_ratio", stats.update_ratio))
        edges = np.asarray(stats.hist_edges, dtype=np.float64)
        centres = (edges[:-1] + edges[1:]) / 2
        for r, step in rows:
            nonfinite: dict[str, int] = {}
            for names, fields in ((stats.modules, per_module), (stats.param_modules, per_param)):
                for i, module in enumerate(names):
                    name = _tag_name(module)
                    for key, values in fields:
                        value = float(values[r, i])
                        if math.isfinite(value):
                            self.writer.add_scalar(f"layers/{name}/{key}", value, step)
                        else:
                            nonfinite[name] = nonfinite.get(name, 0) + 1
            for name, count in nonfinite.items():
                self.writer.add_scalar(f"layers/{name}/nonfinite", count, step)
            if self.histograms:
                for i, module in enumerate(stats.modules):
                    counts = np.asarray(stats.act_hist[r, i], dtype=np.float64)
                    num = float(counts.sum())
                    if not (math.isfinite(num) and num > 0):
                        continue  # not called in the step, or not summarised
                    self.writer.add_histogram_raw(
                        f"activations/{_tag_name(module)}", min=float(edges[0]), max=float(edges[-1]), num=num,
                        sum=float(counts @ centres), sum_squares=float(counts @ centres ** 2),
                        bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step)

    def _log_end(self, learn) -> None:
        """At the end of a fit: the rows not written yet, the findings and (once) the hyper-parameters."""
        self._log_layers(learn)
        step = self.step_offset + learn.train_iter
        from .diagnose import Diagnose  # imported here: deepscope.diagnose is heavier than this module

        diagnose = learn.get_cb(Diagnose)
        if diagnose is not None:
            summary = diagnose.analysis.summary() if diagnose.analysis is not None else None
            self.writer.add_text("diagnosis", findings_markdown(diagnose.findings, summary), step)
        if self.hparams is not None and not self._hparams_written:
            metrics = learn.get_cb(MetricsCallback)
            logged = {k for r in (metrics.history if metrics is not None else []) for k, v in r.items()
                      if isinstance(v, (int, float)) and math.isfinite(v)}
            tags = [f"epoch/{k}" for k in HPARAM_METRICS if k in logged]
            writer = self.writer._get_file_writer()
            for summary in _hparams_summaries(self.hparams, tags, self._start_time, success=learn.error is None):
                writer.add_summary(summary, step)
            self._hparams_written = True
        self.writer.flush()

    def cleanup_fit(self, learn) -> None:
        try:
            self._write(self._log_end, learn)
        finally:  # the writer is closed whatever happened, so what it holds reaches the disk
            if self.writer is not None:
                try:
                    self.writer.close()
                except OSError as e:
                    self._give_up(e)
            self.writer, self._learn = None, None
            self._steps_done = self.step_offset + learn.train_iter
