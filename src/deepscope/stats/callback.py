"""`ActivationStats`: per-layer statistics of activations, output gradients and parameters while training.

Record, analyse, plot are separate steps (STYLE.md, habit 7): this callback only records numbers, via
hooks that reduce each tensor on its device as soon as it exists (`collect`), into a preallocated block
of rows (`rows`) read back once per `flush_every` recorded steps into a bounded history (`store`).
The idea of watching mean, std and a histogram of every layer's activations comes from fastai's
ActivationStats (course22p2, lesson 16); unlike it, nothing here reads a value back inside the step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..callback import Callback
from ..errors import ConfigError
from ..hooks import Hooks, floating_tensors, select_modules
from .collect import activation_stats, gather_values, gradient_stats
from .format import Stats, save_stats
from .params import ParamTracker
from .rows import ACT_FIELDS, GRAD_FIELDS, PARAM_FIELDS, DeviceRows
from .sample import SampleBlock
from .store import HistoryStore

# |a| <= DEAD_THRESHOLD counts as dead. Exactly 0 would only catch ReLU's zeros and miss units of leaky or
# shifted activations (GeneralRelu, leaky ReLU with a small slope) that are stuck just as surely near 0;
# 1e-3 is far below the typical activation scale (~1 after good init) yet above float rounding noise.
DEAD_THRESHOLD = 1e-3

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
ModuleSpec = Sequence[str] | Callable[[str, nn.Module], bool] | None


class ActivationStats(Callback):
    """Record per-module statistics every `every` training steps (and validation batches if `valid`).

    `modules`: None for `select_modules(model)`'s default, a list of names / fnmatch patterns, or a
    `filter(name, module) -> bool`. Per recorded step: activation mean, std, min, max, dead fraction,
    non-finite count and a histogram of |a| (`hist_bins` bins over `hist_range`); mean, std and
    non-finite count of each output's gradient; all of these from `subsample` values of each tensor
    (the whole tensor when it is no larger; `None`: always the whole tensor, about 2x slower per CPU
    step on the default CNN). The L2 norm of each output gradient is estimated from the sample as
    sqrt(values in the gradient / values summarised) times the sample's norm (exact when whole). For
    every module owning parameters: weight norm, gradient norm and update-to-weight ratio. History keeps
    the last `recent` rows exactly and merges older ones, at most `max_rows` in all. Hooks exist from
    `before_fit` to `cleanup_fit` (or `remove()`).

    Gradients are the true ones: under float16 MixedPrecision the hooks see output gradients multiplied
    by `learn.loss_scale`, and their sums and norms are divided by it. A step the scaler skips
    (`learn.skip_step`) records activations but no gradient or parameter statistics (NaN: not measured).
    """

    order = 5  # after DeviceCallback (-20) has put the model on its device
    in_lr_sweep = False  # the sweep's steps are not the fit's: its history must stay the fit's

    def __init__(self, modules: ModuleSpec = None, *, every: int = 1, train: bool = True, valid: bool = False,
                 dead_threshold: float = DEAD_THRESHOLD, hist_bins: int = 40, hist_range: tuple = (0.0, 10.0),
                 subsample: int | None = SAMPLE_SIZE, recent: int = 1024, max_rows: int = 4096, flush_every: int = 64):
        for name, value in (("every", every), ("hist_bins", hist_bins), ("flush_every", flush_every)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ActivationStats: {name} must be a positive integer, got {value!r}")
        if subsample is not None and subsample < 1:
            raise ConfigError(f"ActivationStats: subsample must be a positive number of values, got {subsample}")
        if not hist_range[0] < hist_range[1]:
            raise ConfigError(f"ActivationStats: hist_range must be (low, high) with low < high, got {hist_range}")
        if max_rows < recent + 2:
            raise ConfigError(f"ActivationStats: max_rows ({max_rows}) must exceed recent ({recent}) by 2 or more")
        self.modules_spec, self.every, self.train, self.valid = modules, every, train, valid
        self.dead_threshold, self.hist_bins = float(dead_threshold), hist_bins
        self.hist_range = (float(hist_range[0]), float(hist_range[1]))
        self.subsample, self.recent, self.max_rows, self.flush_every = subsample, recent, max_rows, flush_every
        self.modules: list[str] = []
        self._hooks: list[Hooks] = []
        self._rows: dict[str, DeviceRows] = {}
        self._stores: dict[str, HistoryStore] = {}
        self._row: int | None = None       # the row being filled in this batch, if it is recorded
        self._pending = 0                  # recorded steps not yet summarised (see _summarise)
        self._sample: SampleBlock | None = None
        self._split = "train"
        self._scaled_rows = False          # rows hold gradients multiplied by a loss scale (see after_loss)

    # --- set-up and tear-down ------------------------------------------------------------------------
    def _select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        spec = self.modules_spec
        if spec is None:
            chosen = select_modules(model)
        elif callable(spec):
            chosen = select_modules(model, filter=spec)
        else:
            chosen = select_modules(model, names=[spec] if isinstance(spec, str) else list(spec))
        if not chosen:
            raise ConfigError(f"ActivationStats: no leaf module of the model matches {spec!r}")
        return chosen

    def before_fit(self, learn) -> None:
        self.remove()
        chosen = self._select(learn.model)
        self.modules = [name for name, _ in chosen]
        self._index = {id(module): i for i, (_, module) in enumerate(chosen)}
        param = next(learn.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        M = len(self.modules)
        # Recorded steps are summarised in blocks of up to 8 (fewer if samples would pass ~16 MB), all
        # modules and steps of a block at once: a launch costs tens of microseconds on a CPU just after
        # the big kernels of a training step, whatever its size.
        self._block_steps = min(8, self.flush_every, max(1, (16 << 20) // (2 * M * (self.subsample or 1) * 4)))
        self._pending, self._block_start = 0, ("train", 0)
        self._tracker = ParamTracker(learn.model, steps=self._block_steps)
        P = len(self._tracker.names)
        # sample rows 0..M-1: the modules' outputs, M..2M-1: the gradients of those outputs
        self._sample = None
        if self.subsample:
            self._sample = SampleBlock(2 * M, M, self.subsample, device, steps=self._block_steps,
                                       dead_threshold=self.dead_threshold, hist_range=self.hist_range,
                                       bins=self.hist_bins)
        self._rows, self._stores = {}, {}
        # 1 / loss scale of each train row's step (see after_loss); applied to the gradient rows at _flush
        self._grad_unscale, self._scaled_rows = torch.ones(self.flush_every, device=device), False
        for split, fields in (("train", ACT_FIELDS + GRAD_FIELDS + PARAM_FIELDS), ("valid", ACT_FIELDS)):
            self._rows[split] = DeviceRows(self.flush_every, M, self.hist_bins, P, device, sample_size=self.subsample)
            self._stores[split] = HistoryStore({k: MERGE[k] for k in fields}, std_of=STD_OF,
                                               recent=self.recent, max_rows=self.max_rows)
        # Registered last: if anything above failed, no hook is left behind. The gradient of each output
        # is watched by a tensor hook that _on_forward registers when the step is recorded (hooks.py says
        # why tensor hooks), so steps that are not recorded cost one Python call per module.
        self._hooks = [Hooks(chosen, self._on_forward)]

    def remove(self) -> None:
        """Remove the hooks (idempotent); what was recorded stays available."""
        for hooks in self._hooks:
            hooks.remove()
        self._hooks, self._row = [], None

    def cleanup_fit(self, learn) -> None:
        self.remove()
        self._flush()

    # --- per step --------------------------------------------------------------------------------------
    def before_batch(self, learn) -> None:
        if learn.training:
            record = self.train and learn.train_iter % self.every == 0
        else:
            record = self.valid and learn.iter % self.every == 0
        split = "train" if learn.training else "valid"
        if record and self._pending and (self._pending == self._block_steps or split != self._block_start[0]):
            self._summarise()
        self._split = split
        if not record:
            self._row = None
            return
        self._row = self._rows[split].start_row(learn.train_iter)
        if not self._pending:
            self._block_start = (split, self._row)
        self._pending += 1
        if self._sample is not None:
            self._sample.open()

    def _on_forward(self, hook, module: nn.Module, inputs: tuple, output) -> None:
        if self._row is None:
            return
        tensors = floating_tensors(output)
        if not tensors:
            return
        rows, r, i = self._rows[self._split], self._row, self._index[id(module)]
        if self._sample is not None:   # summarised with the other modules and steps of its block
            rows.numel[r, i], _ = self._sample.put(i, tensors)
        else:
            x = gather_values(tensors)
            rows.numel[r, i] = x.numel()
            activation_stats(x, self.dead_threshold, self.hist_range, rows.tensors[r, i], rows.hist[r, i])
        if self._split == "train":
            j = len(self.modules) + i
            for t in tensors:          # the closures hold the row's index, never the tensor
                if t.grad_fn is not None:
                    # the pre-hook of the node that made t is what t.register_hook installs, for half the cost
                    t.grad_fn.register_prehook(lambda grads, j=j, k=t.output_nr: self._on_gradient(j, grads[k]))
                elif t.requires_grad:
                    t.register_hook(lambda grad, j=j: self._on_gradient(j, grad))

    def _on_gradient(self, j: int, grad: torch.Tensor) -> None:
        """Row j of the watched tensors: the gradient of module j - M's output."""
        if self._row is None or grad is None:  # removed, a graph of an earlier step, or an unused output
            return
        rows, r = self._rows["train"], self._row
        if self._sample is not None:
            kept, total = self._sample.put(j, [grad])
            rows.numel[r, j], rows.norm_scale[r, j] = kept, (total / kept) ** 0.5
            return
        g = gather_values([grad])
        rows.numel[r, j] = g.numel()
        gradient_stats(g, rows.tensors[r, j])

    def after_loss(self, learn) -> None:
        if self._row is not None and learn.training and learn.loss_scale is not None:
            # The backward pass multiplies every gradient by the loss scale (float16 MixedPrecision): the
            # output-gradient sums and norms of this row are divided by it at _flush, on the device.
            self._grad_unscale[self._row].copy_(learn.loss_scale.reciprocal())
            self._scaled_rows = True

    def after_backward(self, learn) -> None:
        if self._row is None:
            return
        if learn.skip_step:  # a float16 overflow the scaler skips: no gradient statistics, no update to measure
            self._rows["train"].numel[self._row, len(self.modules):] = 0  # read back as NaN, "not measured"
        else:
            self._tracker.before_step()

    def after_step(self, learn) -> None:
        if self._row is not None and not learn.skip_step:
            self._tracker.after_step(self._pending - 1)

    def cleanup_batch(self, learn) -> None:
        r, self._row = self._row, None
        if r is None:
            return
        rows = self._rows[self._split]
        rows.finish_row()
        if rows.full:
            self._flush()

    def cleanup_epoch(self, learn) -> None:
        self._flush()

    def _summarise(self) -> None:
        """Reduce the pending block's samples and parameter norms, all modules at once, into its rows."""
        if not self._pending:
            return
        (split, r), K = self._block_start, self._pending
        rows = self._rows[split]
        if self._sample is not None:
            self._sample.summarise(rows.tensors[r:r + K], rows.hist[r:r + K])
        if split == "train":
            self._tracker.summarise(rows.param[r:r + K])
        self._pending = 0

    def _flush(self) -> None:
        """Move the filled device rows into the host history (one read-back per split)."""
        self._summarise()
        if self._scaled_rows:  # sums and norms scale linearly: divide those of the output gradients
            train = self._rows["train"]
            train.tensors[:train.n, len(self.modules):, :2].mul_(self._grad_unscale[:train.n, None, None])
            self._grad_unscale.fill_(1.0)
            self._scaled_rows = False
        for split, rows in self._rows.items():
            if rows.n:
                steps, fields = rows.read()
                store = self._stores[split]
                store.append(steps, {k: fields[k] for k in store.rules})

    # --- results ---------------------------------------------------------------------------------------
    def _arrays(self, split: str) -> dict[str, np.ndarray]:
        store = self._stores[split]
        if len(store):
            return store.arrays()
        M, B, P = len(self.modules), self.hist_bins, len(self._tracker.names)
        shapes = {"act_hist": (0, M, B), **{k: (0, P) for k in PARAM_FIELDS}}
        empty = {k: np.zeros(shapes.get(k, (0, M)), dtype=np.float32) for k in store.rules}
        return {"steps": np.zeros(0, np.int64), "weights": np.zeros(0, np.int64), **empty}

    def stats(self) -> Stats:
        """Everything recorded so far, as the `Stats` that `save` writes."""
        if not self._stores:
            raise RuntimeError("ActivationStats has recorded nothing yet: fit a Learner with it first")
        self._flush()
        train = self._arrays("train")
        valid = {f"valid_{k}": v for k, v in self._arrays("valid").items()} if self.valid else None
        edges = np.linspace(*self.hist_range, self.hist_bins + 1)
        return Stats(modules=list(self.modules), param_modules=list(self._tracker.names), hist_edges=edges,
                     dead_threshold=self.dead_threshold, valid=valid, **train)

    def save(self, path: str | Path) -> Path:
        """Write `stats.npz` (into `path` if it is a folder); returns the file."""
        return save_stats(self.stats(), path)
