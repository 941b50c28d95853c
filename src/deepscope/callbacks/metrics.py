"""Loss and metrics per epoch, accumulated on the device (no host sync inside the step)."""
from __future__ import annotations

import time

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # torchmetrics is imported when the first metric is made: it adds ~0.7 s to `import deepscope`
    from torchmetrics import Metric

from ..callback import Callback
from ..errors import ConfigError

# The metric used when none is given (made at the first batch, for the classes the model outputs).
DEFAULT_METRIC = "accuracy"


class WeightedMean:
    """A batch-size-weighted mean kept on the device. (torchmetrics' MeanMetric would need its NaN check,
    a host sync per step, to honour weights: with nan_strategy="disable" it drops them, as of 1.9.)"""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, value: torch.Tensor, weight: int) -> None:
        value = value.detach().float() * weight
        self.total = value if self.total is None else self.total + value
        self.count += weight

    def compute(self) -> float | None:
        """The mean; under DistributedDataParallel, of every rank's values (a collective: all ranks call it)."""
        from .. import distributed

        if distributed.active():
            device = self.total.device if self.total is not None else distributed.device()
            both = torch.stack([self.total.reshape(()) if self.total is not None else torch.zeros((), device=device),
                                torch.tensor(float(self.count), device=device)])
            distributed.all_reduce_(both, "sum")
            total, count = both.tolist()
            return total / count if count else None
        return None if self.total is None else float(self.total) / self.count


class MetricsCallback(Callback):
    """Mean training loss, validation loss and validation metrics for each epoch.

    `metrics` maps names to torchmetrics `Metric`s (any of them: F1, AUROC, ...); by default, accuracy
    for the number of classes the model outputs. Records land in `history`, one dict per epoch of the
    latest fit: `epoch`, `train_loss`, `valid_loss`, `valid_<name>` for each metric, with `train_metrics`
    also `train_<name>` (from copies of the metrics, so validation values never include training
    batches), and `seconds`. `direction(key)` says whether a key should go up or down. It sits out the LR
    finder's sweep, so `history` stays the fit's.
    """

    order = 10
    in_lr_sweep = False

    def __init__(self, metrics: dict[str, Metric] | None = None, *, train_metrics: bool = False):
        self.metrics = metrics
        self.train_metrics = train_metrics
        self.loss = {"train": WeightedMean(), "valid": WeightedMean()}
        self._train: dict[str, Metric] = {}  # copies of `metrics` fed with training batches
        self.history: list[dict] = []
        self._started, self._in_epoch = 0.0, False
        self._resumed_train: dict | None = None  # training metrics' states from a checkpoint, until they exist

    def _ensure_metrics(self, learn) -> None:
        if self.metrics is None:
            from torchmetrics.classification import MulticlassAccuracy

            n_classes = getattr(learn.dls, "n_classes", None) or learn.preds.shape[-1]
            self.metrics = {DEFAULT_METRIC: MulticlassAccuracy(n_classes, average="micro", validate_args=False)}
        if self.train_metrics and self._train.keys() != self.metrics.keys():
            self._train = {name: m.clone() for name, m in self.metrics.items()}
        device = learn.preds.device
        for m in [*self.metrics.values(), *self._train.values()]:
            if m.device != device:
                m.to(device)

    def keys(self) -> list[str]:
        """The keys of an epoch record that can be monitored."""
        names = list(self.metrics or {DEFAULT_METRIC: None})
        train = [f"train_{n}" for n in names] if self.train_metrics else []
        return ["train_loss", "valid_loss", *[f"valid_{n}" for n in names], *train]

    def direction(self, key: str) -> tuple[str | None, str]:
        """("min" | "max" | None, why) for a record key: a loss is minimised; a metric goes the way its
        torchmetrics class's `higher_is_better` says (None when it does not say). Unknown keys are errors."""
        if key in ("train_loss", "valid_loss"):
            return "min", "a loss"
        if self.metrics is None:
            from torchmetrics.classification import MulticlassAccuracy
        metrics = self.metrics if self.metrics is not None else {DEFAULT_METRIC: MulticlassAccuracy}
        for split in ("valid", "train") if self.train_metrics else ("valid",):
            for name, metric in metrics.items():
                if key == f"{split}_{name}":
                    kind = metric.__name__ if isinstance(metric, type) else type(metric).__name__
                    better = metric.higher_is_better
                    if better is None:
                        return None, f"torchmetrics {kind} does not say whether higher is better"
                    return ("max" if better else "min"), f"from torchmetrics {kind}"
        raise ConfigError(f"the epoch record will hold no {key!r}; it holds {self.keys()} (a metric named <name> "
                          f"in MetricsCallback(metrics=...) appears as valid_<name>)")

    def before_fit(self, learn) -> None:
        self.history = []
        self._resumed_train: dict | None = None

    def state_dict(self) -> dict:
        """The epoch records so far and this epoch's running training loss and training metrics. (The
        validation side is always empty where a checkpoint is taken: in or after the training pass of an
        epoch that has not validated, or at an epoch's end, after which the next epoch starts afresh.)"""
        from .. import distributed

        loss = self.loss["train"]
        own = {"train_loss": {"total": loss.total, "count": loss.count},
               "train_metrics": {name: {"state": {k: v for k, v in m.metric_state.items()},
                                        "update_count": m._update_count}
                                 for name, m in self._train.items()}}
        # under DDP each rank's running sums cover its own share: kept per rank (a collective)
        by_rank = distributed.gather_objects(own) if distributed.active() else [own]
        # the seconds this epoch had run when the checkpoint was taken mid-epoch: a resumed epoch counts them too
        elapsed = time.perf_counter() - self._started if self._in_epoch else 0.0
        return {"history": [dict(r) for r in self.history], "by_rank": by_rank, "epoch_seconds": elapsed}

    def load_state_dict(self, state: dict) -> None:
        from .. import distributed

        self.history = [dict(r) for r in state["history"]]
        self._started -= state.get("epoch_seconds", 0.0)  # loaded after the resumed epoch's before_epoch
        state = state["by_rank"][distributed.rank()] if len(state["by_rank"]) == distributed.world_size() else \
            state["by_rank"][0]
        loss = self.loss["train"]
        loss.total, loss.count = state["train_loss"]["total"], state["train_loss"]["count"]
        self._resumed_train = state["train_metrics"] or None  # put into the metrics once they exist

    def _restore_train_metrics(self) -> None:
        for name, saved in self._resumed_train.items():
            metric = self._train[name]
            for key, value in saved["state"].items():
                current = getattr(metric, key)
                setattr(metric, key, value.to(current.device) if isinstance(value, torch.Tensor) else value)
            metric._update_count = saved["update_count"]
            metric._computed = None
        self._resumed_train = None

    def before_epoch(self, learn) -> None:
        self._started, self._in_epoch = time.perf_counter(), True
        for m in [*self.loss.values(), *(self.metrics or {}).values(), *self._train.values()]:
            m.reset()

    def after_loss(self, learn) -> None:
        self._ensure_metrics(learn)
        if self._resumed_train is not None:
            self._restore_train_metrics()
        split = "train" if learn.training else "valid"
        self.loss[split].update(learn.loss.detach(), weight=len(learn.yb))
        metrics = self._train if learn.training else self.metrics
        for metric in metrics.values():
            metric.update(learn.preds.detach(), learn.yb)

    def after_epoch(self, learn) -> None:
        record: dict = {"epoch": learn.epoch + 1}
        for split, metric in self.loss.items():
            record[f"{split}_loss"] = metric.compute()
        for name, metric in (self.metrics or {}).items():
            record[f"valid_{name}"] = float(metric.compute()) if metric.update_called else None
        for name, metric in self._train.items():
            record[f"train_{name}"] = float(metric.compute()) if metric.update_called else None
        record["seconds"] = time.perf_counter() - self._started
        self._in_epoch = False
        self.history.append(record)
        # the epoch's training sums are spent: a checkpoint at the epoch's end must not carry them into the next
        self.loss["train"].reset()
        for metric in self._train.values():
            metric.reset()
