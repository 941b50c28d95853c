"""What the pre-flight look records: plain numbers and names, no tensors, so its checks can be tested with
made-up values."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerWeight:
    """A weight matrix or kernel (a parameter named `weight` with 2+ dimensions) at the start."""
    module: str
    shape: tuple[int, ...]
    constant: bool  # every element equal
    value: float  # the first element (the constant, when constant)


@dataclass
class SetupRecord:
    """The model, one batch and the loss before training (recorded by preflight.inspect_setup)."""
    loss_kind: str | None = None  # "cross_entropy", "nll", "mse", "l1", "bce", "bce_logits" or None
    batch_size: int = 0  # of the first batch (one process's share of it under DistributedDataParallel)
    last_batch_size: int | None = None  # the size of the epoch's last (partial) batch, when it can be known
    x_float: bool = True
    x_mean: float = 0.0
    x_std: float = 1.0
    x_finite: bool = True
    y_dtype: str = ""
    y_shape: tuple[int, ...] = ()
    y_min: float | None = None
    y_max: float | None = None
    out_shape: tuple[int, ...] | None = None  # None when the forward pass failed
    out_float: bool = True
    out_min: float | None = None
    out_max: float | None = None
    out_row_sum_dev: float | None = None  # max |sum over classes - 1|
    out_row_lse_dev: float | None = None  # max |logsumexp over classes|
    out_col_sum_dev: float | None = None  # max |sum over the batch (dim 0) - 1|: softmax taken over the batch
    out_col_lse_dev: float | None = None  # max |logsumexp over the batch|: log_softmax over the batch
    out_module: str = ""  # the leaf module whose output the model returned ("" if none or unknown)
    # how the loss paired an output with targets of another shape that broadcast to a bigger one: "broadcast"
    # (its value is the elementwise loss over every pair), "paired" (over matching pairs: the loss reshapes
    # them itself), or None (not known); see preflight.loss_pairing
    loss_pairs: str | None = None
    weights: list[LayerWeight] = field(default_factory=list)  # in registration order
    batchnorms: list[str] = field(default_factory=list)  # BatchNorm modules in training mode
    # under DistributedDataParallel: the processes (batch_size is one process's share), and which of the
    # batchnorms are SyncBatchNorm (statistics over the global batch)
    world_size: int = 1
    sync_batchnorms: list[str] = field(default_factory=list)
    error: dict | None = None  # {"where", "type", "message"} when the forward pass or the loss raised
    loss_softmax_over_batch: str | None = None  # "softmax"/"log_softmax" taken over dim 0 inside the loss
