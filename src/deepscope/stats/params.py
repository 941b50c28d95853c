"""Per-module parameter statistics after each optimiser step: weight norm, gradient norm and the
update-to-weight ratio ||w_after - w_before|| / ||w_before|| (Karpathy's "update/data ratio": around 1e-3
is healthy, much larger means the learning rate is too high for that layer, much smaller that it learns
little). The real update is measured, not an `lr * grad` proxy, so Adam's rescaling and weight decay
count: one copy of the parameters is kept on their device to compare against.
"""
from __future__ import annotations

import torch
from torch import nn

from .collect import group_norms

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
    """Call `before_step(out)` between backward and the optimiser step, `after_step(out)` after it;
    `out` is a (P, 3) tensor of PARAM_COLUMNS, one row per module in `names`."""

    def __init__(self, model: nn.Module):
        owners = modules_with_params(model)
        self.names = [name for name, _ in owners]
        self.params = [p for _, own in owners for p in own]
        device = self.params[0].device if self.params else torch.device("cpu")
        self._group = torch.tensor([i for i, (_, own) in enumerate(owners) for _ in own], device=device)
        self._no_grad = torch.full((), float("nan"), device=device)  # stands in for a missing .grad
        self._snapshot: list[torch.Tensor] | None = None
        self._norm_before: torch.Tensor | None = None

    @torch.no_grad()
    def before_step(self, out: torch.Tensor) -> None:
        if not self.params:
            return
        P = len(self.names)
        grads = [p.grad if p.grad is not None else self._no_grad for p in self.params]
        out[:, 1].copy_(group_norms(grads, self._group, P))
        self._norm_before = group_norms(self.params, self._group, P)
        if self._snapshot is None:
            self._snapshot = [p.detach().clone() for p in self.params]
        else:
            torch._foreach_copy_(self._snapshot, self.params)

    @torch.no_grad()
    def after_step(self, out: torch.Tensor) -> None:
        if not self.params or self._norm_before is None:
            return
        P = len(self.names)
        torch._foreach_sub_(self._snapshot, self.params)  # snapshot now holds w_before - w_after
        out[:, 0].copy_(group_norms(self.params, self._group, P))
        out[:, 2].copy_(group_norms(self._snapshot, self._group, P) / self._norm_before)
        self._norm_before = None
