"""The Learner: a training loop whose every step is an event that callbacks can observe and change.

The loop, outermost first (print it with `learn.show_training_loop()`):

    fit:      before_fit  -> epochs -> after_fit, cleanup_fit
    epoch:    before_epoch -> train pass -> validate pass -> after_epoch, cleanup_epoch
    train / validate: before_X -> batches -> after_X, cleanup_X
    batch:    before_batch -> predict, after_pred -> loss, after_loss
              -> (training only) backward, after_backward -> step, after_step -> zero_grad
              -> after_batch, cleanup_batch

Cancel exceptions (`deepscope.callback`) skip the rest of their phase; `cleanup_X` always runs.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .callback import (
    BATCH_POINTS, CANCEL_EXCEPTIONS, EVENTS, PHASES, Callback, CallbackError, check_event_names,
)
from .errors import ConfigError

OptFactory = Callable[..., torch.optim.Optimizer]


class TrainStep:
    """The five pieces of one optimisation step. Subclass and override one piece (or assign an instance to
    `learn.train_step`, e.g. from a callback's `before_fit`) to change it without copying the loop."""

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


class Learner:
    """Train `model` on `dls` with `loss_func`, calling callbacks at every event.

    State that callbacks read and may change (this list is the contract):
      model, dls (with .train / .valid iterables of (x, y) batches), loss_func, opt_func, opt, lr (the
      optimizer's, or base_lr while there is none), base_lr (what a new optimizer starts with), train_step (a TrainStep), cbs, n_epochs, epoch (0-based), training (True in the train pass),
      dl (the iterable being consumed), n_iter (batches in this pass, when known), iter (batch index in
      this pass), train_iter (training batches seen during this fit), batch (the (x, y) pair; xb and yb
      are its parts), preds, loss.
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
        self.dl = None
        self.batch = self.preds = self.loss = None
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
        """before_X, body, after_X; the phase's Cancel exception ends it quietly; cleanup_X always runs."""
        try:
            self.callback(f"before_{name}")
            body()
            self.callback(f"after_{name}")
        except CANCEL_EXCEPTIONS[name]:
            pass
        finally:
            self.callback(f"cleanup_{name}")

    def fit(self, n_epochs: int = 1, lr: float | None = None, cbs: Sequence[Callback] = (),
            *, train: bool = True, valid: bool = True) -> None:
        """Train for `n_epochs`. `cbs` are added for this call only; `lr` (if given) sets the optimizer's."""
        if not isinstance(n_epochs, int) or n_epochs <= 0:
            raise ConfigError(f"number of epochs must be a positive integer, got {n_epochs!r}")
        cbs = list(cbs)
        self.add_cbs(cbs)
        try:
            if lr is not None:
                self.base_lr = lr
            if self.opt is None:
                self.create_opt()
            elif lr is not None:
                self.lr = lr
            self.n_epochs, self.train_iter = n_epochs, 0
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
        self.n_iter = len(self.dl) if hasattr(self.dl, "__len__") else None
        with torch.set_grad_enabled(training):
            self._phase("train" if training else "validate", self._all_batches)

    def _all_batches(self) -> None:
        for self.iter, self.batch in enumerate(self.dl):
            self._phase("batch", self._one_batch)
            if self.training:
                self.train_iter += 1

    def _one_batch(self) -> None:
        step = self.train_step
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
        cbs = list(cbs)
        self.add_cbs(cbs)
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
    def show_training_loop(self) -> str:
        """The loop's events in order with the callbacks that handle each; also printed."""
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
        text = "\n".join(lines)
        print(text)
        return text


assert set(PHASES) == set(CANCEL_EXCEPTIONS)
