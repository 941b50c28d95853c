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
from .errors import ConfigError, DataError, raise_pending_interrupt

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
    unscales the gradients and sets `learn.skip_step` in `backward` (see MixedPrecisionStep)."""

    def predict(self, learn: "Learner") -> None:
        learn.preds = learn.model(learn.xb)

    def get_loss(self, learn: "Learner") -> None:
        learn.loss = learn.loss_func(learn.preds, learn.yb)

    def backward(self, learn: "Learner") -> None:
        learn.loss.backward()

    def step(self, learn: "Learner") -> None:
        learn.opt.step()

    def zero_grad(self, learn: "Learner") -> None:
        learn.opt.zero_grad(set_to_none=True)


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
      `lr_find`'s sweep runs); error (the exception ending a phase).

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
            *, train: bool = True, valid: bool = True) -> None:
        """Train for `n_epochs`. `cbs` are added for this call only; `lr` (if given) sets the optimizer's."""
        if not isinstance(n_epochs, int) or n_epochs <= 0:
            raise ConfigError(f"number of epochs must be a positive integer, got {n_epochs!r}")
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
            self.n_epochs, self.train_iter, self.error = n_epochs, 0, None
            self.iters_per_epoch = data_length(self.dls.train)
            self._phase("fit", functools.partial(self._fit_epochs, train, valid))
        finally:
            self.remove_cbs(cbs)

    def _fit_epochs(self, train: bool, valid: bool) -> None:
        for self.epoch in range(self.n_epochs):
            self._phase("epoch", functools.partial(self._one_epoch, train, valid))

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
        seen = 0
        for self.iter, self.batch in enumerate(self.dl):
            raise_pending_interrupt()  # a Ctrl-C that Python swallowed in a finaliser stops here
            if isinstance(self.batch, (tuple, list)) and self.batch and isinstance(self.batch[0], torch.Tensor) \
                    and self.batch[0].dim() > 0 and len(self.batch[0]) == 0:
                raise DataError(f"{'training' if self.training else 'validation'} batch {self.iter} holds no items; "
                                f"remove empty batches from the data (a batch needs at least one example)")
            seen += 1
            self._phase("batch", self._one_batch)
            if self.training:
                self.train_iter += 1
        if not seen:  # data of unknown length that turned out empty: never "train" silently
            raise no_batches_error(self.training)

    def _one_batch(self) -> None:
        step = self.train_step
        self.loss_scale, self.skip_step = None, False  # a TrainStep that scales the loss sets them
        step.predict(self)
        self.callback("after_pred")
        step.get_loss(self)
        self.callback("after_loss")
        if self.training:
            step.backward(self)
            self.callback("after_backward")
            step.step(self)
            self.callback("after_step")
            step.zero_grad(self)

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


assert set(PHASES) == set(CANCEL_EXCEPTIONS)
