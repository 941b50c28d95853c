"""Short runs: stop each pass after a number of batches (smoke tests, quick looks)."""
from __future__ import annotations

from ..errors import ConfigError
from ..callback import Callback, CancelFitException, CancelTrainException, CancelValidateException


class LimitBatches(Callback):
    """Stop each training pass after `train` batches and each validation pass after `valid` batches.

    It lowers `learn.iters_per_epoch` at before_fit (to its limit when the data's length is unknown) and
    `learn.n_iter` at before_train/before_validate, before the callbacks that plan with them (schedules,
    progress bars) read them. It sits out the LR finder's sweep, which sets its own number of batches.
    """

    order = -10  # after DeviceCallback (-20), before schedules (5)
    in_lr_sweep = False

    def __init__(self, train: int | None = None, valid: int | None = None):
        for name, n in (("train", train), ("valid", valid)):
            if n is not None and n <= 0:
                raise ConfigError(f"LimitBatches({name}={n}): the limit must be a positive number of batches")
        self.train, self.valid = train, valid

    def before_fit(self, learn) -> None:
        if self.train is not None:
            n = learn.iters_per_epoch
            learn.iters_per_epoch = self.train if n is None else min(n, self.train)

    def before_train(self, learn) -> None:
        if self.train is not None and learn.n_iter is not None:
            learn.n_iter = min(learn.n_iter, self.train)

    def before_validate(self, learn) -> None:
        if self.valid is not None and learn.n_iter is not None:
            learn.n_iter = min(learn.n_iter, self.valid)

    def before_batch(self, learn) -> None:
        limit = self.train if learn.training else self.valid
        if limit is not None and learn.iter >= limit:
            raise CancelTrainException() if learn.training else CancelValidateException()


class SingleBatch(Callback):
    """Run one training batch, then stop the fit: the quickest check that everything connects."""

    order = 1
    in_lr_sweep = False  # it would end the sweep after one point

    def after_batch(self, learn) -> None:
        raise CancelFitException()
