"""The learning-rate finder: train briefly while the learning rate grows exponentially, watch the loss.

Leslie Smith, "Cyclical Learning Rates for Training Neural Networks" (2015, section 3.3) introduced the
range test; fastai made it a one-liner and (v2) turned the suggestions into pure functions of the curve,
which is the design here. Three separate steps (STYLE.md, habit 7):

  record:  `LRFinder`, a temporary callback, sets the lr before each training batch and records the loss;
  analyse: `valley`, `steepest`, `minimum_div_10` and `noise_check` are pure functions of (lrs, losses);
  plot:    `LRFindResult.plot(ax=None)`.

`lr_find` has side effects (it trains), so it cleans up (habit 8): the model's parameters and buffers,
the optimizer (its state and hyper-parameters), the learner's lr and the random number generators are put
back exactly as they were, even when the sweep fails. Each callback says whether it takes part in the sweep
(`Callback.in_lr_sweep`): those that change how a step is taken run, those that record, schedule, stop or
write sit out, so what they hold of the real fit is untouched.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from . import distributed
from .callback import Callback, CancelFitException
from .errors import ConfigError
from .learner import data_length

# The sweep stops once the smoothed loss exceeds this multiple of the best smoothed loss so far: past that
# the run has diverged and the rest of the sweep would only show a wall (fastai and Smith use 4 too).
DIVERGENCE_FACTOR = 4.0
# Weight of the past in the exponential moving average of the loss. 0.98 averages over ~50 batches: smooth
# enough to read a trend from minibatch noise, short enough for a 100-step sweep (it is debiased, so the
# first points are not pulled towards 0).
SMOOTHING = 0.98
# The curve is "noisy" when the batch-to-batch scatter of the raw loss (std of its successive differences
# / sqrt 2, an estimate of one point's noise that ignores the trend) is more than this fraction of the
# smoothed loss's total drop: the shape the suggestions read is then not much bigger than the noise.
NOISE_LIMIT = 0.5
# Fewer points than this before the lowest loss (or in all) leave too little curve to read a slope from:
# usually the sweep started too high or diverged almost at once.
MIN_POINTS = 10


# --- analyse: suggestions as pure functions of the curve ------------------------------------------------
def _curve(lrs: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if lrs.shape != losses.shape or len(lrs) < 2:
        raise ValueError(f"need matching lrs and losses with at least 2 points, got {len(lrs)} and {len(losses)}")
    return lrs, losses


def steepest(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr where the loss falls fastest per decade: the most negative d(loss)/d(log lr)."""
    lrs, losses = _curve(lrs, losses)
    slope = np.gradient(losses, np.log(lrs))
    return float(lrs[int(np.argmin(slope))])


def minimum_div_10(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """A decade below the lr of the lowest loss (the lowest loss is already close to diverging), kept
    inside the swept range."""
    lrs, losses = _curve(lrs, losses)
    return float(max(lrs[int(np.argmin(losses))] / 10, lrs[0]))


def longest_descent(losses: Sequence[float]) -> tuple[int, int]:
    """(first, last) index of the longest strictly decreasing subsequence of `losses` (not necessarily
    contiguous, so a small bump does not break a long descent). O(n^2), fine for a few thousand points."""
    losses = np.asarray(losses, dtype=float)
    n = len(losses)
    length = np.ones(n, dtype=int)  # length[i]: longest descent ending at i
    start = np.arange(n)  # start[i]: where that descent begins
    for i in range(1, n):
        higher = np.flatnonzero(losses[:i] > losses[i])
        if len(higher):
            j = higher[np.argmax(length[higher])]
            length[i], start[i] = length[j] + 1, start[j]
    end = int(np.argmax(length))
    return int(start[end]), end


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The middle of the longest descending stretch (fastai v2's "valley" idea): far enough along that the
    loss is clearly falling, far enough from the bottom that training will not diverge."""
    lrs, losses = _curve(lrs, losses)
    first, last = longest_descent(losses)
    return float(lrs[(first + last) // 2])


SUGGESTIONS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "valley": valley, "steepest": steepest, "minimum_div_10": minimum_div_10,
}


def suggest(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Every suggestion in SUGGESTIONS; empty when the curve has fewer than 2 points."""
    if len(lrs) < 2:
        return {}
    return {name: fn(lrs, losses) for name, fn in SUGGESTIONS.items()}


def noise_check(losses: Sequence[float], raw_losses: Sequence[float]) -> tuple[bool, str]:
    """(noisy, message): whether the curve is too short or too noisy for its suggestions to be trusted."""
    losses, raw = np.asarray(losses, dtype=float), np.asarray(raw_losses, dtype=float)
    if len(losses) < MIN_POINTS:
        return True, (f"only {len(losses)} points before the sweep stopped (fewer than {MIN_POINTS}): the loss "
                      f"diverged almost at once; start lower (--start-lr) or check the model and data")
    best = int(np.argmin(losses))
    if best < MIN_POINTS:
        return True, (f"the loss was lowest at point {best} of {len(losses)}: too little descent to read; "
                      f"start the sweep lower (--start-lr)")
    drop = float(losses[: best + 1].max() - losses[best])
    scatter = float(np.std(np.diff(raw[: best + 1])) / math.sqrt(2))
    ratio = scatter / drop if drop > 0 else math.inf
    if ratio > NOISE_LIMIT:
        return True, (f"noisy curve: the batch-to-batch scatter of the loss ({scatter:.3g}) is {ratio:.2f} x its "
                      f"total drop ({drop:.3g}), above {NOISE_LIMIT}; treat the suggestions as rough, try a larger "
                      f"batch or more iterations (--num-it)")
    return False, f"clear curve: scatter {scatter:.3g} is {ratio:.2f} x the drop {drop:.3g}"


# --- the result ----------------------------------------------------------------------------------------
@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed (debiased exponential moving average)
    raw_losses: list[float]
    suggestions: dict[str, float] = field(default_factory=dict)
    noisy: bool = False
    message: str = ""
    num_it: int = 0  # iterations asked for; len(lrs) < num_it when the sweep stopped early

    @classmethod
    def from_curve(cls, lrs: Sequence[float], losses: Sequence[float], raw_losses: Sequence[float],
                   num_it: int = 0) -> "LRFindResult":
        noisy, message = noise_check(losses, raw_losses) if len(losses) else (True, "no finite loss was recorded")
        return cls(list(map(float, lrs)), list(map(float, losses)), list(map(float, raw_losses)),
                   suggest(lrs, losses), noisy, message, num_it)

    def plot(self, ax=None):
        """Smoothed loss against lr (log x) with each suggestion marked and labelled."""
        from .plots import lr_find_plot

        fig = lr_find_plot(self.lrs, self.losses, self.suggestions, ax=ax)
        if self.noisy:
            fig.axes[0].set_title("learning-rate finder (noisy: suggestions are rough)")
        return fig

    def to_dict(self) -> dict:
        """What `lr_find.json` holds (the report reads `lrs`, `losses` and `suggestions`)."""
        return {"lrs": self.lrs, "losses": self.losses, "raw_losses": self.raw_losses,
                "suggestions": self.suggestions, "noisy": self.noisy, "message": self.message, "num_it": self.num_it}

    def __repr__(self) -> str:
        tips = ", ".join(f"{k}={v:.2e}" for k, v in self.suggestions.items() if v is not None)
        return f"LRFindResult({len(self.lrs)} points, {tips}{', noisy' if self.noisy else ''})"

    def _repr_html_(self) -> str:
        """In a notebook: the suggestions and the curve (an inline PNG), with what the noise check said."""
        import html

        from .plots import figure_to_data_uri

        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{'none' if v is None else f'{v:.3g}'}</td></tr>"
                       for k, v in self.suggestions.items())
        image = f'<img src="{figure_to_data_uri(self.plot())}" alt="loss against learning rate">' if self.lrs else ""
        noisy = " (noisy: suggestions are rough)" if self.noisy else ""
        return (f"<div><b>learning-rate finder</b>: {len(self.lrs)} points{noisy}<br><small>"
                f"{html.escape(self.message)}</small><table><tr><th>rule</th><th>learning rate</th></tr>{rows}</table>"
                f"{image}</div>")


# --- record: the sweep ---------------------------------------------------------------------------------
class LRFinder(Callback):
    """Set lr = start * (end/start)^(i/(num_it-1)) before training batch i; record the loss; stop after
    `num_it` batches, on a non-finite loss, or once the smoothed loss passes `div_factor` x its best."""

    order = 50  # after every other callback's before_batch, so nothing overrides the sweep's lr
    in_lr_sweep = True  # it is the sweep

    def __init__(self, start_lr: float, end_lr: float, num_it: int, *, stop_div: bool = True,
                 div_factor: float = DIVERGENCE_FACTOR, smooth: float = SMOOTHING):
        self.start_lr, self.end_lr, self.num_it = start_lr, end_lr, num_it
        self.stop_div, self.div_factor, self.smooth = stop_div, div_factor, smooth
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.raw_losses: list[float] = []
        self._avg, self._best, self._i = 0.0, math.inf, 0

    def lr_at(self, i: int) -> float:
        return self.start_lr * (self.end_lr / self.start_lr) ** (i / max(self.num_it - 1, 1))

    def before_batch(self, learn) -> None:
        if learn.training:
            learn.lr = self.lr_at(self._i)

    def after_batch(self, learn) -> None:
        if not learn.training:
            return
        # one host sync per step: the stop test needs the value now. Under DistributedDataParallel each rank's
        # loss is over its share of the batch: every rank decides on their mean (the whole batch's loss), so
        # all stop at the same step (one rank stopping alone would leave the others waiting in a collective).
        raw = float(distributed.rank_mean(learn.loss.detach()))
        if not math.isfinite(raw):
            raise CancelFitException()
        self._avg = self.smooth * self._avg + (1 - self.smooth) * raw
        smoothed = self._avg / (1 - self.smooth ** (self._i + 1))  # debiased
        self.lrs.append(learn.lr)
        self.raw_losses.append(raw)
        self.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        self._i += 1
        diverged = self.stop_div and (smoothed > self.div_factor * self._best or not math.isfinite(smoothed))
        if diverged or self._i >= self.num_it:
            raise CancelFitException()


def _check_args(start_lr: float, end_lr: float, num_it: int, div_factor: float, smooth: float) -> None:
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"the sweep needs 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if not isinstance(num_it, int) or num_it < 2:
        raise ConfigError(f"num_it must be a whole number >= 2, got {num_it!r}")
    if div_factor <= 1:
        raise ConfigError(f"div_factor must be > 1 (a multiple of the best loss), got {div_factor}")
    if not 0 <= smooth < 1:
        raise ConfigError(f"smooth must be in [0, 1), got {smooth}")


def _rng_states(learn) -> tuple:
    """The random state a sweep consumes: torch's global generators and the data's shuffling generator."""
    gen = getattr(learn.dls.train, "generator", None)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, gen, gen.get_state() if gen is not None else None


def _restore_rng(states: tuple) -> None:
    cpu, cuda, gen, gen_state = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    if gen is not None:
        gen.set_state(gen_state)


def lr_find(learn, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100, *, stop_div: bool = True,
            div_factor: float = DIVERGENCE_FACTOR, smooth: float = SMOOTHING) -> LRFindResult:
    """Sweep the lr exponentially from `start_lr` to `end_lr` over `num_it` training batches (training
    passes only) and suggest learning rates. Model, optimizer, lr and random state are restored after.
    Callbacks whose `in_lr_sweep` is False are left out of the sweep; `learn.lr_sweep` is True during it.
    With the `Distributed` callback under torchrun the sweep trains with DDP on the global batch, and every
    rank records, and stops on, the mean of the ranks' losses: the result is the same on every rank."""
    _check_args(start_lr, end_lr, num_it, div_factor, smooth)
    finder = LRFinder(start_lr, end_lr, num_it, stop_div=stop_div, div_factor=div_factor, smooth=smooth)
    model_state = copy.deepcopy(learn.model.state_dict())
    opt = learn.opt
    opt_state = copy.deepcopy(opt.state_dict()) if opt is not None else None
    base_lr, rng = learn.base_lr, _rng_states(learn)
    cbs = list(learn.cbs)
    n_batches = data_length(learn.dls.train) or 1
    try:
        learn.remove_cbs([cb for cb in cbs if not cb.in_lr_sweep])
        learn.lr_sweep = True
        learn.fit(max(1, math.ceil(num_it / n_batches)), cbs=[finder], valid=False)
    finally:
        learn.lr_sweep = False
        learn.model.load_state_dict(model_state)
        if opt is not None:
            opt.load_state_dict(opt_state)
        learn.opt, learn.base_lr = opt, base_lr  # a fit that created the optimizer leaves none, as before
        _restore_rng(rng)
        learn.remove_cbs(list(learn.cbs))
        learn.add_cbs(cbs)  # the same callbacks in the same places
    return LRFindResult.from_curve(finder.lrs, finder.losses, finder.raw_losses, num_it)
