"""torchrun + DistributedDataParallel on the CPU (gloo): two processes train like one, rank 0 alone writes,
a killed job resumes, and two "nodes" meet through a c10d rendezvous. Every launch has an outer timeout."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import write_tiny_dataset
from deepscope.checkpoint import load_checkpoint, step_checkpoints

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
pytestmark = pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="no torch.distributed")

SCRIPT = '''
import json, sys, torch
from torch import nn
import deepscope as ds
from deepscope import distributed
from deepscope.callbacks import Checkpoint, Distributed, MetricsCallback, OneCycle, Recorder
from deepscope.checkpoint import save_checkpoint
from deepscope.data.loaders import DataLoaders, TensorBatches

out, fail_at = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(320, 12, generator=g)
y = (x[:, 0] + x[:, 1] > 0).long()
x[:, -1] = torch.arange(320).float()  # the item's id, to see which items each rank took; the model ignores it

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(11, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    def forward(self, x):
        return self.body(x[:, :-1])

class Seen(ds.Callback):
    def __init__(self):
        self.items = []
    def before_batch(self, learn):
        if learn.training:
            if learn.iter == 0:
                self.items.append([])
            self.items[-1] += learn.xb[:, -1].long().tolist()
            if learn.train_iter == fail_at and distributed.rank() == 1:
                raise ValueError("rank 1 fails on purpose")

torch.manual_seed(1)
dls = DataLoaders(TensorBatches(x[:256], y[:256], 32, shuffle=True, generator=torch.Generator().manual_seed(2)),
                  TensorBatches(x[256:], y[256:], 40), n_classes=2)
seen = Seen()
learn = ds.Learner(Net(), dls, lr=1e-2, cbs=[MetricsCallback(), Recorder(), OneCycle(1e-2), seen,
                   ds.ActivationStats(subsample=None), Checkpoint(out + "/ckpt", every=5, monitor=None),
                   Distributed()])
learn.fit(3)
json.dump(seen.items, open(f"{out}/seen{distributed.rank()}.json", "w"))
if distributed.is_main():
    s = learn.get_cb(ds.ActivationStats).stats()
    save_checkpoint(f"{out}/result.safetensors", {
        "model": learn.model.state_dict(), "history": learn.get_cb(MetricsCallback).history,
        "losses": learn.get_cb(Recorder).losses,
        **{k: getattr(s, k) for k in ("steps", "act_mean", "act_std", "act_dead", "act_hist", "grad_norm")}})
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _run(args, timeout=150):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env())


def _torchrun(n=2, port=None):
    return [*TORCHRUN, "--nproc-per-node", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port or _port())]


def test_two_processes_train_like_one(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    one = _run([sys.executable, str(script), str(single), "-1"])
    assert one.returncode == 0, one.stderr
    two = _run([*_torchrun(), str(script), str(ddp), "-1"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_checkpoint(single / "result.safetensors"), load_checkpoint(ddp / "result.safetensors")
    for k in a["model"]:
        assert (a["model"][k] - b["model"][k]).abs().max() <= 1e-5, k
    for ra, rb in zip(a["history"], b["history"]):
        for key in ("train_loss", "valid_loss", "valid_accuracy"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), key
    assert np.allclose(a["losses"], b["losses"], atol=1e-6)
    for key in ("act_mean", "act_std", "act_dead", "act_hist", "grad_norm"):
        assert np.allclose(a[key], b[key], rtol=1e-4, atol=1e-6, equal_nan=True), key
    # the ranks saw disjoint halves of each epoch, together the single process's items
    r0, r1, one_proc = (json.loads((d / f).read_text()) for d, f in ((ddp, "seen0.json"), (ddp, "seen1.json"),
                                                                      (single, "seen0.json")))
    for e in range(3):
        assert not set(r0[e]) & set(r1[e]) and len(r0[e]) == len(r1[e]) == 128
        assert sorted(r0[e] + r1[e]) == sorted(one_proc[e])
    assert step_checkpoints(ddp / "ckpt")  # by rank 0 (that rank 1 writes nothing: the CLI test below)


def test_a_failing_rank_ends_the_job_with_its_error_once(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    started = time.monotonic()
    done = _run([*_torchrun(), str(script), str(tmp_path), "7"], timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("rank 1 fails on purpose") >= 1 and time.monotonic() - started < 100


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("ddp") / "data", n_train=512, n_test=96)


def _train_args(data, out, *extra):
    return ["-m", "deepscope", "train", "--data-dir", str(data), "--no-verify", "--nfs", "4", "8", "--batch-size", "32",
            "--epochs", "3", "--threads", "1", "--quiet", "--stats-sample", "0", "--no-report", "--norm", "none",
            "--checkpoint-every", "5", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-cli")
    out = root / "run"
    done = subprocess.run([*_torchrun(), *_train_args(data, out)], capture_output=True, text=True, timeout=200,
                          env=_env(), cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, out, done


def _weights_close(a: Path, b: Path, tol=1e-5) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= tol, k


def _same_metrics(a: Path, b: Path) -> None:
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "timing")} for r in rows]
    assert strip(json.loads((a / "metrics.json").read_text())) == strip(json.loads((b / "metrics.json").read_text()))


def test_torchrun_deepscope_train_writes_one_run_as_a_single_process_would(data, ddp_run, tmp_path):
    root, out, done = ddp_run
    assert done.stdout.count("done in") == 1  # rank 0 speaks for the job
    assert sorted(p.name for p in root.iterdir()) == ["run"]  # one run folder, nothing else from rank 1
    single = tmp_path / "single"
    one = _run([sys.executable, *_train_args(data, single)])
    assert one.returncode == 0, one.stderr
    _weights_close(single, out)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (single, out))
    for ra, rb in zip(ma, mb):
        assert ra["valid_accuracy"] == rb["valid_accuracy"]
        assert ra["valid_loss"] == pytest.approx(rb["valid_loss"], abs=1e-5)


def test_a_killed_torchrun_job_resumes(data, ddp_run, tmp_path):
    root, reference, _ = ddp_run
    out = tmp_path / "run"
    proc = subprocess.Popen([*_torchrun(), *_train_args(data, out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    target = tmp_path / "run.partial" / "checkpoints" / "step-00000020.safetensors"  # mid-epoch 2 (16 a epoch)
    deadline = time.monotonic() + 120
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # torchrun and both ranks at once (the ranks run in sessions of their own): every process whose command
    # line names this run
    subprocess.run(["pkill", "-KILL", "-f", str(out)], check=False)
    proc.wait(30)
    time.sleep(0.5)
    assert (tmp_path / "run.partial").is_dir() and not out.exists(), "the job ended before it was killed"
    resumed = _run([*_torchrun(), *_train_args(data, out)[:3], "--resume", str(out), "--quiet"], timeout=200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _weights_close(reference, out, tol=0)  # the same job, bit for bit
    _same_metrics(reference, out)  # each rank's running sums were resumed, not rank 0's on both


def test_two_nodes_meet_through_a_c10d_rendezvous(data, ddp_run, tmp_path):
    root, reference, _ = ddp_run
    port, out = _port(), tmp_path / "run"
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "deepscope-test",
                               *_train_args(data, out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(), cwd=tmp_path) for _ in range(2)]
    try:
        results = [n.communicate(timeout=200) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert all(n.returncode == 0 for n in nodes), [r[1][-2000:] for r in results]
    _weights_close(reference, out)


@pytest.mark.gpu
def test_nccl_on_gpus_with_sync_batchnorm(data, tmp_path):
    """On a machine with 2 GPUs or more: NCCL, one GPU per process, SyncBatchNorm (skips elsewhere)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    out = tmp_path / "run"
    args = [a for a in _train_args(data, out) if a not in ("--norm", "none")]
    done = _run([*_torchrun(), *args, "--sync-batchnorm", "--device", "auto"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").is_file()


def test_rank_findings_reach_rank_0_with_the_rank_named():
    from deepscope.diagnose import Finding
    from deepscope.diagnose.callback import merge_rank_findings

    own = [Finding("lr_too_high", "", "error", "The loss rose.", "Lower the lr.")]
    other = [Finding("lr_too_high", "", "error", "The loss rose.", "Lower the lr.").to_dict(),
             Finding("nonfinite_forward", "", "error", "The input held NaN at step 3.", "Clean the data.",
                     {"step": 3}).to_dict()]
    merged = merge_rank_findings(own, [[f.to_dict() for f in own], other])
    assert [f.kind for f in merged].count("lr_too_high") == 1  # found by both: once
    added = next(f for f in merged if f.kind == "nonfinite_forward")
    assert added.message.startswith("On rank 1: ") and added.evidence == {"step": 3, "rank": 1}


def test_sigterm_stops_every_rank_at_the_same_boundary(data, ddp_run, tmp_path):
    """A cluster's SIGTERM reaches the ranks at slightly different moments: they agree on one batch boundary,
    write one whole checkpoint there, and the job resumes to the same weights."""
    root, reference, _ = ddp_run
    out = tmp_path / "run"
    proc = subprocess.Popen([*_torchrun(), *_train_args(data, out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    target = tmp_path / "run.partial" / "checkpoints" / "step-00000010.safetensors"
    deadline = time.monotonic() + 120
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    subprocess.run(["pkill", "-TERM", "-f", str(out)], check=False)  # torchrun and both ranks
    _, stderr = proc.communicate(timeout=120)
    assert "EnforceNotMet" not in stderr and "collective mismatch" not in stderr, stderr[-3000:]
    partial = tmp_path / "run.partial"
    stopped = json.loads((partial / "config.json").read_text())["options"].get("stopped_at_step")
    assert stopped is not None and step_checkpoints(partial / "checkpoints")[-1].name == f"step-{stopped:08d}.safetensors"
    resumed = _run([*_torchrun(), *_train_args(data, out)[:3], "--resume", str(out), "--quiet"], timeout=200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _weights_close(reference, out, tol=0)
    _same_metrics(reference, out)
