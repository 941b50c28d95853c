"""Callbacks that change how a step is taken: gradient clipping and mixed precision."""
from __future__ import annotations

import torch
from torch import nn

from ..callback import Callback
from ..errors import check_number
from ..learner import TrainStep


class GradClip(Callback):
    """Clip the global gradient norm to `max_norm` before each step (Pascanu et al. 2013). It clips the true
    gradients (MixedPrecision unscales them before after_backward), so `max_norm` means the same with and
    without loss scaling. A step the scaler will skip (`learn.skip_step`: inf/NaN from a float16 overflow)
    is not clipped. With `keep_norms`, the norm before clipping of each training step of the latest fit
    is kept on the device in `norms`, NaN for a skipped step; the LR finder's sweep steps are not kept."""

    order = 20

    def __init__(self, max_norm: float = 1.0, keep_norms: bool = False):
        check_number("GradClip", "max_norm", max_norm)
        self.max_norm, self.keep_norms = max_norm, keep_norms
        self.norms: list[torch.Tensor] = []

    def before_fit(self, learn) -> None:
        if not learn.lr_sweep:
            self.norms = []

    def state_dict(self) -> dict | None:
        return {"norms": list(self.norms)} if self.keep_norms else None

    def load_state_dict(self, state: dict) -> None:
        self.norms = list(state["norms"])

    def after_backward(self, learn) -> None:
        if learn.skip_step:  # clipping inf would only make NaN of gradients the step ignores
            norm = torch.full((), float("nan"), device=next(learn.model.parameters()).device)
        else:
            norm = nn.utils.clip_grad_norm_(learn.model.parameters(), self.max_norm)
        if self.keep_norms and not learn.lr_sweep:
            self.norms.append(norm.detach())


class MixedPrecisionStep(TrainStep):
    """Forward and loss under autocast, the loss then cast to float32 (`learn.loss` is always the true loss).

    With float16, the loss is scaled so small gradients do not underflow (torch's GradScaler, the recipe of
    Micikevicius et al. 2018): `learn.loss_scale` is the factor from after_loss on, and `backward`
    unscales the gradients before after_backward, so there `p.grad` is the true gradient and
    `learn.skip_step` says whether the scaler will skip this step (inf/NaN from an overflow; it then
    lowers the scale). Knowing that costs one read-back per step, which the scaler's own step makes anyway.
    A batch cancelled after backward keeps its (unscaled) gradients; the next backward scales them again so
    that they accumulate with its own. bfloat16 needs no scaling: the inner step's backward and step run.
    """

    def __init__(self, inner: TrainStep, device_type: str, dtype: torch.dtype):
        self.inner, self.device_type, self.dtype = inner, device_type, dtype
        self.scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
        self._unstepped = False  # gradients were unscaled and no step has used them yet

    def predict(self, learn) -> None:
        with torch.autocast(self.device_type, dtype=self.dtype):
            self.inner.predict(learn)

    def get_loss(self, learn) -> None:
        with torch.autocast(self.device_type, dtype=self.dtype):
            self.inner.get_loss(learn)
        learn.loss = learn.loss.float()  # a custom loss of float16 outputs would be float16 (3 digits)
        if self.scaler.is_enabled() and learn.training:
            learn.loss_scale = self.scaler.scale(learn.loss.new_ones(()))  # on the device: no read-back

    def backward(self, learn) -> None:
        if not self.scaler.is_enabled():
            self.inner.backward(learn)
            return
        if self._unstepped:
            self._rescale_kept_gradients(learn)
        self.scaler.scale(learn.loss).backward()
        self.scaler.unscale_(learn.opt)
        self._unstepped = True
        # The scaler's own verdict, recorded by unscale_ (torch keeps it behind a private method; the public
        # API tells only after the step, by comparing scales). step() reads the same values.
        found_inf = self.scaler._found_inf_per_device(learn.opt)
        learn.skip_step = bool(sum(v.item() for v in found_inf.values()))

    def _rescale_kept_gradients(self, learn) -> None:
        """The last batch stopped after backward, keeping its true gradients (gradient accumulation). Close
        that step's bookkeeping (an overflow in it lowers the scale, as a skipped step does) and multiply
        them by the new scale, so they add to this batch's scaled gradients and are unscaled with them."""
        self.scaler.update()
        scale = self.scaler.scale(learn.loss.new_ones(()))
        for group in learn.opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.device))

    def step(self, learn) -> None:
        if not self.scaler.is_enabled():
            self.inner.step(learn)
            return
        self.scaler.step(learn.opt)  # no update when skip_step
        self.scaler.update()
        self._unstepped = False

    def zero_grad(self, learn) -> None:
        self.inner.zero_grad(learn)

    def state_dict(self) -> dict:
        """The loss scaler's scale and growth tracker (torch's GradScaler.state_dict), for a checkpoint."""
        return {"scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "unstepped": self._unstepped, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self._unstepped = state["unstepped"]
        if state["inner"] is not None:
            self.inner.load_state_dict(state["inner"])


class MixedPrecision(Callback):
    """Train in mixed precision: float16 with loss scaling on CUDA, bfloat16 elsewhere (no scaling needed:
    bfloat16 has float32's exponent range). The original TrainStep is restored when the fit ends. It takes
    part in the LR finder's sweep, so the sweep runs in the precision training will use."""

    order = 10

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype
        self._saved: TrainStep | None = None

    def before_fit(self, learn) -> None:
        device_type = next(learn.model.parameters()).device.type
        dtype = self.dtype or (torch.float16 if device_type == "cuda" else torch.bfloat16)
        self._saved = learn.train_step
        learn.train_step = MixedPrecisionStep(self._saved, device_type, dtype)

    def cleanup_fit(self, learn) -> None:
        if self._saved is not None:
            learn.train_step, self._saved = self._saved, None
