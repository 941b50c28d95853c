"""The callback protocol: events, the Callback base class, and the exceptions used as control flow."""
from __future__ import annotations

import difflib

# The phases of a fit, outermost first. Each has `before_X`, `after_X` (ran to the end) and `cleanup_X`
# (always runs, even when cancelled or when an error propagates: release resources here).
PHASES = ("fit", "epoch", "train", "validate", "batch")
# Points inside one batch, in the order they happen. Backward and step happen only while training.
BATCH_POINTS = ("after_pred", "after_loss", "after_backward", "after_step")
EVENTS: tuple[str, ...] = tuple(
    f"{when}_{phase}" for phase in PHASES for when in ("before", "after", "cleanup")
) + BATCH_POINTS
_EVENT_PREFIXES = ("before_", "after_", "cleanup_")


class CancelFitException(Exception):
    """Raise in a callback to stop fitting now; `cleanup_fit` still runs."""


class CancelEpochException(Exception):
    """Raise to skip the rest of this epoch (training and validation); `cleanup_epoch` still runs."""


class CancelTrainException(Exception):
    """Raise to skip the rest of this epoch's training pass; validation still runs."""


class CancelValidateException(Exception):
    """Raise to skip the rest of this epoch's validation pass."""


class CancelBatchException(Exception):
    """Raise to skip the rest of this batch (e.g. its backward and step); `cleanup_batch` still runs."""


CANCEL_EXCEPTIONS = {
    "fit": CancelFitException,
    "epoch": CancelEpochException,
    "train": CancelTrainException,
    "validate": CancelValidateException,
    "batch": CancelBatchException,
}


class CallbackError(RuntimeError):
    """An exception raised inside a callback, re-raised with the callback's name and the event."""

    def __init__(self, callback: "Callback", event: str, error: BaseException):
        self.callback, self.event, self.error = callback, event, error
        super().__init__(f"callback {callback.name} failed in {event}: {type(error).__name__}: {error}")


class Callback:
    """Base class. Define methods named after events (see EVENTS); each receives the Learner.

    `order` sorts callbacks: lower runs first at every event. A method whose name looks like an event but
    is not one (a typo such as `after_bacth`) is an error when the callback is added, not a silent no-op.
    What the Learner's state means at each event is written in `Learner`'s docstring.

    `in_lr_sweep` says whether the callback takes part in the LR finder's sweep (`lr_find`), a short fit
    whose steps must be taken exactly as training takes them. The default is True because a callback that
    changes how a step is taken (device, precision, clipping, augmentation) must run in the sweep, or its
    curve describes another training; one that records, monitors, schedules, stops or writes files sets it
    to False, so the sweep neither fights it nor replaces what it recorded of the real fit.
    """

    order: int = 0
    in_lr_sweep: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict | None:
        """What this callback must carry across a checkpoint and resume (`Learner.state_dict`), or None when it
        keeps nothing that outlives a batch. Tensors, numpy arrays, numbers, strings, None, and lists, tuples
        and dicts of them (deepscope.checkpoint stores them without pickle). Called at a training batch
        boundary or at the end of an epoch."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Put back what `state_dict` returned. On resume it is called after `before_fit`, `before_epoch` and
        `before_train` of the epoch being resumed, just before its first batch, so it overrides what those
        events reset."""

    def __repr__(self) -> str:
        return f"{self.name}(order={self.order})"


def check_event_names(cb: Callback) -> None:
    """Refuse methods that look like events but are not in EVENTS."""
    for attr in dir(type(cb)):
        if attr.startswith(_EVENT_PREFIXES) and attr not in EVENTS and callable(getattr(cb, attr)):
            close = difflib.get_close_matches(attr, EVENTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; events are {', '.join(EVENTS)}"
            raise ValueError(f"{cb.name} defines {attr!r}, which is not an event{hint}")
