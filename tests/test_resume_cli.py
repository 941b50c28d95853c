"""`deepscope train` survives: SIGKILL at a random step and --resume give the uninterrupted run bit for bit;
Ctrl-C/SIGTERM stop at a batch boundary with a checkpoint, a report and the command that resumes."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import write_tiny_dataset
from deepscope.checkpoint import load_checkpoint, step_checkpoints, step_name

BATCHES_PER_EPOCH = 40  # 640 training images in batches of 16
EPOCHS = 4  # 160 steps


def _args(data, out, *extra):
    return [sys.executable, "-m", "deepscope", "train", "--data-dir", str(data), "--no-verify", "--nfs", "4", "8",
            "--batch-size", "16", "--epochs", str(EPOCHS), "--threads", "1", "--quiet", "--device", "cpu",
            "--checkpoint-every", "7", "--no-report", "--out", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _run(args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_tiny_dataset(root / "data", n_train=BATCHES_PER_EPOCH * 16, n_test=64)
    ref = root / "ref"
    # in this process (no interpreter start-up): the resumed runs, in other processes, must match it bit for bit
    from deepscope.cli import main

    assert main(_args(data, ref)[3:]) == 0
    return root, data, ref


def _same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa), "final weights differ"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "timing")} for r in rows]
    assert strip(json.loads((a / "metrics.json").read_text())) == strip(json.loads((b / "metrics.json").read_text()))
    assert json.loads((a / "recorder.json").read_text()) == json.loads((b / "recorder.json").read_text())
    sa, sb = np.load(a / "stats.npz"), np.load(b / "stats.npz")
    for key in ("steps", "act_mean", "act_std", "act_hist", "grad_norm", "update_ratio"):
        assert np.array_equal(sa[key], sb[key], equal_nan=True), key


def _wait_for(path: Path, proc: subprocess.Popen, limit=90.0) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.stderr.read()}"
        assert time.monotonic() - start < limit, f"{path.name} did not appear"
        time.sleep(0.002)


def test_sigkill_at_a_random_step_then_resume_is_bit_exact(setup, tmp_path):
    root, data, ref = setup
    rng = random.Random()
    # a checkpoint step inside an epoch (checkpoints every 7 steps); the kill lands a few steps after it
    step = rng.choice([s for s in range(7, 2 * BATCHES_PER_EPOCH, 7) if 5 <= s % BATCHES_PER_EPOCH <= 25])
    out = tmp_path / "run"
    proc = subprocess.Popen(_args(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(out.with_name("run.partial") / "checkpoints" / step_name(step), proc)
        proc.kill()  # SIGKILL: no clean-up of any kind
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, f"killed after checkpoint {step}"
    latest = step_checkpoints(out.with_name("run.partial") / "checkpoints")[-1]
    progress = load_checkpoint(latest)["progress"]
    assert 0 < progress["batch"] < BATCHES_PER_EPOCH, f"not mid-epoch: {progress} (kill after step {step})"
    resumed = _run(_args(data, out)[:4] + ["--resume", str(out), "--quiet", "--no-report"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"from {latest.name}" in resumed.stderr
    _same_run(ref, out)


def test_sigterm_stops_at_a_batch_boundary_keeps_a_report_and_says_how_to_resume(setup, tmp_path):
    root, data, ref = setup
    out = tmp_path / "run"
    args = [a for a in _args(data, out) if a != "--no-report"]  # the stopped run writes a report of what ran
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for(out.with_name("run.partial") / "checkpoints" / step_name(21), proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    partial = out.with_name("run.partial")
    assert f"Resume it with: deepscope train --resume {out}" in stderr
    assert "stopping at the next batch boundary" in stderr and "Traceback" not in stderr
    for name in ("report.html", "metrics.json", "recorder.json", "stats.npz", "config.json"):
        assert (partial / name).is_file(), name
    stopped = json.loads((partial / "config.json").read_text())["options"]["stopped_at_step"]
    page = (partial / "report.html").read_text()
    assert f"Stopped</b> after training step {stopped}" in page and f"deepscope train --resume {out}" in page
    latest = step_checkpoints(partial / "checkpoints")[-1]
    assert latest.name == step_name(stopped)  # the checkpoint is the step it stopped at, not an older one
    assert len(json.loads((partial / "recorder.json").read_text())["loss"]) == stopped
    assert not out.exists()
    from deepscope.cli import main

    assert main(["train", "--resume", str(partial), "--no-report"]) == 0  # in-process: the stop was the subprocess's
    _same_run(ref, out)
    assert not partial.exists() and not (out / "report.html").exists()  # --no-report of the resume is honoured


def test_what_resume_refuses_and_a_damaged_checkpoint(setup, tmp_path, capsys):
    root, data, ref = setup
    out = tmp_path / "run"
    proc = subprocess.Popen(_args(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(out.with_name("run.partial") / "checkpoints" / step_name(14), proc)
        proc.kill()
    finally:
        proc.wait(30)
    from deepscope.cli import main

    def cli(*args):
        return main(["train", *args])

    # in this process from here on: only the kill above needs a process of its own
    capsys.readouterr()
    assert main(["runs", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert f"resume with `deepscope train --resume {out}`" in listed, listed
    # a new run into the same --out would lose the checkpoints: refused, with both ways on
    assert main(_args(data, out)[3:]) == 2
    new = capsys.readouterr().err
    assert f"--resume {out}" in new and "--overwrite" in new, new
    assert step_checkpoints(out.with_name("run.partial") / "checkpoints")
    assert cli("--resume", str(out), "--lr", "0.5") == 2
    assert cli("--resume", str(tmp_path / "nothing")) == 2
    assert cli("--resume", str(ref)) == 2  # complete
    # another config.json than the checkpoints were taken with
    config_path = out.with_name("run.partial") / "config.json"
    config = json.loads(config_path.read_text())
    config["config"]["lr"] = 0.5
    config_path.write_text(json.dumps(config))
    capsys.readouterr()
    assert cli("--resume", str(out)) == 2
    changed = capsys.readouterr().err
    assert "lr: 0.01 in the checkpoint, 0.5 in config.json" in changed, changed
    config["config"]["lr"] = 0.01
    config_path.write_text(json.dumps(config))
    # a damaged newest checkpoint is skipped, saying so, and the run resumes from the one before, exactly
    latest = step_checkpoints(out.with_name("run.partial") / "checkpoints")[-1]
    blob = bytearray(latest.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    latest.write_bytes(bytes(blob))
    capsys.readouterr()
    assert cli("--resume", str(out), "--no-report") == 0
    resumed = capsys.readouterr().err
    assert f"skipping {latest.name}" in resumed and "corrupt" in resumed, resumed
    _same_run(ref, out)


def test_resume_with_a_setting_names_it(capsys, setup):
    from deepscope.cli import main

    root, data, ref = setup
    assert main(["train", "--resume", str(ref), "--epochs", "9"]) == 2
    assert "drop --epochs" in capsys.readouterr().err


def test_step_flags_map_to_callbacks(setup, tmp_path, capsys):
    from deepscope.callbacks import EarlyStopping, GradClip, MixedPrecision
    from deepscope.config import TrainConfig
    from deepscope.recipe import build_learner
    from deepscope.data import image_dls

    root, data, ref = setup
    config = TrainConfig(data_dir=str(data), verify=False, nfs=[4, 8], clip=0.5, precision="bf16", early_stop=2)
    learn = build_learner(config, image_dls("fashion_mnist", str(data), 16, verify=False), progress=False)
    assert learn.get_cb(GradClip).max_norm == 0.5
    assert learn.get_cb(EarlyStopping).patience == 2
    import torch

    assert learn.get_cb(MixedPrecision).dtype == torch.bfloat16
    from deepscope.cli import main

    assert main(["train", "--data-dir", str(data), "--no-verify", "--nfs", "4", "--batch-size", "32", "--epochs", "2",
                 "--limit-batches", "4", "--quiet", "--no-stats", "--clip", "0.5", "--precision", "bf16",
                 "--early-stop", "1", "--no-report", "--out", str(tmp_path / "r")]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert (saved["clip"], saved["precision"], saved["early_stop"]) == (0.5, "bf16", 1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:  # argparse's refusal, in this process
        main(["train", "--precision", "fp8"])
    assert bad.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_closed_output_pipe_stops_quietly_and_keeps_the_run(setup, tmp_path):
    root, data, ref = setup
    out = tmp_path / "run"
    args = [a for a in _args(data, out) if a != "--quiet"]  # the per-epoch table goes to stdout
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    proc.stdout.readline()  # the table's header, then the reader goes away (`| head -1`)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(60) == 1 and "Traceback" not in stderr, stderr
    assert step_checkpoints(out.with_name("run.partial") / "checkpoints")  # the work is kept to be resumed


def test_resume_drops_what_was_exported_from_the_unfinished_run(setup, tmp_path):
    from deepscope.runfolder import EXPORT, RunFolder

    root, data, ref = setup
    partial = tmp_path / "run.partial"
    partial.mkdir()
    (partial / ".deepscope-run.json").write_text(json.dumps({"tool": "deepscope", "kind": "train", "state": "writing"}))
    (partial / EXPORT).mkdir()
    (partial / EXPORT / "model.pt2").write_bytes(b"old")
    run = RunFolder.reopen(tmp_path / "run")
    try:
        run.discard(EXPORT)
    finally:
        run._release()
    assert not (partial / EXPORT).exists() and partial.is_dir()
