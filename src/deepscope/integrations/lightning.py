"""`DeepscopeCallback`: look inside a model trained by PyTorch Lightning, with the engine behind
`ActivationStats` and `watch` (`stats.engine.StatsRecorder`).

    from deepscope.integrations.lightning import DeepscopeCallback
    cb = DeepscopeCallback()                       # or DeepscopeCallback(modules=["net.*"], every=10)
    Trainer(callbacks=[cb]).fit(model, data)
    cb.stats(); cb.findings(); cb.report("report.html")

A recorded step is one optimiser step. With `accumulate_grad_batches=k` it spans the k batches of one
update: the gradient and parameter norms are those of the accumulated gradients, the activations and
output gradients those of its first batch (the engine records a module at its first call in a step),
and its loss is the mean of its batches' losses. Steps are numbered by `trainer.global_step`,
Lightning's count of optimiser steps (what `max_steps` counts).

The Lightning hooks, in the order Lightning calls them:
  on_fit_start              a new record: hooks on the LightningModule, on the device the strategy chose
  on_train_batch_start      begin a step, unless one is open (a later batch of an accumulated step)
  on_before_optimizer_step  gradients are final and the weights are those the step ran with. Under
                            float16 AMP (precision="16-mixed") Lightning has unscaled p.grad before this
                            hook; the output gradients seen during backward were multiplied by the loss
                            scale, and the engine divides their sums and norms by it. A step the scaler
                            will skip (inf/NaN gradients) records no gradient or parameter statistics.
  on_train_batch_end        if the optimiser stepped in this batch: the update is done (p.grad still
                            there: Lightning zeroes it in the next step), the step ends
  on_fit_end, on_exception, teardown    `close()`: no hook outlives the fit, however it ends
Gradient norms are read after the update: the gradients the optimiser used, unscaled and, with
`gradient_clip_val`, clipped (Lightning clips right after on_before_optimizer_step), as in a plain loop
that clips before `opt.step()`. Manual optimisation: the first optimiser step of a batch marks the update.

Importing this module does not import Lightning (~4 s, and its import changes warning filters and
environment variables): the class is made when `DeepscopeCallback` is first looked up.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..adapter import LossLog, analysis_of, write_report
from ..diagnose.finding import Finding
from ..errors import ConfigError
from ..stats.engine import SAMPLE_SIZE, ModuleSpec, StatsRecorder, check_options
from ..stats.format import Stats, save_stats

if TYPE_CHECKING:
    import lightning.pytorch as pl

INSTALL = "pip install deepscope[lightning]"
_WHO = "DeepscopeCallback"
_OPTIONS = set(inspect.signature(StatsRecorder).parameters) - {"model", "modules", "who"}


class _Recording:
    """Record per-layer statistics of the LightningModule during `Trainer.fit` (see the module docstring).

    `modules`: None for the default choice, names or fnmatch patterns (as named in the LightningModule,
    e.g. "net.0"), or a `filter(name, module) -> bool`. `every`: record one step in N. `subsample`: values
    of each tensor summarised per step (None: all). `n_classes`: a classifier's number of classes, for the
    chance-level check of `findings()`. Other options go to `StatsRecorder`. Raises ConfigError for an
    unknown or out-of-range option, and at fit start for `modules` that match nothing.
    """

    def __init__(self, modules: ModuleSpec = None, *, every: int = 1, subsample: int | None = SAMPLE_SIZE,
                 n_classes: int | None = None, **options):
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ConfigError(f"{_WHO}: unknown option(s) {unknown}; the recording options are {sorted(_OPTIONS)}")
        check_options(_WHO, every=every, subsample=subsample, **options)  # now, not when the fit starts
        self.modules, self.n_classes = modules, n_classes
        self.options = {"every": every, "subsample": subsample, **options}
        self.recorder: StatsRecorder | None = None
        self._open = False      # a step has begun and not ended
        self._stepped = False   # the optimiser stepped in the open step
        self._skip = False      # ... but the float16 scaler skips that update
        self._loss: torch.Tensor | None = None  # sum of the open step's batch losses, on the device
        self._batches = 0       # batches with a loss in the open step
        self._losses = LossLog()
        self._context: dict = {}
        self._started: float | None = None
        self._seconds: float | None = None

    # --- Lightning's hooks -------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()
        self.recorder = StatsRecorder(pl_module, self.modules, who=_WHO, **self.options)
        self._open, self._losses = False, LossLog()
        self._context = {"model": type(pl_module).__name__, "precision": str(trainer.precision),
                         "accumulate_grad_batches": trainer.accumulate_grad_batches, "device": str(pl_module.device)}
        self._started, self._seconds = time.perf_counter(), None
        self.recorder.attach()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if not self._open:
            self.recorder.start_step(trainer.global_step)
            self._open, self._stepped, self._loss, self._batches = True, False, None, 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._stepped:  # a second optimiser in the same batch (manual optimisation)
            return
        self._stepped, self._skip = True, False
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.recorder.recording and isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
            self.recorder.scale_gradients(scaler.scale(torch.ones((), device=pl_module.device)))
            # (torch's private per-device flags, as MixedPrecisionStep reads them; scaler.step reads them back
            # right after this hook anyway, so this read costs next to nothing)
            self._skip = any(v.item() for v in scaler._found_inf_per_device(optimizer).values())
        self.recorder.before_update(skip=self._skip, optimizer=optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else None
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().reshape(())
            self._loss = loss if self._loss is None else self._loss + loss
            self._batches += 1
        if not self._stepped:
            return  # accumulating gradients: the step goes on
        if not self._skip:
            self.recorder.after_update()
        self.recorder.end_step()
        self._open = False
        if self._loss is not None:  # Lightning divided each batch's loss by accumulate_grad_batches
            self._losses.add(self._loss * (trainer.accumulate_grad_batches / self._batches))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close()  # the only hook Lightning calls when a tuner ends the fit early

    def close(self) -> None:
        """Remove every hook (idempotent) and move what was recorded into the history. A step left
        unfinished (an exception inside it) is dropped."""
        if self.recorder is not None:
            self.recorder.close()
        if self._started is not None and self._seconds is None:
            self._seconds = time.perf_counter() - self._started
        self._open = False
        self._losses.read()

    # --- results -------------------------------------------------------------------------------------------
    @property
    def losses(self) -> list[float]:
        """The training loss of each step (the mean over its batches), as floats."""
        return self._losses.values

    def stats(self) -> Stats:
        """Everything recorded so far, the same `Stats` as `watch` and `ActivationStats` give."""
        if self.recorder is None:
            raise RuntimeError(f"{_WHO} has recorded nothing yet: pass it to Trainer(callbacks=[...]) and fit")
        return self.recorder.stats()

    def save(self, path: str | Path) -> Path:
        """Write `stats.npz` (into `path` if it is a folder); returns the file."""
        return save_stats(self.stats(), path)

    def findings(self) -> list[Finding]:
        """Diagnosis of everything recorded: `Finding`s, causes first (deepscope.diagnose)."""
        return self.analysis().findings

    def analysis(self):
        """The whole diagnosis (deepscope.diagnose.Analysis): the findings and what was checked."""
        return analysis_of(self.stats(), self.losses, self.n_classes)

    def report(self, path: str | Path = "report.html", *, config: dict | None = None) -> Path:
        """Write a self-contained report of the fit and return the file: to `path` itself when it ends in
        `.html`, else into the folder `path` as `report.html`. `config`: your own settings to show."""
        modules = self.modules if isinstance(self.modules, (list, tuple, str, type(None))) else "filter"
        return write_report(path, title=f"deepscope lightning: {self._context.get('model', '')}",
                            settings={**self._context, "modules": modules, **self.options, **(config or {})},
                            stats=self.stats(), losses=self.losses, findings=self.findings(),
                            device=self._context.get("device", "cpu"), wall_seconds=self._seconds)


def __getattr__(name: str):
    # PEP 562: the class is made here, on first use, because its second base is Lightning's Callback
    # and importing Lightning is slow and not free of side effects (see the module docstring)
    global DeepscopeCallback
    if name != "DeepscopeCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError as e:
        raise ConfigError(f"{_WHO} needs PyTorch Lightning, which is not installed here: {INSTALL}") from e
    DeepscopeCallback = type("DeepscopeCallback", (_Recording, Callback),
                             {"__module__": __name__, "__doc__": _Recording.__doc__})
    return DeepscopeCallback
