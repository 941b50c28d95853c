"""`ActivationStats`: the Learner's adapter over the recording engine (`engine.StatsRecorder`): per-layer
statistics of activations, output gradients and parameters while training.

The idea of watching mean, std and a histogram of every layer's activations comes from fastai's
ActivationStats (course22p2, lesson 16); unlike it, nothing here reads a value back inside the step.
"""
from __future__ import annotations

from pathlib import Path

from ..callback import Callback
from .engine import CENSUS_EVERY, DEAD_THRESHOLD, SAMPLE_SIZE, ModuleSpec, StatsRecorder, check_options
from .format import Stats

__all__ = ["ActivationStats", "DEAD_THRESHOLD", "SAMPLE_SIZE"]


class ActivationStats(Callback):
    """Record per-module statistics every `every` training steps (and validation batches if `valid`);
    see `StatsRecorder` for what is recorded and the options.

    `modules`: None for `select_modules(model)`'s default, a list of names / fnmatch patterns, or a
    `filter(name, module) -> bool`. Hooks exist from `before_fit` to `cleanup_fit` (or `remove()`).

    Gradients are the true ones: under float16 MixedPrecision the hooks see output gradients multiplied
    by `learn.loss_scale`, and their sums and norms are divided by it. A step the scaler skips
    (`learn.skip_step`) records activations but no gradient or parameter statistics (NaN: not measured).
    """

    order = 5  # after DeviceCallback (-20) has put the model on its device
    in_lr_sweep = False  # the sweep's steps are not the fit's: its history must stay the fit's

    def __init__(self, modules: ModuleSpec = None, *, every: int = 1, train: bool = True, valid: bool = False,
                 dead_threshold: float = DEAD_THRESHOLD, hist_bins: int = 40, hist_range: tuple = (0.0, 10.0),
                 subsample: int | None = SAMPLE_SIZE, recent: int = 1024, max_rows: int = 4096, flush_every: int = 64,
                 census_every: int = CENSUS_EVERY):
        self.options = dict(modules=modules, every=every, dead_threshold=dead_threshold, hist_bins=hist_bins,
                            hist_range=hist_range, subsample=subsample, recent=recent, max_rows=max_rows,
                            flush_every=flush_every, census_every=census_every)
        check_options("ActivationStats", **self.options)  # now, not when the fit starts
        self.every, self.train, self.valid = every, train, valid
        self.dead_threshold, self.subsample = float(dead_threshold), subsample
        self.hist_bins, self.hist_range, self.recent, self.max_rows = hist_bins, hist_range, recent, max_rows
        self.flush_every = flush_every
        self.recorder: StatsRecorder | None = None

    @property
    def modules(self) -> list[str]:
        return self.recorder.modules if self.recorder is not None else []

    def before_fit(self, learn) -> None:
        self.remove()
        self.recorder = StatsRecorder(learn.model, **self.options, who="ActivationStats")
        self.recorder.attach()

    def remove(self) -> None:
        """Remove the hooks (idempotent); what was recorded stays available."""
        if self.recorder is not None:
            self.recorder.remove()

    def cleanup_fit(self, learn) -> None:
        if self.recorder is not None:  # no cross-rank collective while an error unwinds (other ranks are elsewhere)
            self.recorder.close(synchronized=learn.error is None)

    def before_batch(self, learn) -> None:
        if learn.training:
            record = self.train and learn.train_iter % self.every == 0
        else:
            record = self.valid and learn.iter % self.every == 0
        self.recorder.start_step(learn.train_iter, "train" if learn.training else "valid", record)

    def after_loss(self, learn) -> None:
        if learn.training and learn.loss_scale is not None:
            self.recorder.scale_gradients(learn.loss_scale)

    def after_backward(self, learn) -> None:
        self.recorder.before_update(skip=learn.skip_step, optimizer=learn.opt)
        self.recorder.observe_targets(learn.yb)

    def after_step(self, learn) -> None:
        if not learn.skip_step:
            self.recorder.after_update()

    def cleanup_batch(self, learn) -> None:
        self.recorder.end_step()

    def cleanup_validate(self, learn) -> None:
        # a point every rank reaches whatever its number of validation batches: under DDP the validation
        # rows are combined across ranks here (StatsRecorder.flush)
        if self.recorder is not None:
            self.recorder.flush(synchronized=learn.error is None)

    def cleanup_epoch(self, learn) -> None:
        self.recorder.flush(synchronized=learn.error is None)

    def state_dict(self) -> dict | None:
        """The statistics history and the sampler's streams (StatsRecorder.state_dict), for a checkpoint."""
        return {"recorder": self.recorder.state_dict()} if self.recorder is not None else None

    def load_state_dict(self, state: dict) -> None:
        self.recorder.load_state_dict(state["recorder"])

    def stats(self) -> Stats:
        """Everything recorded so far, as the `Stats` that `save` writes."""
        if self.recorder is None:
            raise RuntimeError("ActivationStats has recorded nothing yet: fit a Learner with it first")
        return self.recorder.stats(valid=self.valid)

    def save(self, path: str | Path) -> Path:
        """Write `stats.npz` (into `path` if it is a folder); returns the file."""
        return self.recorder.save(path, valid=self.valid) if self.recorder is not None else self.stats()
