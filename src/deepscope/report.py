"""The HTML report: a pure function of a run folder, so any past run can be re-rendered.

The result is one self-contained file: plots are inlined as data URIs, styles are inline, nothing is
fetched and there is no script. Jinja2's autoescaping escapes every name, config string and finding shown.

Layout, made to be scanned: a table of contents (in-page links, one per section and per layer); the summary
(the result: final validation accuracy and loss, epochs, wall time; the findings grouped by cause, each root
cause with its symptoms indented under it and every finding about a layer linked to that layer's section;
three key plots, chosen by what the findings point to, else the loss, activation std and off fraction);
metrics (metrics.json, recorder.json, and where each epoch's training time went: samples/s and seconds per
phase, from the `timing` of each epoch record); layers (stats.npz: a table of last values linking to the
layers, heatmaps of every layer at a glance, then one section per watched module, id `layer-<name>`, with
its findings and one small-multiples image: |activation| histogram with colour bar, mean/std, off fraction,
gradient norms, update ratio); the LR finder (lr_find.json); an ablation table (ablation.csv); the
profile's top operators and where its trace is (profile_ops.json, profile_trace.json); the configuration
and environment, folded away in <details>. Only config.json is required; every other part
is shown when its file is in the folder.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import jinja2
import numpy as np

from .callbacks.timing import PHASES, timing_rows
from .errors import DataError
from .plots import figure_to_data_uri, layer_heatmap, layer_panels, lr_find_plot, plot_curve, plot_metrics
from .profile import load_profile
from .runfolder import (
    ABLATION_CSV, CHECKS, FINDINGS, LR_FIND, METRICS, RECORDER, REPORT, STATS, read_config, read_json, write_text,
)

SEVERITIES = ("error", "warning", "info")  # the order findings are listed in
DPI = 80  # enough to read (9 px text and up), small enough that the report of a 13-layer CNN stays near a megabyte
LAYER_DPI = 72  # the per-layer small multiples: one row of five panels, about 1000 px wide


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
    """metrics.json: one JSON object per epoch whose values are numbers or null, or nested objects (the
    epoch's timing: see `_timing`), which are not columns; columns that some epochs lack are filled with
    None, so every row has every column."""
    if not path.is_file():
        return []
    records = read_json(path, list)
    columns: list[str] = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: epoch record {i} should be a JSON object, not {type(record).__name__}")
        for key, value in record.items():
            if isinstance(value, dict):
                continue
            if value is not None and not _is_number(value):
                raise DataError(f"{path}: epoch record {i}: {key!r} should be a number or null, not {value!r}")
            if key not in columns:
                columns.append(key)
    return [{c: r.get(c) for c in columns} for r in records]


def _timing(path: Path) -> list[dict]:
    """The time breakdown per epoch in metrics.json (callbacks.timing.timing_rows); [] for runs without it."""
    if not path.is_file():
        return []
    try:
        return timing_rows(read_json(path, list))
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None


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


def _checks(path: Path) -> str | None:
    """The diagnosis' "what was checked" line (checks.json), or None in runs written before it existed."""
    if not path.is_file():
        return None
    summary = read_json(path, dict).get("summary")
    return summary if isinstance(summary, str) else None


def load_run(run_dir: str | Path) -> dict:
    """Everything in a run folder that the report shows; missing optional parts are None. Raises
    DataError naming the file when one is malformed or holds values of the wrong type."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a folder; pass a run folder that `deepscope train` wrote")
    return {"dir": run_dir, "config": read_config(run_dir), "metrics": _metrics(run_dir / METRICS),
            "timing": _timing(run_dir / METRICS), "profile": load_profile(run_dir),
            "recorder": _recorder(run_dir / RECORDER), "findings": _findings(run_dir / FINDINGS),
            "checks": _checks(run_dir / CHECKS),
            "lr_find": _lr_find(run_dir / LR_FIND), "ablation": _read_csv(run_dir / ABLATION_CSV),
            "stats": load_stats_file(run_dir)}


def _rounded(value):
    """Evidence for reading: floats to 4 significant digits, in lists and dicts too."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


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
                    "evidence": json.dumps(_rounded(evidence), default=str) if evidence else ""})
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


# Which per-layer overview answers the question a finding raises (the summary shows the first three plots
# that the findings point to, then the loss curve, the activation std and the off fraction).
KEY_PLOT_FOR = {
    "dead_units": "act_dead", "saturation": "act_dead",
    "activation_explosion": "act_std", "activation_collapse": "act_std", "input_not_normalized": "act_std",
    "symmetric_init": "act_std", "nonfinite_forward": "act_std", "batchnorm_small_batch": "act_std",
    "gradient_explosion": "grad_norm", "no_gradient": "grad_norm", "nonfinite_backward": "grad_norm",
    "nonfinite_loss": "grad_norm", "diverged": "grad_norm",
    "lr_too_high": "update_ratio", "lr_too_low": "update_ratio", "not_learning": "update_ratio",
}
DEFAULT_KEY_PLOTS = ("loss", "act_std", "act_dead", "grad_norm", "update_ratio")
HEATMAPS = {  # field: (title, caption, colour-bar label, options)
    "act_std": ("activation std per layer", "Activation std per layer",
                "activation std (log scale)", {"log": True}),
    "act_dead": ("fraction of 'off' values per layer (at the floor, saturated, or near 0)", "Off fraction per layer",
                 "fraction of values off (0-1)", {"vmin": 0.0, "vmax": 1.0}),
    "grad_norm": ("gradient norm flowing out of each layer", "Gradient norm per layer",
                  "output-gradient L2 norm (log)", {"log": True}),
    "update_ratio": ("update / weight ratio per layer (white: the healthy 1e-3)", "Update / weight ratio per layer",
                     "||Δw|| / ||w|| (log scale)", {"center": 1e-3}),
}


def layer_anchor_ids(modules) -> dict[str, str]:
    """An HTML id for each module's section: "layer-" and the name with every character outside
    [A-Za-z0-9_.-] replaced by "-" (so the id needs no escaping in a URL fragment), made unique with a
    numeric suffix; "" (the model itself) is "layer-model"."""
    ids, used = {}, set()
    for name in modules:
        base = "layer-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-") or "model")
        anchor, k = base, 2
        while anchor in used:
            anchor, k = f"{base}-{k}", k + 1
        used.add(anchor)
        ids[name] = anchor
    return ids


def group_findings(findings: list[dict]) -> list[dict]:
    """Findings (in `sort_findings`' order) as groups: a root cause with the symptoms it explains under it.
    A symptom whose cause is itself a symptom joins its cause's group; one whose cause was not found is
    a group of its own."""
    groups: list[dict] = []
    for f in findings:
        home = None
        if f["caused_by"]:
            home = next((g for g in groups if f["caused_by"] in [g["cause"]["kind"]] + [s["kind"] for s in g["symptoms"]]), None)
        if home is None:
            groups.append({"cause": f, "symptoms": []})
        else:
            home["symptoms"].append(f)
    return groups


def _has_statistics(stats, i: int) -> bool:
    return bool(np.isfinite(stats.act_mean[:, i]).any())


def key_plot_choice(findings: list[dict], available) -> list[tuple[str, str]]:
    """The three plots of the summary as (key, why): those the findings point to first (in their order,
    causes first), then the loss curve, activation std, off fraction, gradient and update norms."""
    chosen: list[tuple[str, str]] = []
    for f in findings:
        key = KEY_PLOT_FOR.get(f["kind"])
        if key in available and key not in [k for k, _ in chosen]:
            where = f" in {f['module']}" if f["module"] else ""
            chosen.append((key, f"shown because of the finding {f['kind']}{where}"))
    for key in DEFAULT_KEY_PLOTS:
        if key in available and key not in [k for k, _ in chosen]:
            chosen.append((key, ""))
    if "loss" in available and "loss" not in [k for k, _ in chosen[:3]]:
        chosen.insert(min(2, len(chosen)), ("loss", ""))  # the loss curve always makes the summary
    return chosen[:3]


def _layer_sections(stats, findings: list[dict], anchors: dict[str, str]) -> list[dict]:
    rows = {row["module"]: row for row in layer_table(stats)}
    rules = stats.dead_rules or []
    sections = []
    for i, name in enumerate(stats.modules):
        # layer_panels sets its own margins: no second drawing to crop it (half the report's time)
        figure = figure_to_data_uri(layer_panels(stats, name), LAYER_DPI, tight=False) if _has_statistics(stats, i) else None
        sections.append({"module": name, "id": anchors[name], "row": rows[name], "figure": figure,
                         "owns_params": name in stats.param_modules,
                         "rule": rules[i] if i < len(rules) else "",
                         "findings": [f for f in findings if f["module"] == name]})
    return sections


def build_context(run: dict) -> dict:
    findings = sort_findings(run["findings"])
    stats, lr_find = run["stats"], run["lr_find"]
    has_layers = stats is not None and len(stats.modules) and len(stats.steps)
    anchors = layer_anchor_ids(stats.modules) if has_layers else {}
    for f in findings:
        f["anchor"] = anchors.get(f["module"], "") if f["module"] else ""  # "": the model, loss or data
    flagged = {f["module"] for f in findings if f["module"]}

    figures, captions = {}, {}
    if run["metrics"]:
        figures["metrics"] = figure_to_data_uri(plot_metrics(run["metrics"]), DPI)
        captions["metrics"] = "Loss and accuracy per epoch"
    rec = run["recorder"]
    if rec and rec.get("loss"):
        figures["loss"] = figure_to_data_uri(plot_curve(rec["loss"], title="training loss per batch (line: moving average)",
                                                        xlabel="batch", ylabel="loss",
                                                        smooth=max(1, len(rec["loss"]) // 50)), DPI)
        captions["loss"] = "Training loss per batch"
        if rec.get("lr"):
            figures["lr"] = figure_to_data_uri(plot_curve(rec["lr"], title="learning-rate schedule", xlabel="batch",
                                                          ylabel="learning rate"), DPI)
            captions["lr"] = "Learning rate per batch"
    elif "metrics" in figures:
        figures["loss"], captions["loss"] = figures.pop("metrics"), captions.pop("metrics")

    layers = None
    if has_layers:
        for field, (title, caption, label, options) in HEATMAPS.items():
            owner = stats.param_modules if field == "update_ratio" else stats.modules
            if len(owner) and np.isfinite(getattr(stats, field)).any():
                figures[field] = figure_to_data_uri(layer_heatmap(stats, field, title=title, label=label,
                                                                  highlight=sorted(flagged), **options), DPI)
                captions[field] = caption
        sample = run["config"].get("config", {}).get("stats_sample")  # absent in runs of older versions
        invisible = [name or "the model itself" for name in (getattr(stats, "invisible", None) or [])]
        layers = {"sections": _layer_sections(stats, findings, anchors), "n_steps": len(stats.steps),
                  "invisible": invisible, "sample": sample}
    key_plots = [{"key": k, "why": why, "caption": captions[k], "uri": figures[k]}
                 for k, why in key_plot_choice(findings, figures)]
    in_summary = {p["key"] for p in key_plots}
    if lr_find and lr_find.get("lrs"):
        lr_find = {"suggestions": lr_find.get("suggestions") or {}, "message": lr_find.get("message") or "",
                   "figure": figure_to_data_uri(lr_find_plot(lr_find["lrs"], lr_find["losses"], lr_find.get("suggestions")), DPI)}
    else:
        lr_find = None
    metrics = run["metrics"]
    last = metrics[-1] if metrics else {}
    cfg = run["config"]
    # A report is also rendered inside the staging folder `<name>.partial` before it is renamed.
    title = run.get("title") or f"deepscope run {run['dir'].name.removesuffix('.partial')}"
    losses = (rec or {}).get("loss") or []
    tail = [v for v in losses[-20:] if math.isfinite(v)]
    result = {"epochs": last.get("epoch", len(metrics)) if metrics else None,
              "planned_epochs": cfg.get("config", {}).get("epochs"),
              "valid_accuracy": last.get("valid_accuracy"), "valid_loss": last.get("valid_loss"),
              "train_loss": last.get("train_loss"), "batches": len(losses),
              "recent_loss": sum(tail) / len(tail) if tail else None, "recent_n": len(tail), "wall_seconds": cfg.get("wall_seconds"),
              # a run stopped by Ctrl-C/SIGTERM (deepscope.recipe): where, and the command that continues it
              "stopped_at": cfg.get("options", {}).get("stopped_at_step"),
              "resume": f"deepscope train --resume {run['dir'].parent / run['dir'].name.removesuffix('.partial')}"}
    sections = [("summary", "Summary"), ("metrics", "Metrics")]
    if layers:
        sections.append(("layers", "Layers"))
    sections += [(k, t) for k, t, present in (("lr-find", "Learning-rate finder", lr_find), ("ablation", "Ablation", run["ablation"]),
                                              ("profile", "Profile", run.get("profile"))) if present]
    timing = run.get("timing") or []  # [] in runs older than the timer; not in `watch`'s run at all
    timing_phases = [p for p in PHASES if any(p in row["phases"] for row in timing)] + \
        list(dict.fromkeys(p for row in timing for p in row["phases"] if p not in PHASES))
    sections += [("configuration", "Configuration"), ("environment", "Environment and data")]
    return {"title": title, "toc": sections,
            "diagnosed": run["findings"] is not None, "checks": run.get("checks"), "config": cfg.get("config", {}),
            "environment": cfg.get("environment", {}), "data": cfg.get("data", {}), "wall_seconds": cfg.get("wall_seconds"),
            "metrics": metrics, "metric_columns": list(metrics[0]) if metrics else [],
            "timing": timing, "timing_phases": timing_phases, "profile": run.get("profile"),
            "last": last, "result": result, "figures": figures, "captions": captions, "key_plots": key_plots,
            "in_summary": in_summary, "findings": findings, "finding_groups": group_findings(findings),
            "layers": layers, "lr_find": lr_find, "ablation": run["ablation"]}


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
