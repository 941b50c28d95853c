"""`Diagnose`: the same findings as `diagnose()`, collected during a real fit at a small cost."""
from __future__ import annotations

from pathlib import Path


from ..callbacks import MetricsCallback, Recorder
from ..stats import ActivationStats
from .analyse import analyse_probe
from .finding import Finding, merge_findings
from .history import analyse_record
from .preflight import inspect_setup
from .probe import Probe
from .setup_checks import analyse_setup
from .thresholds import DIAGNOSE_EVERY


class Diagnose(Probe):
    """Look inside one training step in `every` (hooks exist only on those steps) and analyse at each epoch
    end. Findings accumulate in `.findings` (errors first); nothing stops the fit. A NaN that appears between
    two checked steps is seen late, so the module named may be a follower: run `diagnose()` to pin it down.
    With `save_dir`, the first batch that produced NaN/Inf is saved there.

    At each epoch end it also analyses the whole history of the fit: the statistics of an `ActivationStats`
    callback and the losses of a `Recorder`, when the learner has them (read once per epoch, never per step).
    Those findings are recomputed from the full history each time, so they describe the fit so far.

    A step that float16 MixedPrecision's scaler skips (`learn.skip_step`: its gradients overflowed) is not
    checked for non-finite gradients or update ratios: the overflow is the scaler's, not the model's. It
    sits out the LR finder's sweep, whose diverging steps would otherwise read as problems of the fit."""

    order = 30
    in_lr_sweep = False

    def __init__(self, every: int = DIAGNOSE_EVERY, save_dir: str | Path | None = None):
        super().__init__(every, stop_on_nonfinite=False, save_dir=save_dir)
        self.findings: list[Finding] = []
        self._known: list[Finding] = []  # from the probe and earlier fits: they accumulate
        self._history: list[Finding] = []  # from this fit's history: recomputed at each epoch end
        self._setup = None

    def before_fit(self, learn) -> None:
        super().before_fit(learn)
        self._setup = None
        self._known, self._history = self.findings, []

    def before_batch(self, learn) -> None:
        batch = learn.batch
        if learn.training and self._setup is None and isinstance(batch, (tuple, list)) and len(batch) == 2:
            # Once per fit: the pre-flight checks on this model and its first batch (eval mode, no grad).
            self._setup = inspect_setup(learn.model, batch[0], batch[1], learn.loss_func, learn.dl)
        super().before_batch(learn)

    def after_backward(self, learn) -> None:
        if learn.skip_step:
            self.where, self._before = "step", None  # nothing to check, and no update to measure
            return
        super().after_backward(learn)

    def after_epoch(self, learn) -> None:
        self._history = self.history_findings(learn)
        self.update_findings()

    def cleanup_fit(self, learn) -> None:
        super().cleanup_fit(learn)
        self._history = self.history_findings(learn)
        self.update_findings()

    def history_findings(self, learn) -> list[Finding]:
        """Analyse the fit's history recorded by the learner's ActivationStats and Recorder callbacks."""
        stats_cb, recorder = learn.get_cb(ActivationStats), learn.get_cb(Recorder)
        stats = None
        if stats_cb is not None:
            try:
                stats = stats_cb.stats()  # one read-back of the device rows
            except RuntimeError:  # it has not recorded anything yet
                stats = None
        losses = recorder.losses if recorder is not None else []
        metrics = learn.get_cb(MetricsCallback)
        valid_losses = [r.get("valid_loss") for r in metrics.history] if metrics is not None else []
        return analyse_record(stats, losses, self._n_classes(learn), valid_losses)

    def _n_classes(self, learn) -> int | None:
        """Classes of a classifier trained with cross-entropy/NLL (chance loss is ln of it), else None."""
        setup = self._setup
        if setup is None or setup.loss_kind not in ("cross_entropy", "nll"):
            return None
        n = getattr(learn.dls, "n_classes", None)
        if n is None and setup.out_shape is not None and len(setup.out_shape) == 2:
            n = setup.out_shape[1]  # the model's output width
        return n

    def update_findings(self) -> list[Finding]:
        """Analyse what has been recorded so far and add the new findings to `.findings`."""
        new = analyse_probe(self.record)
        if self._setup is not None:
            new = analyse_setup(self._setup, self.record.batch_sizes, self.record.grad_nonzero or None) + new
        self._known = merge_findings(self._known, new)
        self.findings = merge_findings(self._known, self._history)
        return self.findings
