"""Callbacks that change how a step is taken: gradient clipping and mixed precision."""
from __future__ import annotations

import torch
from torch import nn

from ..callback import Callback
from ..learner import TrainStep


class GradClip(Callback):
    """Clip the global gradient norm to `max_norm` before each step (Pascanu et al. 2013). The norm before
    clipping is kept, on the device, in `norms` (one tensor per step) for plots or diagnosis."""

    order = 20

    def __init__(self, max_norm: float = 1.0, keep_norms: bool = False):
        if max_norm <= 0:
            raise ValueError(f"GradClip(max_norm={max_norm}): the norm must be positive")
        self.max_norm, self.keep_norms = max_norm, keep_norms
        self.norms: list[torch.Tensor] = []

    def after_backward(self, learn) -> None:
        norm = nn.utils.clip_grad_norm_(learn.model.parameters(), self.max_norm)
        if self.keep_norms:
            self.norms.append(norm.detach())


class MixedPrecisionStep(TrainStep):
    """Forward and loss under autocast; on CUDA with float16, the loss is scaled so small gradients do not
    underflow, and the scaler skips steps whose gradients overflowed."""

    def __init__(self, inner: TrainStep, device_type: str, dtype: torch.dtype):
        self.inner, self.device_type, self.dtype = inner, device_type, dtype
        self.scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    def predict(self, learn) -> None:
        with torch.autocast(self.device_type, dtype=self.dtype):
            self.inner.predict(learn)

    def get_loss(self, learn) -> None:
        with torch.autocast(self.device_type, dtype=self.dtype):
            self.inner.get_loss(learn)

    def backward(self, learn) -> None:
        self.scaler.scale(learn.loss).backward()

    def step(self, learn) -> None:
        self.scaler.step(learn.opt)
        self.scaler.update()

    def zero_grad(self, learn) -> None:
        self.inner.zero_grad(learn)


class MixedPrecision(Callback):
    """Train in mixed precision: float16 with loss scaling on CUDA, bfloat16 elsewhere (no scaling needed:
    bfloat16 has float32's exponent range). The original TrainStep is restored when the fit ends."""

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
