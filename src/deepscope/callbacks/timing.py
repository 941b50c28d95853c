"""Where the time of an epoch goes: `PhaseTimer` splits each training pass into data, forward, loss,
backward, step, callbacks and statistics, and measures samples per second, with no host sync per step.

How it measures without changing the Learner: PhaseTimer adds two partner callbacks for the fit, one that
runs first at every event of a pass (order FIRST) and one that runs last (order LAST). Between them the
timer knows when each event's callbacks began and ended; what happens between one event's end and the next
mark is the Learner's own work:

    end of before_train or cleanup_batch -> next mark    data (the iterable making the next batch)
    end of before_batch -> next mark                      forward (the model)
    end of after_pred -> next mark                        loss
    end of after_loss -> next mark                        backward
    end of after_backward or after_step -> next mark      step (optimiser step, then zero_grad)
    start -> end of every event (and the Learner's dispatch between after_batch and cleanup_batch)   callbacks

So the phases add up to the pass, by construction. Work cut short by an exception stays in its phase; an
event whose callbacks stop early (a Cancel*Exception) counts as callbacks up to the next mark.
Statistics is the host time the recording engine (`stats.engine.StatsRecorder.host_seconds`) spent in
its hooks and step calls: it is taken out of the phase it fell in (forward for activation hooks, backward
for gradient hooks, callbacks for ActivationStats' events) and reported on its own.

Clocks: on CUDA the marks are CUDA events on the current stream, read once the GPU has passed them
(`Event.query`, which does not wait) and all of them at the end of the epoch, after one synchronize; so a
phase is the GPU-timeline time between its marks: GPU work, or the GPU waiting for the host. Statistics
stays host time; when the GPU is the bottleneck that host time overlaps GPU work, so its split from forward
and backward is an estimate there. On the CPU (and MPS, whose work is then measured as the host queues it)
the marks are `time.perf_counter()` readings.
"""
from __future__ import annotations

from functools import partialmethod

import torch

from .. import distributed
from ..callback import Callback
from .clocks import Intervals, clock_for
from .metrics import MetricsCallback

TIMING_KEY = "timing"  # the key of an epoch record (MetricsCallback.history, metrics.json) holding its timing
PHASES = ("data", "forward", "loss", "backward", "step", "callbacks", "statistics")
FIRST, LAST = -1_000_000, 1_000_000  # the two timers' orders: before and after every other callback
# The phase of the Learner's work between the end of an event and the next mark (any other event: callbacks).
WORK_AFTER = {"before_train": "data", "cleanup_batch": "data", "before_batch": "forward", "after_pred": "loss",
              "after_loss": "backward", "after_backward": "step", "after_step": "step"}


def batch_items(batch) -> int:
    """Items in a batch: the length of its first tensor with a batch dimension (0 when it has none)."""
    parts = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    for part in parts:
        if isinstance(part, torch.Tensor) and part.dim() > 0:
            return len(part)
    return 0


def epoch_timing(seconds: dict[str, float], statistics: dict[str, float], items: dict[str, int]) -> dict:
    """An epoch's record from raw seconds per phase (and "valid": the validation pass), the statistics
    engine's host seconds inside each phase, and the items of each pass ("train", "valid"). Seconds are
    sums over the epoch; samples_per_s is None for a pass that did not run."""
    phases, in_stats = {}, 0.0
    for phase in PHASES[:-1]:
        spent = seconds.get(phase, 0.0)
        taken = min(statistics.get(phase, 0.0), spent)  # on CUDA, host time can exceed a GPU-timeline interval
        phases[phase], in_stats = spent - taken, in_stats + taken
    phases["statistics"] = in_stats
    train, valid = sum(phases.values()), seconds.get("valid")
    return {"samples_per_s": items.get("train", 0) / train if train > 0 else None,
            "train_seconds": train if train > 0 else None, "valid_seconds": valid,
            "valid_samples_per_s": items.get("valid", 0) / valid if valid else None, "phases": phases}


class _EventStart(Callback):
    """PhaseTimer's partner that runs before every other callback: notes when each timed event began."""

    order = FIRST
    in_lr_sweep = False

    def __init__(self, timer: "PhaseTimer"):
        self.timer = timer

    def _began(self, event: str, learn) -> None:
        self.timer.began(event, learn)

    before_train = partialmethod(_began, "before_train")
    before_batch = partialmethod(_began, "before_batch")
    after_pred = partialmethod(_began, "after_pred")
    after_loss = partialmethod(_began, "after_loss")
    after_backward = partialmethod(_began, "after_backward")
    after_step = partialmethod(_began, "after_step")
    after_batch = partialmethod(_began, "after_batch")
    cleanup_batch = partialmethod(_began, "cleanup_batch")
    after_train = partialmethod(_began, "after_train")
    cleanup_train = partialmethod(_began, "cleanup_train")
    before_validate = partialmethod(_began, "before_validate")


class _EventEnd(Callback):
    """PhaseTimer's partner that runs after every other callback: notes when each timed event ended."""

    order = LAST
    in_lr_sweep = False

    def __init__(self, timer: "PhaseTimer"):
        self.timer = timer

    def _ended(self, event: str, learn) -> None:
        self.timer.ended(event, learn)

    before_train = partialmethod(_ended, "before_train")
    before_batch = partialmethod(_ended, "before_batch")
    after_pred = partialmethod(_ended, "after_pred")
    after_loss = partialmethod(_ended, "after_loss")
    after_backward = partialmethod(_ended, "after_backward")
    after_step = partialmethod(_ended, "after_step")
    after_batch = partialmethod(_ended, "after_batch")
    cleanup_batch = partialmethod(_ended, "cleanup_batch")
    after_train = partialmethod(_ended, "after_train")
    cleanup_train = partialmethod(_ended, "cleanup_train")
    cleanup_validate = partialmethod(_ended, "cleanup_validate")


class PhaseTimer(Callback):
    """Seconds per phase of each epoch's training pass (data, forward, loss, backward, step, callbacks,
    statistics: sums over the epoch, adding up to `train_seconds`), samples per second of the training
    pass, and the validation pass's seconds and samples per second. See the module docstring for what each
    phase holds and how it is measured (no host sync per step; one per epoch on CUDA).

    Each epoch's record lands in `history` and, as `record["timing"]`, in the MetricsCallback's record of
    the epoch (so in metrics.json). Its two partners (one before, one after every other callback) are
    added at before_fit and removed at cleanup_fit; all three sit out the LR finder's sweep. A failure of
    its own bookkeeping never stops training: timing stops for the fit and `failed` says why.
    """

    # after MetricsCallback (10) appends the epoch's record and ProgressCallback (30) prints it (a nested
    # value is no column); before checkpoints (90) save the record and EarlyStopping (100) may end the fit
    order = 35
    in_lr_sweep = False

    def __init__(self):
        self.history: list[dict] = []
        self.failed: str | None = None
        self._partners = [_EventStart(self), _EventEnd(self)]
        self._intervals: Intervals | None = None
        self._recorder = None
        self._pending_state: dict | None = None
        self._start_epoch(None)

    # --- the fit and the epoch ---------------------------------------------------------------------
    def before_fit(self, learn) -> None:
        self.history, self.failed, self._intervals = [], None, None
        self._recorder = _stats_recorder(learn)
        learn.add_cbs([cb for cb in self._partners if cb not in learn.cbs])

    def cleanup_fit(self, learn) -> None:
        learn.remove_cbs(self._partners)
        self._active = False

    def before_epoch(self, learn) -> None:
        self._start_epoch(learn.epoch)
        state, self._pending_state = self._pending_state, None
        if state is not None and state.get("epoch") == learn.epoch:
            self._add_state(state)

    def after_epoch(self, learn) -> None:
        if self.failed is not None:
            return
        try:
            if self._intervals is not None:
                self._intervals.read(wait=True)  # on CUDA, the one synchronize of the epoch
            # under DDP the items are every process's (a host-side sum): samples/s is the job's, timed on rank 0
            train, valid = distributed.host_sum([self._items.get("train", 0), self._items.get("valid", 0)])
            record = epoch_timing(self._sums(), self._stats_in, {"train": int(train), "valid": int(valid)})
        except Exception as e:  # noqa: BLE001 - the timer's own failure must not stop training
            self._fail(e)
            return
        self.history.append(record)
        metrics = learn.get_cb(MetricsCallback)
        if metrics is not None and metrics.history and metrics.history[-1].get("epoch") == learn.epoch + 1:
            metrics.history[-1][TIMING_KEY] = record

    def cleanup_epoch(self, learn) -> None:
        self._epoch = None

    def _start_epoch(self, epoch: int | None) -> None:
        self._epoch = epoch
        if self._intervals is not None:
            try:
                self._intervals.read(wait=True)  # marks of a cancelled epoch (none after a normal one)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
            self._intervals.sums = {}
        self._carried: dict[str, float] = {}  # seconds loaded from a checkpoint of this epoch
        self._stats_in: dict[str, float] = {}
        self._items = {"train": 0, "valid": 0}
        self._active, self._in_event, self._last_ended = False, False, None
        self._stats_mark = 0.0

    def _sums(self) -> dict[str, float]:
        sums = dict(self._carried)
        for phase, seconds in (self._intervals.sums if self._intervals is not None else {}).items():
            sums[phase] = sums.get(phase, 0.0) + seconds
        return sums

    # --- the marks ---------------------------------------------------------------------------------
    def began(self, event: str, learn) -> None:
        """The first callback of `event` is about to run (called by the partner)."""
        if self.failed is not None or self._epoch is None:
            return
        try:
            if event in ("before_train", "before_validate"):
                self._open(learn)
            elif self._active:
                if event == "after_pred":
                    self._items["train" if learn.training else "valid"] += batch_items(learn.batch)
                if learn.training:
                    self._mark("callbacks" if self._in_event else WORK_AFTER.get(self._last_ended, "callbacks"))
                    self._in_event = True
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def ended(self, event: str, learn) -> None:
        """The last callback of `event` has run (called by the partner)."""
        if self.failed is not None or not self._active:
            return
        try:
            if not learn.training:
                if event == "cleanup_validate":
                    self._mark("valid")
                    self._active = False
                return
            self._mark("callbacks")
            self._in_event, self._last_ended = False, event
            if event == "cleanup_train":
                self._active = False
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _open(self, learn) -> None:
        if self._intervals is None:
            self._intervals = Intervals(clock_for(learn.model))
        self._intervals.add(None)
        self._stats_mark = self._stats_seconds()
        self._active, self._in_event, self._last_ended = True, True, None

    def _mark(self, phase: str) -> None:
        self._intervals.add(phase)
        now = self._stats_seconds()
        if phase != "valid":
            self._stats_in[phase] = self._stats_in.get(phase, 0.0) + now - self._stats_mark
        self._stats_mark = now

    def _stats_seconds(self) -> float:
        return self._recorder.host_seconds if self._recorder is not None else 0.0

    def _fail(self, error: Exception) -> None:
        self.failed = f"{type(error).__name__}: {error}"
        self._active = False

    # --- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The running epoch's sums so far as plain numbers (JSON-able): {"epoch" (0-based, None between
        epochs), "seconds" (per phase, raw, and "valid"), "statistics" (engine host seconds per phase),
        "items" ({"train", "valid"}), "history" (the records of the epochs done)}. On CUDA it waits for the
        GPU once, to read the pending marks."""
        if self._intervals is not None:
            self._intervals.read(wait=True)
        return {"epoch": self._epoch, "seconds": self._sums(), "statistics": dict(self._stats_in),
                "items": dict(self._items), "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Put back `history`, and continue the sums of `state_dict()` in the epoch it was taken in: now if
        that epoch is running (a resume loads it after the epoch's before_train), else when it begins (a
        state of another epoch is then dropped). ValueError for a state that `state_dict` did not make."""
        try:
            history = [dict(r) for r in state.get("history", [])]
            state = {"epoch": state["epoch"], "seconds": {str(k): float(v) for k, v in state["seconds"].items()},
                     "statistics": {str(k): float(v) for k, v in state["statistics"].items()},
                     "items": {k: int(state["items"][k]) for k in ("train", "valid")}}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"PhaseTimer.load_state_dict: not a state of PhaseTimer.state_dict() ({e!r}); it "
                             f"holds epoch, seconds, statistics, items and history") from None
        self.history = history
        if state["epoch"] is not None and state["epoch"] == self._epoch:
            self._add_state(state)
        else:
            self._pending_state = state

    def _add_state(self, state: dict) -> None:
        for phase, seconds in state["seconds"].items():
            self._carried[phase] = self._carried.get(phase, 0.0) + seconds
        for phase, seconds in state["statistics"].items():
            self._stats_in[phase] = self._stats_in.get(phase, 0.0) + seconds
        for split, n in state["items"].items():
            self._items[split] += n


def _stats_recorder(learn):
    """The recording engine of the learner's ActivationStats, or None."""
    from ..stats import ActivationStats  # imported here: statistics sit above the callbacks

    stats = learn.get_cb(ActivationStats)
    return getattr(stats, "recorder", None)


# --- reading the records -------------------------------------------------------------------------------
def timing_rows(records: list[dict]) -> list[dict]:
    """One row per epoch record that holds a timing (runs older than the timer have none): epoch,
    samples_per_s, train_seconds, valid_seconds, and phases as {name: (seconds, % of the training pass, None
    when it took no time)}. ValueError when a timing is malformed."""
    rows = []
    for i, record in enumerate(records):
        timing = record.get(TIMING_KEY) if isinstance(record, dict) else None
        if timing is None:
            continue
        phases = timing.get("phases") if isinstance(timing, dict) else None
        if not isinstance(phases, dict) or not all(_is_number(v) for v in phases.values()):
            raise ValueError(f"epoch record {i}: {TIMING_KEY!r} should hold 'phases', seconds per phase")
        total = sum(phases.values())
        rows.append({"epoch": record.get("epoch", i + 1), "samples_per_s": _number_or_none(timing.get("samples_per_s")),
                     "train_seconds": _number_or_none(timing.get("train_seconds")),
                     "valid_seconds": _number_or_none(timing.get("valid_seconds")),
                     "phases": {name: (float(s), 100 * s / total if total > 0 else None)
                                for name, s in phases.items()}})
    return rows


def summary_line(timing: dict | None) -> str | None:
    """One line for the terminal: samples/s and the three biggest phases of an epoch's timing."""
    if not timing or not timing.get("samples_per_s"):
        return None
    phases = timing["phases"]
    total = sum(phases.values()) or 1.0
    top = sorted(phases.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{name} {100 * s / total:.0f}%" for name, s in top)
    return (f"last epoch: {timing['samples_per_s']:,.0f} samples/s in training; of its {total:.3g} s training "
            f"pass: {parts}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_or_none(value):
    return float(value) if _is_number(value) else None
