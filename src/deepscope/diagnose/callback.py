"""`Diagnose`: the findings of `diagnose()` and `deepscope doctor`, collected during a real fit."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .. import distributed
from ..callback import Callback, CancelFitException
from ..callbacks import MetricsCallback, Recorder
from ..stats import ActivationStats
from .analysis import Analysis, Record, analyse_run
from .finding import Finding
from .preflight import inspect_setup
from .replay import locate_nonfinite

# The events an ActivationStats or Recorder that Diagnose owns (the learner has none) receives from it.
_FORWARDED = ("before_fit", "before_batch", "after_loss", "after_backward", "after_step", "cleanup_batch",
              "cleanup_validate", "after_epoch", "cleanup_epoch", "cleanup_fit")


class Diagnose(Callback):
    """Diagnose a fit while it runs, with the one analysis every entry point shares (`analysis.analyse_run`):
    the recording engine's statistics of every step (the learner's `ActivationStats`, or one of its own),
    the loss of every step (the learner's `Recorder`, or its own), the pre-flight look at the first batch,
    and the learning-rate, loop and gradient checks. Findings are recomputed from the whole record at each
    epoch end and at the end of the fit, into `.findings` (causes first) and `.analysis` (also what was
    checked); nothing stops the fit unless `stop_on_nonfinite`.

    At every training step it checks, with one host read-back, that the loss and the gradients are finite.
    At the first step where they are not, it replays that step's batch with the weights and random state
    the step ran with (`replay.locate_nonfinite`) to name the module that made the NaN; with `save_dir`
    the batch is saved there. Pass `replay=False` to skip that read-back (on a GPU it is a sync per step);
    the per-step counts of the statistics still say where NaN first appeared, less exactly. With
    `record_stats=False` and no ActivationStats in the learner, only the losses and the pre-flight look are
    judged (the analysis says which checks that leaves out).

    A step that float16 MixedPrecision's scaler skips (`learn.skip_step`) is not checked: the overflow is
    the scaler's. It sits out the LR finder's sweep, whose diverging steps are not problems of the fit.
    """

    order = 30  # after device placement (-20), batch limits (-10), schedules (5) and MixedPrecision (20)
    in_lr_sweep = False

    def __init__(self, save_dir: str | Path | None = None, *, replay: bool = True, stop_on_nonfinite: bool = False,
                 census_every: int | None = None, record_stats: bool = True):
        self.save_dir, self.replay, self.stop_on_nonfinite = save_dir, replay, stop_on_nonfinite
        self.record_stats = record_stats
        self.census_every = census_every
        self.findings: list[Finding] = []
        self.analysis: Analysis | None = None
        self._own: list[Callback] = []
        self._setup = None
        self._replayed: list[Finding] = []
        self._error: dict | None = None

    # --- the record: the learner's statistics and losses, or our own ------------------------------------
    def before_fit(self, learn) -> None:
        self._own = []
        if learn.get_cb(ActivationStats) is None and self.record_stats:
            stats = ActivationStats()
            if self.census_every is not None:
                stats.options["census_every"] = self.census_every
            self._own.append(stats)
        if learn.get_cb(Recorder) is None:
            self._own.append(Recorder())
        self._setup, self._replayed, self._error, self._rng = None, [], None, None
        self.findings, self.analysis = [], None
        self._forward("before_fit", learn)

    def _forward(self, event: str, learn) -> None:
        for cb in self._own:
            method = getattr(cb, event, None)
            if method is not None:
                method(learn)

    def _stats_cb(self, learn):
        return learn.get_cb(ActivationStats) or next((c for c in self._own if isinstance(c, ActivationStats)), None)

    def _recorder(self, learn):
        return learn.get_cb(Recorder) or next((c for c in self._own if isinstance(c, Recorder)), None)

    # --- the step ----------------------------------------------------------------------------------------
    def before_batch(self, learn) -> None:
        batch = learn.batch
        if learn.training and self._setup is None and isinstance(batch, (tuple, list)) and len(batch) >= 2:
            # Once per fit: the pre-flight checks on this model and its first batch (eval mode, no grad).
            self._setup = inspect_setup(learn.model, batch[0], batch[1], learn.loss_func, learn.dl)
        if learn.training and self.replay and not self._replayed:
            self._rng = torch.get_rng_state()  # the state this step's forward pass starts from (dropout)
        self._forward("before_batch", learn)

    def after_loss(self, learn) -> None:
        self._forward("after_loss", learn)

    def after_backward(self, learn) -> None:
        self._forward("after_backward", learn)
        if not learn.training or learn.skip_step or not self.replay or self._replayed:
            return
        grads = [p.grad for p in learn.model.parameters() if p.grad is not None]
        checks = [torch.isfinite(learn.loss.detach()).all()]
        if grads:  # the max |g| of each, finite exactly when every value is (an L2 norm of 1e20s overflows)
            checks.append(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all())
        if bool(torch.stack(checks).all()):  # the one read-back per step
            return
        kind = self._setup.loss_kind if self._setup is not None else None
        stats_cb = self._stats_cb(learn)
        paused = stats_cb.recorder.paused() if stats_cb is not None and stats_cb.recorder is not None \
            else contextlib.nullcontext()
        with paused:  # the replay's forward and backward are not the step's
            found = locate_nonfinite(learn.model, learn.batch[:2], learn.loss_func, step=learn.train_iter,
                                     rng_state=self._rng, loss_kind=kind, save_dir=self.save_dir)
        self._replayed = found or \
            [Finding("diverged", "", "error", f"The loss or the gradients became NaN/Inf at step {learn.train_iter}, "
                     "but replaying the step with the same weights, batch and random state gave finite values: "
                     "something outside the model's forward and backward made them (a callback changing the "
                     "gradients, a non-deterministic GPU kernel).",
                     "Lower the learning rate and look at the callbacks that touch the gradients (clipping, "
                     "mixed precision); with a GPU, try torch.use_deterministic_algorithms(True).",
                     {"step": learn.train_iter, "source": "replay"})]
        if self.stop_on_nonfinite:
            raise CancelFitException()

    def after_step(self, learn) -> None:
        self._forward("after_step", learn)

    def cleanup_batch(self, learn) -> None:
        self._forward("cleanup_batch", learn)

    def cleanup_validate(self, learn) -> None:
        self._forward("cleanup_validate", learn)

    def after_epoch(self, learn) -> None:
        self._forward("after_epoch", learn)
        self.update_findings(learn)

    def cleanup_epoch(self, learn) -> None:
        self._forward("cleanup_epoch", learn)

    def cleanup_fit(self, learn) -> None:
        self._forward("cleanup_fit", learn)
        if isinstance(learn.error, Exception) and not isinstance(learn.error, CancelFitException):
            self._error = {"where": "training", "type": type(learn.error).__name__,
                           "message": str(learn.error).strip(), "step": learn.train_iter}
        self.update_findings(learn)

    # --- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The pre-flight look, the replay's findings, and the statistics and losses it records itself."""
        from dataclasses import asdict

        return {"setup": asdict(self._setup) if self._setup is not None else None,
                "replayed": [f.to_dict() for f in self._replayed], "error": self._error,
                "own": {cb.name: cb.state_dict() for cb in self._own}}

    def load_state_dict(self, state: dict) -> None:
        from .records import LayerWeight, SetupRecord

        setup = state["setup"]
        if setup is not None:
            setup = SetupRecord(**{**setup, "weights": [LayerWeight(**w) for w in setup["weights"]]})
        self._setup, self._error = setup, state["error"]
        self._replayed = [Finding.from_dict(f) for f in state["replayed"]]
        for cb in self._own:
            if state["own"].get(cb.name) is not None:
                cb.load_state_dict(state["own"][cb.name])

    # --- the analysis ------------------------------------------------------------------------------------
    def record(self, learn) -> Record:
        """What this fit recorded so far, as the analysis takes it."""
        stats_cb, recorder = self._stats_cb(learn), self._recorder(learn)
        stats = None
        if stats_cb is not None:
            try:
                stats = stats_cb.stats()  # one read-back of the device rows
            except RuntimeError:  # it has not recorded anything yet
                stats = None
        losses = recorder.losses_so_far() if recorder is not None else []
        metrics = learn.get_cb(MetricsCallback)
        valid_losses = [r.get("valid_loss") for r in metrics.history] if metrics is not None else []
        sizes = [self._setup.batch_size] if self._setup is not None and self._setup.batch_size else []
        return Record(losses, stats, self._n_classes(learn), valid_losses, self._setup, sizes,
                      list(self._replayed), self._error)

    def _n_classes(self, learn) -> int | None:
        """Classes of a classifier trained with cross-entropy/NLL (chance loss is ln of it), else None."""
        setup = self._setup
        if setup is None or setup.loss_kind not in ("cross_entropy", "nll"):
            return None
        n = getattr(learn.dls, "n_classes", None)
        if n is None and setup.out_shape is not None and len(setup.out_shape) == 2:
            n = setup.out_shape[1]  # the model's output width
        return n

    def update_findings(self, learn) -> list[Finding]:
        """Analyse everything recorded so far into `.analysis` and `.findings`. Under DistributedDataParallel
        each rank analyses its own record, and rank 0 adds what the others found that it did not (a NaN in
        one rank's share of the batch), with the rank named (a collective: not when an error is ending
        the fit, as the other ranks may be elsewhere)."""
        self.analysis = analyse_run(self.record(learn))
        self.findings = self.analysis.findings
        if distributed.active() and learn.error is None:
            self.findings = self.analysis.findings = merge_rank_findings(
                self.findings, distributed.gather_objects([f.to_dict() for f in self.findings]))
        return self.findings


def merge_rank_findings(own: list[Finding], by_rank: list[list[dict]]) -> list[Finding]:
    """This rank's findings, plus those of other ranks (in rank order) of a kind and module it did not find,
    each saying which rank found it (evidence "rank"); causes first again."""
    from .finding import sort_findings

    seen = {(f.kind, f.module) for f in own}
    merged = list(own)
    for rank, found in enumerate(by_rank):
        if rank == distributed.rank():
            continue
        for data in found:
            f = Finding.from_dict(data)
            if (f.kind, f.module) in seen:
                continue
            seen.add((f.kind, f.module))
            f.message = f"On rank {rank}: {f.message}"
            f.evidence = {**f.evidence, "rank": rank}
            merged.append(f)
    return sort_findings(merged)
