"""The HTML report: a pure function of a run folder, so any past run can be re-rendered.

The result is one self-contained file: plots are inlined as data URIs, styles are inline, nothing is
fetched. Jinja2's autoescaping escapes every name, config string and finding shown.

Sections, each shown only when its file is in the folder (only config.json is required):
findings (findings.json, errors first), summary and configuration (config.json), metrics (metrics.json,
recorder.json), layers (stats.npz: a table of last values, then mean/std, the colourful-dimension grid, dead
activations, gradient norms and update ratios for every layer, and a status screen for at most three
layers — the first, the middle and the last — to keep the file small), the LR finder (lr_find.json) and an
ablation table (ablation.csv).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import jinja2
import numpy as np

from .errors import DataError
from .plots import (
    color_dim_grid, dead_chart, figure_to_data_uri, grad_norm_plot, lr_find_plot, mean_std_plot, plot_curve,
    plot_metrics, status_screen, update_ratio_plot,
)
from .runfolder import (
    ABLATION_CSV, FINDINGS, LR_FIND, METRICS, RECORDER, REPORT, STATS, read_config, read_json, write_text,
)

SEVERITIES = ("error", "warning", "info")  # the order findings are listed in
DPI = 90  # enough to read, small enough that a report with a dozen plots stays around a megabyte


def _number(value) -> str:
    """A table cell: 4 significant digits, '-' for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.4g}"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("deepscope", "templates"),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _number
    return env


def load_stats_file(run_dir: Path):
    """The run's per-layer statistics, or None when the run recorded none."""
    if not (run_dir / STATS).is_file():
        return None
    from .stats import load_stats

    return load_stats(run_dir)


def _read_csv(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a readable CSV file ({e})") from None
    return {"columns": rows[0], "rows": rows[1:]} if rows else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(path: Path, where: str, values) -> list[float]:
    """A JSON list of numbers (null = not measured, read as NaN); DataError naming the file otherwise."""
    if not isinstance(values, list) or not all(v is None or _is_number(v) for v in values):
        raise DataError(f"{path}: {where} should be a list of numbers")
    return [math.nan if v is None else float(v) for v in values]


def _metrics(path: Path) -> list[dict]:
    """metrics.json: one JSON object per epoch whose values are numbers or null; columns that some epochs
    lack are filled with None, so every row has every column."""
    if not path.is_file():
        return []
    records = read_json(path, list)
    columns: list[str] = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: epoch record {i} should be a JSON object, not {type(record).__name__}")
        for key, value in record.items():
            if value is not None and not _is_number(value):
                raise DataError(f"{path}: epoch record {i}: {key!r} should be a number or null, not {value!r}")
            if key not in columns:
                columns.append(key)
    return [{c: r.get(c) for c in columns} for r in records]


def _recorder(path: Path) -> dict | None:
    if not path.is_file():
        return None
    rec = read_json(path, dict)
    return {key: _numbers(path, repr(key), rec[key]) for key in ("loss", "lr", "momentum") if rec.get(key) is not None}


def _findings(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    findings = read_json(path, list)
    for i, f in enumerate(findings):
        if not isinstance(f, dict):
            raise DataError(f"{path}: finding {i} should be a JSON object, not {type(f).__name__}")
    return findings


def _lr_find(path: Path) -> dict | None:
    if not path.is_file():
        return None
    data = read_json(path, dict)
    lrs, losses = _numbers(path, "'lrs'", data.get("lrs", [])), _numbers(path, "'losses'", data.get("losses", []))
    if len(lrs) != len(losses):
        raise DataError(f"{path}: 'lrs' has {len(lrs)} values but 'losses' has {len(losses)}; they must match")
    suggestions = data.get("suggestions") or {}
    if not isinstance(suggestions, dict) or not all(_is_number(v) for v in suggestions.values()):
        raise DataError(f"{path}: 'suggestions' should map names to learning rates")
    return {**data, "lrs": lrs, "losses": losses, "suggestions": suggestions}


def load_run(run_dir: str | Path) -> dict:
    """Everything in a run folder that the report shows; missing optional parts are None. Raises
    DataError naming the file when one is malformed or holds values of the wrong type."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a folder; pass a run folder that `deepscope train` wrote")
    return {"dir": run_dir, "config": read_config(run_dir), "metrics": _metrics(run_dir / METRICS),
            "recorder": _recorder(run_dir / RECORDER), "findings": _findings(run_dir / FINDINGS),
            "lr_find": _lr_find(run_dir / LR_FIND), "ablation": _read_csv(run_dir / ABLATION_CSV),
            "stats": load_stats_file(run_dir)}


def sort_findings(findings: list[dict] | None) -> list[dict]:
    """Findings causes first (errors, then warnings, then notes), each followed by the findings it explains
    (`caused_by`); an unknown severity is shown as info."""
    if findings is not None and not isinstance(findings, list):
        raise DataError(f"findings.json should hold a JSON list of findings, not a {type(findings).__name__}")
    out = []
    for f in findings or []:
        sev = f.get("severity") if f.get("severity") in SEVERITIES else "info"
        evidence = f.get("evidence") or {}
        out.append({"kind": str(f.get("kind", "")), "module": str(f.get("module") or ""), "severity": sev,
                    "caused_by": str(f.get("caused_by") or ""),
                    "message": str(f.get("message", "")), "fix": str(f.get("fix") or ""),
                    "evidence": json.dumps(evidence, default=str) if evidence else ""})
    # causes first (errors, then warnings, then notes), each followed by the findings it explains
    roots = sorted((f for f in out if not f["caused_by"]), key=lambda f: SEVERITIES.index(f["severity"]))
    grouped = []
    for root in roots:
        grouped.append(root)
        grouped.extend(f for f in out if f["caused_by"] and f["caused_by"] == root["kind"] and f not in grouped)
    return grouped + [f for f in out if f not in grouped]


def _last_finite(column) -> float | None:
    finite = np.flatnonzero(np.isfinite(column))
    return float(column[finite[-1]]) if len(finite) else None


def layer_table(stats) -> list[dict]:
    """One row per layer: the latest activation mean, std and dead fraction, the latest gradient norm that
    is not NaN, the update ratio (None for a module that owns no parameters), and why a module has no
    statistics when it has none (`note`: not called, no floating-point output)."""
    params = {name: j for j, name in enumerate(stats.param_modules)}
    notes = stats.notes() if hasattr(stats, "notes") else {}
    rows = []
    for i, name in enumerate(stats.modules):
        j = params.get(name)
        rows.append({"module": name, "note": notes.get(name, ""), "mean": _last_finite(stats.act_mean[:, i]), "std": _last_finite(stats.act_std[:, i]),
                     "dead": _last_finite(stats.act_dead[:, i]), "grad_norm": _last_finite(stats.grad_norm[:, i]),
                     "update_ratio": None if j is None else _last_finite(stats.update_ratio[:, j])})
    return rows


def status_modules(modules: list[str], n: int = 3) -> list[str]:
    """The first, middle and last layer (fewer when there are fewer layers)."""
    idx = sorted({round(k * (len(modules) - 1) / max(n - 1, 1)) for k in range(n)}) if modules else []
    return [modules[k] for k in idx]


def _layer_figures(stats) -> dict:
    uri = lambda fig: figure_to_data_uri(fig, DPI)
    figs = {"mean_std": uri(mean_std_plot(stats)), "color_dim": uri(color_dim_grid(stats)), "dead": uri(dead_chart(stats))}
    if np.isfinite(stats.grad_norm).any():
        figs["grad_norm"] = uri(grad_norm_plot(stats))
    if len(stats.param_modules):
        figs["param_grad_norm"] = uri(grad_norm_plot(stats, params=True))
        figs["update_ratio"] = uri(update_ratio_plot(stats))
    return figs


def build_context(run: dict) -> dict:
    figures = {}
    if run["metrics"]:
        figures["metrics"] = figure_to_data_uri(plot_metrics(run["metrics"]))
    rec = run["recorder"]
    if rec and rec.get("loss"):
        figures["loss"] = figure_to_data_uri(plot_curve(rec["loss"], title="training loss per batch", xlabel="batch",
                                                        ylabel="loss", smooth=max(1, len(rec["loss"]) // 50)))
        if rec.get("lr"):
            figures["lr"] = figure_to_data_uri(plot_curve(rec["lr"], title="learning rate", xlabel="batch", ylabel="lr"))
    stats, lr_find = run["stats"], run["lr_find"]
    layers = None
    if stats is not None and len(stats.modules) and len(stats.steps):
        sample = run["config"].get("config", {}).get("stats_sample")  # absent in runs of older versions
        invisible = [name or "the model itself" for name in (getattr(stats, "invisible", None) or [])]
        layers = {"table": layer_table(stats), "figures": _layer_figures(stats), "n_steps": len(stats.steps),
                  "invisible": invisible,
                  "sample": sample,
                  "status": [(m, figure_to_data_uri(status_screen(stats, m), DPI)) for m in status_modules(list(stats.modules))]}
    if lr_find and lr_find.get("lrs"):
        lr_find = {"suggestions": lr_find.get("suggestions") or {}, "message": lr_find.get("message") or "",
                   "figure": figure_to_data_uri(lr_find_plot(lr_find["lrs"], lr_find["losses"], lr_find.get("suggestions")))}
    else:
        lr_find = None
    last = run["metrics"][-1] if run["metrics"] else {}
    cfg = run["config"]
    # A report is also rendered inside the staging folder `<name>.partial` before it is renamed.
    title = run.get("title") or f"deepscope run {run['dir'].name.removesuffix('.partial')}"
    return {"title": title,
            "diagnosed": run["findings"] is not None, "config": cfg.get("config", {}),
            "environment": cfg.get("environment", {}), "data": cfg.get("data", {}), "wall_seconds": cfg.get("wall_seconds"),
            "metrics": run["metrics"], "metric_columns": list(run["metrics"][0]) if run["metrics"] else [],
            "last": last, "figures": figures, "findings": sort_findings(run["findings"]), "layers": layers,
            "lr_find": lr_find, "ablation": run["ablation"]}


def render_report(run_dir: str | Path) -> str:
    return render_run(load_run(run_dir))


def render_run(run: dict) -> str:
    """The report of a run held in memory, in `load_run`'s layout (`watch` has no run folder)."""
    return _env().get_template("report.html").render(**build_context(run))


def write_report(run_dir: str | Path) -> Path:
    """Render RUN_DIR/report.html (written atomically: a reader never sees half a file)."""
    run_dir = Path(run_dir)
    html = render_report(run_dir)
    path = run_dir / REPORT
    write_text(path, html)
    return path
