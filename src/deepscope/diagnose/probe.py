"""The instrumented run: a callback that records, on the steps it checks, each leaf module's output
statistics, where the first NaN/Inf appears (forward, backward or loss), which parameters get gradients,
the loss and the update-to-weight ratios. It keeps numbers, never activations.

Hooks are installed in `before_batch` of a checked step and removed in `cleanup_batch` (and again in
`cleanup_fit`), so a cancelled or crashing fit leaves none behind.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .. import norms

from ..callback import Callback, CancelFitException
from ..callbacks.device import to_device
from ..hooks import Hooks, floating_tensors
from ._hooks import FullBackwardHooks, all_finite
from .records import ModuleRecord, ProbeRecord
from .thresholds import DEAD_ACTIVATION_ABS, SATURATION_MARGIN

NONFINITE_BATCH_FILE = "nonfinite_batch.pt"


def _saturation_range(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a saturating activation, or None for any other module."""
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return 0.0, 1.0
    if isinstance(module, nn.Tanh):
        return -1.0, 1.0
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    return None


# Layers whose output holds its units (channels) on dim 1: (N, C, ...) convolutions and the norms made for them.
CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm,
                  norms.BatchNorm, norms.InstanceNorm, norms.GroupNorm, norms.RunningBatchNorm)
# Layers whose output holds its units (features) last: (N, F), (N, L, F), (L, N, F).
FEATURES_LAST = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention,
                 nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.modules.rnn.RNNBase)


def unit_axis(module: nn.Module, out: torch.Tensor, previous: int | None = None) -> int:
    """The dim of `out` that holds the module's units: 1 for convolutions and their norms, the last dim
    for Linear, Embedding, attention and RNN outputs, so an (N, L, C) sequence is judged per feature C,
    never per position L. A module that keeps its input's layout (an activation, dropout, LayerNorm,
    which may follow a convolution or a Linear) inherits `previous`, the axis of the layer that ran before
    it; with none known, dim 1 for images (N, C, H, W) and the last dim otherwise."""
    if isinstance(module, CHANNELS_FIRST):
        return 1
    if isinstance(module, FEATURES_LAST):
        return -1
    if previous is not None:
        return previous
    return 1 if out.dim() == 4 else -1


def output_stats(module: nn.Module, out: torch.Tensor, axis: int | None = None) -> tuple[float, float, float, list[float]]:
    """mean, std, share of outputs at a saturation limit (nan if not saturating), share "on" per unit.

    Units lie on `axis` (see `unit_axis`, which gives it when None)."""
    t = out.detach().float()
    on = t.abs() > DEAD_ACTIVATION_ABS
    if t.dim() >= 2:
        ch = unit_axis(module, t) if axis is None else axis
        on = on.movedim(ch, 0).reshape(t.shape[ch], -1)
    else:
        on = on.reshape(1, -1)
    limits = _saturation_range(module)
    if limits is None:
        sat = torch.tensor(math.nan, device=t.device)
    else:
        lo, hi = limits
        margin = SATURATION_MARGIN * (hi - lo)
        sat = ((t < lo + margin) | (t > hi - margin)).float().mean()
    head = torch.stack([t.mean(), t.std() if t.numel() > 1 else torch.zeros((), device=t.device), sat])
    values = torch.cat([head, on.float().mean(1)]).tolist()  # one device sync for all of it
    return values[0], values[1], values[2], values[3:]


class Probe(Callback):
    """Record what diagnosis needs, on one training step in `every`.

    `max_steps` cancels the fit after that many training steps; `stop_on_nonfinite` cancels it at the first
    NaN/Inf; `save_dir` receives `nonfinite_batch.pt` (x, y, RNG state, module, model state) when one appears.
    """

    order = 30  # after device placement (-20), batch limits (-10) and schedulers (0)

    def __init__(self, every: int = 1, *, max_steps: int | None = None, stop_on_nonfinite: bool = True,
                 save_dir: str | Path | None = None, device: torch.device | None = None):
        if every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every, self.max_steps, self.stop_on_nonfinite = every, max_steps, stop_on_nonfinite
        self.save_dir, self.device = save_dir, device
        self.record = ProbeRecord()
        self.where = "optimizer"  # what the fit was doing, for reporting an exception (fit creates the optimizer first)
        self._hooks: Hooks | None = None
        self._checking = self._nonfinite_now = False
        self._batch = self._rng = self._before = self._last_leaf = None
        self._axis, self._axis_ndim = None, None  # unit axis of the last leaf recorded (see unit_axis)

    # --- set-up ------------------------------------------------------------------------------------------
    def before_fit(self, learn) -> None:
        self.record, self.where = ProbeRecord(), "data"
        model = learn.model
        self._leaves = {n: m for n, m in model.named_modules() if next(m.children(), None) is None}
        owner = {id(p): n for n, m in model.named_modules() for p in m.parameters(recurse=False)}
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.record.params = {n: owner.get(id(p), "") for n, p in self._params.items()}
        self._weights = {n: p for n, p in self._params.items() if p.dim() >= 2}

    def before_batch(self, learn) -> None:
        self._checking = self._nonfinite_now = False
        if not learn.training:
            return
        if self.device is not None:
            learn.batch = to_device(learn.batch, self.device)
        self.where = "forward"
        self._axis = self._axis_ndim = None
        if learn.train_iter % self.every:
            return
        self._checking, self._step = True, learn.train_iter
        self._rng = torch.get_rng_state()
        self._batch = learn.batch
        x = learn.xb
        if isinstance(x, torch.Tensor):
            self.record.batch_sizes.append(len(x))
            if self.record.input_std is None and x.is_floating_point() and x.numel() > 1:
                self.record.input_std = float(x.detach().float().std())
        if self.record.nonfinite_forward is None and not all_finite(floating_tensors(x)):
            self.record.nonfinite_forward = {"module": "", "step": self._step, "data": True}
        # Every module, containers included: a container's own forward can make the NaN its children did not.
        self._hooks = Hooks(learn.model.named_modules(), self._on_forward)

    def _on_forward(self, hook, module: nn.Module, inputs, output) -> None:
        outs = floating_tensors(output)
        if not outs:
            return
        finite = all_finite(outs)
        if not finite and self.record.nonfinite_forward is None and all_finite(floating_tensors(inputs)):
            # Forward hooks fire as modules finish, children before parents: the first is the producer.
            self.record.nonfinite_forward = {"module": hook.name, "type": type(module).__name__, "step": self._step,
                                             "data": False}
        if finite and hook.name in self._leaves:  # NaN would read as "off" units and a NaN std
            self._record_stats(hook.name, module, outs[0])
            self._last_leaf = (hook.name, outs[0])

    def _record_stats(self, name: str, module: nn.Module, out: torch.Tensor) -> None:
        if out.numel() < 2:
            return
        rec = self.record.modules.get(name)
        if rec is None:
            rec = self.record.modules[name] = ModuleRecord(name, type(module).__name__, len(self.record.modules))
        axis = unit_axis(module, out, self._axis if out.dim() == self._axis_ndim else None)
        self._axis, self._axis_ndim = axis, out.dim()  # what an activation after this layer inherits
        mean, std, sat, active = output_stats(module, out, axis)
        rec.steps.append(self._step)
        rec.means.append(mean)
        rec.stds.append(std)
        if not math.isnan(sat):
            rec.saturated.append(sat)
        if len(rec.active) == len(active):
            rec.active = [a + b for a, b in zip(rec.active, active)]
        else:  # first record, or the channel count changed: start again
            rec.active, rec.n_active = list(active), 0
        rec.n_active += 1

    # --- the step ----------------------------------------------------------------------------------------
    def after_pred(self, learn) -> None:
        self.where = "loss"
        if self._checking and self._last_leaf is not None and learn.preds is self._last_leaf[1]:
            self.record.output_module = self._last_leaf[0]

    def after_loss(self, learn) -> None:
        self.where = "backward"
        if not self._checking:
            return
        loss = learn.loss.detach().float()
        value = float(loss.mean()) if loss.numel() else math.nan
        self.record.losses.append((self._step, value))
        forward = self.record.nonfinite_forward
        forward_now = forward is not None and forward["step"] == self._step
        if not math.isfinite(value) and not forward_now and self.record.nonfinite_loss is None \
                and all_finite(floating_tensors(learn.preds)):
            self.record.nonfinite_loss = {"step": self._step, "loss": value}
        self._nonfinite_now = forward_now or not math.isfinite(value)
        if self._nonfinite_now:
            self._save(learn, "nonfinite_forward" if forward_now else "nonfinite_loss",
                       forward["module"] if forward_now else "")
            if self.stop_on_nonfinite:
                raise CancelFitException()

    def after_backward(self, learn) -> None:
        self.where = "step"
        if not self._checking:
            return
        grads = {n: p.grad for n, p in self._params.items() if p.grad is not None}
        for n in self._params:
            self.record.grad_seen[n] = self.record.grad_seen.get(n, False) or n in grads
        if grads:
            flags = torch.stack([torch.stack([(g != 0).any(), torch.isfinite(g).all()]) for g in grads.values()]).tolist()
            bad = []
            for (n, _), (nonzero, finite) in zip(grads.items(), flags):
                self.record.grad_nonzero[n] = self.record.grad_nonzero.get(n, False) or bool(nonzero)
                if not finite:
                    bad.append(n)
            if bad and self.record.nonfinite_backward is None and not self._nonfinite_now:  # else the loss caused it
                self.record.nonfinite_backward = self._trace_backward(learn, bad)
                self._save(learn, "nonfinite_backward", self.record.nonfinite_backward["module"])
                if self.stop_on_nonfinite:
                    raise CancelFitException()
        self._before = {n: p.detach().clone() for n, p in self._weights.items()}

    def after_step(self, learn) -> None:
        if not self._checking or not self._before:
            return
        names = list(self._before)
        ratios = torch.stack([(self._weights[n].detach() - self._before[n]).norm() / self._before[n].norm()
                              for n in names]).tolist()
        for n, r in zip(names, ratios):
            if math.isfinite(r):
                self.record.update_ratios.setdefault(n, []).append(r)

    def after_batch(self, learn) -> None:
        if learn.training:
            self.where = "data"
            self.record.steps = learn.train_iter + 1
            if self.max_steps is not None and learn.train_iter + 1 >= self.max_steps:
                raise CancelFitException()

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def cleanup_batch(self, learn) -> None:
        self._remove_hooks()
        self._before = self._last_leaf = None

    def cleanup_fit(self, learn) -> None:
        self._remove_hooks()
        self._batch = None

    # --- NaN in the backward pass: replay the batch with backward hooks ---------------------------------------
    def _trace_backward(self, learn, bad_params: list[str]) -> dict:
        """Re-run this batch (same RNG state, same weights) with a full backward hook on every module; the
        first module whose input gradient is NaN/Inf while its output gradient is finite produced it.
        (deepscope.hooks' backward hooks see only output gradients, so this uses torch's full hooks.)"""
        model, (x, y) = learn.model, self._batch
        self._remove_hooks()  # the replay must not be recorded as another forward pass
        first: dict = {}

        def make_hook(name):
            def hook(module, grad_input, grad_output):
                if not first and all_finite(floating_tensors(grad_output)) and not all_finite(floating_tensors(grad_input)):
                    first["module"] = name
            return hook

        buffers = {n: b.clone() for n, b in model.named_buffers()}  # BatchNorm's running stats move on replay
        rng = torch.get_rng_state()
        how = "backward hooks"
        try:
            with FullBackwardHooks() as hooks:
                for name, module in model.named_modules():
                    hooks.add(module, make_hook(name))
                torch.set_rng_state(self._rng)
                xr = x.detach().clone().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                with torch.enable_grad():
                    loss = learn.loss_func(model(xr), y)
                    inputs = [t for t in [xr, *self._params.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
                    torch.autograd.grad(loss, inputs, allow_unused=True)
        except Exception as e:  # noqa: BLE001 - e.g. in-place ops refuse full backward hooks
            how = f"parameter gradients (backward hooks failed: {type(e).__name__})"
            first.clear()
        finally:
            torch.set_rng_state(rng)
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])
        if "module" not in first:
            # The last parameter in registration order is the first reached by the backward pass.
            first["module"] = self.record.params.get(bad_params[-1], "")
            how = how if how != "backward hooks" else "parameter gradients"
        return {"module": first["module"], "step": self._step, "how": how, "parameters": bad_params[:10]}

    def _save(self, learn, kind: str, module: str) -> None:
        """Write the offending batch, the RNG state before its forward pass and the weights, once."""
        if self.save_dir is None or self.record.saved is not None or self._batch is None:
            return
        x, y = self._batch
        cpu = lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t
        path = Path(self.save_dir) / NONFINITE_BATCH_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"x": cpu(x), "y": cpu(y), "rng_state": self._rng, "module": module, "kind": kind,
                    "step": self._step, "model_state": {k: cpu(v) for k, v in learn.model.state_dict().items()}}, path)
        self.record.saved = str(path)
