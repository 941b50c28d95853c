"""Ablation: train a grid of small CNNs (norm x batch size, plus init/activation variants) on a fixed
budget each and compare test accuracy, final training loss and the fraction of dead activations.

Every run trains for exactly `max_batches` steps, on every machine: the budget is counted in steps, never
in time, so a busy machine makes the grid slower but never changes its table (a time cap did: with 8 s per
run, batch 256 without norm scored 79.0% on a loaded machine and 84.2% on a quiet one). The wall time is
measured and reported in the `seconds` column beside the result; it takes no part in it.

Steps, not samples: at equal steps a batch of 2 sees 128x fewer images than a batch of 256 (the `samples`
column says how many each run saw). A budget of equal samples would instead give the big batches a
handful of updates, or, at an affordable cost on a CPU, give batch 2 tens of thousands of them. Within
one batch size, which is where the norms are compared, steps and samples are the same budget.
"""
from __future__ import annotations

import csv
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .callback import Callback, CancelFitException
from .dead import off_rule
from .errors import ConfigError, OutputError
from .hooks import ACTIVATION_TYPES, Hooks, select_modules

DEFAULT_NORMS = ("none", "batch", "layer", "instance", "group", "running_batch")
DEFAULT_BATCH_SIZES = (2, 16, 256)
# Variants are "init-act"; the first is the base every norm runs with, the others run on the no-norm CNN,
# where init and activation matter most (no norm layer rescales what a poor init gets wrong).
BASE_VARIANT = "default-relu"
DEFAULT_VARIANTS = (BASE_VARIANT, "kaiming-relu", "default-general_relu", "kaiming-general_relu")
VARIANT_NORM = "none"
INITS = ("default", "kaiming", "lsuv")
DEFAULT_NFS = (8, 16, 32, 64)  # small enough that the default grid runs in minutes on a 2-core CPU
DEFAULT_LR = 2e-3  # AdamW, constant: one lr for every batch size (see docs/ablation.md for what that means)
EVAL_ITEMS = 2000  # the first N test images: the same fixed subset for every run
DEAD_BATCH = 500  # test images pushed through the trained model to measure dead activations
FINAL_LOSS_WINDOW = 20  # "final train loss" = mean of the last N batch losses (one batch is too noisy)
CSV_COLUMNS = ("norm", "batch_size", "init", "act", "seed", "accuracy", "train_loss", "dead_fraction", "steps",
               "samples", "seconds")


# --- the grid ------------------------------------------------------------------------------------------
# Each list of the grid is checked on its own, so the CLI can name the option at fault while parsing.
def _names_list(what: str, values) -> list:
    """`values` as a list: not a bare string (whose letters would be read as names), not empty, no repeats."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{what}s must be a list, got {values!r}")
    values = list(values)
    if not values:
        raise ConfigError(f"the grid needs at least one {what}; an empty list would run nothing")
    repeated = [v for v, n in Counter(map(str, values)).items() if n > 1]
    if repeated:
        raise ConfigError(f"{what} {repeated[0]} is listed more than once in the grid")
    return values


def check_norms(norms) -> list[str]:
    from .norms import NORM_KINDS

    norms = _names_list("norm", norms)
    for norm in norms:
        if norm not in NORM_KINDS:
            raise ConfigError(f"unknown norm {norm!r} in the grid; choose from {list(NORM_KINDS)}")
    return norms


def check_batch_sizes(batch_sizes) -> list[int]:
    batch_sizes = _names_list("batch size", batch_sizes)
    for bs in batch_sizes:
        if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0:
            raise ConfigError(f"batch size {bs!r} in the grid must be a positive whole number")
    return batch_sizes


def check_variants(variants) -> list[str]:
    from .models import ACTIVATIONS

    variants = _names_list("variant", variants)
    acts = (*ACTIVATIONS, "general_relu")
    for v in variants:
        init, _, act = v.partition("-") if isinstance(v, str) else (v, "", "")
        if init not in INITS or act not in acts:
            raise ConfigError(f"variant {v!r} must be INIT-ACT with INIT in {INITS} and ACT in {acts}")
    return variants


@dataclass
class AblationGrid:
    """What to train. Every list must be non-empty and without repeats; a bad value is a ConfigError."""

    norms: Sequence[str] = DEFAULT_NORMS
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
    variants: Sequence[str] = DEFAULT_VARIANTS  # INIT-ACT; the first runs with every norm, the rest on norm none
    seeds: int = 1  # runs of each configuration, seeds 0..seeds-1
    max_batches: int = 500  # training steps per run: the whole budget, the same on every machine
    lr: float = DEFAULT_LR
    nfs: Sequence[int] = field(default_factory=lambda: list(DEFAULT_NFS))

    def __post_init__(self) -> None:
        self.norms = check_norms(self.norms)
        self.batch_sizes = check_batch_sizes(self.batch_sizes)
        self.variants = check_variants(self.variants)
        for name in ("seeds", "max_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive whole number, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        nfs = list(self.nfs) if not isinstance(self.nfs, (str, bytes)) and hasattr(self.nfs, "__iter__") else []
        if not nfs or any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in nfs):
            raise ConfigError(f"nfs must be a non-empty list of positive channel counts, got {self.nfs!r}")
        self.nfs = nfs

    def runs(self) -> list[tuple[str, int, str, str, int]]:
        """(norm, batch_size, init, act, seed) for every run: each norm with the base variant, and the
        other variants on the no-norm CNN (skipped when norm none is not in the grid)."""
        base = self.variants[0]
        combos = [(n, base) for n in self.norms]
        combos += [(VARIANT_NORM, v) for v in self.variants[1:] if VARIANT_NORM in self.norms]
        return [(norm, bs, *variant.split("-", 1), seed) for seed in range(self.seeds)
                for norm, variant in combos for bs in self.batch_sizes]


# --- dead activations ------------------------------------------------------------------------------------
def measure_dead(model: nn.Module, xb: torch.Tensor) -> float:
    """The share of "off" values over all activation outputs of `model` on `xb` (eval mode), via forward
    hooks, by deepscope.dead's one definition: at a ReLU's floor (0; `-sub` for GeneralRelu), at or below
    f(0) for a leaky one (its unit's input <= 0, where it passes only the leak's gradient). Activations are
    found by type (torch's and deepscope's), whatever the attribute holding them is called."""
    acts = select_modules(model, types=ACTIVATION_TYPES)
    rules = {m: off_rule(m) for _, m in acts}
    dead, total = [0.0], [0]

    def record(hook, module, inputs, output):
        n = output.numel()
        dead[0] += float(rules[module].off(output).float().sum())
        total[0] += n

    was_training = model.training
    model.eval()
    try:
        with Hooks(acts, record), torch.no_grad():
            model(xb)
    finally:
        model.train(was_training)
    return dead[0] / total[0] if total[0] else float("nan")


# --- one run -------------------------------------------------------------------------------------------
class Budget(Callback):
    """Stop the fit after `max_batches` training batches. Counted in steps only, never in time, so that
    a run trains the same on a busy machine as on a quiet one."""

    order = 40

    def __init__(self, max_batches: int):
        self.max_batches, self.steps = max_batches, 0

    def before_fit(self, learn) -> None:
        self.steps = 0

    def after_batch(self, learn) -> None:
        self.steps += 1
        if self.steps >= self.max_batches:
            raise CancelFitException()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs))
    return correct / len(x)


def _check_fits(data, bs: int) -> None:
    """Runs drop the last incomplete batch, so a batch larger than the training set would train on nothing."""
    if bs > len(data.train.x):
        raise ConfigError(f"batch size {bs} is larger than the {len(data.train.x)} training images: "
                          f"the run would train on nothing")


def run_name(norm: str, bs: int, init: str, act: str, seed: int) -> str:
    """The name of a grid point's own run folder (`--runs-dir`): `<norm>-bs<N>-<init>-<act>-s<seed>`."""
    return f"{norm}-bs{bs}-{init}-{act}-s{seed}"


def check_runs_dir(runs_dir: str | Path, names: Sequence[str] = (), *, beside: Path | None = None) -> Path:
    """`runs_dir` made absolute, or OutputError when the grid's run folders may not go there: inside a run
    folder deepscope made (nested files would stop runfolder's clean-up of it), inside the ablation's own
    folder `beside` (or its staging folder), or where one of `names` would be that folder itself."""
    from .runfolder import STAGING_SUFFIX, read_marker

    given = runs_dir
    path = Path(os.path.abspath(Path(runs_dir).expanduser()))
    if beside is not None:
        beside = Path(os.path.abspath(beside))
        for own in (beside, beside.with_name(beside.name + STAGING_SUFFIX)):
            if path == own or own in path.parents:
                raise OutputError(f"--runs-dir {given} is inside the ablation's own folder {beside}; the runs go "
                                  f"beside it, never inside: e.g. --runs-dir {beside.parent / 'ablation-runs'}")
        if path == beside.parent and beside.name in names:
            raise OutputError(f"--out {beside} has the name of one of the grid's runs in --runs-dir {given}; "
                              f"choose another --out or --runs-dir")
    real = Path(os.path.realpath(path))
    for folder in dict.fromkeys([path, *path.parents, real, *real.parents]):
        if folder.is_dir() and read_marker(folder) is not None:
            raise OutputError(f"--runs-dir {given} is inside {folder}, a run folder deepscope made; deepscope writes "
                              f"only the run's own files there: choose a folder outside it")
    blocked = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise OutputError(f"--runs-dir {given}: {blocked} is a file, not a folder; choose another --runs-dir")
    return path


@dataclass
class SaveRuns:
    """Where and how `run_grid` writes each grid point as its own `train` run folder (`--runs-dir`)."""

    folder: Path  # the runs go to folder/<run_name>
    stats: bool = False  # also record ActivationStats (stats.npz); slows every run down
    overwrite: bool = False  # replace a run folder deepscope made there before
    config: dict = field(default_factory=dict)  # TrainConfig fields the grid does not set (dataset, data_dir, ...)

    def path(self, norm: str, bs: int, init: str, act: str, seed: int) -> Path:
        return Path(self.folder) / run_name(norm, bs, init, act, seed)

    def check(self, runs: Sequence[tuple], beside: Path | None = None) -> None:
        """OutputError unless every run of `runs` (`AblationGrid.runs()`) may be written: `check_runs_dir`,
        then runfolder's `check_out` for each (an earlier run there is replaced only with `overwrite`)."""
        from .runfolder import check_out, read_marker

        check_runs_dir(self.folder, [run_name(*r) for r in runs], beside=beside)
        for r in runs:
            path = self.path(*r)
            if not self.overwrite and path.is_dir() and not path.is_symlink() and read_marker(path) is not None:
                raise OutputError(f"--runs-dir {self.folder} already holds the run {path.name}; pass --overwrite to "
                                  f"replace the grid's runs there, or choose another --runs-dir")
            try:
                check_out(path, self.overwrite)
            except OutputError as e:
                raise OutputError(f"cannot write the grid's run {path.name} into --runs-dir {self.folder}: "
                                  f"{e}") from None


def run_one(data, norm: str, bs: int, init: str, act: str, seed: int, grid: AblationGrid, device: str = "cpu",
            save: SaveRuns | None = None) -> dict:
    """Train one configuration on `data` (a DataLoaders) for `grid.max_batches` steps; return its CSV row.
    `seconds` is the wall time of the training, reported beside the result: nothing depends on it.

    With `save`, the run is also written as its own run folder (kind `train`, through RunFolder): its
    TrainConfig in config.json, one record in metrics.json (the accuracy as `valid_accuracy`, the final
    train loss), the per-step losses in recorder.json, and stats.npz when `save.stats`. It is trained inside
    the folder's `prepare ... finish`, so a stop leaves no half-written run (only runfolder's `.partial`)."""
    if save is None:
        return _train_one(data, norm, bs, init, act, seed, grid, device)[0]
    from .runfolder import METRICS, RECORDER, STATS, RunFolder, environment

    with RunFolder.prepare(save.path(norm, bs, init, act, seed), "train", overwrite=save.overwrite) as run:
        row, learn, config = _train_one(data, norm, bs, init, act, seed, grid, device, save, str(run.final))
        from .callbacks import Recorder
        from .stats import ActivationStats

        recorder = learn.get_cb(Recorder)
        run.write_config(config.to_dict(), environment=environment(device), data=data.info,
                         wall_seconds=row["seconds"])
        run.write_json(METRICS, [{"epoch": config.epochs, "train_loss": row["train_loss"],
                                  "valid_accuracy": row["accuracy"], "dead_fraction": row["dead_fraction"],
                                  "steps": row["steps"], "samples": row["samples"],
                                  "eval_items": min(EVAL_ITEMS, len(data.valid.x)), "seconds": row["seconds"]}])
        run.write_json(RECORDER, {"loss": recorder.losses, "lr": recorder.lrs, "momentum": recorder.moms})
        if save.stats:
            learn.get_cb(ActivationStats).save(run.file(STATS))
        run.finish()
    return row


def _train_one(data, norm, bs, init, act, seed, grid, device, save: SaveRuns | None = None, out: str | None = None):
    """(CSV row, the trained Learner, its TrainConfig) of one grid point."""
    from .callbacks import Recorder
    from .config import TrainConfig
    from .data import DataLoaders, TensorBatches
    from .recipe import build_learner
    from .seed import set_seed

    _check_fits(data, bs)
    set_seed(seed)
    train = TensorBatches(data.train.x, data.train.y, bs, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(seed))
    epochs = max(1, math.ceil(grid.max_batches / max(len(train), 1)))
    stats = save is not None and save.stats
    config = TrainConfig(**(save.config if save is not None else {}), norm=norm, batch_size=bs, init=init, act=act,
                         seed=seed, lr=grid.lr, schedule="constant", nfs=list(grid.nfs), device=device, stats=stats,
                         epochs=epochs, out=out)
    dls = DataLoaders(train, None, data.n_classes, data.classes, data.info)
    budget = Budget(grid.max_batches)
    extra = [budget]
    if stats:
        from .stats import ActivationStats

        extra.append(ActivationStats(every=config.stats_every, subsample=config.stats_sample or None))
    learn = build_learner(config, dls, extra_cbs=extra, progress=False)
    started = time.perf_counter()
    learn.fit(epochs, valid=False)
    seconds = time.perf_counter() - started
    x_eval, y_eval = data.valid.x[:EVAL_ITEMS], data.valid.y[:EVAL_ITEMS]
    model_device = next(learn.model.parameters()).device
    losses = learn.get_cb(Recorder).losses
    row = {"norm": norm, "batch_size": bs, "init": init, "act": act, "seed": seed,
           "accuracy": accuracy(learn.model, x_eval.to(model_device), y_eval.to(model_device)),
           "train_loss": float(np.mean(losses[-FINAL_LOSS_WINDOW:])) if losses else float("nan"),
           "dead_fraction": measure_dead(learn.model, x_eval[:DEAD_BATCH].to(model_device)),
           "steps": budget.steps, "samples": budget.steps * bs, "seconds": seconds}
    return row, learn, config


def run_grid(data, grid: AblationGrid, device: str = "cpu", log=print, save: SaveRuns | None = None) -> list[dict]:
    """Train every grid point (`grid.runs()`); return the CSV rows. With `save`, each point is also written
    as its own run folder as soon as it is trained (`run_one`), so a stop keeps the runs already finished."""
    for bs in grid.batch_sizes:
        _check_fits(data, bs)  # before the first run, not half-way through the grid
    rows = []
    runs = grid.runs()
    if save is not None:
        save.check(runs)  # every run folder, before the first run too
    for k, (norm, bs, init, act, seed) in enumerate(runs, 1):
        row = run_one(data, norm, bs, init, act, seed, grid, device, save)
        saved = f" -> {save.path(norm, bs, init, act, seed)}" if save is not None else ""
        log(f"[{k}/{len(runs)}] norm={norm:<13} bs={bs:<4} {init}-{act:<13} seed={seed} acc={row['accuracy']:.3f} "
            f"loss={row['train_loss']:.3f} dead={row['dead_fraction']:.2f} steps={row['steps']} {row['seconds']:.1f}s"
            f"{saved}")
        rows.append(row)
    return rows


# --- outputs -------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per configuration, the seeds averaged (std of accuracy when there is more than one)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["norm"], r["batch_size"], r["init"], r["act"]), []).append(r)
    out = []
    for (norm, bs, init, act), rs in groups.items():
        mean = lambda key: float(np.mean([r[key] for r in rs]))
        acc = [r["accuracy"] for r in rs]
        out.append({"norm": norm, "batch_size": bs, "init": init, "act": act, "seeds": len(rs),
                    "accuracy": mean("accuracy"), "accuracy_std": float(np.std(acc)) if len(rs) > 1 else None,
                    "train_loss": mean("train_loss"), "dead_fraction": mean("dead_fraction"),
                    "steps": mean("steps"), "samples": mean("samples"), "seconds": mean("seconds")})
    return out


def markdown_table(summary: list[dict]) -> str:
    head = ("| norm | batch size | init | act | seeds | accuracy | final train loss | dead fraction | steps | samples "
            "| seconds |")
    lines = [head, "|" + "---|" * 11]
    for s in summary:
        acc = f"{100 * s['accuracy']:.1f}%" + (f" ± {100 * s['accuracy_std']:.1f}" if s["accuracy_std"] is not None else "")
        lines.append(f"| {s['norm']} | {s['batch_size']} | {s['init']} | {s['act']} | {s['seeds']} | {acc} | "
                     f"{s['train_loss']:.3f} | {s['dead_fraction']:.2f} | {s['steps']:.0f} | {s['samples']:.0f} | "
                     f"{s['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _config_label(s: dict) -> str:
    """A bar group's name: the norm, with the init and the activation below it for a variant (one line each,
    so neighbouring labels do not overlap)."""
    variant = f"{s['init']}-{s['act']}"
    return s["norm"] if variant == BASE_VARIANT else f"{s['norm']}\n{s['init']}\n{s['act']}"


def plot_ablation(summary: list[dict], ax=None):
    """Accuracy per configuration (norm, or norm/init-act for variants), one bar per batch size. Names are
    drawn literally (`plots.LITERAL`), whatever characters they hold."""
    import matplotlib.pyplot as plt

    from .plots import LITERAL, literal

    fig, ax = plt.subplots(figsize=(10, 4)) if ax is None else (ax.figure, ax)
    labels = list(dict.fromkeys(_config_label(s) for s in summary))
    sizes = sorted({s["batch_size"] for s in summary})
    width = 0.8 / max(len(sizes), 1)
    for k, bs in enumerate(sizes):
        acc = {_config_label(s): s["accuracy"] for s in summary if s["batch_size"] == bs}
        xs = [i + (k - (len(sizes) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [acc.get(lab, np.nan) for lab in labels], width, label=f"batch size {bs}")
    ax.set_xticks(range(len(labels)), labels, fontsize="small", **LITERAL)
    ax.set(ylabel="test accuracy", ylim=(0, 1), title="ablation: accuracy per normalisation, grouped by batch size")
    literal(*ax.legend(fontsize="small").get_texts())
    return fig
