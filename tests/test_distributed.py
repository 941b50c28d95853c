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
from deepscope.callbacks import Checkpoint, Compile, Distributed, MetricsCallback, OneCycle, Recorder
from deepscope.checkpoint import save_checkpoint
from deepscope.data.loaders import DataLoaders, TensorBatches

out, fail_at = sys.argv[1], int(sys.argv[2])
graphs = []  # with a third argument "compile": the graphs torch.compile captured (run as captured)
compiling = [Compile(lambda gm, inputs: graphs.append(len(gm.graph.nodes)) or gm.forward)] if sys.argv[3:] == ["compile"] else []
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(321, 12, generator=g)
y = (x[:, 0] + x[:, 1] > 0).long()
x[:, -1] = torch.arange(321).float()  # the item's id, to see which items each rank took; the model ignores it

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
            if learn.train_iter == 0:  # the chain of steps the forward pass goes through
                step, self.chain = learn.train_step, []
                while step is not None:
                    self.chain.append(type(step).__name__)
                    step = getattr(step, "inner", None)
            self.items[-1] += learn.xb[:, -1].long().tolist()
            if learn.train_iter == fail_at and distributed.rank() == 1:
                raise ValueError("rank 1 fails on purpose")

torch.manual_seed(1)
dls = DataLoaders(TensorBatches(x[:256], y[:256], 32, shuffle=True, generator=torch.Generator().manual_seed(2)),
                  TensorBatches(x[256:], y[256:], 32), n_classes=2)  # 65 items: batches of 32, 32, 1 (rank 1 skips it)
seen = Seen()
learn = ds.Learner(Net(), dls, lr=1e-2, cbs=[MetricsCallback(), Recorder(), OneCycle(1e-2), seen,
                   ds.ActivationStats(subsample=None, valid=True, flush_every=2),  # blocks fill mid-validation
                   Checkpoint(out + "/ckpt", every=5, monitor=None),
                   Distributed(), *compiling])
learn.fit(3)
json.dump(seen.items, open(f"{out}/seen{distributed.rank()}.json", "w"))
json.dump({"chain": seen.chain, "graphs": len(graphs)}, open(f"{out}/steps{distributed.rank()}.json", "w"))
if distributed.is_main():
    s = learn.get_cb(ds.ActivationStats).stats()
    save_checkpoint(f"{out}/result.safetensors", {
        "model": learn.model.state_dict(), "history": learn.get_cb(MetricsCallback).history,
        "losses": learn.get_cb(Recorder).losses,
        **{k: getattr(s, k) for k in ("steps", "act_mean", "act_std", "act_dead", "act_hist", "grad_norm")},
        **s.valid})
    json.dump({"observations": s.observations, "structure": s.structure}, open(f"{out}/stats.json", "w"))
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
    two = _run([*_torchrun(), str(script), str(ddp), "-1", "compile"])  # and through torch.compile
    assert two.returncode == 0, two.stderr[-3000:]
    for rank in (0, 1):  # torch.compile captured DistributedDataParallel's forward on every rank
        steps = json.loads((ddp / f"steps{rank}.json").read_text())
        assert steps["chain"] == ["CompiledStep", "DistributedStep", "TrainStep"] and steps["graphs"] > 0, steps
    a, b = load_checkpoint(single / "result.safetensors"), load_checkpoint(ddp / "result.safetensors")
    for k in a["model"]:
        assert (a["model"][k] - b["model"][k]).abs().max() <= 1e-5, k
    for ra, rb in zip(a["history"], b["history"]):
        for key in ("train_loss", "valid_loss", "valid_accuracy"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), key
    assert np.allclose(a["losses"], b["losses"], atol=1e-6)
    for key in ("act_mean", "act_std", "act_dead", "act_hist", "grad_norm"):
        assert np.allclose(a[key], b[key], rtol=1e-4, atol=1e-6, equal_nan=True), key
    # validation statistics: combined across ranks at the end of each pass, row i of every rank being its share of
    # batch i; rank 1 has no item in the last batch (65 = 32 + 32 + 1) and adds an empty row, no collective hangs
    assert list(a["valid_steps"]) == [8] * 3 + [16] * 3 + [24] * 3 and len(b["valid_steps"]) == 9
    for key in ("valid_steps", "valid_weights", "valid_act_mean", "valid_act_std", "valid_act_min", "valid_act_max",
                "valid_act_dead", "valid_act_hist"):
        assert np.allclose(a[key], b[key], rtol=1e-4, atol=1e-6, equal_nan=True), key
    # the loop's observations and the structure describe the whole batch, not rank 0's share
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (single, ddp))
    oa, ob = sa["observations"], sb["observations"]
    assert ob["label_batches"] == oa["label_batches"] == 24 and ob["batch_sizes"] == oa["batch_sizes"] == [32] * 24
    for key in ("batch_classes", "class_counts", "targets_seen", "updates"):
        assert ob[key] == oa[key], key
    assert np.allclose(ob["batch_label_means"], oa["batch_label_means"], atol=2e-5)
    assert sb["structure"]["input_std"] == pytest.approx(sa["structure"]["input_std"], rel=1e-4)
    ca, cb = sa["structure"]["census"]["modules"], sb["structure"]["census"]["modules"]
    assert ca.keys() == cb.keys() and ca
    for name in ca:
        for key in ("dead", "first_dead", "units", "steps", "censuses"):
            assert cb[name][key] == pytest.approx(ca[name][key], abs=1e-6), (name, key)
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
        for r in (ra, rb):  # samples/s is the job's: every process's items over the training pass's seconds
            t = r["timing"]
            assert t["samples_per_s"] * t["train_seconds"] == pytest.approx(512, rel=1e-6)  # 16 batches of 32
    _same_observations(single, out)
    environments = [json.loads((d / "config.json").read_text())["environment"] for d in (single, out)]
    assert [e["processes"] for e in environments] == [1, 2]  # how many processes trained is recorded


def _same_observations(a: Path, b: Path) -> None:
    """stats.npz's observations of the loop describe the global batches (sizes, classes, class counts)."""
    from deepscope.stats import load_stats

    oa, ob = (load_stats(d / "stats.npz").observations for d in (a, b))
    assert oa["label_batches"] == ob["label_batches"] == 48 and set(ob["batch_sizes"]) == {32}
    means = "batch_label_means"
    assert {k: v for k, v in oa.items() if k != means} == {k: v for k, v in ob.items() if k != means}
    assert np.allclose(oa[means], ob[means], atol=2e-5)


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
    _same_observations(reference, out)  # the combined observations, resumed


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


def test_batchnorm_is_judged_on_the_batch_each_process_sees():
    """One definition of a BatchNorm batch too small (diagnosis's check, BN_SMALL_BATCH), judged per process: the
    finding under DDP, and the warning the Distributed callback prints from it. In-process: world sizes as given."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from deepscope.callbacks.distributed import batchnorm_warning
    from deepscope.data.loaders import TensorBatches
    from deepscope.diagnose.preflight import last_batch_size, process_batch_size
    from deepscope.diagnose.records import SetupRecord
    from deepscope.diagnose.setup_checks import analyse_setup, check_batchnorm_batch
    from deepscope.diagnose.thresholds import BN_SMALL_BATCH

    assert check_batchnorm_batch(["bn"], BN_SMALL_BATCH, BN_SMALL_BATCH, world_size=2) == []
    (f,) = check_batchnorm_batch(["bn"], 4, 4, world_size=2)
    assert f.severity == "warning" and "4 samples per process (8 over 2 processes" in f.message
    assert {k: f.evidence[k] for k in ("batch_size", "last_batch_size", "per_process_batch_size",
                                       "global_batch_size", "world_size", "sync_batchnorm")} == \
        {"batch_size": 4, "last_batch_size": 4, "per_process_batch_size": 4, "global_batch_size": 8, "world_size": 2,
         "sync_batchnorm": False}
    # SyncBatchNorm normalises over the global batch: 4 per process over 2 is 8, not small; 2 over 2 is
    assert check_batchnorm_batch(["bn"], 4, 4, world_size=2, synced=["bn"]) == []
    (f,) = check_batchnorm_batch(["bn"], 2, 2, world_size=2, synced=["bn"])
    assert f.evidence["batch_size"] == 4 and "per process" not in f.message and "SyncBatchNorm" in f.message
    # one layer left unsynchronised (deepscope's BatchNorm is not converted) sees its process's share
    (f,) = check_batchnorm_batch(["a", "b"], 4, 4, world_size=2, synced=["a"])
    assert f.module == "b" and "per process" in f.message
    # the pre-flight record under DDP: the per-process batch, and this process's share of the last batch
    x, y = torch.randn(98, 3), torch.zeros(98, dtype=torch.long)
    assert last_batch_size(TensorBatches(x, y, 16)) == 2
    sharded = TensorBatches(x, y, 16).shard(1, 2, even=True)
    assert (process_batch_size(sharded), last_batch_size(sharded)) == (8, 1)
    (f,) = analyse_setup(SetupRecord(batchnorms=["bn"], batch_size=8, last_batch_size=1, world_size=2))
    assert f.kind == "batchnorm_small_batch" and f.severity == "error" and "1 sample per process" in f.message
    # the callback's warning is that finding, on the per-process batch: 8 over 2 processes is 4 each...
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    warning = batchnorm_warning(model, TensorBatches(x[:96], y[:96], 8).shard(0, 2, even=True), 2)
    assert warning.startswith("deepscope: warning: BatchNorm") and "4 samples per process (8 over 2" in warning
    assert batchnorm_warning(model, TensorBatches(x[:96], y[:96], 16).shard(0, 2, even=True), 2) is None
    assert batchnorm_warning(nn.Linear(3, 4), TensorBatches(x[:96], y[:96], 8).shard(0, 2, even=True), 2) is None
    # ...while a DataLoader's batch_size is already per process (a DistributedSampler shares out the items)
    data = TensorDataset(x[:96], y[:96])
    loader = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    assert (process_batch_size(loader), last_batch_size(loader)) == (8, 8)
    assert batchnorm_warning(model, loader, 2) is None


def test_the_distributed_callback_prints_the_batchnorm_warning_once_on_rank_0(monkeypatch, capsys):
    import torch
    from torch import nn

    import deepscope as ds
    from deepscope import distributed
    from deepscope.callbacks import Distributed
    from deepscope.data.loaders import DataLoaders, TensorBatches

    monkeypatch.setattr(distributed, "init", lambda timeout_s, device: True)  # as if torchrun had started 2 processes
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda model, **kwargs: model)
    x, y = torch.randn(64, 3), torch.zeros(64, dtype=torch.long)
    for rank, printed in ((1, 0), (0, 1)):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        cb = Distributed()
        learn = ds.Learner(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
                           DataLoaders(TensorBatches(x, y, 8), TensorBatches(x, y, 8)))
        with torch.random.fork_rng():
            for _ in range(2):  # two fits (an LR sweep, then the fit): one warning
                cb.before_fit(learn)
                cb.cleanup_fit(learn)
        assert capsys.readouterr().err.count("4 samples per process (8 over 2 processes") == printed  # a warning: stderr


def test_the_backend_suits_the_device_trained_on(monkeypatch):
    from deepscope.distributed import backend_for

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a machine with GPUs
    assert [backend_for(d) for d in ("auto", None, "cuda", "cuda:1")] == ["nccl"] * 4
    assert backend_for("cpu") == "gloo"  # NCCL cannot carry CPU tensors: --device cpu on a GPU machine
    import torch

    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert backend_for("auto") == backend_for("cpu") == "gloo"


def test_each_rank_resumes_its_own_sampling_streams(monkeypatch):
    """Under DDP a rank that ran fewer validation batches has drawn less from its sampler: a checkpoint keeps
    every rank's streams, and each rank takes back its own (here rank 1 of 2, in one process)."""
    import torch

    from deepscope import distributed
    from deepscope.stats import StatsRecorder

    def recorder():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        rec = StatsRecorder(model, subsample=8, flush_every=4)
        rec.attach()
        return rec, model

    def steps(rec, model, n):
        for step in range(n):
            rec.start_step(step)
            model(torch.randn(16, 3)).sum().backward()
            rec.before_update()
            rec.after_update()
            rec.end_step()

    rank0, m0 = recorder()
    steps(rank0, m0, 3)
    rank1, m1 = recorder()
    steps(rank1, m1, 5)  # a different position in the same streams
    own0, own1 = rank0._sample.state_dict(), rank1._sample.state_dict()
    assert own0["host_rng"] != own1["host_rng"]
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: [obj, own1])
    monkeypatch.setattr(distributed, "all_reduce_", lambda t, op="sum": t)
    monkeypatch.setattr(distributed, "any_rank", lambda v: v)
    state = rank0.state_dict()
    assert len(state["sample"]["by_rank"]) == 2
    for rank, own in ((0, own0), (1, own1)):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        fresh, _ = recorder()
        fresh.load_state_dict(state)
        assert fresh._sample.state_dict()["host_rng"] == own["host_rng"], rank


def test_the_resume_command_has_the_runs_own_number_of_processes(tmp_path):
    from deepscope.recipe import resume_command

    final = tmp_path / "run"
    (tmp_path / "run.partial").mkdir()
    config = {"kind": "train", "config": {}, "options": {}, "data": {}, "environment": {"processes": 4}}
    (tmp_path / "run.partial" / "config.json").write_text(json.dumps(config))
    # asked from a single process (a refused resume, `deepscope runs`): still the run's 4 processes
    assert resume_command(final) == f"torchrun --nproc-per-node 4 -m deepscope train --resume {final}"
    config["environment"]["processes"] = 1
    (tmp_path / "run.partial" / "config.json").write_text(json.dumps(config))
    assert resume_command(final) == f"deepscope train --resume {final}"
