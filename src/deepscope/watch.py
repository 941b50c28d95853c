"""`watch`: look inside any model trained by your own loop, with the same engine as the Learner's
`ActivationStats` (`stats.engine.StatsRecorder`).

    with deepscope.watch(model, opt) as w:
        for xb, yb in loader:                       # your loop, unchanged
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step()
            w.step(loss, targets=yb)                # optional: without it, opt.step() ends each step
    w.stats(); w.findings(); w.report("report.html")

Where a step begins and ends: a step begins when a watched module first runs in training mode after
the previous step ended, so several forwards before one optimiser step (gradient accumulation) are one
step, and eval-mode forwards (your validation) are none. It ends at
`w.step()`, or, until `w.step` is first called, when the optimiser's step returns (its post-hook).
The optimiser's pre-hook marks the point where gradients are final and the weights are those the step
ran with, for the weight, gradient and update norms; without an optimiser, those are not recorded.
Nothing is read back from the device inside a step: losses are kept as device tensors and read back
in blocks.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .adapter import LossLog, analysis_of, write_report
from .errors import ConfigError
from .hooks import opaque, unwrapped
from .stats.engine import SAMPLE_SIZE, ModuleSpec, StatsRecorder
from .stats.format import Stats

# param_group keys that choose an implementation, not the training: left out of the report's settings
_IMPLEMENTATION_FLAGS = {"params", "foreach", "capturable", "differentiable", "fused", "maximize"}


class Watch:
    """The handle `watch()` returns; a context manager. See the module docstring."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 modules: ModuleSpec = None, every: int = 1, subsample: int | None = SAMPLE_SIZE, **options):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"watch: expected an nn.Module to watch, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"watch: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        self.recorder = StatsRecorder(model, modules, every=every, subsample=subsample, who="watch", **options)
        self.options = {"modules": modules if isinstance(modules, (list, tuple, str, type(None))) else "filter",
                        "every": every, "subsample": subsample, **options}
        self.steps = 0            # training steps ended so far
        self._open = False        # a step has begun (its first forward ran) and not ended
        self._manual = False      # the user calls w.step(): it, not the optimiser, ends steps
        self._handles: list = []
        self._losses = LossLog()
        self._targets: torch.Tensor | None = None
        self._n_outputs: int | None = None
        self._output_check: torch.Tensor | None = None  # see _after_forward
        self._output_kind: str | None = None
        self._output_shape: tuple = ()
        self._first_output: torch.Tensor | None = None  # the first training output, until the first w.step
        self._loss_check: tuple | None = None  # see _check_loss_shapes
        self._shapes_checked = False
        self._started = None

    # --- the context -------------------------------------------------------------------------------------
    def __enter__(self) -> "Watch":
        # a new `with` starts a new record (the engine's attach drops the old one): so do the counters
        self.steps, self._open, self._manual, self._losses, self._targets = 0, False, False, LossLog(), None
        self._n_outputs, self._output_check = None, None
        self._first_output, self._loss_check, self._shapes_checked = None, None, False
        self._output_kind: str | None = None  # what the model's first training forward returned
        self.recorder.attach()
        self.recorder.before_forward = self._begin_step  # for a submodule called on its own
        try:
            # the model's own call opens the step before anything inside it runs
            # (prepended: it runs before the engine's own look at the model's input, which needs the step open)
            self._handles.append(self.model.register_forward_pre_hook(opaque(lambda m, inputs: self._begin_step(m)),
                                                                      prepend=True))
            self._handles.append(self.model.register_forward_hook(opaque(self._after_forward)))
            if self.optimizer is not None:
                self._handles.append(self.optimizer.register_step_pre_hook(self._before_update))
                self._handles.append(self.optimizer.register_step_post_hook(self._after_update))
        except BaseException:
            self.remove()
            raise
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove(keep_open_step=exc_type is None)

    def remove(self, keep_open_step: bool = True) -> None:
        """Remove every hook (idempotent) and move what was recorded into the history. The open step is
        ended and kept, unless `keep_open_step` is False (the loop raised inside it: a step cut short is
        dropped, as the Lightning callback drops it)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.recorder.before_forward = None
        if keep_open_step:
            self._end_step()
        self._open = False
        self.recorder.close()
        self._losses.read()

    # --- hooks ---------------------------------------------------------------------------------------------
    def _begin_step(self, module: nn.Module) -> None:
        """A watched module ran: the first one in training mode, with autograd on, after a step ended begins
        the next (a forward under torch.no_grad() is inference, not training, whatever the module's mode)."""
        if not self._open and module.training and torch.is_grad_enabled():
            self.recorder.start_step(self.steps)
            self._open = True

    def _after_forward(self, module, inputs, output) -> None:
        if self._output_kind is None and module.training and torch.is_grad_enabled():
            self._output_kind = "tensor" if isinstance(output, torch.Tensor) else type(output).__name__
        if (not self._shapes_checked and self._first_output is None and isinstance(output, torch.Tensor)
                and module.training and torch.is_grad_enabled()):
            self._first_output = output.detach()  # its shape is compared with the targets' at the first w.step
        if self._n_outputs is None and isinstance(output, torch.Tensor) and output.dim() == 2:
            self._n_outputs = output.shape[1]  # (N, C): C classes, if the targets are class indices
            if output.is_floating_point() and output.shape[0] >= 2 and output.shape[1] >= 2 and module.training:
                # how the first training output is normalised, kept on the device until findings() reads it
                from .diagnose.preflight import output_normalisation

                self._output_shape = tuple(output.shape)
                self._output_check = output_normalisation(output.detach().float())

    def _before_update(self, optimizer, args, kwargs) -> None:
        if not self._open and self.model.training:
            # a closure-based optimiser (LBFGS) runs its forward passes inside step(): the step begins here
            self.recorder.start_step(self.steps)
            self._open = True
        self.recorder.before_update(optimizer=optimizer)

    def _after_update(self, optimizer, args, kwargs) -> None:
        self.recorder.after_update()
        if not self._manual:
            self._end_step()

    def _end_step(self) -> None:
        if self._open:
            self.recorder.end_step()
            self.steps += 1
            self._open = False

    # --- the user's calls ------------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float | None = None, *, targets: torch.Tensor | None = None) -> None:
        """End this training step. `loss` (kept on its device, read back every 64 steps) feeds the
        loss-history checks of `findings()`; `targets` (the first batch's are kept) lets them compare the
        loss with chance level for a classifier, check the targets' shape against the model's output and,
        counted on the device at every step, whether class batches are shuffled. No host synchronisation."""
        self._manual = True
        if loss is not None:
            self._losses.add(loss)
        if targets is not None and self._targets is None:
            self._targets = targets.detach()
        if targets is not None:
            self.recorder.observe_targets(targets)
        if not self._shapes_checked:
            self._check_loss_shapes(loss, targets)
        self._end_step()  # (already ended by the optimiser's post-hook on the first step)

    def _check_loss_shapes(self, loss, targets) -> None:
        """At the first w.step: float targets whose shape broadcasts with the first training output's to a
        bigger one are kept for findings() with how the loss paired them (device tensors, no read-back)."""
        from .diagnose.preflight import loss_pairing

        out, self._first_output, self._shapes_checked = self._first_output, None, True
        if out is None or not isinstance(targets, torch.Tensor):
            return
        values = loss_pairing(out, targets)
        if values is not None:
            self._loss_check = (tuple(out.shape), tuple(targets.shape), str(targets.dtype).removeprefix("torch."),
                                values, loss.detach() if isinstance(loss, torch.Tensor) else loss)

    # --- checkpoints ---------------------------------------------------------------------------------------
    _STATE = ("steps", "_manual", "_targets", "_n_outputs", "_output_check", "_output_kind", "_output_shape",
              "_first_output", "_loss_check", "_shapes_checked")

    def state_dict(self) -> dict:
        """Everything recorded so far (statistics history, losses, what the first steps showed), to store with
        your own checkpoint, e.g. `deepscope.save_checkpoint(path, {"model": model.state_dict(), "optimizer":
        opt.state_dict(), "watch": w.state_dict(), "rng": deepscope.checkpoint.rng_state(), ...})` (no pickle;
        torch.save would need numpy arrays allowed). Take it between steps. ConfigError inside a step."""
        if self._open:
            raise ConfigError("watch: take its state between training steps (after optimizer.step() or w.step()), "
                              "not inside one")
        self._losses.read()
        return {"recorder": self.recorder.state_dict(), "losses": list(self._losses.values),
                **{name.lstrip("_"): getattr(self, name) for name in self._STATE}}

    def load_state_dict(self, state: dict) -> None:
        """Continue the record `state_dict` saved: call it inside `with watch(...)`, before the first step of
        the resumed loop. ConfigError outside the `with` or when other modules are watched."""
        if not self._handles:
            raise ConfigError("watch: load_state_dict continues a record, so call it inside `with watch(...)`, "
                              "before the resumed loop's first step")
        self.recorder.load_state_dict(state["recorder"])
        self._losses = LossLog()
        self._losses._values = list(state["losses"])
        for name in self._STATE:
            setattr(self, name, state[name.lstrip("_")])

    # --- results ---------------------------------------------------------------------------------------------
    @property
    def losses(self) -> list[float]:
        """The losses passed to `step`, one per step, as floats."""
        return self._losses.values

    def stats(self) -> Stats:
        """The same `Stats` as `ActivationStats.stats()`: everything recorded in the steps that ended."""
        self.recorder.flush()
        return self.recorder.stats()

    def n_classes(self) -> int | None:
        """Classes of a classifier (integer targets, an (N, C) output), else None."""
        t = self._targets
        if t is None or t.is_floating_point() or self._n_outputs is None or self._n_outputs < 2:
            return None
        return self._n_outputs

    def findings(self) -> list:
        """Diagnosis of everything recorded: `Finding`s, causes first (deepscope.diagnose)."""
        return self.analysis().findings

    def analysis(self):
        """The whole diagnosis (deepscope.diagnose.Analysis): the findings, the checks that ran on how many
        steps, and those that could not and why; `.summary()` says it in a line."""
        checked = ["the first training output's softmax axis"] if self._output_check is not None else []
        skipped = []
        if self._output_kind not in (None, "tensor"):
            skipped.append(("the output's softmax axis and shape", f"the model returns a {self._output_kind}: "
                            "these look at a tensor output only"))
        if self._loss_check is not None:
            checked.append("prediction and target shapes")
        elif self._targets is None:
            skipped.append(("prediction and target shapes; the batches' class order", "needs targets= in w.step"))
        return analysis_of(self.stats(), self.losses, self.n_classes(), also=self._output_findings(),
                           also_checked=checked, also_skipped=skipped)

    def _output_findings(self) -> list:
        """Checks on the model's first training output: how it was normalised (softmax over the batch), and
        its shape against the targets' (broadcast in the loss)."""
        from .diagnose.preflight import pairing_of, set_normalisation
        from .diagnose.records import SetupRecord
        from .diagnose.setup_checks import check_loss_shapes, check_softmax_dim

        found = []
        if self._loss_check is not None:
            out_shape, y_shape, y_dtype, values, loss = self._loss_check
            found += check_loss_shapes(SetupRecord(out_shape=out_shape, y_shape=y_shape, y_dtype=y_dtype,
                                                   loss_pairs=pairing_of(loss, values)))
        if self._output_check is None:
            return found
        rec = SetupRecord(out_shape=self._output_shape)
        set_normalisation(rec, self._output_check.tolist())
        return found + check_softmax_dim(rec)

    def settings(self) -> dict:
        """What the report shows as this run's configuration: the model, the watch options and the
        optimiser with its first parameter group's hyper-parameters."""
        out = {"model": type(unwrapped(self.model)).__name__, **self.options}
        if self.optimizer is not None:
            group = self.optimizer.param_groups[0]
            out["optimizer"] = type(self.optimizer).__name__
            out.update({k: v for k, v in group.items()
                        if k not in _IMPLEMENTATION_FLAGS and isinstance(v, (int, float, str, tuple, bool))})
            for key in list(out):  # a hyper-parameter that differs between parameter groups: one value each
                values = [g.get(key) for g in self.optimizer.param_groups]
                if key in group and len(values) > 1 and any(v != values[0] for v in values):
                    out[key] = values
        return out

    def report(self, path: str | Path = "report.html", *, config: dict | None = None) -> Path:
        """Write a self-contained report of this run and return the file: to `path` itself when it ends
        in `.html`, else into the folder `path` (made if missing) as `report.html`. `config`: your own
        settings to show beside the optimiser's (e.g. {"batch_size": 64}). No run folder is needed."""
        param = next(self.model.parameters(), None)
        seconds = time.perf_counter() - self._started if self._started else None
        return write_report(path, title=f"deepscope watch: {type(unwrapped(self.model)).__name__}",
                            settings={**self.settings(), **(config or {})}, stats=self.stats(),
                            losses=self.losses, findings=self.findings(),
                            device=param.device if param is not None else "cpu", wall_seconds=seconds)


def watch(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, modules: ModuleSpec = None,
          every: int = 1, subsample: int | None = SAMPLE_SIZE, **options) -> Watch:
    """Record per-layer statistics of `model` in your own training loop; use it as a context manager.

    `modules`: None for the default choice (modules owning parameters, activations, norms), names or
    fnmatch patterns, or a `filter(name, module) -> bool`. `every`: record one step in N. `subsample`:
    values of each tensor summarised per step (None: all). Other options go to `StatsRecorder`. With an
    `optimizer`, weight, gradient and update norms are recorded through its step hooks (any
    torch.optim optimizer). Raises ConfigError for bad arguments or modules that match nothing.
    """
    return Watch(model, optimizer, modules=modules, every=every, subsample=subsample, **options)

