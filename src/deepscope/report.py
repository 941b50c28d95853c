"""The HTML report: a pure function of a run folder, so any past run can be re-rendered.

The result is one self-contained file: plots are inlined as data URIs, styles are inline, nothing is
fetched. Jinja2's autoescaping escapes every name and config string shown.
"""
from __future__ import annotations

from pathlib import Path

import jinja2

from .errors import DataError
from .plots import figure_to_data_uri, plot_curve, plot_metrics
from .rundir import read_json


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("deepscope", "templates"),
        autoescape=jinja2.select_autoescape(["html"], default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )


def load_run(run_dir: str | Path) -> dict:
    """Everything in a run folder that the report shows; missing optional parts are None."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise DataError(f"{run_dir} is not a deepscope run folder (no config.json); pass the folder that "
                        f"`deepscope train` wrote")
    optional = lambda name: read_json(run_dir / name) if (run_dir / name).is_file() else None
    return {"dir": run_dir, "config": read_json(run_dir / "config.json"), "metrics": optional("metrics.json") or [],
            "recorder": optional("recorder.json")}


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
    last = run["metrics"][-1] if run["metrics"] else {}
    cfg = run["config"]
    return {"title": f"deepscope run {run['dir'].name}", "config": cfg.get("config", {}),
            "environment": cfg.get("environment", {}), "data": cfg.get("data", {}), "wall_seconds": cfg.get("wall_seconds"),
            "metrics": run["metrics"], "metric_columns": list(run["metrics"][0]) if run["metrics"] else [],
            "last": last, "figures": figures}


def render_report(run_dir: str | Path) -> str:
    return _env().get_template("report.html").render(**build_context(load_run(run_dir)))


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    html = render_report(run_dir)
    path = run_dir / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
