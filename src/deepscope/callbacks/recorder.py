"""Per-batch training loss and hyper-parameters, for plots and the report."""
from __future__ import annotations

import torch

from .. import distributed
from ..callback import Callback


class Recorder(Callback):
    """Records the training loss and the learning rate (and momentum, where the optimizer has one) at
    every training batch of the latest fit. Losses stay on the device until the fit ends (no sync per
    step). It sits out the LR finder's sweep, so what it holds is the fit's."""

    order = 15
    in_lr_sweep = False

    def __init__(self):
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.moms: list[float] = []
        self._pending: list[torch.Tensor] = []

    def before_fit(self, learn) -> None:
        self.losses, self.lrs, self.moms, self._pending = [], [], [], []

    def after_loss(self, learn) -> None:
        if learn.training:
            loss = learn.loss.detach()  # one value per step: an unreduced loss is recorded as its mean
            loss = loss.float().mean() if loss.numel() != 1 else loss.reshape(())
            loss = distributed.rank_mean(loss)  # every rank's loss is over its share: their mean is the batch's
            self._pending.append(loss)
            group = learn.opt.param_groups[0]
            self.lrs.append(float(group["lr"]))
            mom = group.get("momentum", group.get("betas", (None,))[0])
            if mom is not None:
                self.moms.append(float(mom))

    def after_epoch(self, learn) -> None:
        self._flush()

    def cleanup_fit(self, learn) -> None:
        self._flush()

    def state_dict(self) -> dict:
        """The fit's losses, learning rates and momenta so far."""
        self._flush()
        return {"losses": list(self.losses), "lrs": list(self.lrs), "moms": list(self.moms)}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.lrs, self.moms = list(state["losses"]), list(state["lrs"]), list(state["moms"])
        self._pending = []

    def losses_so_far(self) -> list[float]:
        """Every loss recorded in this fit, including those still on the device (reads them back)."""
        return self.losses + [float(t) for t in self._pending]

    def _flush(self) -> None:
        if self._pending:
            self.losses.extend(torch.stack(self._pending).float().cpu().tolist())
            self._pending = []

    def plot_loss(self, ax=None, skip_start: int = 0):
        from ..plots import plot_curve

        return plot_curve(self.losses[skip_start:], ax=ax, title="training loss", ylabel="loss", xlabel="batch")

    def plot_schedule(self, ax=None):
        from ..plots import plot_curve

        return plot_curve(self.lrs, ax=ax, title="learning rate", ylabel="lr", xlabel="batch")
