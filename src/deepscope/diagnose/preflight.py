"""Pre-flight: look at the model, one batch and the loss before any training, and record plain numbers.

Nothing changes: the forward pass runs in eval mode under no_grad, and the training mode is put back.
The checks on these numbers are pure functions in `analyse_setup.py`.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .. import distributed
from ..hooks import Hooks, select_modules
from ..norms import BatchNorm
from .records import LayerWeight, SetupRecord

# Losses recognised by identity: the functional form, or an instance of the module form.
_FUNCTIONAL_LOSSES = {
    F.cross_entropy: "cross_entropy", F.nll_loss: "nll", F.mse_loss: "mse", F.l1_loss: "l1",
    F.smooth_l1_loss: "l1", F.huber_loss: "l1", F.binary_cross_entropy: "bce",
    F.binary_cross_entropy_with_logits: "bce_logits",
}
_MODULE_LOSSES = (
    (nn.CrossEntropyLoss, "cross_entropy"), (nn.NLLLoss, "nll"), (nn.MSELoss, "mse"), (nn.L1Loss, "l1"),
    (nn.SmoothL1Loss, "l1"), (nn.HuberLoss, "l1"), (nn.BCELoss, "bce"), (nn.BCEWithLogitsLoss, "bce_logits"),
)


def loss_kind(loss_func) -> str | None:
    """Which standard loss `loss_func` is (looking through functools.partial), or None."""
    while isinstance(loss_func, functools.partial):
        loss_func = loss_func.func
    for cls, kind in _MODULE_LOSSES:
        if isinstance(loss_func, cls):
            return kind
    try:
        return _FUNCTIONAL_LOSSES.get(loss_func)
    except TypeError:  # unhashable callable
        return None


# Layers that normalise with the current batch's statistics in training, so a tiny batch hurts them:
# torch's BatchNorm1d/2d/3d, SyncBatchNorm and lazy variants, deepscope's BatchNorm, and subclasses.
# By type, not by name: deepscope.norms.RunningBatchNorm is named like them but is built for tiny batches.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, BatchNorm)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether `module` trains on batch statistics (`BATCHNORM_TYPES`)."""
    return isinstance(module, BATCHNORM_TYPES)


def layer_weights(model: nn.Module) -> list[LayerWeight]:
    """Every module's own `weight` of 2+ dimensions (Linear, Conv, Embedding, ...), in registration order."""
    found = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and w.numel() > 1:
            flat = w.detach().flatten()
            found.append(LayerWeight(name, tuple(w.shape), bool((flat == flat[0]).all()), float(flat[0])))
    return found


def last_batch_size(data) -> int | None:
    """The size of the last batch of an epoch that this process takes, for deepscope's TensorBatches (its share
    of the last global batch once sharded for DistributedDataParallel) and torch DataLoaders (from its
    sampler: a DistributedSampler's share of the items)."""
    bs = getattr(data, "batch_size", None)
    if not isinstance(bs, int) or getattr(data, "drop_last", False):
        return None
    source = getattr(data, "x", None)
    if source is None:
        sampler = getattr(data, "sampler", None)
        source = sampler if hasattr(sampler, "__len__") else getattr(data, "dataset", None)
    try:
        n = len(source)
    except TypeError:
        return None
    last = n % bs or (bs if n else None)
    world, rank = _shard_of(data)
    if world > 1 and last:
        if getattr(data, "even", False) and last % world:
            last = bs  # a last global batch that does not split evenly is dropped (TensorBatches.shard)
        last = len(range(rank, last, world)) or len(range(rank, bs, world))  # nothing left for it: it skips it
    return last


def process_batch_size(data) -> int | None:
    """The size of the batches this process takes from `data`: a sharded TensorBatches' share of each global
    batch; a DataLoader's own batch_size (per process under DDP: a DistributedSampler shares out the items)."""
    bs = getattr(data, "batch_size", None)
    if not isinstance(bs, int):
        return None
    world, rank = _shard_of(data)
    return len(range(rank, bs, world)) if world > 1 else bs


def _shard_of(data) -> tuple[int, int]:
    """(world size, rank) of a TensorBatches sharded for DistributedDataParallel; (1, 0) for other data."""
    world, rank = getattr(data, "world_size", 1), getattr(data, "rank", 0)
    return (world, rank) if isinstance(world, int) and isinstance(rank, int) and world > 1 else (1, 0)


class SoftmaxAxes(TorchFunctionMode):
    """While active, notes whether a softmax or log_softmax is taken over dim 0 of a (N, C, ...) tensor
    whose N is the batch size: the batch axis, inside a hand-written loss (F.nll_loss(F.log_softmax(out,
    dim=0), y)), where no module's output shows it. Only the pre-flight look's one loss call runs under it."""

    _FUNCS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
              torch.Tensor.log_softmax}

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size, self.over_batch = batch_size, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FUNCS and args and isinstance(args[0], torch.Tensor):
            t, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(dim, int) and t.dim() >= 2 and self.batch_size >= 2 and t.shape[0] == self.batch_size \
                    and dim % t.dim() == 0:
                self.over_batch = getattr(func, "__name__", "softmax")
        return func(*args, **kwargs)


def inspect_setup(model: nn.Module, x, y, loss_func, data=None) -> SetupRecord:
    """Record the set-up's numbers; an exception in the forward pass or the loss is recorded, not raised."""
    rec = SetupRecord(loss_kind=loss_kind(loss_func), batch_size=len(x) if hasattr(x, "__len__") else 0,
                      last_batch_size=last_batch_size(data), weights=layer_weights(model))
    rec.batchnorms = [n for n, m in model.named_modules() if is_batchnorm(m) and m.training]
    rec.world_size = distributed.world_size()
    rec.sync_batchnorms = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm) and m.training]
    _describe_inputs(rec, x, y)
    was_training = model.training
    last: list = []  # [name, output] of the last leaf module to finish: the one that made the model's output

    def remember(hook, module, inputs, output):
        last[:] = [hook.name, output]

    try:
        model.eval()
        leaves = select_modules(model, filter=lambda name, module: True)  # every leaf, root included if a leaf
        with torch.no_grad(), Hooks(leaves, remember) as hooks:
            stage = "forward"
            out = model(x)
            hooks.remove()
            _describe_output(rec, out)
            rec.out_module = last[0] if last and last[1] is out else ""
            stage = "loss"
            with SoftmaxAxes(len(x) if hasattr(x, "__len__") else 0) as axes:
                loss = loss_func(out, y)
            rec.loss_softmax_over_batch = axes.over_batch
            if isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and isinstance(loss, torch.Tensor):
                rec.loss_pairs = pairing_of(loss, loss_pairing(out, y))
    except Exception as e:  # noqa: BLE001 - a broken model or loss is what we are here to report
        rec.error = {"where": stage, "type": type(e).__name__, "message": str(e).strip()}
    finally:
        model.train(was_training)
    return rec


def _describe_inputs(rec: SetupRecord, x, y) -> None:
    if isinstance(x, torch.Tensor):
        rec.x_float = x.is_floating_point()
        if rec.x_float and x.numel() > 1:
            xf = x.detach().float()
            rec.x_finite = bool(torch.isfinite(xf).all())
            finite = xf[torch.isfinite(xf)]
            if finite.numel() > 1:
                rec.x_mean, rec.x_std = float(finite.mean()), float(finite.std())
    if isinstance(y, torch.Tensor):
        rec.y_dtype, rec.y_shape = str(y.dtype).removeprefix("torch."), tuple(y.shape)
        if y.numel() and not y.is_complex():
            rec.y_min, rec.y_max = float(y.min()), float(y.max())


def output_normalisation(o: torch.Tensor) -> torch.Tensor:
    """How an (N, C, ...) float output is normalised, as a (6,) tensor on its device (no read-back): min,
    max, max |sum over the classes (dim 1) - 1|, max |logsumexp over them|, and the same two over the batch
    (dim 0), which are ~0 only when a softmax / log_softmax was taken over the batch."""
    return torch.stack([o.min(), o.max(), (o.sum(1) - 1).abs().max(), torch.logsumexp(o, 1).abs().max(),
                        (o.sum(0) - 1).abs().max(), torch.logsumexp(o, 0).abs().max()])


def set_normalisation(rec: SetupRecord, values: list[float]) -> None:
    """Fill `rec`'s output fields from `output_normalisation(...).tolist()` of an output of `rec.out_shape`
    (logsumexp deviations that are not finite become inf; the batch ones only when N >= 2)."""
    lo, hi, row_sum, row_lse, col_sum, col_lse = values
    finite = lambda v: v if math.isfinite(v) else math.inf  # noqa: E731
    rec.out_min, rec.out_max, rec.out_row_sum_dev, rec.out_row_lse_dev = lo, hi, row_sum, finite(row_lse)
    if rec.out_shape[0] >= 2:
        rec.out_col_sum_dev, rec.out_col_lse_dev = col_sum, finite(col_lse)


def _describe_output(rec: SetupRecord, out) -> None:
    if not isinstance(out, torch.Tensor):
        return
    rec.out_shape, rec.out_float = tuple(out.shape), out.is_floating_point()
    if not rec.out_float or out.numel() == 0:
        return
    o = out.detach().float()
    if o.dim() >= 2 and o.shape[1] >= 2:  # (N, C, ...): classes on dim 1, as cross_entropy expects
        set_normalisation(rec, output_normalisation(o).tolist())  # one read-back for all of it
    else:
        rec.out_min, rec.out_max = float(o.min()), float(o.max())


def broadcast_shape(a: tuple, b: tuple) -> tuple | None:
    """The shape two tensors of shapes `a` and `b` broadcast to, or None when they do not."""
    try:
        return tuple(torch.broadcast_shapes(tuple(a), tuple(b)))
    except RuntimeError:
        return None


def loss_pairing(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """For float outputs and targets whose shapes broadcast to a bigger one ((N, 1) and (N,) to (N, N)),
    the mean squared, absolute and Huber (delta 1) errors over the matching pairs (NaN when the two do not
    hold as many values) and over every broadcast pair, as a (6,) tensor on the device (no read-back); None
    for any other shapes."""
    shape = broadcast_shape(out.shape, y.shape)
    if (shape is None or not out.is_floating_point() or not y.is_floating_point()
            or math.prod(shape) <= max(out.numel(), y.numel())):
        return None
    o, t = out.detach().float(), y.detach().float().to(out.device)
    nan = torch.full((), math.nan, device=o.device)
    pairs = o.reshape(t.shape) - t if o.numel() == t.numel() else None
    values = []
    for d in (pairs, o - t):
        a = d.abs() if d is not None else None
        values += [nan, nan, nan] if d is None else [d.pow(2).mean(), a.mean(),
                                                     torch.where(a < 1, 0.5 * d.pow(2), a - 0.5).mean()]
    return torch.stack(values)


def pairing_of(loss: torch.Tensor | float | None, values: torch.Tensor | list | None) -> str | None:
    """"paired" when `loss` equals one of `loss_pairing`'s matching-pair errors, "broadcast" when it equals
    one of the broadcast ones, None when neither (another loss) or nothing to compare (one read-back)."""
    if values is None or loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            return None
        *values, loss = torch.cat([values.cpu(), loss.detach().float().reshape(1).cpu()]).tolist()
    elif isinstance(values, torch.Tensor):
        values = values.tolist()
    close = lambda v: math.isfinite(v) and abs(v - loss) <= 1e-4 * abs(v) + 1e-7  # noqa: E731
    if any(close(v) for v in values[:3]):
        return "paired"
    if any(close(v) for v in values[3:]):
        return "broadcast"
    return None
