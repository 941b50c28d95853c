"""Checks on the set-up (model, one batch, loss) before training: pure functions of a SetupRecord."""
from __future__ import annotations

import math

from .finding import Finding
from .records import LayerWeight, SetupRecord
from .thresholds import (
    BN_SMALL_BATCH, INPUT_MEAN_LIMIT, INPUT_STD_MAX, INPUT_STD_MIN, PROBABILITY_TOLERANCE,
)

_INTEGER_DTYPES = {"uint8", "int8", "int16", "int32", "int64"}
# Class-index dtypes that F.cross_entropy and F.nll_loss take ("Long or Byte"; int8/16/32 raise): only
# what torch itself refuses is flagged.
_CLASS_INDEX_DTYPES = {"int64", "uint8"}
_LOSS_NAMES = {"cross_entropy": "cross_entropy", "nll": "nll_loss", "mse": "mse_loss", "l1": "an L1-type loss",
               "bce": "binary_cross_entropy", "bce_logits": "binary_cross_entropy_with_logits"}
IGNORE_INDEX = -100  # cross_entropy's and nll_loss's default ignore_index: such labels are skipped, not wrong
_EXCEPTION_FIXES = {
    "data": "Check the data: iterating over it must yield (x, y) pairs of tensors.",
    "forward": "Fix the model's forward pass for this batch (check the input shape, dtype and device it expects).",
    "loss": "Check the loss against the model's output and the targets (shapes, dtypes, number of classes).",
    "backward": "Check the loss is a scalar connected to the parameters, and custom autograd Functions' backward.",
    "step": "Check the optimizer and any callback that changes parameters.",
    "optimizer": "Check opt_func, and that the model has trainable parameters.",
    "model": "Unfreeze the layers you mean to train (model.requires_grad_(True), or those layers only).",
}


def exception_finding(error: dict) -> Finding:
    """An exception raised by the data, model, loss or optimizer, quoted."""
    where = error.get("where", "forward")
    step = f" at step {error['step']}" if error.get("step") is not None else ""
    return Finding("exception", "", "error",
                   f"The {where} stage raised {error['type']}{step}: {error['message']}",
                   _EXCEPTION_FIXES.get(where, "Fix the code that raised."), dict(error))


def check_targets(rec: SetupRecord) -> list[Finding]:
    """Targets of the wrong dtype or shape for the loss, or labels out of range for the outputs."""
    out, y, kind = rec.out_shape, rec.y_shape, rec.loss_kind
    if kind is None or out is None or not rec.y_dtype:
        return []
    loss = _LOSS_NAMES[kind]
    evidence = {"loss": loss, "output_shape": list(out), "target_shape": list(y), "target_dtype": rec.y_dtype,
                "target_min": rec.y_min, "target_max": rec.y_max}
    mismatch = lambda msg, fix: [Finding("target_mismatch", "", "error", msg, fix, evidence)]
    integer = rec.y_dtype in _INTEGER_DTYPES
    if kind in ("cross_entropy", "nll"):
        n_classes = out[1] if len(out) >= 2 else None
        expected = (out[0], *out[2:]) if len(out) >= 2 else out[:1]
        if not integer:
            if kind == "cross_entropy" and y == out:
                return []  # class probabilities as soft targets: valid for cross_entropy
            return mismatch(f"{loss} expects class indices of dtype int64 and shape {expected}, but the targets are "
                            f"{rec.y_dtype} of shape {y}.", "Pass integer class labels: y.long(); if y is one-hot, "
                            "use y.argmax(1).")
        if y != expected:
            return mismatch(f"{loss} on outputs of shape {out} expects targets of shape {expected}, but they have shape {y}.",
                            "Reshape the targets: y.view(-1) for (N, 1) labels, y.argmax(1) for one-hot labels.")
        if rec.y_dtype not in _CLASS_INDEX_DTYPES:
            return mismatch(f"{loss} expects int64 (or uint8) class labels, but the targets are {rec.y_dtype}.",
                            "Convert the labels with y.long().")
        if n_classes is not None and rec.y_max is not None and (
                rec.y_max >= n_classes or (rec.y_min < 0 and rec.y_min != IGNORE_INDEX)):
            return mismatch(f"Labels run from {rec.y_min:g} to {rec.y_max:g}, but the model has {n_classes} outputs "
                            f"(valid labels 0..{n_classes - 1}).", f"Give the model's last layer "
                            f"{int(rec.y_max) + 1} outputs, or remap the labels to 0..{n_classes - 1}.")
        return []
    if y != out:
        return mismatch(f"{loss} gets outputs of shape {out} and targets of shape {y}; it broadcasts them and "
                        "compares every prediction with every target.",
                        "Make the shapes equal, e.g. y.view_as(pred) or pred.squeeze(-1).")
    if integer:
        return mismatch(f"{loss} needs floating-point targets, but they are {rec.y_dtype}.", "Use y.float().")
    if kind in ("bce", "bce_logits") and rec.y_min is not None and (rec.y_min < 0 or rec.y_max > 1):
        return mismatch(f"{loss} needs targets in [0, 1], but they run from {rec.y_min:g} to {rec.y_max:g}.",
                        "Map the labels to 0/1 (or probabilities).")
    return []


# Losses that compare each prediction with the target at the same position, and broadcast mismatched shapes
# (bce and bce_logits raise instead: then the exception finding reports it).
_ELEMENTWISE = {"mse", "l1", "bce", "bce_logits"}


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """numpy/torch broadcasting of two shapes, or None when they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x, y = (a[-i] if i <= len(a) else 1), (b[-i] if i <= len(b) else 1)
        if x != y and 1 not in (x, y):
            return None
        out.append(x if y == 1 else y)
    return tuple(reversed(out))


def check_loss_shapes(rec: SetupRecord) -> list[Finding]:
    """loss_shape_mismatch: outputs and targets whose shapes broadcast to a bigger one inside an elementwise
    loss ((N, 1) predictions and (N,) targets make an (N, N) loss; torch only warns). With the loss unknown
    (a custom loss, or `watch`), only float targets count (class indices (N,) against (N, C) logits are
    normal), and not when the loss's value shows it paired them itself (`rec.loss_pairs`)."""
    out, y = rec.out_shape, rec.y_shape
    if out is None or not rec.y_dtype or out == y:
        return []
    shape = _broadcast(out, y)
    if shape is None or math.prod(shape) <= max(math.prod(out), math.prod(y)):
        return []
    known = rec.loss_kind in _ELEMENTWISE
    if known and rec.error is not None and rec.error.get("where") == "loss":
        return []  # torch refused the shapes (bce): the exception finding says so
    float_targets = rec.y_dtype.startswith(("float", "bfloat"))
    if not known and (rec.loss_kind is not None or not float_targets or rec.loss_pairs == "paired"):
        return []
    severity = "error" if known or rec.loss_pairs == "broadcast" else "warning"
    loss = _LOSS_NAMES[rec.loss_kind] if known else "The loss"
    pairs = f"{math.prod(shape)} pairs instead of {max(math.prod(out), math.prod(y))}"
    confirmed = (", and its value is the error over every pair" if rec.loss_pairs == "broadcast" else
                 "" if known else " if the loss compares them elementwise (its value did not show how it paired them)")
    return [Finding("loss_shape_mismatch", "", severity,
                    f"{loss} gets outputs of shape {out} and targets of shape {y}, which broadcast to {shape} "
                    f"({pairs}){confirmed}: every prediction is compared with every target, so the model learns "
                    f"the average target instead of each example's own.",
                    "Make the shapes equal before the loss: pred.squeeze(-1) for (N, 1) predictions, or "
                    "y.view_as(pred).",
                    {"loss": loss, "output_shape": list(out), "target_shape": list(y), "broadcast_shape": list(shape),
                     "target_dtype": rec.y_dtype, "loss_pairs": rec.loss_pairs})]


def check_softmax_dim(rec: SetupRecord) -> list[Finding]:
    """softmax_wrong_dim: outputs normalised over the batch (dim 0), each column a distribution, while the
    rows (the classes of one example) are not: softmax(x, dim=0) where dim=1 (or -1) was meant."""
    inside = rec.loss_softmax_over_batch
    if inside:
        return [Finding("softmax_wrong_dim", "", "error",
                        f"The loss function takes a {inside} over the batch (dim 0 of the {rec.out_shape[0] if rec.out_shape else 'N'} "
                        f"examples): each example's probabilities depend on the other examples in its batch, and "
                        f"the classes of one example do not form a distribution.",
                        f"Take the {inside} over the classes in the loss: {inside}(x, dim=1) (or dim=-1), never "
                        f"dim=0; or use F.cross_entropy on the raw logits.",
                        {"where": "loss function", "function": inside})]
    if rec.out_col_sum_dev is None or rec.out_row_sum_dev is None or rec.out_min is None:
        return []
    tol = PROBABILITY_TOLERANCE
    probs = rec.out_min >= -tol and rec.out_col_sum_dev <= tol < rec.out_row_sum_dev
    log_probs = rec.out_max <= tol and rec.out_col_lse_dev <= tol < rec.out_row_lse_dev
    if not (probs or log_probs):
        return []
    what = "softmax" if probs else "log_softmax"
    return [Finding("softmax_wrong_dim", rec.out_module, "error",
                    f"The model's output is a {what} over the batch (dim 0): each column sums to 1 across the "
                    f"{rec.out_shape[0]} examples (within {min(rec.out_col_sum_dev, rec.out_col_lse_dev):.1e}), "
                    f"so each prediction depends on the other examples in its batch and the classes of one "
                    f"example do not form a distribution.",
                    f"Take the {what} over the classes: {what}(x, dim=1) (or dim=-1), never dim=0.",
                    {"output_shape": list(rec.out_shape), "max_column_sum_minus_1": rec.out_col_sum_dev,
                     "max_abs_column_logsumexp": rec.out_col_lse_dev, "max_row_sum_minus_1": rec.out_row_sum_dev})]


def check_loss_input(rec: SetupRecord) -> list[Finding]:
    """Probabilities or log-probabilities fed to cross_entropy; anything but log-probabilities fed to nll_loss."""
    if rec.loss_kind not in ("cross_entropy", "nll") or rec.out_row_sum_dev is None or rec.out_min is None:
        return []
    tol = PROBABILITY_TOLERANCE
    probs = rec.out_min >= -tol and rec.out_row_sum_dev <= tol
    log_probs = rec.out_max <= tol and rec.out_row_lse_dev <= tol
    evidence = {"output_min": rec.out_min, "output_max": rec.out_max, "max_row_sum_minus_1": rec.out_row_sum_dev,
                "max_abs_row_logsumexp": rec.out_row_lse_dev}
    n_classes = rec.out_shape[1] if rec.out_shape and len(rec.out_shape) >= 2 else 2
    if rec.loss_kind == "cross_entropy" and probs:
        # With logits in [0, 1] the best case is 1 for the target and 0 elsewhere: loss log(1 + (C - 1) / e).
        floor = math.log(1 + (n_classes - 1) / math.e)
        evidence["loss_floor"] = floor
        return [Finding("softmax_before_cross_entropy", rec.out_module, "error",
                        f"The model outputs probabilities (all >= 0, every row sums to 1 within "
                        f"{rec.out_row_sum_dev:.1e}) and cross_entropy applies its own softmax to them, so every "
                        f"logit is squeezed into [0, 1]: with {n_classes} classes the loss can never go below "
                        f"{floor:.3f} and the gradients shrink.",
                        "Remove the final softmax: cross_entropy expects raw logits (use softmax only to read "
                        "probabilities at inference).", evidence)]
    if rec.loss_kind == "cross_entropy" and log_probs:
        return [Finding("softmax_before_cross_entropy", rec.out_module, "info",
                        f"The model outputs log-probabilities (every row's logsumexp is 0 within "
                        f"{rec.out_row_lse_dev:.1e}) and cross_entropy applies log_softmax again; the result is the "
                        f"same, the work is wasted.",
                        "Drop the final log_softmax (cross_entropy expects raw logits), or use nll_loss with it.", evidence)]
    if rec.loss_kind == "nll" and not log_probs:
        what = (f"probabilities (all >= 0, rows sum to 1 within {rec.out_row_sum_dev:.1e})" if probs else
                f"raw scores (values up to {rec.out_max:.3g}, row logsumexp off 0 by up to {rec.out_row_lse_dev:.3g})")
        return [Finding("probabilities_to_nll", rec.out_module, "error",
                        f"nll_loss gets {what}, but it expects log-probabilities: it only picks -output[target], so "
                        f"it can be pushed to minus infinity instead of learning.",
                        "NLL expects log-probabilities; CE expects raw logits: end the model with log_softmax, or "
                        "drop the softmax and use cross_entropy.", evidence)]
    return []


def _weight_param(module: str) -> str:
    return f"{module}.weight" if module else "weight"


def check_symmetric_init(weights: list[LayerWeight], grad_nonzero: dict[str, bool] | None = None) -> list[Finding]:
    """Layers whose weights all start equal. Two such layers in a row never break the symmetry (two zero
    layers pass no gradient at all): fatal. One alone is a warning, unless the short run showed its
    weights never got a non-zero gradient (e.g. a zero layer before a ReLU, whose slope at 0 is 0)."""
    constant = [i for i, w in enumerate(weights) if w.constant]
    findings = []
    for i in constant:
        w = weights[i]
        what = "zero" if w.value == 0 else f"the constant {w.value:g}"
        pair = next((weights[j] for j in (i - 1, i + 1) if j in constant), None)
        stalled = grad_nonzero is not None and grad_nonzero.get(_weight_param(w.module)) is False
        evidence = {"value": w.value, "shape": list(w.shape), "neighbour": pair.module if pair else None,
                    "gradient_ever_nonzero": None if grad_nonzero is None else not stalled}
        if pair is not None:
            both_zero = w.value == 0 and pair.value == 0
            why = ("no gradient reaches either of them (each one's gradient is multiplied by the other's zero weights)"
                   if both_zero else "their units get identical gradients at every step and stay identical forever")
            findings.append(Finding("symmetric_init", w.module, "error",
                                    f"Weights of {w.module!r} {tuple(w.shape)} are all {what}, next to {pair.module!r} "
                                    f"which is constant too: {why} (fatal).",
                                    "Initialise weights randomly (torch's default, or nn.init.kaiming_normal_); keep "
                                    "constants for biases and norm layers only.", evidence))
            continue
        last = i == len(weights) - 1
        severity = "error" if stalled else ("info" if last and w.value == 0 else "warning")
        tail = ("its weights got no non-zero gradient in the short run, so it never learns (fatal)" if stalled else
                "zeroing the output layer is a known technique and is fine while the layers before it are random"
                if severity == "info" else
                "its units start identical and only differ if a neighbouring random layer breaks the tie "
                "(behind a ReLU, whose slope at 0 is 0, they may never get a gradient)")
        findings.append(Finding("symmetric_init", w.module, severity,
                                f"Weights of {w.module!r} {tuple(w.shape)} are all {what}: {tail}.",
                                "Initialise weights randomly (torch's default, or nn.init.kaiming_normal_).", evidence))
    return findings


def check_batchnorm_batch(batchnorms: list[str], batch_size: int, last_batch_size: int | None = None,
                          seen_sizes: list[int] = (), *, world_size: int = 1, synced: list[str] = ()) -> list[Finding]:
    """BatchNorm trained on batches too small for stable statistics; a batch of 1 is an error.

    The sizes are one process's batches. Under DistributedDataParallel (`world_size` > 1) a BatchNorm layer
    normalises each process's share of the global batch alone, so the share is judged and the message says
    so ("4 per process (8 over 2 processes)"); layers named in `synced` (SyncBatchNorm) compute their
    statistics over the global batch, the share times `world_size`, and are judged on that when every
    BatchNorm layer is one. The one definition of "too small" (BN_SMALL_BATCH), shared by diagnosis and
    the warning of the Distributed callback."""
    if not batchnorms or batch_size <= 0:
        return []
    world = max(1, int(world_size))
    local = [b for b in batchnorms if b not in set(synced)] if world > 1 else list(batchnorms)
    scale = 1 if local else world  # every one synchronised: their statistics are over the global batch
    modules = local or list(batchnorms)
    batch, last = batch_size * scale, last_batch_size * scale if last_batch_size else last_batch_size
    evidence = {"batch_size": batch, "last_batch_size": last, "batchnorm_modules": modules[:10]}
    if world > 1:
        evidence.update(per_process_batch_size=batch_size, global_batch_size=batch_size * world, world_size=world,
                        sync_batchnorm=not local)
    smallest = min([batch, *(s * scale for s in seen_sizes), *([last] if last else [])])
    per = " per process" if scale < world else ""
    over = (f" ({batch_size * world} over {world} processes, and each process's BatchNorm normalises its own "
            f"share)" if per else f" (SyncBatchNorm, over {world} processes)" if world > 1 else "")
    if per:
        fix = ("Use SyncBatchNorm (deepscope train --sync-batchnorm; CUDA only), whose statistics cover the "
               "global batch, per-process batches of at least {0}, or GroupNorm/LayerNorm, which do not depend "
               "on the batch.").format(BN_SMALL_BATCH)
    else:
        fix = ("Use batches of at least {0} (gradient accumulation if memory is short), or GroupNorm/LayerNorm, "
               "which do not depend on the batch.").format(BN_SMALL_BATCH)
    if smallest == 1:
        where = (f"the batches hold 1 sample{per}{over}" if batch == 1 else
                 f"the last batch of each epoch holds 1 sample{per}")
        return [Finding("batchnorm_small_batch", modules[0], "error",
                        f"BatchNorm ({len(modules)} modules) trains with batch statistics but {where}: its "
                        "variance over the batch is 0 (BatchNorm1d raises, BatchNorm2d normalises each image alone).",
                        fix if batch == 1 else "Drop the last incomplete batch (drop_last=True) or change the "
                        f"batch size so it does not leave 1 sample{per}.", evidence)]
    if batch < BN_SMALL_BATCH:
        return [Finding("batchnorm_small_batch", modules[0], "warning",
                        f"BatchNorm ({len(modules)} modules) normalises with statistics of only {batch} samples{per}"
                        f"{over}, fewer than {BN_SMALL_BATCH}, which are too noisy for stable training.", fix,
                        evidence)]
    return []


def check_inputs(rec: SetupRecord) -> list[Finding]:
    """Float inputs whose mean/std are far from 0/1 (NaN in the inputs is the probe's `nonfinite_forward`)."""
    if not rec.x_float or not rec.x_finite:
        return []
    if abs(rec.x_mean) <= INPUT_MEAN_LIMIT and INPUT_STD_MIN <= rec.x_std <= INPUT_STD_MAX:
        return []
    return [Finding("input_not_normalized", "", "warning",
                    f"The inputs have mean {rec.x_mean:.3g} and std {rec.x_std:.3g}; the network expects roughly 0 and 1 "
                    f"(|mean| <= {INPUT_MEAN_LIMIT:g}, std in [{INPUT_STD_MIN:g}, {INPUT_STD_MAX:g}]).",
                    "Normalise with the training set's statistics: x = (x - mean) / std (computed once on the "
                    "training split, applied to every split).", {"mean": rec.x_mean, "std": rec.x_std})]


def analyse_setup(rec: SetupRecord, seen_sizes: list[int] = (), grad_nonzero: dict[str, bool] | None = None) -> list[Finding]:
    """All set-up checks; `seen_sizes` and `grad_nonzero` come from the short run when there was one."""
    findings = [exception_finding(rec.error)] if rec.error else []
    findings += check_targets(rec) + check_loss_shapes(rec) + check_softmax_dim(rec) + check_loss_input(rec)
    # (NaN in the data: the probe)
    findings += check_symmetric_init(rec.weights, grad_nonzero)
    findings += check_batchnorm_batch(rec.batchnorms, rec.batch_size, rec.last_batch_size, list(seen_sizes),
                                      world_size=rec.world_size, synced=rec.sync_batchnorms)
    return findings + check_inputs(rec)
