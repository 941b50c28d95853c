"""Loss and metrics per epoch, accumulated on the device (no host sync inside the step)."""
from __future__ import annotations

import time

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from ..callback import Callback


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
        return None if self.total is None else float(self.total) / self.count


class MetricsCallback(Callback):
    """Mean training loss, validation loss and validation metrics for each epoch.

    `metrics` maps names to torchmetrics `Metric`s (any of them: F1, AUROC, ...); by default, accuracy
    for the number of classes the model outputs. Records land in `history`, one dict per epoch:
    `epoch`, `train_loss`, `valid_loss`, `valid_<name>` for each metric, `seconds`.
    """

    order = 10

    def __init__(self, metrics: dict[str, Metric] | None = None, *, train_metrics: bool = False):
        self.metrics = metrics
        self.train_metrics = train_metrics
        self.loss = {"train": WeightedMean(), "valid": WeightedMean()}
        self.history: list[dict] = []
        self._started = 0.0

    def _ensure_metrics(self, learn) -> None:
        if self.metrics is None:
            n_classes = getattr(learn.dls, "n_classes", None) or learn.preds.shape[-1]
            self.metrics = {"accuracy": MulticlassAccuracy(n_classes, average="micro", validate_args=False)}
        device = learn.preds.device
        for m in self.metrics.values():
            if m.device != device:
                m.to(device)

    def before_fit(self, learn) -> None:
        self.history = []

    def before_epoch(self, learn) -> None:
        self._started = time.perf_counter()
        for m in [*self.loss.values(), *(self.metrics or {}).values()]:
            m.reset()

    def after_loss(self, learn) -> None:
        self._ensure_metrics(learn)
        split = "train" if learn.training else "valid"
        self.loss[split].update(learn.loss.detach(), weight=len(learn.yb))
        if not learn.training or self.train_metrics:
            for metric in self.metrics.values():
                metric.update(learn.preds.detach(), learn.yb)

    def after_epoch(self, learn) -> None:
        record: dict = {"epoch": learn.epoch + 1}
        for split, metric in self.loss.items():
            record[f"{split}_loss"] = metric.compute()
        for name, metric in (self.metrics or {}).items():
            record[f"valid_{name}"] = float(metric.compute()) if metric.update_called else None
        record["seconds"] = time.perf_counter() - self._started
        self.history.append(record)
