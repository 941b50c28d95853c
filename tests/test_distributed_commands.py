"""The other sub-commands under torchrun (deepscope.cli.main): lr-find sweeps with DDP on the global batch,
doctor runs once in rank 0, single-process commands run in rank 0 alone; one run folder, one output. Every
launch has an outer timeout; the in-process tests check the rules without starting processes."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import write_tiny_dataset
from deepscope import distributed
from deepscope.callback import CancelFitException
from deepscope.cli import main
from deepscope.lr_find import LRFinder

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]


def _port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun(args, cwd, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([*TORCHRUN, "--master-port", _port(), "-m", "deepscope", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("ddp-commands") / "data", n_train=256, n_test=64)


def _model_args(data):
    return ["--data-dir", str(data), "--no-verify", "--nfs", "4", "8", "--batch-size", "32", "--norm", "none"]


def test_lr_find_under_torchrun_sweeps_the_global_batch_once(data, tmp_path):
    # lr up to 1000: the loss diverges, so the sweep stops early, on the mean of the two processes' losses
    sweep = [*_model_args(data), "--num-it", "16", "--start-lr", "0.1", "--end-lr", "1000"]
    root = tmp_path / "ddp"
    root.mkdir()
    done = _torchrun(["lr-find", *sweep, "--threads", "1", "--out", str(root / "run")], root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("lr finder (2 processes, global batch 32): ") == 1
    assert done.stdout.count("wrote ") == 1 and "Traceback" not in done.stderr
    assert sorted(p.name for p in root.iterdir()) == ["run"]  # one run folder, nothing else from rank 1
    assert {"lr_find.json", "lr_find.png", "config.json"} <= {p.name for p in (root / "run").iterdir()}
    ddp = json.loads((root / "run" / "lr_find.json").read_text())
    # the same sweep in one process, at the same global batch and seed (here, in-process: no second launch)
    single = tmp_path / "single"
    assert main(["lr-find", *sweep, "--out", str(single)]) == 0
    one = json.loads((single / "lr_find.json").read_text())
    assert 2 < len(one["lrs"]) < 16  # it diverged and stopped early ...
    assert len(ddp["lrs"]) == len(one["lrs"])  # ... at the same step under DDP
    assert ddp["lrs"] == pytest.approx(one["lrs"], rel=1e-12)
    # DDP's step equals the global batch's up to float32 rounding (the mean of two half-batch means, gradients
    # averaged in another order): the curves agree within 1e-5, relative to the loss, which grows to hundreds
    # once the sweep diverges (about 1e-7 before)
    for key in ("raw_losses", "losses"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), key
    assert max(abs(a - b) for a, b in zip(ddp["raw_losses"][:5], one["raw_losses"][:5])) <= 1e-5
    assert json.loads((root / "run" / "config.json").read_text())["options"]["processes"] == 2


# doctor, then a single-process command, in one launch (the start of torchrun and its processes is most of
# the time): each rank runs them through deepscope.cli.main as `python -m deepscope` would, and keeps its
# exit codes; rank 0 marks where each command's output begins.
TWO_COMMANDS = """
import json, os, sys
from deepscope.cli import main
codes, rank = {}, os.environ["RANK"]
for args in json.loads(sys.argv[2]):
    if rank == "0":
        print("=== " + args[0], flush=True)
    codes[args[0]] = main(args)
json.dump(codes, open(os.path.join(sys.argv[1], "codes" + rank + ".json"), "w"))
"""


def test_doctor_runs_once_in_rank_0_and_other_commands_in_rank_0_alone(data, tmp_path):
    root, codes = tmp_path / "work", tmp_path / "codes"
    root.mkdir(), codes.mkdir(), (root / "empty").mkdir()
    script = tmp_path / "two_commands.py"
    script.write_text(TWO_COMMANDS)
    commands = [["doctor", *_model_args(data), "--threads", "1", "--steps", "3", "--limit-batches", "3", "--out",
                 str(root / "doc")], ["runs", "empty"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([*TORCHRUN, "--master-port", _port(), str(script), str(codes), json.dumps(commands)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    # every rank exits with rank 0's code
    assert [json.loads((codes / f"codes{r}.json").read_text()) for r in "01"] == [{"doctor": 0, "runs": 0}] * 2
    doctor, runs = done.stdout.split("=== runs")
    # doctor: one run folder, written by rank 0, its summary printed once, with what the DDP job would do
    assert sorted(p.name for p in root.iterdir()) == ["doc", "empty"]
    assert (root / "doc" / "findings.json").is_file()
    assert doctor.count("findings written to") == 1
    assert doctor.count("doctor ran in one process (rank 0 of 2) on the global batch of 32") == 1
    assert "each of the 2 processes of the DDP job would take 16 items per step" in doctor
    # runs: a single-process command, printed once
    assert runs.count("no deepscope runs in empty") == 1
    assert done.stderr.count("deepscope runs: a single-process command; under torchrun rank 0 runs it") == 1


# --- in process: the rules, without launching ---------------------------------------------------------------
def test_lr_finder_stops_on_the_mean_of_the_ranks_losses(monkeypatch):
    """Two ranks whose own losses differ: each records, and decides to stop on, their mean, so both stop at
    the same step (rank 1's loss diverges, rank 0's does not)."""
    other = iter([1.0, 1.0, 1.0, 30.0])  # the other rank's losses, step by step
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_reduce_", lambda t, op="sum": t.add_(next(other)))
    finder = LRFinder(1e-3, 1.0, num_it=10, smooth=0.0)
    learn = SimpleNamespace(training=True, lr=1e-3, loss=torch.tensor(1.0))
    for _ in range(3):
        finder.after_batch(learn)
    assert finder.raw_losses == [1.0, 1.0, 1.0]
    with pytest.raises(CancelFitException):  # own loss 1, mean 15.5 > 4 x the best
        finder.after_batch(learn)
    assert finder.raw_losses[-1] == 15.5


def test_lr_finder_in_one_process_records_its_own_loss():
    finder = LRFinder(1e-3, 1.0, num_it=10, smooth=0.0)
    finder.after_batch(SimpleNamespace(training=True, lr=1e-3, loss=torch.tensor(0.25)))
    assert finder.raw_losses == [0.25] and math.isclose(finder.losses[0], 0.25)


def test_other_ranks_skip_a_single_process_command_and_say_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["runs", str(tmp_path / "missing")]) == 0  # rank 1: nothing done, nothing printed
    with pytest.raises(SystemExit) as stopped:  # a usage error: rank 0 prints it
        main(["lr-find", "--bogus"])
    assert stopped.value.code == 2
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    assert main(["runs", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("does not exist") == 1 and "rank 0 runs it and the other 1 process exits at once" in err


def test_doctor_judges_batchnorm_on_each_processs_share():
    from torch import nn

    from deepscope.cli.doctor import _batchnorm_per_process
    from deepscope.data.loaders import TensorBatches

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    train = TensorBatches(torch.randn(64, 1, 8, 8), torch.zeros(64, dtype=torch.long), 8, shuffle=True)
    found = _batchnorm_per_process(model, train, 2)  # 8 a global batch: 4 per process
    assert [f.kind for f in found] == ["batchnorm_small_batch"]
    assert "4 samples per process (8 over 2 processes" in found[0].message
    assert train.world_size == 1  # the doctor's own data is left whole
    assert _batchnorm_per_process(model, TensorBatches(train.x, train.y, 16), 2) == []  # 8 per process: enough
