"""`StatsRecorder`: the one recording engine behind every way of looking inside a model.

It knows nothing of the Learner. An adapter tells it where a training step begins and ends and where
the optimiser updates the weights; it does the rest with hooks on the model:

    rec = StatsRecorder(model)          # nothing happens to the model yet
    rec.attach()                        # hooks on, buffers on the model's device
    for step, (xb, yb) in enumerate(data):
        rec.start_step(step)            # before the forward pass; records when step % every == 0
        loss = loss_fn(model(xb), yb); loss.backward()
        rec.before_update()             # gradients are final; the weights are those the step ran with
        opt.step()
        rec.after_update()
        rec.end_step()
    rec.remove(); rec.stats()           # hooks off; the recorded Stats

Adapters: `ActivationStats` (the Learner callback) and `deepscope.watch` (a plain loop, through the
optimiser's step hooks). How it records: hooks reduce each tensor on its device as soon as it exists
(`sample`, `collect`) into a preallocated block of rows (`rows`), read back once per `flush_every`
recorded steps into a bounded history (`store`); nothing is read back inside a step.

A module called several times in one step (a shared activation, a recurrent cell) is recorded at its
first call of the step: its activation and gradient statistics both come from that call. A module whose
output has several floating-point parts (a tuple, list, dict or PackedSequence: LSTM's (output, (h, c)),
attention's (output, weights)) is summarised over all of them, and so is its gradient, over every part
that receives one.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import time
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import dead, distributed
from ..errors import ConfigError
from ..hooks import Hooks, floating_tensors, opaque, select_modules, unwrapped
from .collect import activation_stats, gather_values, gradient_stats
from .format import Stats, save_stats
from .loop import LoopObserver
from .params import ParamTracker
from .rows import ACT_FIELDS, GRAD_FIELDS, PARAM_FIELDS, DeviceRows
from .sample import SampleBlock
from .store import HistoryStore

# How close to its floor (or to 0, for a module without one) a value counts as off: see deepscope.dead,
# the one definition of off and dead that the statistics, diagnosis, plots and ablation share.
DEAD_THRESHOLD = dead.DEAD_TOLERANCE
# Per-unit census of floor activations (ReLU, GeneralRelu): one recorded training step in CENSUS_EVERY
# measures the share of each unit's values that are on; the last CENSUS_WINDOW censuses make the verdict
# (a sliding window, so a 30-step run is judged on steps 15-25, not on its start). A unit that is off for
# good stays off, so a census every 5 steps misses nothing, at ~1/5 of a pass over those outputs per step.
CENSUS_EVERY = 5
CENSUS_WINDOW = 3

# Values per module and step that the statistics are computed from by default (see `sample`): enough for
# a dead fraction within ~0.8 points and a histogram with ~100 values per bin, cheap enough to record
# every step at a few percent of a CPU training step. `subsample=None` summarises every value instead.
SAMPLE_SIZE = 4096

# How each saved field merges when old rows are downsampled (see store.MERGE_RULES).
MERGE = {
    "act_mean": "mean", "act_std": "std", "act_min": "min", "act_max": "max", "act_dead": "mean",
    "act_nonfinite": "sum", "act_hist": "sum",
    "grad_mean": "mean", "grad_std": "std", "grad_norm": "mean", "grad_nonfinite": "sum",
    "weight_norm": "mean", "param_grad_norm": "mean", "update_ratio": "mean",
}
STD_OF = {"act_std": "act_mean", "grad_std": "grad_mean"}
ModuleSpec = Sequence[str] | str | Callable[[str, nn.Module], bool] | None


def choose_modules(model: nn.Module, spec: ModuleSpec, who: str) -> list[tuple[str, nn.Module]]:
    """The `(name, module)` pairs `spec` names: None for `select_modules`' default, names / fnmatch
    patterns, or a `filter(name, module) -> bool`. ConfigError when nothing matches."""
    if spec is None:
        chosen = select_modules(model)
        if not chosen and model is not None:  # a model with no submodules (a bare nn.Linear): watch it whole
            chosen = [("", model)]
    elif callable(spec):
        chosen = select_modules(model, filter=spec)
    else:
        names = [spec] if isinstance(spec, str) else list(spec)
        chosen = select_modules(model, names=names)
        matched = [n for n, _ in chosen]
        unmatched = [p for p in names if not any(n == p or fnmatch.fnmatchcase(n, p) for n in matched)]
        if unmatched and chosen:
            raise ConfigError(f"{who}: no module of the model matches {unmatched}; modules are named as in "
                              f"model.named_modules(), e.g. {[n for n, _ in model.named_modules() if n][:6]}")
    if not chosen:
        what = "the default choice" if spec is None else repr(spec)
        raise ConfigError(f"{who}: no module of the model matches {what}; modules are named as in "
                          f"model.named_modules(), e.g. {[n for n, _ in model.named_modules() if n][:6]}")
    return chosen


def host_timed(method):
    """Add the host time spent in `method` to `self.host_seconds`, counting only the outermost timed call
    (a flush inside end_step is not counted twice). About a microsecond per call."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        if self._in_timed:
            return method(self, *args, **kwargs)
        self._in_timed, started = True, time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.host_seconds += time.perf_counter() - started
            self._in_timed = False
    return timed


def check_options(who: str, *, every: int = 1, hist_bins: int = 40, hist_range: tuple = (0.0, 10.0),
                  subsample: int | None = SAMPLE_SIZE, recent: int = 1024, max_rows: int = 4096,
                  flush_every: int = 64, **_) -> None:
    """ConfigError, naming `who` and the option, for a recording option out of range."""
    for name, value in (("every", every), ("hist_bins", hist_bins), ("flush_every", flush_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{who}: {name} must be a positive integer, got {value!r}")
    if subsample is not None and (not isinstance(subsample, int) or subsample < 1):
        raise ConfigError(f"{who}: subsample must be a positive number of values, or None for all, got {subsample!r}")
    if not hist_range[0] < hist_range[1]:
        raise ConfigError(f"{who}: hist_range must be (low, high) with low < high, got {hist_range}")
    if max_rows < recent + 2:
        raise ConfigError(f"{who}: max_rows ({max_rows}) must exceed recent ({recent}) by 2 or more")


def _dtype_of(output) -> str:
    """A short description of a module output that holds no floating-point tensor."""
    if isinstance(output, torch.Tensor):
        return str(output.dtype)
    return type(output).__name__


class StatsRecorder:
    """Per-module statistics of one model's activations, output gradients and parameters.

    Per recorded step: activation mean, std, min, max, off fraction (by the module's rule, deepscope.dead,
    with `dead_threshold` as its tolerance),
    non-finite count and a histogram of |a| (`hist_bins` bins over `hist_range`); mean, std, L2 norm and
    non-finite count of each output's gradient; all of these from `subsample` values of each tensor (the
    whole tensor when it is no larger; `None`: always the whole tensor, about 1.6x the step on a CPU).
    Floor activations (ReLU, GeneralRelu) also get a per-unit census in one recorded step in
    `census_every` (see `census`).
    For every module owning parameters: weight norm, gradient norm and update-to-weight ratio. The
    history keeps the last `recent` rows exactly and merges older ones, at most `max_rows` in all.
    Validation steps (`start_step(..., split="valid")`) record activations only, in their own history.

    Raises ConfigError for out-of-range options, or when `modules` matches nothing (at `attach`).
    """

    def __init__(self, model: nn.Module, modules: ModuleSpec = None, *, every: int = 1,
                 dead_threshold: float = DEAD_THRESHOLD, hist_bins: int = 40, hist_range: tuple = (0.0, 10.0),
                 subsample: int | None = SAMPLE_SIZE, recent: int = 1024, max_rows: int = 4096,
                 flush_every: int = 64, census_every: int = CENSUS_EVERY, who: str = "StatsRecorder"):
        check_options(who, every=every, hist_bins=hist_bins, hist_range=hist_range, subsample=subsample,
                      recent=recent, max_rows=max_rows, flush_every=flush_every)
        # a compiled or DDP-wrapped model is recorded by the names of the module inside it
        self.model, self.modules_spec, self.every, self.who = unwrapped(model), modules, every, who
        self.dead_threshold, self.hist_bins = float(dead_threshold), hist_bins
        self.hist_range = (float(hist_range[0]), float(hist_range[1]))
        self.subsample, self.recent, self.max_rows, self.flush_every = subsample, recent, max_rows, flush_every
        if not isinstance(census_every, int) or census_every < 1:
            raise ConfigError(f"{who}: census_every must be a positive integer, got {census_every!r}")
        self.census_every = census_every
        self.rules: list[dead.OffRule] = []
        self._units: dict[int, dict] = {}   # census of floor activations, by module index (see census)
        self._output_module: str | None = None
        self._input_std: torch.Tensor | None = None  # 0-d, the model's first recorded input
        self._order: list[int] = []       # watched modules in the order of their first call (first train step)
        self.modules: list[str] = []
        self._hooks: list[Hooks] = []
        self._rows: dict[str, DeviceRows] = {}
        self._stores: dict[str, HistoryStore] = {}
        self._tracker: ParamTracker | None = None
        self._row: int | None = None       # the row being filled in this step, if it is recorded
        self._seen: set[int] = set()       # modules already recorded in this row (first call only)
        self._parts: dict[int, list] = {}   # gradient row j -> [expected, arrived, gradients] (multi-part outputs)
        self._invisible: list[str] | None = None  # see _discover
        self._discovery: Hooks | None = None
        self._produced: dict[int, tuple] = {}  # id(output) -> (weak reference, module name), one step
        self._discovered, self._discovery_tries = False, 0
        self._loop: LoopObserver | None = None  # what the training loop did at each update
        self._pending = 0                  # recorded steps not yet summarised (see _summarise)
        # Host seconds spent in the hooks and step calls, cumulative (read by callbacks.timing.PhaseTimer)
        self.host_seconds, self._in_timed = 0.0, False
        self._sample: SampleBlock | None = None
        self._split = "train"
        self._scaled_rows = False          # rows hold gradients multiplied by a loss scale
        # Under DistributedDataParallel: full blocks of validation rows kept aside (raw, DeviceRows.take) until
        # every rank reaches a synchronized flush, since ranks may run different numbers of validation batches
        self._held: list[tuple] = []
        self._input_moments: torch.Tensor | None = None  # [n, sum, sum of squares] of this rank's first input
        # Called with the module before a watched module's output is recorded: an adapter that finds step
        # boundaries from the forward pass itself (watch) opens the step here.
        self.before_forward: Callable[[nn.Module], None] | None = None

    # --- set-up and tear-down ------------------------------------------------------------------------
    def attach(self) -> None:
        """Put the hooks on and allocate the buffers on the model's device. A new attach starts a new
        record (what an earlier attach recorded is dropped)."""
        self.remove()
        chosen = choose_modules(self.model, self.modules_spec, self.who)
        self.modules = [name for name, _ in chosen]
        self._index = {id(module): i for i, (_, module) in enumerate(chosen)}
        self.rules = [dead.off_rule(module, self.dead_threshold) for _, module in chosen]
        self._units, self._census_now, self._train_steps, self._last_axis = {}, False, 0, None
        self._output_module, self._input_std, self._order = None, None, []
        self._calls, self._max_calls = {}, {}  # calls of a module in this recorded step; the most in any
        self._model_calls = self._max_model_calls = 0  # forward passes of the model in this step; the most in any
        self._paused = False
        # every leaf module in registration order (bounded), to say which unwatched ones ran near a watched one
        self._leaves = [n for n, m in self.model.named_modules() if next(m.children(), None) is None][:1000]
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        # the first recorded training step whose model input held NaN/Inf (-1: none), kept on the device
        self._first_bad_input = torch.full((), -1, dtype=torch.long, device=device)
        M = len(self.modules)
        # Recorded steps are summarised in blocks of up to 8 (fewer if samples would pass ~16 MB), all
        # modules and steps of a block at once: a launch costs tens of microseconds on a CPU just after
        # the big kernels of a training step, whatever its size.
        self._block_steps = min(8, self.flush_every, max(1, (16 << 20) // (2 * M * (self.subsample or 1) * 4)))
        self._pending, self._block_start, self._row = 0, ("train", 0), None
        self._held, self._input_moments = [], None
        self._called = [False] * M          # ran in a recorded step (see module_notes)
        self._no_float: dict[int, str] = {}  # module -> dtype of an output with no floating-point tensor
        self._tracker = ParamTracker(self.model, steps=self._block_steps)
        P = len(self._tracker.names)
        # sample rows 0..M-1: the modules' outputs, M..2M-1: the gradients of those outputs
        self._sample = None
        if self.subsample:
            self._sample = SampleBlock(2 * M, M, self.subsample, device, steps=self._block_steps,
                                       rules=self.rules, hist_range=self.hist_range,
                                       bins=self.hist_bins)
        self._rows, self._stores = {}, {}
        # 1 / loss scale of each train row's step (see scale_gradients); applied to the gradient rows at flush
        self._grad_unscale, self._scaled_rows = torch.ones(self.flush_every, device=device), False
        for split, fields in (("train", ACT_FIELDS + GRAD_FIELDS + PARAM_FIELDS), ("valid", ACT_FIELDS)):
            self._rows[split] = DeviceRows(self.flush_every, M, self.hist_bins, P, device, sample_size=self.subsample,
                                           zero_off=[r.zero_is_off for r in self.rules])
            self._stores[split] = HistoryStore({k: MERGE[k] for k in fields}, std_of=STD_OF,
                                               recent=self.recent, max_rows=self.max_rows)
        # Registered last: if anything above failed, no hook is left behind. The gradient of each output
        # is watched by a tensor hook that _on_forward registers when the step is recorded (hooks.py says
        # why tensor hooks), so steps that are not recorded cost one Python call per module.
        self._hooks = [Hooks(chosen, self._on_forward)]
        self._input_handle = self.model.register_forward_pre_hook(opaque(self._on_model_input))
        self._invisible, self._discovery_tries = None, 0  # found again in the first recorded training step
        self._loop = LoopObserver(self.model)
        self._loop.attach()

    def _discover(self) -> None:
        """For one step, hook every module to find containers whose output no module inside them made:
        their forward ends in functional code (a residual sum, F.relu), which no leaf module shows."""
        watched = set(self.modules)
        containers = [(n, m) for n, m in self.model.named_modules() if next(m.children(), None) is not None]
        self._invisible, self._produced, self._discovered = [], {}, False

        def maker(t: torch.Tensor) -> str | None:
            # weak references: the outputs are not kept alive, and a dead tensor's reused id is no match
            entry = self._produced.get(id(t))
            return entry[1] if entry is not None and entry[0]() is t else None

        def seen(hook, module, inputs, output) -> None:
            name, tensors = hook.name, floating_tensors(output)
            if not tensors:
                return
            is_container = next(module.children(), None) is not None
            if is_container and name not in watched:
                prefix = f"{name}." if name else ""
                if not any((m := maker(t)) is not None and m.startswith(prefix) for t in tensors):
                    self._invisible.append(name)
            if module is self.model:
                self._output_module = next((m for t in tensors if (m := maker(t)) is not None), "")
                x = floating_tensors(inputs)
                if x and x[0].numel() > 1:
                    self._input_std = x[0].detach().float().std()  # kept on the device until read
                if distributed.active():  # this rank's share of the batch: combined into the whole's std at flush
                    device = self._first_bad_input.device
                    v = x[0].detach().to(device, torch.float64).flatten() if x else \
                        torch.zeros(0, dtype=torch.float64, device=device)
                    self._input_moments = torch.stack([torch.full((), float(v.numel()), dtype=torch.float64,
                                                                  device=device), v.sum(), v.square().sum()])
            for t in tensors:
                if maker(t) is None:
                    self._produced[id(t)] = (weakref.ref(t), name)
            if module is self.model:
                self._discovered = True

        leaves = [(n, m) for n, m in self.model.named_modules() if next(m.children(), None) is None]
        self._discovery = Hooks(leaves + containers, seen)

    def _end_discovery(self) -> None:
        if self._discovery is not None:
            self._discovery.remove()
            self._discovery, self._produced = None, {}
            self._discovery_tries += 1
            if not self._discovered and self._discovery_tries < 2:
                # begun inside a forward pass, the model's own call was missed: look again once (an
                # adapter whose steps never call the model itself, Lightning's training_step, keeps the
                # second look's answer)
                self._invisible = None

    def invisible_outputs(self) -> list[str]:
        """Containers (not watched) whose output is made by functional code in their forward, found in the
        first recorded training step; "" is the model itself. Watch one by name to see its output."""
        return list(self._invisible or [])

    @host_timed
    def _on_model_input(self, model: nn.Module, inputs: tuple) -> None:
        """The model's own forward begins: count it, and note (on the device) the first recorded training
        step whose input holds NaN/Inf, so a NaN from the data is not blamed on the first layer."""
        if self._row is None or self._split != "train" or self._paused or not torch.is_grad_enabled():
            return
        self._model_calls += 1
        self._max_model_calls = max(self._max_model_calls, self._model_calls)
        x = [t for t in floating_tensors(inputs) if t.numel()]
        if x and self._model_calls == 1:
            bad = ~torch.isfinite(x[0].detach()).all()
            step = int(self._rows["train"].steps[self._row])
            first = self._first_bad_input
            self._first_bad_input = torch.where(bad & (first < 0), torch.full_like(first, step), first)

    @contextlib.contextmanager
    def paused(self):
        """Nothing that runs inside is recorded (a replay of the step, a look that is not training)."""
        was, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = was

    def remove(self) -> None:
        """Remove the hooks (idempotent); what was recorded stays available. A step still open (an
        exception or a Ctrl-C in its middle) is dropped: its row was never finished."""
        for hooks in self._hooks:
            hooks.remove()
        if getattr(self, "_input_handle", None) is not None:
            self._input_handle.remove()
            self._input_handle = None
        self._end_discovery()
        if self._loop is not None:
            self._loop.remove()
        if self._row is not None and self._pending:
            self._pending -= 1
            if self._sample is not None:
                self._sample.drop_last()
        self._hooks, self._row = [], None

    def close(self, synchronized: bool = True) -> None:
        """Remove the hooks and move everything recorded into the history (see `flush` for `synchronized`)."""
        self.remove()
        self.flush(synchronized)

    # --- per step --------------------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        """Whether the current step is being recorded."""
        return self._row is not None

    @host_timed
    def start_step(self, step: int, split: str = "train", record: bool | None = None) -> bool:
        """Begin training step `step` (or a validation batch run at training step `step`, split "valid").
        It is recorded when `record`, or, when `record` is None, when `step % every == 0`. Returns whether
        it is recorded."""
        if record is None:
            record = step % self.every == 0
        if record and self._pending and (self._pending == self._block_steps or split != self._block_start[0]):
            self._summarise()
        self._split = split
        self._seen, self._parts = set(), {}
        if not record or not self._hooks:
            self._row = None
            return False
        self._row = self._rows[split].start_row(step)
        self._last_axis, self._calls, self._model_calls = None, {}, 0
        if split == "train":
            self._census_now = self._train_steps % self.census_every == 0
            self._train_steps += 1
        else:
            self._census_now = False
        if self._invisible is None and split == "train":
            self._discover()
        if not self._pending:
            self._block_start = (split, self._row)
        self._pending += 1
        if self._sample is not None:
            self._sample.open()
        return True

    @host_timed
    def _on_forward(self, hook, module: nn.Module, inputs: tuple, output) -> None:
        if self.before_forward is not None:
            self.before_forward(module)
        if self._row is None:
            return
        if self._paused or (self._split == "train" and not torch.is_grad_enabled()):
            return  # a look without autograd inside a training step (a pre-flight check) is not the step
        i = self._index[id(module)]
        if i in self._seen:   # a later call of the module in this step: the first call is the recorded one
            self._calls[i] = self._calls.get(i, 1) + 1
            self._max_calls[i] = max(self._max_calls.get(i, 1), self._calls[i])
            return
        self._called[i] = True
        tensors = [t for t in floating_tensors(output) if t.numel()]  # an empty batch's outputs: nothing to summarise
        if not tensors:
            if i not in self._no_float and not floating_tensors(output):
                self._no_float[i] = _dtype_of(output)
            return
        self._seen.add(i)
        if self._train_steps == 1 and self._split == "train":
            self._order.append(i)
        rows, r = self._rows[self._split], self._row
        if self._sample is not None:   # summarised with the other modules and steps of its block
            rows.numel[r, i], _ = self._sample.put(i, tensors)
        else:
            x = gather_values(tensors)
            rows.numel[r, i] = x.numel()
            activation_stats(x, self.rules[i], self.hist_range, rows.tensors[r, i], rows.hist[r, i])
        if self._split == "train" and len(tensors) == 1 and tensors[0].dim() >= 2:
            out = tensors[0]
            last = self._last_axis
            axis = dead.unit_axis(module, out, last[0] if last is not None and last[1] == out.dim() else None)
            self._last_axis = (axis, out.dim())  # what an activation after this layer inherits
            if self._census_now and self.rules[i].can_die:
                self._count_units(i, out, axis)
        if self._split == "train":
            j = len(self.modules) + i
            parts = [t for t in tensors if t.grad_fn is not None or t.requires_grad]
            if len(parts) > 1:  # a tuple/dict/PackedSequence output: its parts' gradients are summarised together
                self._parts[j] = [len(parts), 0, []]
            for t in parts:            # the closures hold the row's index, never the tensor
                if t.grad_fn is not None:
                    # the pre-hook of the node that made t is what t.register_hook installs, for half the cost
                    t.grad_fn.register_prehook(lambda grads, j=j, k=t.output_nr: self._on_gradient(j, grads[k]))
                else:
                    t.register_hook(lambda grad, j=j: self._on_gradient(j, grad))

    def _count_units(self, i: int, out: torch.Tensor, axis: int) -> None:
        """Put this step's on-share of each unit of module i into its census ring (on the device)."""
        share = dead.on_share_per_unit(out, self.rules[i], axis)   # (C,)
        step = int(self._rows["train"].steps[self._row])
        u = self._units.get(i)
        if u is None or u["ring"].shape[1] != share.numel():     # first census, or the unit count changed
            u = self._units[i] = {"ring": torch.zeros(CENSUS_WINDOW, share.numel(), device=share.device),
                                  "steps": [], "first": None, "n": 0}
        u["ring"][u["n"] % CENSUS_WINDOW].copy_(share)
        u["n"] += 1
        u["steps"] = (u["steps"] + [step])[-CENSUS_WINDOW:]
        if u["n"] == CENSUS_WINDOW:                              # the first full window: kept as evidence
            u["first"] = (self._verdict(u), list(u["steps"]))
            if distributed.active():  # this rank's share: judged again on every rank's at the next flush
                u["first_ring"] = u["ring"].clone()

    @staticmethod
    def _verdict(u: dict) -> torch.Tensor:
        """0-d, on the device: the share of units on for fewer than dead.DEAD_UNIT_ON_FRACTION of their values
        over the censuses in the ring."""
        k = min(u["n"], CENSUS_WINDOW)
        return (u["ring"][:k].mean(0) < dead.DEAD_UNIT_ON_FRACTION).float().mean()

    def structure(self) -> dict:
        """What one look at the model found, for `Stats.structure`: {"output_module": the watched-or-not
        module whose output the model returned (None: not known, "": the model's own code), "input_std":
        the std of the model's first recorded input (None: not known), "order": watched modules in the
        order of their first call in the first recorded training step, "census": {"every": census_every,
        "window": CENSUS_WINDOW, "modules": {name: {"units", "dead" (the share of units on for fewer than
        dead.DEAD_UNIT_ON_FRACTION of their values over the last CENSUS_WINDOW censuses), "first_dead" (the
        first full window's), "steps" [first, last] of the last window, "censuses", "rule"}}}} for the floor
        activations measured. One read-back."""
        modules = {}
        for i, u in self._units.items():
            first = u["first"] or (self._verdict(u), list(u["steps"]))
            modules[self.modules[i]] = {"units": int(u["ring"].shape[1]), "dead": float(self._verdict(u)),
                                        "first_dead": float(first[0]), "steps": [u["steps"][0], u["steps"][-1]],
                                        "censuses": u["n"], "rule": self.rules[i].text}
        input_std = float(self._input_std) if self._input_std is not None else None
        first_bad = int(self._first_bad_input)
        return {"output_module": self._output_module, "first_nonfinite_input": first_bad if first_bad >= 0 else None,
                "leaves": list(self._leaves),
                "input_std": input_std if input_std is not None and np.isfinite(input_std) else None,
                "order": [self.modules[i] for i in self._order],
                "census": {"every": self.census_every, "window": CENSUS_WINDOW, "modules": modules}}

    @host_timed
    def _on_gradient(self, j: int, grad: torch.Tensor | None) -> None:
        """Row j of the watched tensors: the gradient of (a part of) module j - M's output. The parts of
        a multi-part output are held until the last has arrived (or the backward pass is over: see
        `_put_partial_gradients`), then summarised as one tensor."""
        if self._row is None:  # removed, or a graph of an earlier step
            return
        parts = self._parts.get(j)
        if parts is None:
            if grad is not None:  # None: an output no loss depends on
                self._put_gradient(j, [grad])
            return
        parts[1] += 1
        if grad is not None:
            parts[2].append(grad)
        if parts[1] == parts[0]:
            del self._parts[j]
            if parts[2]:
                self._put_gradient(j, parts[2])

    def _put_partial_gradients(self) -> None:
        """Multi-part outputs some of whose parts got no gradient (not on the loss's path): summarise the
        parts that did."""
        for j, (_, _, grads) in list(self._parts.items()):
            if grads:
                self._put_gradient(j, grads)
        self._parts = {}

    def _put_gradient(self, j: int, grads: list[torch.Tensor]) -> None:
        grads = [g for g in grads if g.numel()]
        if not grads:
            return
        rows, r = self._rows["train"], self._row
        if self._sample is not None:
            kept, total = self._sample.put(j, grads)
            rows.numel[r, j], rows.norm_scale[r, j] = kept, (total / kept) ** 0.5
            return
        g = gather_values(grads)
        rows.numel[r, j] = g.numel()
        gradient_stats(g, rows.tensors[r, j])

    def scale_gradients(self, scale: torch.Tensor) -> None:
        """The backward pass of this step multiplies every gradient by `scale` (a 0-d device tensor: float16
        loss scaling); the output-gradient sums and norms of this row are divided by it at flush, on the
        device, with no read-back."""
        if self._row is not None and self._split == "train":
            self._grad_unscale[self._row].copy_(scale.reciprocal())
            self._scaled_rows = True

    def observe_targets(self, targets) -> None:
        """The targets of this training batch, for the loop's checks (stats/loop.py); no synchronisation."""
        if self._loop is not None and self._split == "train":
            self._loop.observe_targets(targets)

    @host_timed
    def before_update(self, skip: bool = False, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The gradients are final and the weights are those this step ran with. `skip`: the optimiser
        will not update (a float16 overflow the scaler skips): no gradient or parameter statistics.
        `optimizer`: the one about to step, so that parameters it does not hold can be named."""
        if self._loop is not None:
            self._loop.on_update(optimizer)
        if self._row is None or self._split != "train":
            return
        self._put_partial_gradients()
        if skip:
            self._rows["train"].numel[self._row, len(self.modules):] = 0  # read back as NaN, "not measured"
        else:
            self._tracker.before_step()

    @host_timed
    def after_update(self) -> None:
        """The optimiser has updated the weights (gradients not yet zeroed)."""
        if self._loop is not None:
            self._loop.after_update()
        if self._row is not None and self._split == "train":
            self._tracker.after_step(self._pending - 1)

    @host_timed
    def end_step(self) -> None:
        """The step is over: its row is complete."""
        self._end_discovery()
        if self._row is None:
            return
        if self._split == "train":
            self._put_partial_gradients()
        self._row = None
        rows = self._rows[self._split]
        rows.finish_row()
        if rows.full and self._split == "valid" and distributed.active():
            # not a point every rank reaches (ranks may run different numbers of validation batches): no
            # collective here; the rows wait, uncombined, for the next synchronized flush
            self._summarise()
            self._held.append(rows.take())
        elif rows.full:
            self.flush()

    @host_timed
    def _summarise(self) -> None:
        """Reduce the pending block's samples and parameter norms, all modules at once, into its rows."""
        if not self._pending:
            return
        (split, r), K = self._block_start, self._pending
        rows = self._rows[split]
        K = min(K, len(rows.steps) - r)  # never past the block (a step cut short by an exception)
        if K <= 0:
            self._pending = 0
            if self._sample is not None:
                self._sample.drop_all()
            return
        if self._sample is not None:
            self._sample.summarise(rows.tensors[r:r + K], rows.hist[r:r + K])
        if split == "train":
            self._tracker.summarise(rows.param[r:r + K])
        self._pending = 0

    @host_timed
    def flush(self, synchronized: bool = True) -> None:
        """Move the filled device rows into the host history (one read-back per split).

        Under DistributedDataParallel (deepscope.distributed) the rows are first combined across ranks, a
        collective: that happens only where every rank flushes at the same point (`synchronized`: a full
        block of training rows, the end of a validation pass, an epoch's end, close, a checkpoint). A flush
        asked for at any other time (reading `stats()` for a plot) leaves the rows for the next synchronized
        one. Validation rows are combined row by row in batch order (row i of every rank: its share of
        global batch i); a rank that ran fewer validation batches (nothing left for it in the last one)
        adds empty rows. The census, the model's first input, the first step with a non-finite input and
        the loop's class-target observations are combined at the same points."""
        if self._row is not None:
            return  # a step is being filled: its rows are read back once it ends
        combine = distributed.active()
        if combine and not synchronized:
            return
        self._summarise()
        if self._scaled_rows:  # sums and norms scale linearly: divide those of the output gradients
            train = self._rows["train"]
            train.tensors[:train.n, len(self.modules):, :2].mul_(self._grad_unscale[:train.n, None, None])
            self._grad_unscale.fill_(1.0)
            self._scaled_rows = False
        if combine:
            self._rows["train"].combine_across_ranks(distributed.world_size())
            self._combine_census()
            self._combine_inputs()
            if self._loop is not None:
                self._loop.combine_across_ranks()
            self._combine_valid()
        for split, rows in self._rows.items():
            if rows.n:
                steps, fields = rows.read()
                store = self._stores[split]
                store.append(steps, {k: fields[k] for k in store.rules})

    def _combine_census(self) -> None:
        """The per-unit on-shares of every rank's censuses, averaged (equal batches: the whole batch's); the
        first full window's verdict, taken on this rank's share, is taken again on the average."""
        for i in sorted(self._units):
            u = self._units[i]
            distributed.all_reduce_(u["ring"], "sum").div_(distributed.world_size())
            first = u.pop("first_ring", None)
            if first is not None:
                distributed.all_reduce_(first, "sum").div_(distributed.world_size())
                u["first"] = (self._verdict({"ring": first, "n": CENSUS_WINDOW}), u["first"][1])

    def _combine_inputs(self) -> None:
        """The first step whose model input held NaN/Inf on any rank; the std of the whole first recorded
        batch from every rank's share (once, after the look at the model found it)."""
        first = self._first_bad_input
        never = torch.iinfo(first.dtype).max
        first = distributed.all_reduce_(torch.where(first < 0, torch.full_like(first, never), first), "min")
        self._first_bad_input = torch.where(first == never, torch.full_like(first, -1), first)
        if distributed.any_rank(int(self._input_moments is not None)):
            m = self._input_moments
            if m is None:
                m = torch.zeros(3, dtype=torch.float64, device=first.device)
            n, total, squares = distributed.all_reduce_(m, "sum").unbind()
            var = (squares - total * total / n.clamp(min=1)) / (n - 1).clamp(min=1)
            if float(n) > 1:
                self._input_std = var.clamp(min=0).sqrt().float()
            self._input_moments = None

    def _combine_valid(self) -> None:
        """Combine every rank's validation rows (held blocks, then the block being filled) row by row; a rank
        with fewer rows adds empty ones (nothing measured). In blocks of the rows' capacity, into the history."""
        rows, held = self._rows["valid"], self._held
        total = distributed.any_rank(sum(len(h[3]) for h in held) + rows.n)
        if not total:
            return
        self._held = []
        if rows.n:
            held.append(rows.take())
        M2, width = 2 * len(self.modules), rows.buffer.shape[1]
        pad = total - sum(len(h[3]) for h in held)
        held.append((np.full((pad, width), np.nan, np.float32), np.zeros((pad, M2)), np.ones((pad, M2)),
                     np.full(pad, -1, np.int64)))
        buffer, numel, scale, steps = (np.concatenate(part) for part in zip(*held))
        # a row's step is the training step its batch ran at; a rank without the batch takes it from the others
        steps = distributed.all_reduce_(torch.as_tensor(steps, device=rows.buffer.device), "max").cpu().numpy()
        store, capacity = self._stores["valid"], len(rows.steps)
        for lo in range(0, total, capacity):
            hi = min(lo + capacity, total)
            rows.put(buffer[lo:hi], numel[lo:hi], scale[lo:hi], steps[lo:hi])
            rows.combine_across_ranks(distributed.world_size())
            got, fields = rows.read()
            store.append(got, {k: fields[k] for k in store.rules})

    # --- results ---------------------------------------------------------------------------------------
    def _arrays(self, split: str) -> dict[str, np.ndarray]:
        store = self._stores[split]
        if len(store):
            return store.arrays()
        M, B, P = len(self.modules), self.hist_bins, len(self._tracker.names)
        shapes = {"act_hist": (0, M, B), **{k: (0, P) for k in PARAM_FIELDS}}
        empty = {k: np.zeros(shapes.get(k, (0, M)), dtype=np.float32) for k in store.rules}
        return {"steps": np.zeros(0, np.int64), "weights": np.zeros(0, np.int64), **empty}

    def stats(self, valid: bool = False) -> Stats:
        """Everything recorded so far as `Stats` (with the validation history when `valid`)."""
        if not self._stores:
            raise RuntimeError(f"{self.who} has recorded nothing yet")
        self.flush(synchronized=False)
        train = self._arrays("train")
        valid_arrays = {f"valid_{k}": v for k, v in self._arrays("valid").items()} if valid else None
        edges = np.linspace(*self.hist_range, self.hist_bins + 1)
        return Stats(modules=list(self.modules), param_modules=list(self._tracker.names), hist_edges=edges,
                     dead_threshold=self.dead_threshold, valid=valid_arrays, module_notes=self.module_notes(),
                     invisible=self.invisible_outputs(), dead_rules=[f"{r.kind}: {r.text}" for r in self.rules],
                     structure=self.structure(),
                     observations=self._loop.observations() if self._loop is not None else None, **train)

    def module_notes(self) -> list[str]:
        """Per watched module, why it has no statistics ("" when it has some): never called in a recorded
        step (e.g. MultiheadAttention.out_proj, whose weights attention uses without calling it), or an
        output with no floating-point tensor (integer indices, a mask)."""
        notes = []
        for i in range(len(self.modules)):
            if i in self._no_float:
                notes.append(f"its output holds no floating-point tensor ({self._no_float[i]}): not summarised")
            elif self._max_calls.get(i, 1) > max(1, self._max_model_calls):
                notes.append(f"called {self._max_calls[i]} times in a step: only its first call is recorded "
                             f"(give each use its own module to see them all)")
            elif not self._called[i]:
                notes.append("not called in any recorded step")
            else:
                notes.append("")
        return notes

    def save(self, path: str | Path, valid: bool = False) -> Path:
        """Write `stats.npz` (into `path` if it is a folder); returns the file."""
        return save_stats(self.stats(valid), path)

    # --- checkpoints -------------------------------------------------------------------------------------
    # what outlives a step, besides the histories and the sampler: what one look at the model found
    _STATE = ("_train_steps", "_order", "_output_module", "_input_std", "_first_bad_input", "_called", "_no_float",
              "_max_calls", "_max_model_calls", "_invisible", "_discovered", "_discovery_tries")

    def state_dict(self) -> dict:
        """Everything recorded so far and the streams that decide what is sampled next, for a checkpoint
        (deepscope.checkpoint). Taken between steps; the pending rows are flushed into the history first,
        so a resumed record equals an uninterrupted one that flushed at the same step."""
        if self._row is not None:
            raise RuntimeError(f"{self.who}: a checkpoint is taken between steps, not while one is recorded")
        self.flush()
        units = {i: {"ring": u["ring"], "steps": list(u["steps"]), "n": u["n"],
                     "first": list(u["first"]) if u["first"] is not None else None} for i, u in self._units.items()}
        sample = self._sample.state_dict() if self._sample is not None else None
        if distributed.active():  # each rank samples its share with its own streams: kept per rank (a collective)
            sample = {"by_rank": distributed.gather_objects(sample)}
        return {"modules": list(self.modules), "stores": {k: v.state_dict() for k, v in self._stores.items()},
                "sample": sample, "units": units,
                "loop": self._loop.state_dict() if self._loop is not None else None,
                **{name.lstrip("_"): getattr(self, name) for name in self._STATE}}

    def load_state_dict(self, state: dict) -> None:
        """Continue the record `state_dict` saved (after `attach`, on the same model). ConfigError when the
        watched modules differ."""
        if list(state["modules"]) != self.modules:
            raise ConfigError(f"{self.who}: the checkpoint watched other modules ({state['modules'][:5]}...) than "
                              f"this model's ({self.modules[:5]}...)")
        for split, store in state["stores"].items():
            self._stores[split].load_state_dict(store)
        sample = state["sample"]
        if isinstance(sample, dict) and "by_rank" in sample:  # written under DDP: this rank's own streams
            by_rank = sample["by_rank"]
            sample = by_rank[distributed.rank()] if len(by_rank) == distributed.world_size() else by_rank[0]
        if self._sample is not None and sample is not None:
            self._sample.load_state_dict(sample)
        if self._loop is not None and state["loop"] is not None:
            self._loop.load_state_dict(state["loop"])
        device = self._first_bad_input.device
        self._units = {int(i): {"ring": u["ring"].to(device), "steps": list(u["steps"]), "n": u["n"],
                                "first": (u["first"][0].to(device), list(u["first"][1])) if u["first"] else None}
                       for i, u in state["units"].items()}
        for name in self._STATE:
            value = state[name.lstrip("_")]
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            setattr(self, name, value)
        self._no_float = {int(k): v for k, v in self._no_float.items()}
        self._max_calls = {int(k): v for k, v in self._max_calls.items()}
