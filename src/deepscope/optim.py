"""Optimisers written from their update rules (fast.ai 2019 part 2, lesson 11), torch-compatible.

Each subclasses `torch.optim.Optimizer` for its bookkeeping only: `param_groups` (so schedulers and the
LR finder set `opt.param_groups[i]["lr"]`, `"momentum"` or `"betas"` exactly as on torch's optimisers),
`zero_grad()`, `state_dict()` and `load_state_dict()`. The `step()` of each is written out by hand and
tested against its torch.optim counterpart. Per-parameter state keys follow torch's names.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from deepscope.errors import ConfigError

Params = Iterable[torch.Tensor] | Iterable[dict]


def _l2(p: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """The gradient with L2 weight decay folded in: d/dp of loss + wd/2·|p|² is grad + wd·p."""
    return p.grad.add(p, alpha=weight_decay) if weight_decay else p.grad


class PerParameterOptimizer(Optimizer):
    """The loop every optimiser here shares: each parameter with a gradient gets `update(p, group, state)`,
    the one method a subclass writes (lesson 11's `opt_step`)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group, self.state[p])
        return loss

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError


class SGD(PerParameterOptimizer):
    """Plain gradient descent: p ← p - lr·(grad + wd·p)."""

    def __init__(self, params: Params, lr: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        p.sub_(_l2(p, group["weight_decay"]), alpha=group["lr"])


class Momentum(PerParameterOptimizer):
    """SGD with momentum as torch writes it (dampening 0): buf ← mom·buf + grad; p ← p - lr·buf.

    The first step starts the buffer at the gradient itself. The hyper-parameter is stored under torch's
    key `"momentum"` so one-cycle schedulers find it.
    """

    def __init__(self, params: Params, lr: float, mom: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=mom, weight_decay=weight_decay))

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        grad = _l2(p, group["weight_decay"])
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.clone()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
        p.sub_(state["momentum_buffer"], alpha=group["lr"])


class RMSProp(PerParameterOptimizer):
    """RMSProp (Hinton, Coursera lecture 6e): divide the step by a running RMS of the gradient.

    sq ← alpha·sq + (1-alpha)·grad²; p ← p - lr·grad / (sqrt(sq) + eps), as torch.optim.RMSprop.
    """

    def __init__(self, params: Params, lr: float, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay))

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        grad = _l2(p, group["weight_decay"])
        if "square_avg" not in state:
            state["square_avg"] = torch.zeros_like(p)
        sq = state["square_avg"]
        sq.mul_(group["alpha"]).addcmul_(grad, grad, value=1 - group["alpha"])
        p.addcdiv_(grad, sq.sqrt().add_(group["eps"]), value=-group["lr"])


def _adam_update(p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
    """One Adam step (Kingma & Ba 2015) on `p`: bias-corrected first and second moments of `grad`."""
    beta1, beta2 = group["betas"]
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].lerp_(grad, 1 - beta1)  # m ← β1·m + (1-β1)·g
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v ← β2·v + (1-β2)·g²
    # The moments start at zero, so early on they are too small by 1-β^t: divide it back out.
    m_hat_scale = 1 - beta1 ** t
    v_hat = state["exp_avg_sq"] / (1 - beta2 ** t)
    p.addcdiv_(state["exp_avg"], v_hat.sqrt_().add_(group["eps"]), value=-group["lr"] / m_hat_scale)


class Adam(PerParameterOptimizer):
    """Adam with L2 weight decay added to the gradient, as torch.optim.Adam does."""

    def __init__(self, params: Params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        _adam_update(p, _l2(p, group["weight_decay"]), group, state)


class AdamW(PerParameterOptimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019): p ← p·(1 - lr·wd) before the Adam step.

    Decay applied to the weights, not the gradient, is not rescaled by Adam's per-parameter step size.
    """

    def __init__(self, params: Params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        p.mul_(1 - group["lr"] * group["weight_decay"])
        _adam_update(p, p.grad, group, state)


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD, "momentum": Momentum, "rmsprop": RMSProp, "adam": Adam, "adamw": AdamW,
}


def get_optimizer(name: str) -> type[Optimizer]:
    """The optimiser class named `name`; call it as `cls(params, lr=..., **hyper_parameters)`."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]
