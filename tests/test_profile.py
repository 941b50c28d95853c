"""`--profile N` (profile.py): torch.profiler over N training steps, its trace and its top operators."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deepscope.cli import main
from deepscope.config import TrainConfig
from deepscope.data import DataLoaders, TensorBatches
from deepscope.errors import ConfigError, DataError
from deepscope.learner import Learner
from deepscope.callbacks import LimitBatches
from deepscope.profile import WAIT, WARMUP, Profile, load_profile, plan, top_operators
from deepscope.report import render_report

pytestmark = pytest.mark.usefixtures("one_thread")


def fit_with(profile, n_batches=8, cbs=()):
    x, y = torch.randn(8 * n_batches, 6), torch.randint(0, 3, (8 * n_batches,))
    dls = DataLoaders(TensorBatches(x, y, 8), TensorBatches(x, y, 16), n_classes=3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    learn = Learner(model, dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD, cbs=[profile, *cbs])
    learn.fit(2)
    return learn


def test_plan_skips_and_warms_up_when_the_pass_is_long_enough():
    assert plan(None, 3) == (WAIT, WARMUP) and plan(WAIT + WARMUP + 3, 3) == (WAIT, WARMUP)
    assert plan(3, 3) == (0, 1) and plan(1, 3) == (0, 0)


def test_profile_writes_a_trace_and_the_top_operators(tmp_path):
    profile = Profile(3, tmp_path)
    fit_with(profile)
    assert profile.profiled == 3 and profile.note is None and profile.failed is None
    trace = json.loads((tmp_path / "profile_trace.json").read_text())
    assert "traceEvents" in trace and trace["traceEvents"]
    ops = load_profile(tmp_path)
    assert ops["profiled_steps"] == 3 and ops["trace"] == "profile_trace.json" and ops["trace_present"]
    rows = ops["cpu"]["ops"]
    assert 0 < len(rows) <= 15 and ops["cuda"] is None
    assert [r["self_ms"] for r in rows] == sorted((r["self_ms"] for r in rows), reverse=True)
    assert any(r["name"].startswith("aten::") for r in rows)
    assert all(0 <= r["percent"] <= 100 and r["calls"] >= 1 for r in rows)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_short_pass_profiles_what_there_is_and_says_so(tmp_path):
    profile = Profile(5, tmp_path)
    fit_with(profile, cbs=[LimitBatches(train=3)])  # 3 batches a pass: no wait, 1 warm-up, 2 recorded
    assert profile.profiled == 2 and "2 of the 5" in profile.note
    assert load_profile(tmp_path)["note"] == profile.note


def test_a_profile_that_cannot_be_written_does_not_stop_training(tmp_path, capsys):
    profile = Profile(2, tmp_path / "missing" / "folder")
    learn = fit_with(profile)
    assert profile.failed and "could not write the profile" in capsys.readouterr().err
    assert learn.epoch == 1  # both epochs ran


def test_top_operators_leave_out_the_step_markers_but_count_their_time():
    def event(key, self_us, total_us, count=1):
        return SimpleNamespace(key=key, count=count, self_cpu_time_total=self_us, cpu_time_total=total_us,
                               self_device_time_total=0, device_time_total=0)

    events = [event("ProfilerStep#3", 500, 1000), event("aten::mm", 300, 300, 4), event("aten::add", 200, 250, 2)]
    out = top_operators(events, n=1)
    assert out["cpu"]["total_ms"] == 1.0 and out["cuda"] is None
    assert out["cpu"]["ops"] == [{"name": "aten::mm", "calls": 4, "self_ms": 0.3, "total_ms": 0.3, "percent": 30.0}]
    assert top_operators(events, device=True)["cuda"] == {"total_ms": 0.0, "ops": []}


def test_bad_numbers_of_steps_are_clear_errors(capsys):
    with pytest.raises(ConfigError, match="positive integer"):
        Profile(0, ".")
    with pytest.raises(ConfigError, match="profile must be a positive number of training steps"):
        TrainConfig(profile=0)
    with pytest.raises(SystemExit) as info:
        main(["train", "--profile", "0"])
    assert info.value.code == 2 and "--profile: must be a positive whole number" in capsys.readouterr().err


def test_a_malformed_profile_file_is_a_data_error(tmp_path):
    (tmp_path / "profile_ops.json").write_text(json.dumps({"cpu": {"ops": "many"}}))
    with pytest.raises(DataError, match="profile_ops.json"):
        load_profile(tmp_path)
    assert load_profile(tmp_path / "nowhere") is None


def test_train_with_profile_writes_the_trace_and_the_report_lists_operators(tiny_data, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(tiny_data), "--out", str(out), "--no-verify", "--epochs", "1",
                 "--batch-size", "16", "--nfs", "4", "--device", "cpu", "--no-stats", "--profile", "3", "--quiet"])
    assert code == 0
    assert "traceEvents" in json.loads((out / "profile_trace.json").read_text())
    html = render_report(out)
    assert 'id="profile"' in html and "Top operators by self CPU time" in html and "aten::" in html
    assert "profile_trace.json" in html and "ui.perfetto.dev" in html
    marker = json.loads((out / ".deepscope-run.json").read_text())
    assert {"profile_trace.json", "profile_ops.json"} <= set(marker["files"])  # --overwrite knows they are ours
