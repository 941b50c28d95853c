"""`Diagnose`: the same findings as `diagnose()`, collected during a real fit at a small cost."""
from __future__ import annotations

from pathlib import Path

from .analyse import analyse_probe
from .finding import Finding, sort_findings
from .preflight import inspect_setup
from .probe import Probe
from .setup_checks import analyse_setup
from .thresholds import DIAGNOSE_EVERY


class Diagnose(Probe):
    """Look inside one training step in `every` (hooks exist only on those steps) and analyse at each epoch
    end. Findings accumulate in `.findings` (errors first); nothing stops the fit. A NaN that appears between
    two checked steps is seen late, so the module named may be a follower: run `diagnose()` to pin it down.
    With `save_dir`, the first batch that produced NaN/Inf is saved there."""

    order = 30

    def __init__(self, every: int = DIAGNOSE_EVERY, save_dir: str | Path | None = None):
        super().__init__(every, stop_on_nonfinite=False, save_dir=save_dir)
        self.findings: list[Finding] = []
        self._setup = None

    def before_fit(self, learn) -> None:
        super().before_fit(learn)
        self._setup = None

    def before_batch(self, learn) -> None:
        batch = learn.batch
        if learn.training and self._setup is None and isinstance(batch, (tuple, list)) and len(batch) == 2:
            # Once per fit: the pre-flight checks on this model and its first batch (eval mode, no grad).
            self._setup = inspect_setup(learn.model, batch[0], batch[1], learn.loss_func, learn.dl)
        super().before_batch(learn)

    def after_epoch(self, learn) -> None:
        self.update_findings()

    def cleanup_fit(self, learn) -> None:
        super().cleanup_fit(learn)
        self.update_findings()

    def update_findings(self) -> list[Finding]:
        """Analyse what has been recorded so far and add the new findings to `.findings`."""
        new = analyse_probe(self.record)
        if self._setup is not None:
            new = analyse_setup(self._setup, self.record.batch_sizes, self.record.grad_nonzero or None) + new
        known = {(f.kind, f.module) for f in self.findings}
        self.findings = sort_findings(self.findings + [f for f in new if (f.kind, f.module) not in known])
        return self.findings
