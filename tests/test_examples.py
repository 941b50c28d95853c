"""The example scripts run as a user runs them: in a fresh process, from the repository root, writing only
into the folder they are given."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WATCH = ROOT / "examples" / "watch_transformer.py"
WATCH_FILES = ("report.html", "mean_std.png", "color_dim.png", "update_ratio.png")


def start_example(script: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_example(script: Path, *args) -> subprocess.CompletedProcess:
    return finish(start_example(script, *args))


@pytest.fixture(scope="module")
def watch_runs(tmp_path_factory):
    """The two training runs of the example, started together: each is a process on one thread, so on two
    cores they run side by side (most of their time is drawing the report's plots). Each test waits for its own."""
    root = tmp_path_factory.mktemp("watch")
    outs = {"ok": root / "ok", "high-lr": root / "high-lr"}
    procs = {"ok": start_example(WATCH, "--steps", 40, "--out", outs["ok"]),
             "high-lr": start_example(WATCH, "--lr", 0.3, "--steps", 40, "--out", outs["high-lr"])}
    done = {}

    def result(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        if name not in done:
            done[name] = finish(procs[name])
        return done[name], outs[name]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def check_watch_outputs(out: Path) -> str:
    """The four files exist, the PNGs are PNGs, and the report needs nothing from the network; returns it."""
    assert sorted(p.name for p in out.iterdir()) == sorted(WATCH_FILES)
    for name in WATCH_FILES[1:]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    html = (out / "report.html").read_text()
    # one self-contained file: every image inlined, no script, stylesheet or font fetched from anywhere
    sources = re.findall(r"""\ssrc\s*=\s*["']?([^"'\s>]*)""", html, re.I)
    assert "<img" in html and sources
    assert all(src.startswith("data:image/png;base64,") for src in sources), [src[:40] for src in sources]
    assert not re.search(r"<link\b|@import|url\(\s*[\"']?\s*(https?:)?//", html, re.I)
    return html


@pytest.mark.slow
def test_watch_example_trains_and_finds_nothing(watch_runs):
    done, out = watch_runs("ok")  # examples/watch_transformer.py --steps 40 --out <tmp>/ok
    assert done.returncode == 0, done.stderr
    assert "40 steps recorded" in done.stdout
    assert "no findings" in done.stdout
    check_watch_outputs(out)


@pytest.mark.slow
def test_watch_example_at_a_diverging_lr_reports_an_error(watch_runs):
    done, out = watch_runs("high-lr")  # examples/watch_transformer.py --lr 0.3 --steps 40 --out <tmp>/high-lr
    assert done.returncode == 0, done.stderr
    assert re.search(r"^ERROR\s+lr_too_high", done.stdout, re.M), done.stdout
    html = check_watch_outputs(out)
    assert "lr_too_high" in html


def test_watch_example_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = run_example(WATCH, "--steps", 1, "--out", tmp_path)
    assert done.returncode != 0
    assert "notes.txt" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
