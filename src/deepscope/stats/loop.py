"""What the training loop itself did, observed at each optimiser step: the silent bugs of hand-written loops
(issue "diagnosis you can trust"). The recording engine owns one `LoopObserver` and calls it at each
update; the counts go into `Stats.observations` and `deepscope.diagnose.loop` judges them.

Observed, with no host synchronisation inside a step:
- updates taken while the model, or one of its BatchNorm/Dropout modules, was in eval mode;
- trainable parameters that have a gradient at an update but are in none of the optimiser's groups;
- gradients left over from the previous update when the first backward pass after it begins (one small
  parameter is watched by a tensor hook; a leftover means nothing cleared them: zero_grad was not called).
  Several backward passes between two updates (gradient accumulation) are fine: only the first is checked.
- the class targets of each training batch (`observe_targets`, from `w.step(targets=)` or the Learner's
  batch): per batch, how many distinct classes it holds, its mean label and its size, and the run's class
  counts, kept in preallocated device tensors for the first `LABEL_BATCHES` batches (unshuffled data).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed

# Class targets: the first 512 batches are observed (shuffling shows in the first dozens); labels are
# counted modulo 1024 slots, so more classes than that share slots (counts stay consistent run-wide).
LABEL_BATCHES = 512
LABEL_SLOTS = 1024


class LoopObserver:
    """Counts for one model's updates (see the module docstring); `observations()` returns them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.updates = 0
        self.eval_updates = 0
        self.model_eval_updates = 0
        self.eval_modules: list[str] = []         # modules found in eval mode at an update (first seen)
        self.not_in_optimizer: list[str] | None = None  # modules with such parameters; None: not checked
        self._handle = None
        self._watched: nn.Parameter | None = None
        self._first_backward = False              # the next backward pass is the first since an update
        self._stale = None                        # device count of first backward passes that found old gradients
        self._checked = 0                         # first backward passes seen
        self.targets_seen = 0                     # batches whose targets were given
        self.other_targets = 0                    # ...that were not one class index per example
        self._labels = 0                          # batches of class indices observed
        self._label_rows = None                   # (LABEL_BATCHES, 3) device: classes, mean label, size
        self._class_counts = None                 # (LABEL_SLOTS,) device: labels seen per class slot
        # Under DistributedDataParallel each rank observes its share of every batch: the rows from
        # `_combined` on are this rank's (column 1 the label sum, not the mean), with the classes present in
        # `_shared["presence"]` and the class counts in `_shared["counts"]`, until `combine_across_ranks` makes
        # them the whole batch's (at the recorder's synchronized flushes); only combined rows are reported.
        self._combined = 0
        self._shared: dict | None = None

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
        self.model_eval_updates += not self.model.training  # watch records training-mode forwards only
        # Only modules whose eval mode changes the computation count: Dropout, and BatchNorm with trainable
        # parameters (one whose parameters are all frozen, left in eval mode, is a backbone frozen on purpose).
        # A model in eval mode without such modules trains as it would in train mode.
        off = [name for name, m in self.model.named_modules() if not m.training and
               (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 or
                isinstance(m, nn.RNNBase) and m.dropout > 0 or
                isinstance(m, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters()))]
        if off and not self.model.training:
            off = ["", *off]  # the whole model: say so first
        if off:
            self.eval_updates += 1
            self.eval_modules = self.eval_modules or off[:8]
        if optimizer is not None and self.not_in_optimizer is None:
            given = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self.not_in_optimizer = sorted({name for name, m in self.model.named_modules()
                                            for p in m.parameters(recurse=False)
                                            if p.requires_grad and p.grad is not None and id(p) not in given})
            if self._watched is not None and id(self._watched) not in given:
                # zero_grad clears only the optimiser's parameters: watch one of those for leftovers
                held = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
                self.remove()
                self._watched = min(held, key=lambda p: p.numel()) if held else None
                if self._watched is not None:
                    self._handle = self._watched.register_hook(self._on_gradient)

    # what outlives a step: the counts, and the device tensors holding some of them
    _STATE = ("updates", "eval_updates", "model_eval_updates", "eval_modules", "not_in_optimizer", "_first_backward",
              "_stale", "_checked", "targets_seen", "other_targets", "_labels", "_label_rows", "_class_counts")

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in self._STATE:
            value = state[name]
            if isinstance(value, torch.Tensor) and self._stale is not None:
                value = value.to(self._stale.device)
            setattr(self, name, value)
        self._combined, self._shared = self._labels, None  # a checkpoint holds combined rows only (taken at a flush)

    def after_update(self) -> None:
        self._first_backward = True

    def observe_targets(self, targets) -> None:
        """A training batch's targets. Class indices (any integer dtype, shape (N,) or (N, 1)) are counted
        on their device, with no synchronisation; float, boolean or dense (N, T, ...) targets only counted."""
        if not isinstance(targets, torch.Tensor):
            return
        self.targets_seen += 1
        t = targets.detach()
        if t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 1 or not t.numel():
            self.other_targets += 1
            return
        if self._labels >= LABEL_BATCHES:
            return
        self._label_buffers(t.device)
        t = t.to(self._class_counts.device).long()
        valid = (t >= 0).float()  # negative labels (ignore_index) are not classes
        counts = torch.zeros(LABEL_SLOTS, device=t.device).index_add_(0, t.clamp(min=0) % LABEL_SLOTS, valid)
        size = valid.sum()
        shared = self._shared
        total = (t * valid).sum()
        self._label_rows[self._labels] = torch.stack([(counts > 0).sum().float(),
                                                      total if shared is not None else total / size.clamp(min=1), size])
        if shared is not None:
            shared["presence"][self._labels] = counts > 0
            shared["counts"] += counts
        else:
            self._class_counts += counts
        self._labels += 1

    def _label_buffers(self, device) -> None:
        if self._label_rows is None:
            self._label_rows = torch.zeros(LABEL_BATCHES, 3, device=device)
            self._class_counts = torch.zeros(LABEL_SLOTS, device=device)
        if self._shared is None and distributed.active():
            device = self._class_counts.device
            self._shared = {"presence": torch.zeros(LABEL_BATCHES, LABEL_SLOTS, dtype=torch.uint8, device=device),
                            "counts": torch.zeros(LABEL_SLOTS, device=device)}

    def combine_across_ranks(self) -> None:
        """Under DistributedDataParallel, at a point every rank reaches: make the batches observed since the
        last call describe the whole global batch on every rank (classes present in any rank's share, sizes
        and label sums added, hence the mean label; class counts added). A collective."""
        n, done = min(distributed.any_rank(self._labels), LABEL_BATCHES), self._combined
        if n <= done:
            return
        self._label_buffers(self._stale.device if self._stale is not None else distributed.device())
        rows, presence, counts = self._label_rows[done:n], self._shared["presence"][done:n], self._shared["counts"]
        if self._labels < n:  # a rank that observed fewer batches: nothing of them
            rows[self._labels - done:] = 0
            presence[self._labels - done:] = 0
        distributed.all_reduce_(presence, "max")
        packed = distributed.all_reduce_(torch.cat([rows[:, 1:].flatten(), counts]), "sum")
        k = n - done
        sums = packed[:2 * k].view(k, 2)
        rows[:, 0] = presence.sum(1).float()
        rows[:, 1] = sums[:, 0] / sums[:, 1].clamp(min=1)
        rows[:, 2] = sums[:, 1]
        self._class_counts += packed[2 * k:]
        counts.zero_()
        self._labels = self._combined = n

    def observations(self) -> dict:
        """The counts so far (one read-back for the leftover-gradient count, one for the class targets)."""
        return {"updates": self.updates, "eval_updates": self.eval_updates, "eval_modules": list(self.eval_modules),
                "model_eval_updates": self.model_eval_updates,
                "not_in_optimizer": self.not_in_optimizer,
                "gradient_checks": self._checked,
                "stale_gradients": int(self._stale.item()) if self._stale is not None else 0,
                **self._label_observations()}

    def _label_observations(self) -> dict:
        """targets_seen (0: no targets were given, nothing to judge), other_targets, label_batches and, per
        observed batch of class indices, its classes, mean label and size; class_counts: the run's, per class."""
        n = self._combined if self._shared is not None else self._labels  # under DDP: the whole batches only
        out = {"targets_seen": self.targets_seen, "other_targets": self.other_targets, "label_batches": n}
        if n:
            values = torch.cat([self._label_rows[:n].flatten(), self._class_counts]).cpu()
            rows, counts = values[:3 * n].view(n, 3), values[3 * n:]
            out.update(batch_classes=[int(v) for v in rows[:, 0].tolist()],
                       batch_label_means=[round(v, 5) for v in rows[:, 1].tolist()],
                       batch_sizes=[int(v) for v in rows[:, 2].tolist()],
                       class_counts=sorted((int(c) for c in counts.tolist() if c > 0), reverse=True))
        return out
