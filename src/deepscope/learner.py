"""The Learner: a training loop whose every step is an event that callbacks can observe and change.

The loop, outermost first (print it with `learn.show_training_loop()`):

    fit:      before_fit  -> epochs -> after_fit, cleanup_fit
    epoch:    before_epoch -> train pass -> validate pass -> after_epoch, cleanup_epoch
    train / validate: before_X -> batches -> after_X, cleanup_X
    batch:    before_batch -> predict, after_pred -> loss, after_loss
              -> (training only) backward, after_backward -> step, after_step -> zero_grad
              -> after_batch, cleanup_batch

Cancel exceptions (`deepscope.callback`) skip the rest of their phase; `cleanup_X` always runs. What each
piece of state means at each event is written once, in `Learner`'s docstring.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .callback import (
    BATCH_POINTS, CANCEL_EXCEPTIONS, EVENTS, PHASES, Callback, CallbackError, check_event_names,
)
from .errors import CheckpointError, ConfigError, DataError, deferring_stops, raise_pending_interrupt, stop_due

OptFactory = Callable[..., torch.optim.Optimizer]
_CANCELS = tuple(CANCEL_EXCEPTIONS.values())


def data_length(dl) -> int | None:
    """`len(dl)`, or None when it has none (a generator; a DataLoader over an IterableDataset, whose
    `__len__` exists but raises TypeError)."""
    try:
        return len(dl)
    except TypeError:
        return None


def no_batches_error(training: bool) -> DataError:
    if training:
        return DataError("the training data yielded no batches, so there is nothing to train on: check that the "
                         "training set is not empty and holds at least one batch (with drop_last=True, a set "
                         "smaller than the batch size gives none)")
    return DataError("the validation data yielded no batches, so no validation metric can be computed: check the "
                     "validation set and its batch size, or train without validation (DataLoaders(valid=None), "
                     "or fit(valid=False))")


class TrainStep:
    """The five pieces of one optimisation step. Subclass and override one piece (or assign an instance to
    `learn.train_step`, e.g. from a callback's `before_fit`) to change it without copying the loop. A step
    honours the Learner's contract: one that scales the loss sets `learn.loss_scale` in `get_loss`, and
    unscales the gradients and sets `learn.skip_step` in `backward` (see MixedPrecisionStep). A step that
    wraps another derives from `WrappedStep`."""

    def forward_module(self, learn: "Learner") -> nn.Module:
        """What the forward pass calls: `learn.model` itself. A wrapping step may return a wrapper of what its
        inner step returns (DistributedDataParallel in training, torch.compile's module), so the wrappers
        compose: DDP inside torch.compile inside autocast."""
        return learn.model

    def predict(self, learn: "Learner") -> None:
        # the outermost step says which module runs (learn.train_step is the whole chain of wrappers)
        learn.preds = learn.train_step.forward_module(learn)(learn.xb)

    def get_loss(self, learn: "Learner") -> None:
        learn.loss = learn.loss_func(learn.preds, learn.yb)

    def backward(self, learn: "Learner") -> None:
        learn.loss.backward()

    def step(self, learn: "Learner") -> None:
        learn.opt.step()

    def zero_grad(self, learn: "Learner") -> None:
        learn.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict | None:
        """What a checkpoint must keep of this step (a loss scaler's state), or None."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Put back what `state_dict` returned."""


class WrappedStep(TrainStep):
    """A TrainStep around another (`inner`): every piece, its state and the module the forward pass calls
    are the inner step's unless a subclass overrides them (MixedPrecisionStep, DistributedStep,
    CompiledStep). A callback installs one with `wrap` and takes it out with `unwrap` at cleanup_fit."""

    def __init__(self, inner: TrainStep):
        self.inner = inner

    @classmethod
    def wrap(cls, learn: "Learner", *args, **kwargs) -> "WrappedStep":
        """Wrap `learn.train_step` in a new step of this class (built with `args`, `kwargs`); returns it."""
        learn.train_step = step = cls(learn.train_step, *args, **kwargs)
        return step

    def unwrap(self, learn: "Learner") -> None:
        """Take this step out of `learn.train_step`'s chain wherever it is now: callbacks clean up in their
        order, not in the reverse of the order they wrapped, so another wrapper may sit outside it."""
        if learn.train_step is self:
            learn.train_step = self.inner
            return
        step = learn.train_step
        while isinstance(step, WrappedStep):
            if step.inner is self:
                step.inner = self.inner
                return
            step = step.inner

    def forward_module(self, learn: "Learner") -> nn.Module:
        return self.inner.forward_module(learn)

    def predict(self, learn: "Learner") -> None:
        self.inner.predict(learn)

    def get_loss(self, learn: "Learner") -> None:
        self.inner.get_loss(learn)

    def backward(self, learn: "Learner") -> None:
        self.inner.backward(learn)

    def step(self, learn: "Learner") -> None:
        self.inner.step(learn)

    def zero_grad(self, learn: "Learner") -> None:
        self.inner.zero_grad(learn)

    def state_dict(self) -> dict | None:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class LoopText(str):
    """Text that a notebook shows as it is (a plain str shows as its repr, newlines escaped)."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


class Learner:
    """Train `model` on `dls` with `loss_func`, calling callbacks at every event.

    State that callbacks read and may change (this docstring is the contract; every built-in honours it):
      model; dls (.train and .valid iterables of (x, y) batches; valid None: no validation); loss_func;
      opt_func; opt; lr (the optimizer's, or base_lr while there is none); base_lr (what a new optimizer
      starts with); train_step (a TrainStep); cbs; n_epochs; epoch (0-based); training (True in the train
      pass); dl (the iterable being consumed); n_iter (batches in this pass, None when unknown); iter
      (batch index in this pass); train_iter (training batches finished in this fit, so the index of the
      current one); iters_per_epoch (training batches per epoch that schedules plan for); batch (the
      (x, y) pair; xb and yb are its parts); preds; loss; loss_scale; skip_step; lr_sweep (True while
      `lr_find`'s sweep runs); error (the exception ending a phase); gradients_pending (a backward pass
      ran since the last step's zero_grad: a batch cancelled after backward); resuming (the progress of the
      checkpoint this fit resumes, {"epoch", "batch", "train_iter", ...}, until its state is put back; else
      None).

    What the state means at each event (callbacks run by `order`, lowest first; one may change the state
    for those after it):
      before_fit      opt exists; n_epochs is set, train_iter is 0, error is None; no parameter has a
                      gradient (each fit starts with none, even after a fit cancelled mid-step);
                      iters_per_epoch is len(dls.train) (None when unknown), which LimitBatches (order -10)
                      lowers, or sets to its limit when the length is unknown, before schedules (5) plan
                      with it; DeviceCallback (-20) moves the model to its device.
      before_epoch    epoch is this epoch's index.
      before_train,   training, the model's train/eval mode and dl are set; n_iter is len(dl) (None when
      before_validate unknown), lowered by LimitBatches (-10).
      before_batch    iter and batch are this batch's (as the data gave it: DeviceCallback (-20) moves it);
                      train_iter is this training batch's index in the fit; lr is this batch's once a
                      schedule (5) has set it; preds, loss and the other per-batch state are still the
                      previous batch's.
      after_pred      preds: the model's output (float16/bfloat16 under MixedPrecision's autocast).
      after_loss      loss: the true loss (never multiplied by a loss scale), a float32 scalar under
                      MixedPrecision, with its graph while training. loss_scale: None, or the factor (a 0-d
                      tensor on the device) by which the coming backward pass multiplies every gradient
                      (float16 loss scaling), so that gradients seen *during* backward (tensor hooks,
                      ActivationStats) are that many times too large and must be divided by it.
      after_backward  (training only) p.grad is the true, unscaled gradient, summed over the batches since
                      the last step (a batch cancelled after backward keeps its gradients for the next:
                      gradient accumulation). skip_step is True when this step will be skipped because a
                      gradient is inf/NaN from a float16 overflow: the scaler lowers the scale and no weight
                      changes; it is not a numerical error of the model. Gradients are changed here
                      (GradClip, 20).
      after_step      (training only) the weights are updated (unchanged when skip_step); p.grad still holds
                      what the step used (clipped, after GradClip); gradients are zeroed after this event.
      after_batch,    train_iter is still this batch's index (it counts up after cleanup_batch).
      cleanup_batch
      after_train,    the pass went through all its batches (n_iter of them, when known) uncancelled.
      after_validate
      after_epoch     MetricsCallback (10) has appended the epoch's record for callbacks after it;
                      EarlyStopping (100) runs last, so its stop skips no other callback's after_epoch.
      after_fit       only when the fit finished normally: no cancel, no error.
      cleanup_X       always. error is None when the phase finished or was cancelled, else the exception
                      propagating (KeyboardInterrupt included). Resources are released here, and state a
                      callback changed for the fit (hyper-parameters, train_step, hooks) is put back.
    Resuming (`fit(..., resume_from=checkpoint)`): before_fit runs as in any fit (with `resuming` set), then
    the model, optimizer and train_step states are loaded; the loop starts at the checkpoint's epoch, whose
    before_epoch and before_train run, then every callback's `load_state_dict`, the random streams and the
    data position are put back, and the next batch is the one after the checkpoint's. See `state_dict`.
    Stops (Ctrl-C, SIGTERM) asked for while `deferring_stops` is on (the Checkpoint callback turns it on)
    are taken at the next training-batch boundary or at the start of the next epoch, as an Interrupted with
    `at_batch_boundary` True.
    An empty pass is a DataError: no training batch, or no validation batch while dls.valid is not None.
    After `fit` returns, the model holds the last weights (the best ones with SaveBest). In `lr_find`'s
    sweep (a fit with lr_sweep True) only the callbacks whose `in_lr_sweep` is True run.
    """

    def __init__(self, model: nn.Module, dls, loss_func: Callable = nn.functional.cross_entropy, *,
                 lr: float = 1e-3, opt_func: OptFactory = torch.optim.AdamW, cbs: Sequence[Callback] = (),
                 train_step: TrainStep | None = None):
        self.model, self.dls, self.loss_func = model, dls, loss_func
        self.opt_func, self.opt = opt_func, None
        self.base_lr = lr
        self.train_step = train_step or TrainStep()
        self.cbs: list[Callback] = []
        self._handlers: dict[str, list[Callable]] | None = None
        self.n_epochs, self.epoch, self.training = 0, 0, False
        self.iter, self.n_iter, self.train_iter = 0, None, 0
        self.iters_per_epoch: int | None = None
        self.dl = None
        self.batch = self.preds = self.loss = None
        self.loss_scale: torch.Tensor | None = None
        self.skip_step, self.lr_sweep = False, False
        self.error: BaseException | None = None
        self.resuming: dict | None = None
        self.gradients_pending = False  # a backward pass ran and no step has used its gradients yet
        self._resume: dict | None = None  # the checkpoint's state until it is put back
        self._epoch_rng: dict | None = None  # random streams at the start of this training pass (see _data_state)
        self.add_cbs(cbs)

    # --- callbacks -----------------------------------------------------------------------------------
    def add_cbs(self, cbs: Iterable[Callback]) -> None:
        for cb in cbs:
            if not isinstance(cb, Callback):
                raise TypeError(f"{cb!r} is not a deepscope Callback")
            check_event_names(cb)
            self.cbs.append(cb)
        self._handlers = None

    def remove_cbs(self, cbs: Iterable[Callback]) -> None:
        for cb in cbs:
            if cb in self.cbs:
                self.cbs.remove(cb)
        self._handlers = None

    def sorted_cbs(self) -> list[Callback]:
        return sorted(self.cbs, key=lambda cb: cb.order)  # stable: equal orders keep insertion order

    def get_cb(self, kind: type) -> Callback | None:
        """The first callback of a type, e.g. `learn.get_cb(Recorder)`."""
        return next((cb for cb in self.cbs if isinstance(cb, kind)), None)

    def callback(self, event: str) -> None:
        """Run `event` on every callback that handles it, in order."""
        if self._handlers is None:
            self._handlers = {e: [(cb, getattr(cb, e)) for cb in self.sorted_cbs() if hasattr(cb, e)] for e in EVENTS}
        for cb, method in self._handlers[event]:
            try:
                method(self)
            except tuple(CANCEL_EXCEPTIONS.values()):
                raise
            except CallbackError:
                raise
            except Exception as e:
                raise CallbackError(cb, event, e) from e

    # --- state helpers ---------------------------------------------------------------------------------
    @property
    def xb(self):
        return self.batch[0]

    @property
    def yb(self):
        return self.batch[1]

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"] if self.opt is not None else self.base_lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.base_lr = value
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"] = value

    def create_opt(self) -> torch.optim.Optimizer:
        self.opt = self.opt_func(self.model.parameters(), lr=self.base_lr)
        return self.opt

    # --- the loop --------------------------------------------------------------------------------------
    def _phase(self, name: str, body: Callable[[], None]) -> None:
        """before_X, body, after_X; the phase's Cancel exception ends it quietly; cleanup_X always runs, and
        sees in `error` any other exception on its way out. When cleanup_X fails too, the exception that
        ended the phase is the one raised (a Ctrl-C stays a Ctrl-C), with the cleanup's failure noted on it."""
        failure: BaseException | None = None
        try:
            self.callback(f"before_{name}")
            body()
            self.callback(f"after_{name}")
        except CANCEL_EXCEPTIONS[name]:
            pass
        except BaseException as e:
            if not isinstance(e, _CANCELS):
                self.error = e
            failure = e
        try:
            self.callback(f"cleanup_{name}")
        except BaseException as cleanup_error:
            if failure is None or isinstance(failure, _CANCELS):
                raise
            if hasattr(failure, "add_note"):  # Python 3.11+
                failure.add_note(f"while stopping, cleanup_{name} failed too: {cleanup_error}")
        if failure is not None:
            raise failure

    def fit(self, n_epochs: int = 1, lr: float | None = None, cbs: Sequence[Callback] = (),
            *, train: bool = True, valid: bool = True, resume_from=None) -> None:
        """Train for `n_epochs`. `cbs` are added for this call only; `lr` (if given) sets the optimizer's.

        `resume_from`: a checkpoint file, a folder of checkpoints or a run folder (its latest checkpoint whose
        checksum matches), or a state from `state_dict`: the fit continues from there, as if it had never
        stopped (bit for bit on the CPU with the same callbacks, data and thread count). The fit must be the
        one the checkpoint was taken in: same `n_epochs`, model, optimizer and stateful callbacks, else
        CheckpointError naming what differs. A checkpoint taken at the end of the last epoch leaves nothing to
        train: the fit puts its state back (weights, metrics, records) and ends, as the uninterrupted fit did
        (how `train --resume` finishes a run killed while writing its results). To train such a model
        further, load its weights into a new fit instead."""
        if not isinstance(n_epochs, int) or n_epochs <= 0:
            raise ConfigError(f"number of epochs must be a positive integer, got {n_epochs!r}")
        resume = self._load_resume(resume_from, n_epochs, train) if resume_from is not None else None
        if train and data_length(self.dls.train) == 0:  # known before any callback runs
            raise no_batches_error(training=True)
        if valid and self.dls.valid is not None and data_length(self.dls.valid) == 0:
            raise no_batches_error(training=False)
        cbs = list(cbs)
        self.add_cbs(cbs)
        try:
            if lr is not None:
                self.base_lr = lr
            if self.opt is None:
                self.create_opt()
            elif lr is not None:
                self.lr = lr
            self.model.zero_grad(set_to_none=True)  # a fit cancelled after backward left its gradients
            self.gradients_pending = False
            self.n_epochs, self.train_iter, self.error = n_epochs, 0, None
            self.iters_per_epoch = data_length(self.dls.train)
            self._resume = resume
            self.resuming = dict(resume["progress"]) if resume is not None else None
            self._phase("fit", functools.partial(self._fit_epochs, train, valid))
        finally:
            self._resume = self.resuming = None
            self.remove_cbs(cbs)

    def _fit_epochs(self, train: bool, valid: bool) -> None:
        first = 0
        if self._resume is not None:  # after before_fit: the device is set, the callbacks are ready
            first = self._load_training_state()
        for self.epoch in range(first, self.n_epochs):
            self._stop_point()  # a stop asked for during the last validation
            self._phase("epoch", functools.partial(self._one_epoch, train, valid))
        if self._resume is not None:  # a checkpoint taken at the very end of the last epoch
            self._restore_callbacks_and_streams()
        self._stop_point()  # asked for during the last validation: still a stop

    def _one_epoch(self, train: bool, valid: bool) -> None:
        if train:
            self._one_pass(training=True)
        if valid and self.dls.valid is not None:
            self._one_pass(training=False)

    def _one_pass(self, training: bool) -> None:
        self.training = training
        self.model.train(training)
        self.dl = self.dls.train if training else self.dls.valid
        self.n_iter = data_length(self.dl)
        with torch.set_grad_enabled(training):
            self._phase("train" if training else "validate", self._all_batches)

    def _all_batches(self) -> None:
        seen, start, batches = 0, 0, self.dl
        if self.training:
            if self._resume is not None:
                start, batches = self._resume_data()
            elif not _has_state(self.dl):
                self._epoch_rng = _stream_state(self.dl)
        for self.iter, self.batch in enumerate(batches, start):
            if self.training or not deferring_stops():  # a stop asked during validation waits for the epoch's end
                # a stop asked for is taken here, between batches (also a Ctrl-C Python swallowed in a finaliser)
                self._stop_point()
            if isinstance(self.batch, (tuple, list)) and self.batch and isinstance(self.batch[0], torch.Tensor) \
                    and self.batch[0].dim() > 0 and len(self.batch[0]) == 0:
                raise DataError(f"{'training' if self.training else 'validation'} batch {self.iter} holds no items; "
                                f"remove empty batches from the data (a batch needs at least one example)")
            seen += 1
            self._phase("batch", self._one_batch)
            if self.training:
                self.train_iter += 1
        if not seen and not start:  # data of unknown length that turned out empty: never "train" silently
            raise no_batches_error(self.training)

    def _stop_point(self) -> None:
        """Take a stop asked for (Ctrl-C, SIGTERM; also one Python swallowed in a finaliser) here, between
        batches; under DistributedDataParallel only once every rank has agreed on it (Checkpoint)."""
        from . import distributed

        if stop_due(distributed.active()):
            raise_pending_interrupt(at_batch_boundary=True)

    def _one_batch(self) -> None:
        step = self.train_step
        self.loss_scale, self.skip_step = None, False  # a TrainStep that scales the loss sets them
        step.predict(self)
        self.callback("after_pred")
        step.get_loss(self)
        self.callback("after_loss")
        if self.training:
            step.backward(self)
            self.gradients_pending = True
            self.callback("after_backward")
            step.step(self)
            self.callback("after_step")
            step.zero_grad(self)
            self.gradients_pending = False

    # --- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self, at: str = "batch", extra: dict | None = None) -> dict:
        """Everything needed to continue this fit exactly (deepscope.checkpoint stores it without pickle):

            progress    {"epoch", "batch" (training batches of that epoch already done), "train_iter",
                         "n_epochs", "finished"}: where the fit continues
            model       model.state_dict()
            optimizer   opt.state_dict() (moments, step counts, hyper-parameters as last set)
            train_step  train_step.state_dict() (a float16 loss scaler's scale and growth tracker)
            callbacks   {key: cb.state_dict()} for every callback that keeps state (key: its class name,
                        with "#2", "#3"... for repeats): metrics and loss history, schedules' and monitors'
                        positions, the statistics history and its sampler's generator, ...
            rng         Python's, NumPy's, torch's CPU and CUDA random streams (deepscope.checkpoint.rng_state)
            data        the training data's position: its own state_dict when it has one (TensorBatches: this
                        epoch's order, batches taken, generator), else the streams at the start of the epoch
                        and the number of batches to replay
            extra       `extra` as given (deepscope train stores its config)

        `at` says where the fit is: "batch" at the end of a training batch (cleanup_batch: the fit continues
        with the next batch), "epoch" at the end of an epoch (cleanup_epoch: the next epoch), "fit" when the
        fit is over. Take it with no gradients pending (not after a batch cancelled after backward)."""
        if at == "batch":
            if not self.training:
                raise RuntimeError("Learner.state_dict(at='batch') is taken at the end of a training batch")
            progress = {"epoch": self.epoch, "batch": self.iter + 1, "train_iter": self.train_iter + 1}
        elif at == "epoch":
            progress = {"epoch": self.epoch + 1, "batch": 0, "train_iter": self.train_iter}
        elif at == "fit":
            progress = {"epoch": self.n_epochs, "batch": 0, "train_iter": self.train_iter}
        else:
            raise ValueError(f"at must be 'batch', 'epoch' or 'fit', got {at!r}")
        from . import distributed

        progress.update(n_epochs=self.n_epochs, finished=at == "fit", world_size=distributed.world_size())
        from .checkpoint import rng_state

        # under DistributedDataParallel each rank has its own streams (dropout): all of them, a collective
        by_rank = distributed.gather_objects(rng_state()) if distributed.active() else None
        return {"rng_by_rank": by_rank, "progress": progress, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict() if self.opt is not None else None,
                "optimizer_class": type(self.opt).__name__ if self.opt is not None else None,
                "train_step": self.train_step.state_dict() if hasattr(self.train_step, "state_dict") else None,
                "callbacks": {key: state for key, cb in self._keyed_cbs() if (state := cb.state_dict()) is not None},
                "rng": rng_state(), "data": self._data_state(at == "batch"), "extra": dict(extra or {})}

    def _keyed_cbs(self) -> list[tuple[str, Callback]]:
        """Every callback with the key its state has in a checkpoint: its class name, "#2"... for repeats."""
        counts: dict[str, int] = {}
        out = []
        for cb in self.sorted_cbs():
            counts[cb.name] = counts.get(cb.name, 0) + 1
            out.append((cb.name if counts[cb.name] == 1 else f"{cb.name}#{counts[cb.name]}", cb))
        return out

    def _data_state(self, mid_epoch: bool) -> dict:
        dl = self.dls.train
        if _has_state(dl):
            return {"kind": "state_dict", "state": dl.state_dict(), "mid_epoch": mid_epoch}
        generator = getattr(dl, "generator", None)
        return {"kind": "replay", "mid_epoch": mid_epoch, "epoch_start": self._epoch_rng if mid_epoch else None,
                "generator": generator.get_state() if isinstance(generator, torch.Generator) else None}

    def _load_resume(self, source, n_epochs: int, train: bool) -> dict:
        """The state to resume from, checked against this learner before anything runs."""
        from .checkpoint import latest_checkpoint, load_checkpoint

        if isinstance(source, dict):
            state = source
        else:
            from pathlib import Path

            path = Path(source)
            if path.is_dir():
                from .runfolder import CHECKPOINTS

                folder = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
                found = latest_checkpoint(folder, log=lambda m: print(f"deepscope: {m}"))
                if found is None:
                    raise CheckpointError(f"{path} holds no checkpoint to resume from (none in {folder} whose "
                                          f"checksum matches)")
                path = found
            state = load_checkpoint(path)
        progress = state.get("progress") or {}
        if progress.get("finished"):
            raise CheckpointError(f"the fit this checkpoint was taken in had finished all its "
                                  f"{progress.get('n_epochs')} epochs; there is nothing to resume")
        if progress.get("n_epochs") != n_epochs:
            raise CheckpointError(f"the checkpoint was taken in a fit of {progress.get('n_epochs')} epochs; resume "
                                  f"it with fit({progress.get('n_epochs')}, ...) (a schedule planned over that many "
                                  f"epochs is in its state), not fit({n_epochs}, ...)")
        if not train:
            raise ConfigError("resuming continues training: fit(..., train=False) cannot resume")
        from . import distributed

        saved_world = progress.get("world_size", 1)
        if saved_world != distributed.planned_world_size():
            raise CheckpointError(f"the checkpoint was taken by {saved_world} process(es) and this job has "
                                  f"{distributed.planned_world_size()}: resume with the same number (torchrun "
                                  f"--nproc-per-node/--nnodes), since the batches and random streams are split by it")
        check_model_state(self.model, state.get("model") or {})
        return state

    def _load_training_state(self) -> int:
        """Load model, optimizer and train_step states (after before_fit); returns the epoch to start at."""
        state = self._resume
        self.model.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            if self.opt is None:
                self.create_opt()
            opt_class = state.get("optimizer_class")
            if opt_class is not None and opt_class != type(self.opt).__name__:
                raise CheckpointError(f"the checkpoint's optimizer is {opt_class}, this learner's is "
                                      f"{type(self.opt).__name__}; resume with the optimizer it was taken with")
            _check_same_hyper_parameters(state["optimizer"], self.opt)
            try:
                self.opt.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({e})") from None
        if state.get("train_step") is not None and hasattr(self.train_step, "load_state_dict"):
            self.train_step.load_state_dict(state["train_step"])
        self.train_iter = state["progress"]["train_iter"]
        return state["progress"]["epoch"]

    def _restore_callbacks_and_streams(self) -> None:
        """Put back every callback's state and the random streams; the checkpoint is then spent."""
        state, self._resume = self._resume, None
        saved = dict(state.get("callbacks") or {})
        keyed = self._keyed_cbs()
        have = {key for key, cb in keyed if type(cb).state_dict is not Callback.state_dict}
        missing, extra = sorted(set(saved) - {k for k, _ in keyed}), sorted(have - set(saved))
        if missing or extra:
            parts = ([f"state for callbacks this learner lacks: {', '.join(missing)}"] if missing else []) + \
                    ([f"no state for this learner's {', '.join(extra)}"] if extra else [])
            raise CheckpointError(f"the checkpoint was taken with other callbacks ({'; '.join(parts)}); resume "
                                  f"with the callbacks it was taken with")
        for key, cb in keyed:
            if key in saved:
                cb.load_state_dict(saved[key])
        from . import distributed
        from .checkpoint import set_rng_state

        by_rank = state.get("rng_by_rank")
        if by_rank and len(by_rank) == distributed.world_size():
            set_rng_state(by_rank[distributed.rank()])
        else:
            set_rng_state(state["rng"])
        self.resuming = None

    def _resume_data(self):
        """(index of the next batch, an iterator positioned there) for the resumed training pass; the
        callbacks' states and the random streams are put back on the way."""
        state = self._resume
        data, start = state["data"], state["progress"]["batch"]
        from .checkpoint import set_rng_state

        if data["kind"] == "state_dict":
            if not _has_state(self.dl):
                raise CheckpointError("the checkpoint's training data had a state_dict (its order and position); "
                                      "this learner's has none")
            dl_state = data["state"]
            if not data["mid_epoch"] and isinstance(dl_state, dict) and "order" in dl_state:
                dl_state = {**dl_state, "order": None, "position": 0}  # a new epoch draws a new order
            self.dl.load_state_dict(dl_state)
            self._restore_callbacks_and_streams()
            return start, iter(self.dl)
        generator = getattr(self.dl, "generator", None)
        if data["mid_epoch"] and start:
            # Replay the epoch's first batches from the streams it started with, then continue from the
            # checkpoint's streams: exact for data whose order comes from those streams (a DataLoader).
            epoch_start = data["epoch_start"]
            set_rng_state(epoch_start["rng"])
            if epoch_start.get("generator") is not None and isinstance(generator, torch.Generator):
                generator.set_state(epoch_start["generator"])
            self._epoch_rng = epoch_start
            batches = iter(self.dl)
            for _ in range(start):
                next(batches)
        else:
            if data.get("generator") is not None and isinstance(generator, torch.Generator):
                generator.set_state(data["generator"])
            batches = None
        self._restore_callbacks_and_streams()
        if batches is None:
            self._epoch_rng = _stream_state(self.dl)
            batches = iter(self.dl)
        return start, batches

    def validate(self, cbs: Sequence[Callback] = ()) -> None:
        """One validation pass over `dls.valid`, with the callbacks' batch and validate events."""
        if self.dls.valid is None:
            raise ConfigError("validate() needs validation data, but dls.valid is None")
        cbs = list(cbs)
        self.add_cbs(cbs)
        self.error = None
        try:
            self._one_pass(training=False)
        finally:
            self.remove_cbs(cbs)

    def lr_find(self, **kwargs):
        """Sweep the learning rate exponentially and suggest values; model and optimizer are restored
        afterwards. See `deepscope.lr_find.lr_find` for the options."""
        from .lr_find import lr_find

        return lr_find(self, **kwargs)

    # --- introspection ---------------------------------------------------------------------------------
    def show_training_loop(self) -> "LoopText":
        """The loop's events in order with the callbacks that handle each: printed in a script; in a
        notebook, shown once as the cell's value (not printed and then repeated as an escaped string)."""
        lines = []
        indent = {"fit": 0, "epoch": 1, "train": 2, "validate": 2, "batch": 3}
        order = ["before_fit", "before_epoch", "before_train", "before_batch", *BATCH_POINTS, "after_batch",
                 "cleanup_batch", "after_train", "cleanup_train", "before_validate", "(batches as above, "
                 "no backward/step)", "after_validate", "cleanup_validate", "after_epoch", "cleanup_epoch",
                 "after_fit", "cleanup_fit"]
        for event in order:
            phase = event.split("_", 1)[-1]
            pad = "  " * (indent.get(phase, 4 if event in BATCH_POINTS else 3))
            names = [cb.name for cb in self.sorted_cbs() if hasattr(cb, event)]
            lines.append(f"{pad}{event}: {', '.join(names)}" if names else f"{pad}{event}")
        text = LoopText("\n".join(lines))
        from .callbacks.progress import in_notebook

        if not in_notebook():
            print(text)
        return text


def _has_state(dl) -> bool:
    return callable(getattr(dl, "state_dict", None)) and callable(getattr(dl, "load_state_dict", None))


def _stream_state(dl) -> dict:
    """The random streams a pass over `dl` starts from (global ones, and a DataLoader's own generator)."""
    from .checkpoint import rng_state

    generator = getattr(dl, "generator", None)
    return {"rng": rng_state(), "generator": generator.get_state() if isinstance(generator, torch.Generator) else None}


# hyper-parameters a schedule moves during a fit: the checkpoint's values are the ones to continue with
_SCHEDULED = {"params", "lr", "initial_lr", "momentum", "betas"}


def _check_same_hyper_parameters(saved: dict, opt: torch.optim.Optimizer) -> None:
    """CheckpointError naming the optimizer settings (weight decay, eps, ...) that differ between a
    checkpoint and this optimizer: loading it would silently replace the ones asked for."""
    groups = saved.get("param_groups") or []
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"the checkpoint's optimizer has {len(groups)} parameter group(s), this one "
                              f"{len(opt.param_groups)}")
    differ = [f"{k}: {g[k]!r} in the checkpoint, {own.get(k)!r} here" for g, own in zip(groups, opt.param_groups)
              for k in g if k not in _SCHEDULED and k in own and g[k] != own[k]]
    if differ:
        raise CheckpointError(f"the checkpoint's optimizer was set up otherwise ({'; '.join(differ[:4])}); resume "
                              f"with the settings it was taken with")


def check_model_state(model: nn.Module, state: dict) -> None:
    """CheckpointError naming the keys missing, unexpected and of another shape when `state` (a model's
    state_dict) was not taken from a model like `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the checkpoint vs {tuple(own[k].shape)} in the model"
              for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    show = lambda items: ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
    parts = ([f"missing from the checkpoint: {show(missing)}"] if missing else []) + \
            ([f"not in the model: {show(unexpected)}"] if unexpected else []) + \
            ([f"different shapes: {show(shapes)}"] if shapes else [])
    raise CheckpointError(f"the checkpoint is of another model ({'; '.join(parts)}); resume with the model and "
                          f"config it was taken with")


assert set(PHASES) == set(CANCEL_EXCEPTIONS)
