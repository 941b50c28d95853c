"""Hyper-parameter schedules: any optimizer hyper-parameter as a function of training progress.

One-cycle (Smith 2018, "Super-convergence"): lr warms up then anneals while momentum does the opposite.
"""
from __future__ import annotations

import math
from typing import Callable

from ..callback import Callback
from ..errors import ConfigError, check_number

Schedule = Callable[[float], float]  # fraction of training done, in [0, 1] -> value


def sched_lin(start: float, end: float) -> Schedule:
    return lambda pct: start + pct * (end - start)


def sched_cos(start: float, end: float) -> Schedule:
    return lambda pct: end + (start - end) * (1 + math.cos(math.pi * pct)) / 2


def combine_scheds(pcts: list[float], scheds: list[Schedule]) -> Schedule:
    """Run `scheds[i]` over the fraction `pcts[i]` of training (the fractions sum to 1)."""
    if abs(sum(pcts) - 1) > 1e-6 or len(pcts) != len(scheds):
        raise ValueError("combine_scheds needs one fraction per schedule, summing to 1")
    bounds = [0.0]
    for p in pcts:
        bounds.append(bounds[-1] + p)

    def schedule(pct: float) -> float:
        i = next((j for j in range(len(scheds)) if pct < bounds[j + 1]), len(scheds) - 1)
        width = bounds[i + 1] - bounds[i]
        return scheds[i]((pct - bounds[i]) / width if width > 0 else 1.0)

    return schedule


def one_cycle_lr(max_lr: float, pct_start: float = 0.25, div: float = 25.0, div_final: float = 1e4) -> Schedule:
    return combine_scheds([pct_start, 1 - pct_start],
                          [sched_cos(max_lr / div, max_lr), sched_cos(max_lr, max_lr / div_final)])


def one_cycle_mom(high: float = 0.95, low: float = 0.85, pct_start: float = 0.25) -> Schedule:
    return combine_scheds([pct_start, 1 - pct_start], [sched_cos(high, low), sched_cos(low, high)])


def has_momentum(group: dict) -> bool:
    """Scheduling momentum only makes sense where the optimizer uses it (not plain SGD)."""
    return "betas" in group or bool(group.get("momentum"))


def _set_hyper(group: dict, name: str, value: float) -> None:
    """Momentum lives in `momentum` (SGD, RMSprop) or in `betas[0]` (Adam family)."""
    if name == "momentum" and "momentum" not in group and "betas" in group:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group[name] = value


class ParamScheduler(Callback):
    """Set optimizer hyper-parameters before each training batch from schedules of training progress.

    `scheds` maps a hyper-parameter name (`lr`, `momentum`, `weight_decay`, ...) to a Schedule. Training
    progress is `train_iter / (n_epochs * learn.iters_per_epoch)`: the batches the fit will run, which
    LimitBatches lowers, so a shortened run still warms up and anneals completely. Data of unknown length
    needs LimitBatches(train=N) to say how many batches an epoch holds. The original values are restored
    when the fit ends, so a schedule never leaks into the next fit. It sits out the LR finder's sweep.
    """

    order = 5  # after LimitBatches (-10) has set learn.iters_per_epoch
    in_lr_sweep = False

    def __init__(self, scheds: dict[str, Schedule]):
        self.scheds = scheds
        self._saved: list[dict] = []

    def before_fit(self, learn) -> None:
        self._saved = []  # first: if this fails, cleanup_fit must not restore an earlier fit's values
        if not learn.iters_per_epoch:
            raise ConfigError(f"{self.name} plans its schedule over the fit's training batches, but the training "
                              f"data has no length: give it a __len__, or say how many batches an epoch holds "
                              f"with LimitBatches(train=N)")
        group = learn.opt.param_groups[0]
        self._active = {k: f for k, f in self.scheds.items() if k != "momentum" or has_momentum(group)}
        self._total = learn.n_epochs * learn.iters_per_epoch
        self._saved = [{k: g.get(k, g.get("betas")) for k in self._active} for g in learn.opt.param_groups]

    def before_batch(self, learn) -> None:
        if not learn.training:
            return
        pct = min(learn.train_iter / self._total, 1.0)
        for group in learn.opt.param_groups:
            for name, schedule in self._active.items():
                _set_hyper(group, name, schedule(pct))

    def cleanup_fit(self, learn) -> None:
        for group, saved in zip(learn.opt.param_groups, self._saved):
            for name, value in saved.items():
                if name == "momentum" and "momentum" not in group and "betas" in group:
                    group["betas"] = value
                elif value is not None:
                    group[name] = value


class OneCycle(ParamScheduler):
    """One-cycle schedule for lr and momentum (betas[0] for Adam-style optimizers)."""

    def __init__(self, max_lr: float, pct_start: float = 0.25, moms: tuple[float, float] = (0.95, 0.85)):
        check_number("OneCycle", "max_lr", max_lr)
        if not 0 < pct_start < 1:
            raise ConfigError(f"OneCycle: pct_start must be between 0 and 1, got {pct_start!r}")
        super().__init__({"lr": one_cycle_lr(max_lr, pct_start), "momentum": one_cycle_mom(moms[0], moms[1], pct_start)})
        self.max_lr = max_lr


class CosineSchedule(ParamScheduler):
    """Cosine annealing of lr from `max_lr` to `max_lr / div_final`."""

    def __init__(self, max_lr: float, div_final: float = 1e3):
        check_number("CosineSchedule", "max_lr", max_lr)
        check_number("CosineSchedule", "div_final", div_final)
        super().__init__({"lr": sched_cos(max_lr, max_lr / div_final)})
