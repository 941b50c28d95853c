"""What the training loop itself did, observed at each optimiser step: the silent bugs of hand-written loops
(issue "diagnosis you can trust"). The recording engine owns one `LoopObserver` and calls it at each
update; the counts go into `Stats.observations` and `deepscope.diagnose.loop` judges them.

Observed, with no host synchronisation inside a step:
- updates taken while the model, or one of its BatchNorm/Dropout modules, was in eval mode;
- trainable parameters that have a gradient at an update but are in none of the optimiser's groups;
- gradients left over from the previous update when the first backward pass after it begins (one small
  parameter is watched by a tensor hook; a leftover means nothing cleared them: zero_grad was not called).
  Several backward passes between two updates (gradient accumulation) are fine: only the first is checked.
"""
from __future__ import annotations

import torch
from torch import nn

# Modules whose eval mode changes what training computes (running statistics instead of the batch's;
# no dropout): an update taken with one of them in eval mode trains a different model than intended.
MODE_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class LoopObserver:
    """Counts for one model's updates (see the module docstring); `observations()` returns them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.updates = 0
        self.eval_updates = 0
        self.eval_modules: list[str] = []         # modules found in eval mode at an update (first seen)
        self.not_in_optimizer: list[str] | None = None  # modules with such parameters; None: not checked
        self._handle = None
        self._watched: nn.Parameter | None = None
        self._first_backward = False              # the next backward pass is the first since an update
        self._stale = None                        # device count of first backward passes that found old gradients
        self._checked = 0                         # first backward passes seen

    def attach(self) -> None:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            return
        # the smallest trainable parameter (a bias, usually): the cheapest to look at
        self._watched = min(trainable, key=lambda p: p.numel())
        self._stale = torch.zeros((), device=self._watched.device)
        self._handle = self._watched.register_hook(self._on_gradient)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _on_gradient(self, grad: torch.Tensor) -> None:
        # called with this backward pass's gradient, before it is added to .grad
        if not self._first_backward:
            return
        self._first_backward = False
        self._checked += 1
        old = self._watched.grad
        if old is not None:
            self._stale += (old.detach().abs().sum() > 0).float()  # on the device: no synchronisation

    def on_update(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """An optimiser step is about to update the weights (gradients final)."""
        self.updates += 1
        off = [name for name, m in self.model.named_modules() if not m.training and
               (m is self.model or isinstance(m, MODE_SENSITIVE))]
        if off:
            self.eval_updates += 1
            self.eval_modules = self.eval_modules or off[:8]
        if optimizer is not None and self.not_in_optimizer is None:
            given = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self.not_in_optimizer = sorted({name for name, m in self.model.named_modules()
                                            for p in m.parameters(recurse=False)
                                            if p.requires_grad and p.grad is not None and id(p) not in given})

    def after_update(self) -> None:
        self._first_backward = True

    def observations(self) -> dict:
        """The counts so far (one read-back for the leftover-gradient count)."""
        return {"updates": self.updates, "eval_updates": self.eval_updates, "eval_modules": list(self.eval_modules),
                "not_in_optimizer": self.not_in_optimizer,
                "gradient_checks": self._checked,
                "stale_gradients": int(self._stale.item()) if self._stale is not None else 0}
