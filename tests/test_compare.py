"""`deepscope compare` and `deepscope runs` on small real runs made with the CLI (trained once per module)."""
import json
import re
import shutil

import pytest

from conftest import write_tiny_dataset
from deepscope.cli import main
from deepscope.diagnose import Finding, save_findings

FAST = ["--no-verify", "--nfs", "4", "8", "--threads", "1", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
        "--quiet"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Three runs (a: batch norm, lr 0.01; b: no norm, lr 0.003; c: as a without statistics) and the page
    comparing a with b."""
    root = tmp_path_factory.mktemp("compare")
    data = write_tiny_dataset(root / "data", n_train=64, n_test=32)
    runs = root / "runs"
    options = {"a": ["--norm", "batch", "--lr", "0.01"], "b": ["--norm", "none", "--lr", "0.003"],
               "c": ["--norm", "batch", "--lr", "0.01", "--no-stats"]}
    for name, extra in options.items():
        # --no-report: compare and runs read the run files, never report.html (and rendering one costs seconds)
        assert main(["train", "--data-dir", str(data), "--out", str(runs / name), *FAST, *extra, "--no-report"]) == 0
    # b as a diagnosed run with a problem: a cause and the symptom it explains (a tiny run finds none itself)
    save_findings(runs / "b" / "findings.json", [
        Finding("lr_too_high", "", "warning", "the loss rose 3x in the first steps", "lower --lr"),
        Finding("dead_units", "block0.act", "warning", "80% of block0.act is off", "", caused_by="lr_too_high")])
    page = root / "pages" / "compare.html"
    assert main(["compare", str(runs / "a"), str(runs / "b"), "--out", str(page)]) == 0
    return {"root": root, "runs": runs, "data": data, "page": page, "html": page.read_text(encoding="utf-8")}


def _table_keys(html: str, table_id: str) -> list[str]:
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S).group(1)
    return re.findall(r'<tr><td class="key">([^<]*)</td>', table)


def test_the_page_is_one_offline_file(made):
    html = made["html"]
    assert list(made["page"].parent.iterdir()) == [made["page"]]
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', html, re.I)
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]* src="([^"]*)"', html))
    assert '<meta name="generator" content="deepscope compare">' in html


def test_the_summary_names_every_run_with_its_results(made):
    html = made["html"]
    summary = re.search(r'<table id="summary-table">(.*?)</table>', html, re.S).group(1)
    for name in ("a", "b"):
        assert f"</span>{name}</td>" in summary
        metrics = json.loads((made["runs"] / name / "metrics.json").read_text())
        assert f"{100 * metrics[-1]['valid_accuracy']:.2f}%" in summary
    assert summary.count("<td class=\"key\">train</td>") == 2 and " s</td>" in summary
    assert "lr_too_high" in summary  # b's root cause; its symptom is not one
    assert "dead_units" not in summary


def test_only_the_differing_settings_are_in_the_differences_table(made):
    html = made["html"]
    assert sorted(_table_keys(html, "config-differences")) == ["lr", "norm"]
    identical = _table_keys(html, "config-identical")
    assert "batch_size" in identical and "nfs" in identical and "out" not in identical
    assert re.search(r'<details>\s*<summary>\d+ identical setting', html)


def test_one_image_per_overlaid_curve(made):
    html = made["html"]
    alts = re.findall(r'<img class="curve" alt="([^"]*)"', html)
    assert alts == ["training loss per step", "validation loss per epoch", "validation accuracy per epoch"]


def test_per_layer_grid_for_the_shared_modules(made):
    html = made["html"]
    grids = re.findall(r'<img class="layer-grid" alt="([^"]*)"', html)
    assert [g.split(":")[0] for g in grids] == ["Activation std", "Off fraction"]
    assert all("block0.conv" in g and "block0.norm" not in g for g in grids)  # shared by a and b; norm only in a
    assert "block0.conv" in _table_keys(html, "layer-table")
    assert re.search(r"<b>b</b> lacks 2 module\(s\).*block0\.norm, block1\.norm", html, re.S)


def test_each_runs_findings_are_shown_causes_first(made):
    html = made["html"]
    section = html[html.index('<h2 id="findings">'):]
    a, b = section.index("</span>a</h3>"), section.index("</span>b</h3>")
    assert "Diagnosis found no problems" in section[a:b]
    assert section.index("the loss rose 3x") < section.index("80% of block0.act is off")
    assert "caused by lr_too_high" in section[b:]


def test_a_run_without_statistics_and_three_runs_with_the_default_out(made, monkeypatch, capsys):
    runs = made["runs"]
    monkeypatch.chdir(made["page"].parent)  # the default out is ./compare.html: the page written above, replaced
    assert main(["compare", str(runs / "a"), str(runs / "b"), str(runs / "c")]) == 0
    assert "compare.html" in capsys.readouterr().out
    html = made["page"].read_text(encoding="utf-8")
    assert html != made["html"]
    assert "c: no per-layer statistics: no stats.npz in its folder" in html
    assert sorted(_table_keys(html, "config-differences")) == ["lr", "norm", "stats"]


def _error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("deepscope ") and len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("case, message", [
    ("one", "at least two run folders"),
    ("twice", "is given twice"),
    ("same via another path", "is given twice"),
    ("data folder", "is not a deepscope run folder"),
    ("missing", "does not exist"),
    ("a file", "is a file, not a run folder"),
    ("unfinished", "unfinished run"),
])
def test_bad_runs_are_one_line_errors(made, tmp_path, capsys, case, message):
    a, b = str(made["runs"] / "a"), str(made["runs"] / "b")
    if case == "unfinished":
        partial = tmp_path / "x.partial"
        shutil.copytree(made["runs"] / "b", partial)
        marker = json.loads((partial / ".deepscope-run.json").read_text())
        (partial / ".deepscope-run.json").write_text(json.dumps({**marker, "state": "writing"}))
    paths = {"one": [a], "twice": [a, b, a], "same via another path": [a, str(made["runs"] / "b" / ".." / "a")],
             "data folder": [a, str(made["data"])], "missing": [a, str(tmp_path / "nope")],
             "a file": [a, str(made["runs"] / "a" / "config.json")], "unfinished": [a, str(tmp_path / "x.partial")]}
    _error(capsys, main(["compare", *paths[case], "--out", str(tmp_path / "page.html")]), message)
    assert not (tmp_path / "page.html").exists()


def test_never_writes_into_a_run_folder_nor_over_a_foreign_file(made, tmp_path, monkeypatch, capsys):
    a, b = made["runs"] / "a", made["runs"] / "b"
    before = sorted(p.name for p in a.iterdir())
    _error(capsys, main(["compare", str(a), str(b), "--out", str(a / "cmp.html")]), "inside the run folder")
    _error(capsys, main(["compare", str(a), str(b), "--out", str(a / "report.html")]), "inside the run folder")
    monkeypatch.chdir(a)
    _error(capsys, main(["compare", str(a), str(b)]), "inside the run folder")
    assert sorted(p.name for p in a.iterdir()) == before
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>my notes</html>")
    _error(capsys, main(["compare", str(a), str(b), "--out", str(foreign)]), "not a comparison page deepscope wrote")
    assert foreign.read_text() == "<html>my notes</html>"


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.strip().splitlines()


def test_runs_lists_the_runs_with_accuracy_and_findings(made, capsys):
    assert main(["runs", str(made["runs"])]) == 0
    header, *lines = _lines(capsys)
    assert header.split()[:3] == ["path", "kind", "date"]
    assert len(lines) == 3
    for name in ("a", "b", "c"):
        line = next(x for x in lines if x.startswith(str(made["runs"] / name) + " "))
        acc = json.loads((made["runs"] / name / "metrics.json").read_text())[-1]["valid_accuracy"]
        assert " train " in line and f"{100 * acc:.2f}%" in line
    assert "0 error(s), 2 warning(s)" in next(x for x in lines if x.startswith(str(made["runs"] / "b") + " "))
    assert main(["runs", str(made["runs"] / "a")]) == 0  # DIR itself is a run
    assert len(_lines(capsys)) == 2


def test_runs_sorts_by_date_and_shows_unfinished_runs(made, tmp_path, capsys):
    for name, started in (("a", "2030-01-03T00:00:00"), ("b", "2030-01-01T00:00:00")):
        shutil.copytree(made["runs"] / name, tmp_path / name)
        marker_path = tmp_path / name / ".deepscope-run.json"
        marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "started": started}))
    shutil.copytree(tmp_path / "a", tmp_path / "z.partial")
    marker_path = tmp_path / "z.partial" / ".deepscope-run.json"
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "state": "writing",
                                       "started": "2030-01-02T00:00:00", "files": []}))
    (tmp_path / "not-a-run").mkdir()
    assert main(["runs", str(tmp_path)]) == 0
    _, *lines = _lines(capsys)
    assert [line.split()[0] for line in lines] == [str(tmp_path / n) for n in ("b", "z.partial", "a")]
    assert "2030-01-01 00:00:00" in lines[0] and "unfinished (.partial" in lines[1]


def test_runs_says_so_when_there_are_none(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    assert "no deepscope runs in" in capsys.readouterr().out
    _error(capsys, main(["runs", str(tmp_path / "nope")]), "does not exist")


def test_an_out_named_as_a_folder_gets_compare_html_inside(made, tmp_path, monkeypatch):
    """`--out newdir/` (or a name without .html) is a folder: the page goes inside it, never into a file
    named like the folder."""
    from deepscope.cli import main

    runs = [str(made["runs"] / "a"), str(made["runs"] / "b")]
    for given in (f"{tmp_path}/newdir/", f"{tmp_path}/other"):
        assert main(["compare", *runs, "--out", given]) == 0
        folder = tmp_path / given.rstrip("/").rsplit("/", 1)[-1]
        assert folder.is_dir() and (folder / "compare.html").is_file()
