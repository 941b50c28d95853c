"""The HTML report: one self-contained file rebuilt from a run folder; every shown name is escaped."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from deepscope.cli import main
from deepscope.errors import DataError
from deepscope.stats import load_stats
from deepscope.report import (
    group_findings, key_plot_choice, layer_anchor_ids, layer_table, render_report, sort_findings, status_modules,
)
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
    {"kind": "dead_units", "module": "body.conv", "severity": "warning", "message": "half the units are dead",
     "fix": "use a leaky ReLU", "evidence": {"dead": 0.5}},
    {"kind": "not_learning", "module": "", "severity": "warning", "message": "the loss is flat", "fix": "",
     "evidence": {}, "caused_by": "dead_units"},
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


def section(html, anchor):
    """The HTML of the <section id=anchor> element (sections hold no nested section of the same id)."""
    start = html.index(f'<section id="{anchor}"') if f'<section id="{anchor}"' in html else html.index(f'id="{anchor}"')
    return html[start:html.index("</section>", start)]


def test_report_rebuilt_by_cli_has_every_section(full_run):
    _, stats, html = full_run
    for heading in ("Contents", "Summary", "Findings", "Key plots", "Metrics", "Layers", "All layers at a glance",
                    "Learning-rate finder", "Ablation", "Configuration", "Environment and data"):
        assert f">{heading}</h" in html
    assert "valley" in html and "the curve is noisy" in html and "baseline" in html and "0.81" in html
    # summary (3) + metrics, lr (2) + the heatmaps not in the summary (2 of 4) + one per layer (4) + LR finder (1)
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) == 12


def test_summary_comes_first_with_the_result(full_run):
    html = full_run[2]
    order = [html.index(f'id="{a}"') for a in ("contents", "summary", "findings", "metrics", "layers", "configuration")]
    assert order == sorted(order)
    summary = section(html, "summary")
    assert "validation accuracy <b>70.00%</b>" in summary and "0.8000" in summary and "1.5 s" in summary
    assert "After 2 epoch(s)" in summary
    assert len(re.findall(r"<img ", summary)) == 3  # the three key plots
    assert html.index('id="summary"') < min(m.start() for m in re.finditer(r'<section class="layer"', html))


def test_table_of_contents_links_resolve(full_run):
    html = full_run[2]
    toc = html[html.index('<nav class="toc"'):html.index("</nav>")]
    links = re.findall(r'href="#([^"]*)"', toc)
    ids = set(re.findall(r'\sid="([^"]*)"', html))
    assert {"summary", "metrics", "layers", "lr-find", "ablation", "configuration", "environment"} <= set(links)
    assert len(links) == 7 + 4  # the sections and the four layers
    assert all(link in ids for link in links)
    assert all(link in ids for link in re.findall(r'href="#([^"]*)"', html))  # every in-page link in the report
    assert len(ids) == len(re.findall(r'\sid="', html))  # ids are unique


def test_each_layer_has_a_section_with_its_own_image(full_run):
    _, stats, html = full_run
    anchors = layer_anchor_ids(stats.modules)
    sections = dict(re.findall(r'<section class="layer" id="([^"]*)">(.*?)</section>', html, re.S))
    assert list(sections) == [anchors[m] for m in stats.modules]
    for module in stats.modules:
        body = sections[anchors[module]]
        assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', body)) == 1
    assert anchors[EVIL] == "layer-script-alert-1-script"


def test_a_finding_links_to_its_layer_section(full_run):
    _, stats, html = full_run
    anchor = layer_anchor_ids(stats.modules)["body.conv"]
    summary = section(html, "summary")
    assert f'<a class="module" href="#{anchor}">body.conv</a>' in summary
    assert f'<a class="module" href="#{layer_anchor_ids(stats.modules)[EVIL]}">{EVIL_ESCAPED}</a>' in summary
    assert "half the units are dead" in section(html, anchor)  # and the layer's section repeats the finding
    # the symptom (not_learning, caused by dead_units) is indented under its cause
    group = summary[summary.index("half the units are dead"):]
    assert '<div class="symptoms">' in group and "the loss is flat" in group
    assert group.index("the loss is flat") < group.index('<div class="finding-group">')


def test_key_plots_follow_the_findings(full_run):
    summary = section(full_run[2], "summary")
    captions = re.findall(r"<figcaption>([^<]*)", summary)
    assert captions == ["Off fraction per layer", "Update / weight ratio per layer", "Training loss per batch"]
    assert "because of the finding dead_units in body.conv" in summary
    available = {"loss", "act_std", "act_dead", "grad_norm", "update_ratio"}
    assert [k for k, _ in key_plot_choice([], available)] == ["loss", "act_std", "act_dead"]
    assert [k for k, _ in key_plot_choice([], {"loss"})] == ["loss"]


def test_config_and_environment_are_folded_away(full_run):
    html = full_run[2]
    for anchor in ("configuration", "environment"):
        body = section(html, anchor)
        assert "<details>" in body and body.index("<details>") < body.index("<table>")
    assert "<summary>3 setting(s)</summary>" in section(html, "configuration")


def test_report_is_self_contained(full_run):
    html = full_run[2]
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert "<link" not in html and "<script" not in html and "@import" not in html and "url(" not in html
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', html))
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', html))


def test_findings_sorted_errors_first_and_colour_coded(full_run):
    html = full_run[2]
    summary = section(html, "summary")
    order = [summary.index(f'finding sev-{s}"') for s in ("error", "warning", "info")]
    assert order == sorted(order)
    assert "half the units are dead" in html and "use a leaky ReLU" in html


def test_every_shown_name_is_escaped(full_run):
    html = full_run[2]
    assert EVIL not in html and "<script" not in html
    # config value, layer table, TOC, layer heading and alt text, finding module/message/fix/evidence, ablation cell
    assert html.count(EVIL_ESCAPED) >= 7


def test_group_findings_nests_symptoms_under_their_cause():
    found = sort_findings([{"kind": "a", "severity": "error", "message": "a"},
                           {"kind": "b", "severity": "warning", "message": "b", "caused_by": "a"},
                           {"kind": "c", "severity": "info", "message": "c", "caused_by": "b"},
                           {"kind": "d", "severity": "info", "message": "d", "caused_by": "missing"}])
    groups = group_findings(found)
    assert [(g["cause"]["kind"], [s["kind"] for s in g["symptoms"]]) for g in groups] == [("a", ["b", "c"]), ("d", [])]


def test_layer_anchor_ids_are_safe_and_unique():
    ids = layer_anchor_ids(["a.b", "a b", "a-b", "", "ünï", '"><x>'])
    assert list(ids.values())[:3] == ["layer-a.b", "layer-a-b", "layer-a-b-2"]
    assert ids[""] == "layer-model" and ids["ünï"] == "layer-n" and ids['"><x>'] == "layer-x"
    assert all(re.fullmatch(r"layer-[A-Za-z0-9_.-]+", v) for v in ids.values())
    assert len(set(ids.values())) == len(ids)


def test_color_dim_panel_has_labels_and_a_colour_bar():
    from deepscope import plots

    stats = make_fake_stats(T=5, M=3)
    fig = plots.color_dim_panel(stats, "layers.1")
    ax, bar = fig.axes  # the plot and its colour bar
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "|activation| (bin)"
    assert bar.get_ylabel() == "log(1 + count)"
    assert ax.title.get_fontsize() >= 10
    panels = plots.layer_panels(stats, "layers.1")
    assert len(panels.axes) == 6  # five panels and the histogram's colour bar
    assert all(a.get_xlabel() and a.get_ylabel() for a in panels.axes[:5])  # every panel labels both axes
    assert panels.axes[5].get_ylabel() == "log(1 + count)"
    heat = plots.layer_heatmap(stats, "act_dead", title="off", label="fraction off (0-1)", vmin=0, vmax=1)
    assert heat.axes[1].get_ylabel() == "fraction off (0-1)" and heat.axes[0].get_xlabel() == "training step"
    plt_close(fig, panels, heat)


def plt_close(*figs):
    import matplotlib.pyplot as plt

    for fig in figs:
        plt.close(fig)


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
    assert "No training result was recorded" in html
    for heading in ("Findings", "Layers", "Learning-rate finder", "Ablation", "Key plots"):
        assert f">{heading}</h" not in html


def test_folder_without_config_is_a_data_error(tmp_path, capsys):
    with pytest.raises(DataError, match="config.json"):
        render_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A small real run: `deepscope train` with per-layer statistics on the tests' tiny dataset."""
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("real")
    data = write_tiny_dataset(root / "data")
    run_dir = root / "run"
    assert main(["train", "--data-dir", str(data), "--out", str(run_dir), "--no-verify", "--epochs", "1",
                 "--batch-size", "16", "--nfs", "4", "8", "--lr", "0.01", "--device", "cpu", "--stats-every", "2",
                 "--quiet"]) == 0
    return run_dir, load_stats(run_dir), (run_dir / "report.html").read_text()


def test_real_run_has_a_section_per_watched_module(real_run):
    _, stats, html = real_run
    anchors = layer_anchor_ids(stats.modules)
    sections = dict(re.findall(r'<section class="layer" id="([^"]*)">(.*?)</section>', html, re.S))
    assert len(stats.modules) >= 5 and list(sections) == [anchors[m] for m in stats.modules]
    assert all('src="data:image/png;base64,' in sections[anchors[m]] for m in stats.modules)
    toc = html[html.index('<nav class="toc"'):html.index("</nav>")]
    ids = set(re.findall(r'\sid="([^"]*)"', html))
    assert all(link in ids for link in re.findall(r'href="#([^"]*)"', toc))
    assert html.index('id="summary"') < html.index('<section class="layer"')
    assert "http://" not in html and "https://" not in html


def test_report_size_stays_small(real_run):
    """The small run's report is well under a megabyte, and a default CNN run (13 watched modules) stays
    under ~3 MB: the per-layer images grow with the number of layers, the rest does not."""
    _, stats, html = real_run
    size = len(html.encode())
    assert size < 1_000_000
    layer_images = [len(uri) for uri in re.findall(r'<section class="layer" id="[^"]*">.*?src="(data:[^"]*)"', html, re.S)]
    assert len(layer_images) == len(stats.modules)
    rest = size - sum(layer_images)
    assert max(layer_images) < 150_000
    assert rest + 13 * max(layer_images) < 3_000_000


def _chromium() -> str | None:
    import shutil

    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


def _render_in_chromium(browser: str, page) -> tuple[str, list[str]]:
    """Load `page` headless; returns the DOM after load and the console lines Chromium logged to stderr."""
    import subprocess

    try:
        done = subprocess.run([browser, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
                               "--disable-extensions", f"--user-data-dir={page.parent / 'chromium-profile'}",
                               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000", "--dump-dom",
                               page.as_uri()], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{browser} did not finish loading the page within 120 s")
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return done.stdout, console


def test_report_loads_in_a_browser_without_console_errors(real_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH")
    # The check itself: a page with a console error must be caught, or this Chromium cannot tell us anything.
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><title>c</title><script>console.error('control-error'); missing();</script>")
    _, console = _render_in_chromium(browser, control)
    if not any("control-error" in line for line in console):
        pytest.skip(f"{browser} does not log console messages to stderr with --enable-logging=stderr")

    run_dir, stats, html = real_run
    dom, console = _render_in_chromium(browser, run_dir / "report.html")
    assert console == []
    title = re.search(r"<h1[^>]*>(.*?)</h1>", html).group(1)
    assert title in dom and '<nav class="toc" id="contents"' in dom and ">Contents</h2>" in dom
    assert dom.count('<section class="layer"') == len(stats.modules)

    # Every image decodes, and every in-page link has a target: a copy of the report with a small script
    # that reports what the browser found (the report itself has no script).
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  const links = [...document.querySelectorAll('a[href^="#"]')];
  const dangling = links.filter(a => !document.getElementById(decodeURIComponent(a.hash.slice(1)))).length;
  console.log(`probe images=${imgs.length} broken=${broken} links=${links.length} dangling=${dangling}`);
});
</script></body>"""))
    _, console = _render_in_chromium(browser, probe)
    found = [line for line in console if "probe images=" in line]
    assert len(found) == 1 and len(console) == 1, console
    n_images = int(re.search(r"images=(\d+)", found[0]).group(1))
    assert n_images == html.count("<img ") and "broken=0" in found[0] and "dangling=0" in found[0]


def test_the_report_says_what_the_diagnosis_checked(tmp_path):
    """A report of a healthy run says more than "no problems": which checks ran on how many steps (from the
    run's checks.json, which `deepscope train` writes)."""
    import json

    from conftest import write_tiny_dataset
    from deepscope.cli import main

    data = write_tiny_dataset(tmp_path / "data", n_train=512, n_test=32)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--no-verify", "--nfs", "4", "8", "--threads", "1",
                 "--epochs", "1", "--quiet", "--out", str(out)]) in (0, 1)
    checks = json.loads((out / "checks.json").read_text())
    assert checks["steps"] == 2 and checks["summary"].startswith(f"{len(checks['ran'])} checks on 2 steps")  # 512 / 256
    page = (out / "report.html").read_text()
    assert "What was checked: " + checks["summary"].split(":")[0] in page
