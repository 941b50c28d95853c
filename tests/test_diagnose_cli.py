"""`deepscope doctor` on small IDX files the test writes itself."""
import json

import numpy as np
import pytest
import torch

from deepscope.cli import main
from deepscope.data import write_idx
from deepscope.diagnose import load_findings


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    for prefix, n in (("train", 96), ("t10k", 32)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 64 + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def doctor(idx_dir, out, *extra):
    return main(["doctor", "--data-dir", str(idx_dir), "--no-verify", "--limit-batches", "3", "--batch-size", "16",
                 "--steps", "4", "--nfs", "8", "16", "--device", "cpu", "--threads", "1", "--out", str(out), *extra])


def test_doctor_prints_findings_and_writes_findings_json(idx_dir, tmp_path, capsys):
    out = tmp_path / "doctor-run"
    assert doctor(idx_dir, out) == 0
    printed = capsys.readouterr().out
    assert "findings.json" in printed
    data = json.loads((out / "findings.json").read_text())
    assert isinstance(data, list)
    assert all(f.severity != "error" for f in load_findings(out / "findings.json"))
    assert json.loads((out / "config.json").read_text())["config"]["batch_size"] == 16


def test_doctor_exits_0_when_it_finds_problems(idx_dir, tmp_path, capsys):
    out = tmp_path / "doctor-high-lr"
    assert doctor(idx_dir, out, "--lr", "1000", "--opt", "sgd", "--norm", "none") == 0
    findings = load_findings(out / "findings.json")
    assert findings and findings[0].severity == "error"
    assert findings[0].kind in capsys.readouterr().out


def test_doctor_user_errors_exit_2(tmp_path, capsys):
    assert main(["doctor", "--data-dir", str(tmp_path / "missing"), "--no-verify", "--out", str(tmp_path / "o")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
