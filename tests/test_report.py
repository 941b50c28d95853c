"""The HTML report: one self-contained file rebuilt from a run folder; every shown name is escaped."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from deepscope.cli import main
from deepscope.errors import DataError
from deepscope.stats import load_stats
from deepscope.report import layer_table, render_report, sort_findings, status_modules
from test_plots import make_fake_stats

EVIL = "<script>alert(1)</script>"
EVIL_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
STATS_KEYS = ("steps", "weights", "act_mean", "act_std", "act_min", "act_max", "act_dead", "act_nonfinite", "act_hist",
              "hist_edges", "grad_mean", "grad_std", "grad_norm", "grad_nonfinite", "weight_norm", "param_grad_norm",
              "update_ratio")


def write_config(run_dir, **config):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {"lr": 0.01, "model": "cnn", **config},
                                                     "environment": {"torch": "x"}, "data": {}, "wall_seconds": 1.5}))


def write_stats(run_dir, stats):
    arrays = {k: getattr(stats, k) for k in STATS_KEYS}
    np.savez(run_dir / "stats.npz", format_version=np.int64(1), modules=np.array(stats.modules),
             param_modules=np.array(stats.param_modules), dead_threshold=np.float64(stats.dead_threshold), **arrays)


FINDINGS = [
    {"kind": "dead_units", "module": "layers.1", "severity": "warning", "message": "half the units are dead",
     "fix": "use a leaky ReLU", "evidence": {"dead": 0.5}},
    {"kind": "note", "module": None, "severity": "info", "message": "a note", "fix": "", "evidence": {}},
    {"kind": "exploding", "module": EVIL, "severity": "error", "message": f"bad {EVIL}", "fix": EVIL,
     "evidence": {"x": EVIL}},
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A run folder with every optional file, written by hand, its report rebuilt through the CLI."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    write_config(run_dir, act=EVIL)
    (run_dir / "metrics.json").write_text(json.dumps([
        {"epoch": 1, "train_loss": 1.0, "valid_loss": 0.9, "valid_accuracy": 0.6, "seconds": 1.0},
        {"epoch": 2, "train_loss": 0.7, "valid_loss": 0.8, "valid_accuracy": 0.7, "seconds": 1.0}]))
    (run_dir / "recorder.json").write_text(json.dumps({"loss": list(np.linspace(2, 1, 30)), "lr": [0.01] * 30, "momentum": []}))
    stats = make_fake_stats(T=5, M=4, B=10, names=["stem", EVIL, "body.conv", "head"])
    write_stats(run_dir, stats)
    (run_dir / "findings.json").write_text(json.dumps(FINDINGS))
    (run_dir / "lr_find.json").write_text(json.dumps({"lrs": list(np.logspace(-5, 0, 20)), "losses": list(np.linspace(2, 3, 20)),
                                                      "suggestions": {"valley": 3.2e-3, "steep": 1e-2}, "noisy": True,
                                                      "message": "the curve is noisy"}))
    (run_dir / "ablation.csv").write_text(f"variant,valid_accuracy\nbaseline,0.81\n{EVIL},0.79\n")
    assert load_stats(run_dir).modules == stats.modules  # the file written here is what deepscope.stats reads
    assert main(["report", str(run_dir)]) == 0
    return run_dir, stats, (run_dir / "report.html").read_text()


def test_report_rebuilt_by_cli_has_every_section(full_run):
    _, _, html = full_run
    for heading in ("Findings", "Configuration", "Metrics", "Layers", "Status screens", "Learning-rate finder",
                    "Ablation", "Environment and data"):
        assert f">{heading}</h" in html
    assert html.index(">Findings<") < html.index(">Configuration<")  # findings come first
    assert "valley" in html and "the curve is noisy" in html and "baseline" in html and "0.81" in html
    # metrics (3) + layer plots (6) + status screens for first, middle, last layer (3) + LR finder (1)
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == 13


def test_report_is_self_contained(full_run):
    html = full_run[2]
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script src" not in html
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', html))


def test_findings_sorted_errors_first_and_colour_coded(full_run):
    html = full_run[2]
    order = [html.index(f'finding sev-{s}"') for s in ("error", "warning", "info")]
    assert order == sorted(order)
    assert "half the units are dead" in html and "use a leaky ReLU" in html


def test_every_shown_name_is_escaped(full_run):
    html = full_run[2]
    assert EVIL not in html and "<script" not in html
    # config value, layer table, status screen alt text, finding module/message/fix/evidence, ablation cell
    assert html.count(EVIL_ESCAPED) >= 7


def test_layer_table_holds_last_values():
    stats = make_fake_stats(T=4, M=3)
    stats.grad_norm[-1, 0] = np.nan  # no gradient at the last step: the latest finite value is shown
    rows = layer_table(stats)
    assert [r["module"] for r in rows] == stats.modules
    assert rows[1]["std"] == pytest.approx(stats.act_std[-1, 1])
    assert rows[1]["dead"] == pytest.approx(stats.act_dead[-1, 1])
    assert rows[0]["grad_norm"] == pytest.approx(stats.grad_norm[-2, 0])
    assert rows[2]["grad_norm"] is None  # never had a gradient
    assert rows[1]["update_ratio"] == pytest.approx(stats.update_ratio[-1, 1])
    assert rows[2]["update_ratio"] is None  # owns no parameters


def test_status_modules_first_middle_last():
    assert status_modules([f"m{i}" for i in range(7)]) == ["m0", "m3", "m6"]
    assert status_modules(["a", "b"]) == ["a", "b"]
    assert status_modules([]) == []


def test_sort_findings_normalises_severity():
    out = sort_findings([{"severity": "info", "message": "i"}, {"severity": "bogus", "message": "b"},
                         {"severity": "error", "message": "e"}])
    assert [(f["severity"], f["message"]) for f in out] == [("error", "e"), ("info", "i"), ("info", "b")]


def test_minimal_folder_omits_optional_sections(tmp_path):
    write_config(tmp_path / "run")
    html = render_report(tmp_path / "run")
    assert ">Configuration</h2>" in html and "No metrics were recorded" in html
    for heading in ("Findings", "Layers", "Learning-rate finder", "Ablation"):
        assert f">{heading}</h2>" not in html


def test_folder_without_config_is_a_data_error(tmp_path, capsys):
    with pytest.raises(DataError, match="config.json"):
        render_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
