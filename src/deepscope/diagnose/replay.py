"""Replaying the step that first made NaN/Inf, to name exactly where it came from.

The recording engine counts non-finite values in a sample of each output at every step; that says at which
step NaN appeared and roughly where. `locate_nonfinite` then runs that step's batch again, with the weights
and random state the step ran with, hooks on every module (containers included: a container's own
forward can make a NaN its children did not) and a full backward hook on each, and reports:

- nonfinite_forward: the input batch itself, or the first module whose output is non-finite while its
  inputs are finite (forward hooks fire children first, so the first is the producer);
- nonfinite_loss: the loss is non-finite although the model's output is finite;
- nonfinite_backward: the first module whose input gradient is non-finite while its output gradient is
  finite.

Buffers (BatchNorm's running statistics) and the global random state are restored afterwards, so the
replay changes nothing the training will see.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..hooks import Hooks, floating_tensors
from ._hooks import FullBackwardHooks, all_finite
from .finding import Finding

NONFINITE_BATCH_FILE = "nonfinite_batch.pt"
# Losses that compute their result from their inputs without a log or division of their own that a user
# wrote: a NaN from finite predictions there means the targets or the reduction (a mean over no element).
_BUILT_IN_LOSS = ("cross_entropy", "nll", "mse", "l1", "bce", "bce_logits")
# Outputs this large make a loss overflow float32 (a squared error of 1e20, a logsumexp of 1e38): weights that
# have blown up, not a bug of the loss. Healthy logits and regression outputs stay within a few hundred.
HUGE_OUTPUT = 1e6


def _nonfinite_loss_finding(step: int, value: float, loss_kind: str | None, largest: float) -> list[Finding]:
    evidence = {"step": step, "loss": str(value), "loss_kind": loss_kind, "largest_output": largest, "source": "replay"}
    if largest > HUGE_OUTPUT:
        loss = Finding("nonfinite_loss", "", "error",
                       f"The loss is {value} at step {step}: the model's outputs are finite but huge (largest "
                       f"|output| {largest:.3g}), so the loss overflows.",
                       "Lower the learning rate (or the init scale, if it happens at the first step).", evidence)
        if step == 0:
            return [loss]
        return [Finding("lr_too_high", "", "error",
                        f"After {step} update{'s' if step != 1 else ''} the model's outputs reached {largest:.3g} and "
                        f"the loss overflowed to {value}: each step moved the weights far too much.",
                        "Lower the learning rate 10x or more (an LR finder shows the usable range), or add gradient "
                        "clipping and warm-up.", evidence), loss]
    if loss_kind in _BUILT_IN_LOSS:
        why = (f"torch's own {loss_kind} loss returned it from finite predictions, which happens when every "
               f"target of the batch is ignored (ignore_index: a mean over no element is 0/0), or the targets "
               f"themselves hold NaN/Inf or values outside the loss's domain (BCE targets outside [0, 1]).")
        fix = ("Check the batch's targets (torch.isfinite(y), their range, how many equal ignore_index); drop "
               "batches with no counted target, or use reduction='sum' divided by max(count, 1).")
    else:
        why = "the loss function itself produced it."
        fix = ("In a hand-written loss, clamp before log (x.clamp_min(1e-7).log()) or use the log-space form "
               "(F.log_softmax, F.cross_entropy, F.binary_cross_entropy_with_logits).")
    return [Finding("nonfinite_loss", "", "error",
                    f"The loss is {value} at step {step} although the model's output is finite: {why}", fix, evidence)]


def locate_nonfinite(model: nn.Module, batch, loss_func: Callable, *, step: int, rng_state: torch.Tensor | None,
                     loss_kind: str | None = None, save_dir: str | Path | None = None) -> list[Finding]:
    """Replay `batch` = (x, y) at `step` through `model` and `loss_func` (see the module docstring); the
    findings for where NaN/Inf first comes from, each with {"source": "replay"} in its evidence. With
    `save_dir`, the batch, the random state and the weights go to `save_dir/nonfinite_batch.pt`."""
    x, y = batch
    first: dict = {}
    largest = 0.0

    def forward_hook(hook, module, inputs, output):
        outs = floating_tensors(output)
        if outs and "forward" not in first and not all_finite(outs) and all_finite(floating_tensors(inputs)):
            first["forward"] = (hook.name, type(module).__name__)

    def backward_hook(name):
        def hook(module, grad_input, grad_output):
            if "backward" not in first and all_finite(floating_tensors(grad_output)) \
                    and not all_finite(floating_tensors(grad_input)):
                first["backward"] = name
        return hook

    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    findings: list[Finding] = []
    value = math.nan
    try:
        with torch.enable_grad(), Hooks(model.named_modules(), forward_hook), FullBackwardHooks() as hooks:
            for name, module in model.named_modules():
                hooks.add(module, backward_hook(name))
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            floating = isinstance(x, torch.Tensor) and x.is_floating_point()
            xr = x.detach().clone().requires_grad_(True) if floating else x
            preds = model(xr)
            outs = floating_tensors(preds)
            largest = max((float(t.detach().abs().max()) for t in outs if t.numel()), default=0.0)
            loss = loss_func(preds, y)
            value = float(loss.detach().float().mean()) if loss.numel() else math.nan
            if "forward" not in first and math.isfinite(value):
                params = [p for p in model.parameters() if p.requires_grad]
                inputs = ([xr] if floating else []) + params
                torch.autograd.grad(loss, inputs, allow_unused=True)
    except Exception as e:  # noqa: BLE001 - in-place ops refuse full backward hooks: see below
        first.setdefault("error", f"{type(e).__name__}: {e}")
        if "forward" not in first:
            found, value = _by_parameter_gradients(model, x, y, loss_func, rng_state)
            first.update(found)
    finally:
        torch.set_rng_state(rng)
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
    source = {"step": step, "source": "replay"}
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not all_finite([x]):
        findings.append(Finding("nonfinite_forward", "", "error",
                                f"The input batch at step {step} contains NaN or Inf values.",
                                "Clean the data: find the items where torch.isfinite(x) is False.",
                                {**source, "data": True}))
    elif "forward" in first:
        name, kind = first["forward"]
        where = f"Module {name!r} ({kind})" if name else "The model's own forward (outside its submodules)"
        findings.append(Finding("nonfinite_forward", name, "error",
                                f"{where} produced NaN/Inf at step {step} from finite inputs; every module before "
                                f"it was finite (replaying the step).",
                                "Guard the operation that can overflow or leave its domain there (log/sqrt/div of "
                                "values that can be <= 0: clamp(min=eps) or add eps; exp: subtract the max first); if "
                                "it only appears after some steps, lower the learning rate.",
                                {**source, "module": name, "type": kind, "data": False}))
    elif not math.isfinite(value):
        findings += _nonfinite_loss_finding(step, value, loss_kind, largest)
    elif "backward" in first:
        name = first["backward"]
        how = first.get("how", "backward hooks")
        findings.append(Finding("nonfinite_backward", name, "error",
                                f"The gradient became NaN/Inf in the backward pass of {name or 'the model'!r} at step "
                                f"{step}: its output gradient was finite, its input gradient was not (replaying the "
                                f"step, found with {how}).",
                                "Look for an operation whose derivative is infinite where it is used (sqrt or "
                                "pow(<1) at 0, log at 0, a custom autograd Function's backward dividing by 0); add an "
                                "eps inside it or clamp its input.", {**source, "module": name, "how": how}))
    if save_dir is not None and findings:
        f = findings[0]
        path = save(model, batch, step, rng_state, save_dir, module=f.module, kind=f.kind)
        findings = [replace(f, message=f"{f.message} The batch is saved in {path}.", evidence={**f.evidence, "saved": path})
                    for f in findings]
    return findings


def _by_parameter_gradients(model: nn.Module, x, y, loss_func: Callable, rng_state) -> tuple[dict, float]:
    """When full backward hooks cannot run (in-place operations refuse them), replay without them: the
    module owning the last parameter, in registration order, whose gradient is non-finite (the backward
    pass reaches it first), and the loss."""
    owner = {id(p): n for n, m in model.named_modules() for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    try:
        with torch.enable_grad():
            loss = loss_func(model(x), y)
            value = float(loss.detach().float().mean()) if loss.numel() else math.nan
            if not math.isfinite(value):
                return {}, value
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    except Exception:  # noqa: BLE001 - nothing more to learn from the replay
        return {}, 0.0  # unknown: not evidence of a non-finite loss
    bad = [p for p, g in zip(params, grads) if g is not None and not torch.isfinite(g).all()]
    if not bad:
        return {}, value
    why = "parameter gradients (backward hooks refuse this model's in-place operations)"
    return {"backward": owner.get(id(bad[-1]), ""), "how": why}, value


def save(model: nn.Module, batch, step: int, rng_state, save_dir: str | Path, *, module: str = "",
         kind: str = "") -> str:
    """Write the batch, the random state before its forward pass, the weights, and the module and kind
    of finding that the replay found to `save_dir/nonfinite_batch.pt`; returns the path."""
    x, y = batch
    cpu = lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    path = Path(save_dir) / NONFINITE_BATCH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": cpu(x), "y": cpu(y), "rng_state": rng_state, "step": step, "module": module, "kind": kind,
                "model_state": {k: cpu(v) for k, v in model.state_dict().items()}}, path)
    return str(path)
