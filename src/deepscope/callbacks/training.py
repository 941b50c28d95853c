"""Callbacks that change how a step is taken: gradient clipping and mixed precision."""
from __future__ import annotations

import torch
from torch import nn

from ..callback import Callback
from ..errors import ConfigError, check_number
from ..hooks import compiled_code_sees_hooks
from ..learner import TrainStep, WrappedStep


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


class MixedPrecisionStep(WrappedStep):
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
        super().__init__(inner)
        self.device_type, self.dtype = device_type, dtype
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
        self._step: MixedPrecisionStep | None = None

    def before_fit(self, learn) -> None:
        device_type = next(learn.model.parameters()).device.type
        dtype = self.dtype or (torch.float16 if device_type == "cuda" else torch.bfloat16)
        self._step = MixedPrecisionStep.wrap(learn, device_type, dtype)

    def cleanup_fit(self, learn) -> None:
        if self._step is not None:
            self._step.unwrap(learn)
            self._step = None


class CompiledStep(WrappedStep):
    """The forward pass through `torch.compile` of whatever the inner step calls (the model, or its
    DistributedDataParallel wrapper, which torch compiles bucket by bucket). The model itself stays
    uncompiled in `learn.model`, so its module names, `state_dict` keys, hooks and checkpoints are those
    of the eager model. A compiler that fails is a ConfigError that says where and why."""

    def __init__(self, inner: TrainStep, **options):
        super().__init__(inner)
        self.options = options
        self._compiled: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(module) -> (module, its compiled form)

    def forward_module(self, learn) -> nn.Module:
        module = self.inner.forward_module(learn)
        kept = self._compiled.get(id(module))
        if kept is None or kept[0] is not module:
            kept = self._compiled[id(module)] = (module, torch.compile(module, **self.options))
        return kept[1]

    def predict(self, learn) -> None:
        try:
            self.inner.predict(learn)
        except Exception as e:  # noqa: BLE001 - only the compiler's own failures are turned into advice
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            root = e
            while getattr(root, "inner_exception", None) or root.__cause__:
                root = getattr(root, "inner_exception", None) or root.__cause__
            reason = (str(root).strip().splitlines() or [""])[0] or type(root).__name__
            backend = self.options.get("backend", "inductor")
            where = f"training step {learn.train_iter}" if learn.training else f"validation of epoch {learn.epoch}"
            raise ConfigError(f"torch.compile (backend {getattr(backend, '__name__', backend)!r}) could not compile "
                              f"the forward pass at {where}: {type(root).__name__}: {reason}; train without "
                              f"compiling (drop --compile), or try --compile aot_eager to see whether the model "
                              f"traces at all") from e


class Compile(Callback):
    """Run the forward pass (training and validation) through `torch.compile` (PyTorch 2's graph compiler:
    TorchDynamo captures the graph, a backend such as Inductor generates fused kernels). `backend` and
    `mode` are torch.compile's (`torch._dynamo.list_backends()`; mode None, "reduce-overhead" (CUDA graphs)
    or "max-autotune"); `options` go to torch.compile as they are.

    The model stays eager in `learn.model` (CompiledStep): names, `state_dict` keys, checkpoints and
    exports are unchanged, and the first batch pays the compilation (seconds to a minute; the phase timer
    counts it as forward time). deepscope's hooks run outside the compiled graph (`hooks.opaque`), so with
    statistics on the graph is cut at each watched module and the statistics are exactly eager's; with
    `--no-stats` the forward is one graph. It takes part in the LR finder's sweep. Raises ConfigError for an
    unknown backend or a Python that TorchDynamo does not support (when made), or a compiler that fails."""

    order = -14  # after Distributed (-15), so the DistributedDataParallel wrapper is what gets compiled

    def __init__(self, backend: str = "inductor", mode: str | None = None, **options):
        check_compile_backend(backend)
        self.backend, self.mode, self.options = backend, mode, options
        self._step: CompiledStep | None = None

    def before_fit(self, learn) -> None:
        compiled_code_sees_hooks()  # hooks added in a later fit (statistics, a replay) must not be skipped
        self._step = CompiledStep.wrap(learn, backend=self.backend, mode=self.mode, **self.options)

    def cleanup_fit(self, learn) -> None:
        if self._step is not None:
            self._step.unwrap(learn)
            self._step = None


def check_compile_backend(backend) -> None:
    """ConfigError unless torch.compile can run `backend` (a registered name, or a callable backend) here."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(f"torch.compile is not supported with this Python and torch ({torch.__version__}); "
                          f"train without compiling")
    if not callable(backend) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"unknown torch.compile backend {backend!r}; choose one of "
                          f"{sorted({*torch._dynamo.list_backends(), 'aot_eager', 'eager'})} (inductor generates "
                          f"kernels; aot_eager and eager only trace, to test that a model compiles)")
