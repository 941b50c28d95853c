"""Compare runs side by side: one self-contained HTML page for two or more run folders (init vs init, norm
vs norm, lr vs lr), the way the lesson compares experiments.

The page is a pure function of the run folders, which are only read. Like the report it is one file: plots
are inlined as data URIs, styles are inline, nothing is fetched, and Jinja2's autoescaping escapes every name,
config value and finding shown. Sections:

- summary: one row per run: name (its folder's name), kind, final metrics, wall time, findings by severity
  and their root causes;
- configuration differences: only the settings whose values differ between the runs (config.json's
  `config`, then its `data.*` and `environment.*`); the identical ones are folded away in a <details>;
- curves: training loss per step (raw and smoothed), validation loss and accuracy per epoch, one colour per
  run in every plot;
- layers: for every module recorded (stats.npz) in at least two runs, small multiples of the activation std
  and of the off fraction over the training steps, one line per run, plus a table of the last values; the
  modules a run lacks, and runs without statistics, are listed;
- findings: each run's findings, causes first, as in the report.

Where the page goes (`check_out`): `compare.html` in the current folder by default; a folder as `--out`
gets a `compare.html` inside it. It is never written inside a run folder (any folder deepscope made), and
an existing file is replaced only when it is a comparison page deepscope wrote (it carries `GENERATOR` in
its head); anything else is refused. Nothing is ever deleted.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError, OutputError
from .runfolder import CONFIG, FINDINGS, MARKER, STAGING_SUFFIX, STATS, read_marker, write_text

DEFAULT_OUT = "compare.html"
# Written into the page's <head>; an existing file at --out is replaced only when it carries this line.
GENERATOR = '<meta name="generator" content="deepscope compare">'
DPI = 90
LAYERS_PER_FIGURE = 16  # small multiples per image (4 x 4); more modules make more images
NCOLS = 4
# Keys of config.json's `config` that differ between any two runs by construction (the run's own folder):
# leaving them out keeps the differences table to what was varied.
IGNORED_CONFIG_KEYS = ("out",)
_LINESTYLES = ("-", "--", ":", "-.")


# --- reading the runs ------------------------------------------------------------------------------------
def check_run_dir(path: str | Path) -> Path:
    """`path` when it is a complete run folder (or a run of an older deepscope, with a config.json and no
    marker); DataError saying what it is otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path} does not exist; pass run folders that `deepscope train` (or doctor, lr-find) wrote")
    if not p.is_dir():
        raise DataError(f"{path} is a file, not a run folder; pass the folder `deepscope train` wrote")
    marker = read_marker(p)
    if marker is not None and marker.get("state") != "complete":
        why = (f"a {STAGING_SUFFIX} folder: still being written, or left by an interrupted run"
               if p.name.endswith(STAGING_SUFFIX) else f"its state is {marker.get('state')!r}")
        raise DataError(f"{path} is an unfinished run ({why}); compare complete runs only")
    if marker is None and not (p / CONFIG).is_file():
        raise DataError(f"{path} is not a deepscope run folder (no {MARKER}, no {CONFIG}); pass folders that "
                        f"`deepscope train` wrote (`deepscope runs` lists them)")
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_run_dirs(paths: list[str | Path]) -> list[Path]:
    """The run folders to compare: at least two, each a run (`check_run_dir`), none given twice."""
    if len(paths) < 2:
        raise ConfigError(f"compare needs at least two run folders, got {len(paths)}; e.g. "
                          f"`deepscope compare runs/a runs/b`")
    dirs = [check_run_dir(p) for p in paths]
    for i, a in enumerate(dirs):
        for b in dirs[:i]:
            if _same_file(a, b):
                also = "" if str(a) == str(b) else f" (also as {b})"
                raise ConfigError(f"{a} is given twice{also}; compare different runs")
    return dirs


def _names(dirs: list[Path]) -> list[str]:
    """Each run's name: its folder's name, or its path where two runs share a folder name."""
    names = [d.name for d in dirs]
    return [str(d) if names.count(d.name) > 1 else d.name for d in dirs]


def _findings(run_dir: Path) -> list | None:
    """The run's findings, causes first (deepscope.diagnose), or None when the run was not diagnosed."""
    from .diagnose import load_findings, sort_findings

    path = run_dir / FINDINGS
    if not path.is_file():
        return None
    try:
        return sort_findings(load_findings(path))
    except (OSError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{path} is not a readable findings file ({e}); re-create the run, or move the file "
                        f"away to compare without it") from None


def load_runs(dirs: list[Path]) -> list[dict]:
    """Each run as `report.load_run` reads it, plus its name and its findings (Finding objects)."""
    from .report import load_run

    runs = []
    for name, d in zip(_names(dirs), dirs):
        run = load_run(d)
        run["name"] = name
        run["finding_objects"] = _findings(d)
        runs.append(run)
    return runs


# --- where the page goes ---------------------------------------------------------------------------------
def is_compare_page(path: Path) -> bool:
    """Whether `path` is a comparison page deepscope wrote (GENERATOR in its first few kilobytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return GENERATOR.encode() in head


def check_out(out: str | Path | None, run_dirs: list[Path]) -> Path:
    """Where to write the page (see the module doc), made absolute; OutputError when it may not go there."""
    given = DEFAULT_OUT if out is None else str(out)
    raw = Path(given).expanduser()
    # a folder, an existing one or one named with a trailing slash or without a .html/.htm suffix, gets
    # compare.html inside it (made if missing)
    as_folder = given.endswith(("/", os.sep)) or raw.suffix.lower() not in (".html", ".htm")
    if (raw.is_dir() and not raw.is_symlink()) or (as_folder and not raw.exists()):
        raw = raw / DEFAULT_OUT
    path = Path(os.path.abspath(raw))
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link; deepscope does not write through links: choose another --out")
    real_parent = Path(os.path.realpath(path.parent))
    for folder in [path.parent, *path.parent.parents, real_parent, *real_parent.parents]:
        if any(_same_file(folder, d) for d in run_dirs if folder.exists()):
            raise OutputError(f"{path} is inside the run folder {folder}, one of the runs compared; deepscope "
                              f"never writes into them: pass --out outside it (e.g. --out compare.html elsewhere)")
        if folder.is_dir() and read_marker(folder) is not None:
            raise OutputError(f"{path} is inside {folder}, a run folder deepscope made; deepscope writes only the "
                              f"run's own files there: pass --out outside it")
    if path.exists():
        if not path.is_file():
            raise OutputError(f"{path} exists and is not a file; choose another --out")
        if not is_compare_page(path):
            raise OutputError(f"{path} exists and is not a comparison page deepscope wrote; deepscope never "
                              f"replaces it: choose another --out, or move the file away")
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists() or tmp.is_symlink():
        raise OutputError(f"{tmp} is in the way (deepscope writes the page there first and would replace it); "
                          f"move it away, or choose another --out")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is a file, not a folder; choose another --out")
    return path


# --- the page's parts -------------------------------------------------------------------------------------
def _cell(value, present: bool = True) -> str:
    if not present:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def config_differences(configs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(differing, identical): rows {key, cells} over config.json's `config`, then `data.*` and
    `environment.*`; a key missing in a run counts as a difference and shows as '(absent)'."""
    sections = [("", "config"), ("data.", "data"), ("environment.", "environment")]
    differ, same = [], []
    for prefix, section in sections:
        dicts = [c.get(section) or {} for c in configs]
        keys = list(dict.fromkeys(k for d in dicts for k in d))
        for key in keys:
            if not prefix and key in IGNORED_CONFIG_KEYS:
                continue
            values = [_cell(d.get(key), key in d) for d in dicts]
            canon = [json.dumps(d.get(key), sort_keys=True, default=str) if key in d else None for d in dicts]
            row = {"key": prefix + key, "cells": values}
            (same if all(c == canon[0] for c in canon) else differ).append(row)
    return differ, same


def _last(metrics: list[dict], key: str):
    for record in reversed(metrics):
        value = record.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return value
    return None


def summary_row(run: dict) -> dict:
    cfg, metrics, findings = run["config"], run["metrics"], run["finding_objects"]
    counts = None if findings is None else {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    causes = [] if findings is None else [
        f"{f.kind}" + (f" ({f.module})" if f.module else "")
        for f in findings if not f.caused_by and f.severity in ("error", "warning")]
    return {"name": run["name"], "path": str(run["dir"]), "kind": cfg.get("kind", "train"),
            "epochs": _last(metrics, "epoch"),
            "valid_accuracy": _last(metrics, "valid_accuracy"), "valid_loss": _last(metrics, "valid_loss"),
            "train_loss": _last(metrics, "train_loss"), "wall_seconds": cfg.get("wall_seconds"),
            "counts": counts, "causes": list(dict.fromkeys(causes))}


def _style(k: int) -> dict:
    """Run k's colour (and, past ten runs, its line style), the same in every plot of the page."""
    return {"color": f"C{k % 10}", "ls": _LINESTYLES[(k // 10) % len(_LINESTYLES)]}


def _smooth(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """A moving average of `window` points over the finite values (x, y), NaN gaps skipped."""
    x = np.flatnonzero(np.isfinite(values))
    y = values[x]
    if window <= 1 or len(y) < window:
        return x, y
    return x[window - 1:], np.convolve(y, np.ones(window) / window, mode="valid")


def _legend(ax_or_fig, handles: list, **kw) -> None:
    from .plots import literal

    legend = ax_or_fig.legend(handles, [h.get_label() for h in handles], fontsize="small", **kw)
    literal(*legend.get_texts())


def curve_figures(runs: list[dict]) -> list[dict]:
    """The overlaid curves: {title, uri, missing (names of runs without the data)}; a curve no run has is
    left out (listed with uri None)."""
    import matplotlib.pyplot as plt

    from .plots import LITERAL, figure_to_data_uri

    out = []
    losses = [np.asarray((r["recorder"] or {}).get("loss") or [], dtype=float) for r in runs]
    lengths = [len(v) for v in losses if len(v)]
    title = "training loss per step"
    if lengths:
        window = max(1, int(np.median(lengths)) // 50)
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        handles = []
        for k, (run, values) in enumerate(zip(runs, losses)):
            if not len(values):
                continue
            style = _style(k)
            x = np.flatnonzero(np.isfinite(values))
            if window > 1:
                ax.plot(x, values[x], lw=0.6, alpha=0.25, color=style["color"])
            sx, sy = _smooth(values, window)
            handles += ax.plot(sx, sy, lw=1.5, label=run["name"], **style)
        smoothed = f" (moving average of {window} steps; raw values faint)" if window > 1 else ""
        ax.set_title(title + smoothed, fontsize="medium")
        ax.set(xlabel="training step (batch)", ylabel="loss (cross-entropy)")
        _legend(ax, handles, loc="best")
        out.append({"key": "train_loss", "title": title, "uri": figure_to_data_uri(fig, DPI),
                    "missing": [r["name"] for r, v in zip(runs, losses) if not len(v)]})
    else:
        out.append({"key": "train_loss", "title": title, "uri": None, "missing": [r["name"] for r in runs]})
    for key, title, ylabel in (("valid_loss", "validation loss per epoch", "loss (cross-entropy)"),
                               ("valid_accuracy", "validation accuracy per epoch", "accuracy (fraction correct)")):
        series = []
        for run in runs:
            points = [(r.get("epoch", i + 1), r.get(key)) for i, r in enumerate(run["metrics"])]
            series.append([(e, v) for e, v in points if v is not None and e is not None])
        if not any(series):
            out.append({"key": key, "title": title, "uri": None, "missing": [r["name"] for r in runs]})
            continue
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        handles = []
        for k, (run, points) in enumerate(zip(runs, series)):
            if points:
                xs, ys = zip(*points)
                handles += ax.plot(xs, ys, marker="o", lw=1.5, label=run["name"], **_style(k))
        ax.set_title(title, fontsize="medium", **LITERAL)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if key == "valid_accuracy":
            ax.set_ylim(0, 1)
        _legend(ax, handles, loc="best")
        out.append({"key": key, "title": title, "uri": figure_to_data_uri(fig, DPI),
                    "missing": [r["name"] for r, p in zip(runs, series) if not p]})
    return out


def _has_rows(stats) -> bool:
    return stats is not None and len(stats.modules) > 0 and len(stats.steps) > 0


def shared_modules(runs: list[dict]) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(modules recorded in at least two runs, in the order the first such run lists them; for each run with
    statistics, the modules of the others that it lacks; (name, why) of each run without statistics)."""
    with_stats = [r for r in runs if _has_rows(r["stats"])]
    order = list(dict.fromkeys(m for r in with_stats for m in r["stats"].modules))
    count = {m: sum(m in r["stats"].modules for r in with_stats) for m in order}
    shared = [m for m in order if count[m] >= 2]
    missing = {r["name"]: [m for m in order if m not in r["stats"].modules] for r in with_stats}
    without = [(r["name"], f"no {STATS} in its folder (trained with --no-stats, or a kind of run that records none)"
                if r["stats"] is None else f"its {STATS} holds no recorded step or module")
               for r in runs if not _has_rows(r["stats"])]
    return shared, {k: v for k, v in missing.items() if v}, without


def _layer_grid(runs: list[dict], modules: list[str], field: str, ylabel: str, title: str):
    """Small multiples: one panel per module, one line per run (field: 'act_std' or 'act_dead')."""
    import matplotlib.pyplot as plt

    from .plots import LITERAL

    ncols = max(1, min(NCOLS, len(modules)))
    nrows = -(-len(modules) // ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.5 * nrows + 0.4), squeeze=False)
    handles = {}
    for ax, module in zip(axs.flat, modules):
        values_all = []
        for k, run in enumerate(runs):
            stats = run["stats"]
            if not _has_rows(stats) or module not in stats.modules:
                continue
            i = list(stats.modules).index(module)
            y = np.asarray(getattr(stats, field)[:, i], dtype=float)
            values_all.append(y[np.isfinite(y)])
            (line,) = ax.plot(np.asarray(stats.steps), y, lw=1.2, label=run["name"], **_style(k))
            handles.setdefault(run["name"], line)
        ax.set_title(module, fontsize="small", **LITERAL)
        ax.set_xlabel("training step", fontsize="small")
        ax.set_ylabel(ylabel, fontsize="small")
        ax.tick_params(labelsize="x-small")
        if field == "act_dead":
            ax.set_ylim(0, 1)
        else:
            finite = np.concatenate(values_all) if values_all else np.array([])
            positive = finite[finite > 0]
            if len(positive) == len(finite) and len(positive) and positive.max() / positive.min() > 100:
                ax.set_yscale("log")  # runs orders of magnitude apart (no norm vs norm) stay readable
    for ax in list(axs.flat)[len(modules):]:
        fig.delaxes(ax)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    ordered = [handles[r["name"]] for r in runs if r["name"] in handles]
    _legend(fig, ordered, loc="upper right", ncols=min(len(ordered), 4))
    return fig


def layer_section(runs: list[dict]) -> dict:
    from .plots import figure_to_data_uri

    shared, missing, without = shared_modules(runs)
    figures = []
    for start in range(0, len(shared), LAYERS_PER_FIGURE):
        chunk = shared[start:start + LAYERS_PER_FIGURE]
        part = f" (layers {start + 1}-{start + len(chunk)} of {len(shared)})" if len(shared) > LAYERS_PER_FIGURE else ""
        figures.append({"title": "Activation std" + part, "modules": chunk, "uri": figure_to_data_uri(
            _layer_grid(runs, chunk, "act_std", "std of output", "activation std per layer over training" + part), DPI)})
        figures.append({"title": "Off fraction" + part, "modules": chunk, "uri": figure_to_data_uri(
            _layer_grid(runs, chunk, "act_dead", "fraction off (0-1)",
                        "off fraction per layer over training (at the floor, saturated, or near 0)" + part), DPI)})
    from .report import _last_finite

    table = []
    for module in shared:
        cells = []
        for run in runs:
            stats = run["stats"]
            if _has_rows(stats) and module in stats.modules:
                i = list(stats.modules).index(module)
                cells.append({"std": _last_finite(stats.act_std[:, i]), "dead": _last_finite(stats.act_dead[:, i]),
                              "present": True})
            else:
                cells.append({"std": None, "dead": None, "present": False})
        table.append({"module": module, "cells": cells})
    steps = {r["name"]: len(r["stats"].steps) for r in runs if _has_rows(r["stats"])}
    return {"shared": shared, "missing": missing, "without": without, "figures": figures, "table": table,
            "steps": steps}


def finding_cards(run: dict) -> list[dict] | None:
    """The run's findings in the report's card layout, causes first."""
    from .report import sort_findings as card_layout

    findings = run["finding_objects"]
    return None if findings is None else card_layout([f.to_dict() for f in findings])


def build_context(runs: list[dict]) -> dict:
    differ, same = config_differences([r["config"] for r in runs])
    return {"title": "deepscope comparison: " + " vs ".join(r["name"] for r in runs),
            "generator": GENERATOR, "names": [r["name"] for r in runs],
            "colors": [_hex(k) for k in range(len(runs))],
            "summary": [summary_row(r) for r in runs], "differ": differ, "same": same,
            "curves": curve_figures(runs), "layers": layer_section(runs),
            "findings": [{"name": r["name"], "cards": finding_cards(r)} for r in runs]}


def _hex(k: int) -> str:
    from matplotlib.colors import to_hex

    return to_hex(_style(k)["color"])


def render_compare(run_dirs: list[str | Path]) -> str:
    from markupsafe import Markup

    from .report import _env

    context = build_context(load_runs(check_run_dirs(run_dirs)))
    context["generator"] = Markup(context["generator"])  # our own constant, not user data
    return _env().get_template("compare.html").render(**context)


def write_compare(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Render the comparison of `run_dirs` and write it atomically to `out` (see `check_out`)."""
    dirs = check_run_dirs(run_dirs)
    path = check_out(out, dirs)
    html = render_compare(dirs)
    path = check_out(out, dirs)  # again: rendering takes a while, and the file may have appeared meanwhile
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, html)
    return path
