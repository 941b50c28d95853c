"""The safety contract of the command line, tried as a user would: every way out of `deepscope train`
(an error, Ctrl-C, SIGTERM, kill -9, a full disk, a second process) leaves the old run intact or the new
one complete and says so; every bad input is one clear message with exit 2, never a traceback."""
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_dataset
from deepscope.cli import main
from deepscope.runfolder import MARKER, is_run_folder, read_marker

FAST = ["--no-verify", "--nfs", "4", "8", "--threads", "1", "--epochs", "1"]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "deepscope", *map(str, args)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), n_train=256, n_test=64)


@pytest.fixture(scope="module")
def old_run(data, tmp_path_factory):
    """A finished run to protect; each test copies it."""
    out = tmp_path_factory.mktemp("old") / "run"
    assert main(["train", "--data-dir", str(data), *FAST, "--out", str(out), "--quiet"]) == 0  # in this process
    assert is_run_folder(out) and (out / "report.html").is_file()
    return out


def copy_run(src: Path, dest: Path) -> Path:
    for path in src.rglob("*"):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dest


def start_long_run(data, out, *extra) -> subprocess.Popen:
    """A training run that lasts long enough to be interrupted; returns once it is writing its staging folder."""
    proc = subprocess.Popen(cli("train", "--data-dir", data, *FAST[:-2], "--epochs", "500", "--batch-size", "16",
                                "--no-report", "--out", out, *extra), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    staging = Path(str(out) + ".partial")
    deadline = time.monotonic() + 60
    while not (staging / "stats.npz").exists() and not staging.is_dir() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # into the training loop (data loaded, a few epochs run)
    assert proc.poll() is None, proc.communicate()
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_training_keeps_the_old_run_and_says_so(sig, code, said, data, old_run, tmp_path):
    out = copy_run(old_run, tmp_path / "run")
    before = tree(out)
    proc = start_long_run(data, out, "--overwrite")
    checkpoints = Path(str(out) + ".partial") / "checkpoints"
    deadline = time.monotonic() + 60
    while not list(checkpoints.glob("step-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)  # training: an epoch has ended and written its checkpoint
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert said in stderr and "old run" in stderr and "intact" in stderr
    assert "Traceback" not in stderr
    assert tree(out) == before
    # the new run's work is kept to be resumed (tests/test_resume_cli.py resumes one)
    assert f"--resume {out}" in stderr and list(checkpoints.glob("step-*.safetensors"))


@pytest.mark.slow
def test_kill_9_leaves_the_old_run_and_the_next_run_cleans_up(data, old_run, tmp_path, capsys):
    out = copy_run(old_run, tmp_path / "run")
    before = tree(out)
    proc = start_long_run(data, out, "--overwrite")
    proc.kill()
    proc.communicate(timeout=30)
    assert tree(out) == before, "kill -9 mid-run must not touch the old run"
    assert read_marker(Path(str(out) + ".partial"))["state"] == "writing"
    capsys.readouterr()
    code = main(["train", "--data-dir", str(data), *FAST, "--out", str(out), "--overwrite", "--no-report"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "interrupted run" in err
    assert is_run_folder(out) and not Path(str(out) + ".partial").exists()
    assert tree(out) != before


@pytest.mark.slow
def test_a_second_process_cannot_write_into_the_same_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    first = start_long_run(data, out)
    try:
        capsys.readouterr()
        code = main(["train", "--data-dir", str(data), *FAST, "--out", str(out), "--overwrite"])  # this process
        second = capsys.readouterr().err
        assert code == 2, second
        assert "another deepscope process" in second and str(first.pid) in second
    finally:
        first.terminate()
        _, stderr = first.communicate(timeout=60)
    # the first run's work is kept to be resumed when it had reached a checkpoint, else nothing is left
    partial = Path(str(out) + ".partial")
    assert not out.exists() and (not partial.exists() or f"--resume {out}" in stderr)


def _limit_file_size(limit: int):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


@pytest.mark.slow
def test_a_full_disk_while_writing_results_keeps_the_old_run(data, old_run, tmp_path):
    out = copy_run(old_run, tmp_path / "run")
    before = tree(out)
    # 64 KiB: the config fits, the first checkpoint and the weights of this wider model (~0.5 MB) do not.
    done = subprocess.run(cli("train", "--data-dir", data, *FAST, "--nfs", "32", "64", "128", "--out", out,
                              "--overwrite"), env=env(), capture_output=True, text=True,
                          preexec_fn=_limit_file_size(64 * 1024))
    assert done.returncode == 2, done.stderr
    assert "File too large: " in done.stderr and ".safetensors" in done.stderr and "Traceback" not in done.stderr
    assert "old run" in done.stderr and "intact" in done.stderr
    assert tree(out) == before and not Path(str(out) + ".partial").exists()


@pytest.mark.slow
def test_a_failed_report_keeps_the_finished_run(data, tmp_path):
    out = tmp_path / "run"
    # 200 KiB: every result file fits, the report (plots inlined, ~400 KB) does not.
    done = subprocess.run(cli("train", "--data-dir", data, *FAST, "--out", out), env=env(), capture_output=True,
                          text=True, preexec_fn=_limit_file_size(200 * 1024))
    assert done.returncode == 1, done.stderr
    assert "could not write the report" in done.stderr and f"deepscope report {out}" in done.stdout
    assert is_run_folder(out)
    assert {"config.json", "metrics.json", "model.safetensors", "stats.npz"} <= set(read_marker(out)["files"])
    assert not (out / "report.html").exists()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()  # rebuilt, in this process
    assert "report.html" in read_marker(out)["files"], "a rebuilt report is recorded as deepscope's"


# --- bad input: one message, exit 2, nothing written ------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--device", "cuda"], "cuda"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--device", "tpu"], "device"),
    (["--lr", "inf"], "finite"), (["--lr", "nan"], "finite"), (["--weight-decay", "nan"], "finite"),
    (["--weight-decay", "-1"], "0 or positive"), (["--lr", "1e400"], "finite"),
    (["--threads", "99999"], "CPU core"), (["--threads", "0"], "positive"),
])
def test_bad_options_stop_before_the_data_is_read(args, message, tmp_path, capsys):
    if args[:2] == ["--device", "cuda"] or args[:2] == ["--device", "cuda:7"]:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 7:
            pytest.skip("this machine has the device")
    with pytest.raises(SystemExit) as info:
        main(["train", "--data-dir", str(tmp_path / "no-such-folder"), *args, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-folder" not in err
    assert not (tmp_path / "out").exists()


def test_lr_find_refuses_a_sweep_that_goes_down(tmp_path, capsys):
    code = main(["lr-find", "--data-dir", str(tmp_path), "--start-lr", "1", "--end-lr", "0.1", "--out", str(tmp_path / "o")])
    assert code == 2 and "--start-lr" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("n_train, blank, message", [(0, False, "holds no images"), (64, True, "blank")])
def test_empty_or_blank_training_images_are_refused(n_train, blank, message, tmp_path, capsys):
    import numpy as np

    from deepscope.data.idx import write_idx

    folder = write_tiny_dataset(tmp_path / "data", n_train=n_train, n_test=16)
    if blank:
        write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((n_train, 28, 28), np.uint8))
    code = main(["train", "--data-dir", str(folder), *FAST, "--out", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def _run_folder(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"config": {}, "environment": {}}')
    (run / "metrics.json").write_text('[{"epoch": 1, "train_loss": 0.5, "valid_loss": 0.6}]')
    return run


@pytest.mark.parametrize("name, text, message", [
    ("metrics.json", "{", "not valid JSON"),
    ("metrics.json", '{"epoch": 1}', "JSON list"),
    ("metrics.json", "[1, 2]", "epoch record 0"),
    ("metrics.json", '[{"epoch": "one"}]', "'epoch' should be a number"),
    ("config.json", "[]", "JSON object"),
    ("config.json", '{"config": "lr=1"}', "'config' should be"),
    ("recorder.json", '{"loss": ["x"]}', "list of numbers"),
    ("findings.json", '{"kind": "x"}', "JSON list"),
    ("findings.json", '["nan"]', "finding 0"),
    ("lr_find.json", '{"lrs": [1, 2], "losses": [1]}', "must match"),
    ("stats.npz", "not a zip", "stats"),
    ("ablation.csv", b"\xff\xfe\x00bad", "CSV"),
])
def test_report_on_a_malformed_run_file_is_a_clear_error(name, text, message, tmp_path, capsys):
    run = _run_folder(tmp_path)
    path = run / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and name in err and "Traceback" not in err
    assert not (run / "report.html").exists(), "nothing half-written"


def test_report_on_a_missing_or_non_run_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a deepscope run folder" in capsys.readouterr().err


def test_report_accepts_metrics_whose_epochs_differ_in_columns(tmp_path):
    run = _run_folder(tmp_path)
    (run / "metrics.json").write_text('[{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "valid_loss": null}]')
    assert main(["report", str(run)]) == 0
    assert "valid_loss" in (run / "report.html").read_text()


@pytest.mark.parametrize("command", ["train", "doctor", "lr-find", "ablate"])
def test_every_command_refuses_a_parent_folder_and_a_users_folder(command, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "parent"
    (parent / "child").mkdir(parents=True)
    (parent / "mine.txt").write_text("mine")
    monkeypatch.chdir(parent / "child")
    before = tree(parent)
    for out in ("..", ".", str(parent)):
        assert main([command, "--data-dir", str(tmp_path), "--out", out, "--overwrite"]) == 2
        assert "current folder" in capsys.readouterr().err
    assert main([command, "--data-dir", str(tmp_path), "--out", str(parent), "--overwrite"]) == 2
    assert tree(parent) == before


def test_training_to_nan_is_a_failure_not_a_success(data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(data), *FAST, "--lr", "1e30", "--schedule", "constant", "--opt", "sgd",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "training failed" in captured.out and "nan" in captured.out.lower()
    assert "done in" not in captured.out
    assert is_run_folder(out), "the failed run is kept to be looked at"
    import json

    findings = json.loads((out / "findings.json").read_text())
    assert any(f["kind"] == "diverged" and f["severity"] == "error" for f in findings), findings


def test_limit_batches_says_what_was_measured(data, tmp_path, capsys):
    assert main(["train", "--data-dir", str(data), *FAST, "--limit-batches", "1", "--batch-size", "16",
                 "--no-report", "--out", str(tmp_path / "run")]) == 0
    assert "valid accuracy" in (out := capsys.readouterr().out) and "on 32 of 64 test images" in out


@pytest.mark.slow
def test_quiet_silences_the_bars_on_a_terminal_and_keeps_the_table(data, tmp_path):
    import pty

    def run(*extra) -> str:
        import fcntl
        import struct
        import termios

        leader, follower = pty.openpty()  # a real terminal, where bars would show
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # 100 columns wide
        proc = subprocess.Popen(cli("train", "--data-dir", data, *FAST, "--batch-size", "16", "--no-report",
                                    "--out", tmp_path / f"run{len(extra)}", *extra),
                                env=env(), stdin=follower, stdout=follower, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=120)
        os.close(leader)
        assert proc.returncode == 0
        return b"".join(chunks).decode(errors="replace")

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # both runs at once: each takes one thread of the two cores
        loud, quiet_out = pool.submit(run), pool.submit(run, "--quiet")
        loud, quiet_out = loud.result(), quiet_out.result()
    assert "it/s]" in loud or "s/it]" in loud, "the bars show on a terminal without --quiet"
    assert "it/s]" not in quiet_out and "s/it]" not in quiet_out
    assert "valid_accuracy" in quiet_out and "done in" in quiet_out


@pytest.mark.parametrize("damage", ["no columns", "short rows", "strings", "edges", "notes", "pickle"])
def test_report_on_a_stats_file_whose_arrays_do_not_fit(damage, tmp_path, capsys):
    import numpy as np

    from deepscope.stats import load_stats, save_stats
    from deepscope.stats.format import Stats

    run = _run_folder(tmp_path)
    T, M, P, B = 3, 2, 1, 4
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    stats = Stats(modules=["a", "b"], steps=np.arange(T), weights=np.ones(T, np.int64), act_mean=z(T, M),
                  act_std=z(T, M), act_min=z(T, M), act_max=z(T, M), act_dead=z(T, M), act_nonfinite=z(T, M),
                  act_hist=z(T, M, B), hist_edges=np.linspace(0, 1, B + 1), grad_mean=z(T, M), grad_std=z(T, M),
                  grad_norm=z(T, M), grad_nonfinite=z(T, M), param_modules=["a"], weight_norm=z(T, P),
                  param_grad_norm=z(T, P), update_ratio=z(T, P), dead_threshold=1e-3, module_notes=["", ""])
    save_stats(stats, run)
    assert load_stats(run).modules == ["a", "b"]
    with np.load(run / "stats.npz") as f:
        arrays = dict(f)
    if damage == "no columns":
        arrays["act_mean"] = z(T, 0)
    elif damage == "short rows":
        arrays["act_std"] = z(1, M)
    elif damage == "strings":
        arrays["grad_norm"] = np.array([["x"] * M] * T)
    elif damage == "edges":
        arrays["hist_edges"] = np.array(["a", "b"])
    elif damage == "notes":
        arrays["module_notes"] = np.array(["only one"])
    if damage == "pickle":
        np.savez(run / "stats.npz", **arrays, junk=np.array([object()], dtype=object))
    else:
        np.savez(run / "stats.npz", **arrays)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "stats.npz" in err and "Traceback" not in err
    assert not (run / "report.html").exists()


def test_config_and_recipe_name_the_same_optimizers():
    from deepscope import config, recipe

    assert set(config.OPTIMIZER_NAMES) == set(recipe.OPTIMIZER_NAMES)


@pytest.mark.parametrize("args, message", [
    (["--lr", "1e300"], "float32"), (["--weight-decay", "1e39"], "float32"),
    (["--seed", "99999999999999999999999"], "seed"), (["--stats-sample", "99999999999"], "stats sample"),
    (["--act", "bogus"], "unknown activation"), (["--opt", "bogus"], "unknown optimizer"),
])
def test_out_of_range_values_are_refused_before_any_folder_is_made(args, message, tmp_path, capsys):
    try:
        code = main(["train", "--data-dir", str(tmp_path / "nothing-here"), *args, "--out", str(tmp_path / "out")])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "nothing-here" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_report_will_not_replace_a_report_it_cannot_tell_it_wrote(tmp_path, capsys):
    run = _run_folder(tmp_path)
    (run / "report.html").write_text("my own notes")
    assert main(["report", str(run)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run / "report.html").read_text() == "my own notes"
    assert main(["report", str(run), "--overwrite"]) == 0
    assert "<html" in (run / "report.html").read_text().lower()


def test_empty_batches_are_a_data_error():
    from torch import nn

    from deepscope import DataLoaders, Learner
    from deepscope.errors import DataError

    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    learn = Learner(nn.Linear(3, 2), DataLoaders([(x, y), (x[:0], y[:0])], None))
    with pytest.raises(DataError, match="batch 1 holds no items"):
        learn.fit(1)


def test_leftover_staging_with_a_users_file_is_not_removed(tmp_path):
    from deepscope.errors import OutputError
    from deepscope.runfolder import RunFolder

    out = tmp_path / "run"
    run = RunFolder.prepare(out, "train", log=lambda m: None)
    run.file("config.json").write_text("half")
    (run.path / "tensorboard").mkdir()
    (run.path / "tensorboard" / "events.out").write_text("e")
    run._release()  # what kill -9 leaves
    (run.path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        RunFolder.prepare(out, "train", log=lambda m: None)
    assert (run.path / "notes.txt").read_text() == "mine"
    assert not (run.path / "config.json").exists() and not (run.path / "tensorboard").exists(), "its own files went"


def test_ablate_with_a_diverging_lr_is_a_failure(data, tmp_path, capsys):
    code = main(["ablate", "--data-dir", str(data), "--no-verify", "--norms", "none", "--batch-sizes", "16",
                 "--variants", "default-relu", "--max-batches", "5", "--lr", "1e30", "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert code == 1 and "training failed in 1 of 1 runs" in out


def test_train_prints_the_errors_diagnosis_found(data, tmp_path, capsys, monkeypatch):
    from deepscope.diagnose import Finding
    from deepscope.diagnose import callback as diagnose_callback

    # a finding from the run's history, as a real divergence would give, without the cost of training one
    from deepscope.diagnose.analysis import Analysis

    monkeypatch.setattr(diagnose_callback, "analyse_run", lambda record: Analysis(
        [Finding("lr_too_high", "", "error", "The training loss spiked.", "Lower the lr.")], ["a check"], [], 7))
    assert main(["train", "--data-dir", str(data), *FAST, "--no-report", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "diagnosis found 1 error(s), 0 warning(s), causes first" in out
    assert "error lr_too_high: The training loss spiked." in out and "  fix: Lower the lr." in out
    assert "diagnosis: 1 check on 7 steps: 1 problem found." in out  # what was checked, always printed
