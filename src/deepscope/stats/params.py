"""Per-module parameter statistics after each optimiser step: weight norm, gradient norm and the
update-to-weight ratio ||w_after - w_before|| / ||w_before|| (Karpathy's "update/data ratio": around 1e-3
is healthy, much larger means the learning rate is too high for that layer, much smaller that it learns
little). The real update is measured, not an `lr * grad` proxy, so Adam's rescaling and weight decay
count: one copy of the parameters is kept on their device to compare against.
"""
from __future__ import annotations

import torch
from torch import nn

PARAM_COLUMNS = ("weight_norm", "grad_norm", "update_ratio")


def modules_with_params(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """`(name, trainable parameters it owns directly)` for each module that owns some."""
    found = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            found.append((name, own))
    return found


class ParamTracker:
    """Per-module weight norm, gradient norm and update ratio of up to `steps` steps, grouped at once.

    For the k-th pending step, call `before_step()` between backward and the optimiser step and
    `after_step(k)` after it; `summarise(out)` writes the pending steps into `out` (K', P, 3) of
    PARAM_COLUMNS, one row per module in `names`. The weight norm is taken before the update, on the
    weights that made this step's activations and gradients, and is the ratio's denominator.

    Each step costs a copy of the parameters, a subtraction, one fused `_foreach_norm` (the kernel
    torch's clip_grad_norm_ uses) and one stack; grouping per-tensor norms into per-module norms is one
    index_add for all pending steps."""

    def __init__(self, model: nn.Module, steps: int = 1):
        owners = modules_with_params(model)
        self.names = [name for name, _ in owners]
        self.params = [p for _, own in owners for p in own]
        device = self.params[0].device if self.params else torch.device("cpu")
        P, n = len(owners), len(self.params)
        module_of = [i for i, (_, own) in enumerate(owners) for _ in own]
        # per-tensor norms of the k-th step, in three lists (weights, grads, updates), go to slot
        # k * 3P + list * P + module
        self._slots = torch.tensor([k * 3 * P + j * P + i for k in range(steps) for j in range(3) for i in module_of],
                                   device=device, dtype=torch.long)
        self._norms = torch.full((steps, 3 * n), float("nan"), device=device)  # (K, 3n) per pending step
        self._done = [False] * steps
        self._no_grad = torch.full((), float("nan"), device=device)  # stands in for a missing .grad
        self._snapshot: list[torch.Tensor] | None = None
        self._copied = False                      # the snapshot holds this step's weights

    @torch.no_grad()
    def before_step(self) -> None:
        if not self.params:
            return
        if self._snapshot is None:
            self._snapshot = [p.detach().clone() for p in self.params]
        else:
            torch._foreach_copy_(self._snapshot, self.params)
        self._copied = True

    @torch.no_grad()
    def after_step(self, k: int) -> None:
        if not self.params or not self._copied:
            return
        # the gradients are still there (the learner zeroes them after this event), so one fused norm
        # covers the weights before the update, the gradients and the updates
        grads = [p.grad if p.grad is not None else self._no_grad for p in self.params]
        updates = list(torch._foreach_sub(self._snapshot, self.params))  # w_before - w_after
        self._norms[k].copy_(torch.stack(torch._foreach_norm(self._snapshot + grads + updates)))
        self._done[k], self._copied = True, False

    @torch.no_grad()
    def summarise(self, out: torch.Tensor) -> None:
        """Group the first K' = len(out) pending steps per module into `out` (K', P, 3); forget them."""
        K, P = out.shape[0], len(self.names)
        if P:
            for k in range(K):
                if not self._done[k]:                # no optimiser step was taken (a cancelled batch)
                    self._norms[k].fill_(float("nan"))
            squares = self._norms[:K].square().view(-1)  # (K * 3n,)
            module_norms = torch.zeros(K * 3 * P, device=squares.device)
            module_norms.index_add_(0, self._slots[:len(squares)], squares).sqrt_()
            weight, grad, update = module_norms.view(K, 3, P).unbind(1)
            out.copy_(torch.stack([weight, grad, update / weight], dim=-1))
        self._done = [False] * len(self._done)
