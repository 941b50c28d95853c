"""`deepscope train` end to end on small IDX files the tests write, and every bad input."""
import json

import numpy as np
import pytest

from deepscope.cli import main
from deepscope.data.idx import write_idx
from deepscope.weights import load_weights

FAST = ["--no-verify", "--epochs", "2", "--batch-size", "16", "--nfs", "4", "8", "--lr", "0.01", "--device", "cpu", "--no-stats"]


def train(data_dir, out, *extra):
    return main(["train", "--data-dir", str(data_dir), "--out", str(out), *FAST, *extra])


def test_train_writes_the_run_folder(tiny_data, tmp_path, capsys):
    assert train(tiny_data, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "epoch" in out and "valid_accuracy" in out and "done in" in out
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.json", "recorder.json", "model.safetensors", "report.html"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics] == [1, 2]
    assert all({"train_loss", "valid_loss", "valid_accuracy", "seconds"} <= set(r) for r in metrics)
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["batch_size"] == 16 and config["environment"]["torch"]
    from deepscope.models import cnn

    load_weights(cnn(nfs=(4, 8), norm="batch"), run / "model.safetensors")
    assert "<img" in (run / "report.html").read_text()
    assert not (tmp_path / "run.partial").exists()


def test_limit_batches(tiny_data, tmp_path):
    assert train(tiny_data, tmp_path / "run", "--limit-batches", "2", "--epochs", "1") == 0
    assert len(json.loads((tmp_path / "run" / "recorder.json").read_text())["loss"]) == 2


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--epochs", "--lr", "--batch-size", "--model", "--norm", "--data-dir", "--dataset", "--seed",
                 "--device", "--out", "--limit-batches"]:
        assert flag in text


def check_error(capsys, code, pattern, out_dir=None):
    captured = capsys.readouterr()
    assert code != 0
    assert pattern in captured.err, captured.err
    if out_dir is not None:
        assert not out_dir.exists() and not out_dir.with_name(out_dir.name + ".partial").exists()


def test_missing_data_folder(tmp_path, capsys):
    code = train(tmp_path / "nowhere", tmp_path / "run")
    check_error(capsys, code, "does not exist; point --data-dir", tmp_path / "run")


def test_truncated_gz(tiny_data, tmp_path, capsys):
    path = tiny_data / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    code = train(tiny_data, tmp_path / "run")
    check_error(capsys, code, "train-images-idx3-ubyte.gz: the gzip stream is truncated or corrupt", tmp_path / "run")


def test_wrong_magic(tiny_data, tmp_path, capsys):
    raw = tiny_data / "train-labels-idx1-ubyte.gz"
    raw.unlink()
    (tiny_data / "train-labels-idx1-ubyte").write_bytes(b"\x1f\x8b\x08\x01" + b"\x00" * 20)
    code = train(tiny_data, tmp_path / "run")
    check_error(capsys, code, "wrong magic number 0x1f8b0801", tmp_path / "run")


def test_count_mismatch(tiny_data, tmp_path, capsys):
    write_idx(tiny_data / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    code = train(tiny_data, tmp_path / "run")
    check_error(capsys, code, "holds 48 images but", tmp_path / "run")


def test_checksum_mismatch(tiny_data, tmp_path, capsys):
    code = main(["train", "--data-dir", str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "1"])
    check_error(capsys, code, "checksum mismatch", tmp_path / "run")


def test_label_out_of_range(tiny_data, tmp_path, capsys):
    labels = np.zeros(96, dtype=np.uint8)
    labels[7] = 12
    write_idx(tiny_data / "train-labels-idx1-ubyte.gz", labels)
    code = train(tiny_data, tmp_path / "run")
    check_error(capsys, code, "label 12 at index 7 is out of range for 10 classes", tmp_path / "run")


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "must be a positive whole number, got 0"),
    ("--batch-size", "-4", "must be a positive whole number, got -4"),
    ("--epochs", "0", "must be a positive whole number, got 0"),
    ("--lr", "-1", "must be positive"),
])
def test_bad_numbers_are_refused_before_any_work(flag, value, message, tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data-dir", str(tiny_data), "--out", str(tmp_path / "run"), flag, value])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_output_folder_not_writable(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = train(tiny_data, blocker / "run")
    check_error(capsys, code, "cannot write the output folder")


def test_existing_run_folder_is_not_overwritten(tiny_data, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    code = train(tiny_data, tmp_path / "run")
    check_error(capsys, code, "did not write")
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"
    # --overwrite replaces only a folder deepscope made: a user's folder is never emptied.
    check_error(capsys, train(tiny_data, tmp_path / "run", "--overwrite"), "did not write")
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"
    assert train(tiny_data, tmp_path / "run2") == 0
    check_error(capsys, train(tiny_data, tmp_path / "run2"), "--overwrite")
    assert train(tiny_data, tmp_path / "run2", "--overwrite") == 0


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ["train", "report", "doctor", "lr-find", "ablate", "bench"]:
        assert f"    {command} " in text


@pytest.mark.parametrize("extra", [
    ["--opt", "ds_adamw", "--norm", "group", "--init", "kaiming"],
    ["--opt", "ds_momentum", "--norm", "running_batch", "--init", "lsuv", "--act", "general_relu"],
    ["--opt", "rmsprop", "--norm", "layer", "--schedule", "cosine", "--model", "resnet"],
    ["--opt", "sgd", "--norm", "instance", "--schedule", "constant"],
])
def test_every_optimizer_norm_and_init_option_trains(extra, tiny_data, tmp_path):
    assert train(tiny_data, tmp_path / "run", "--epochs", "1", *extra) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert config["opt"] == extra[1] and config["norm"] == extra[3]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())[0]["train_loss"] > 0


def test_unknown_optimizer_is_refused(tiny_data, tmp_path, capsys):
    code = train(tiny_data, tmp_path / "run", "--opt", "lion")
    check_error(capsys, code, "unknown optimizer 'lion'", tmp_path / "run")


def test_statistics_findings_and_tensorboard_by_default(tiny_data, tmp_path):
    from deepscope.stats import load_stats

    args = [a for a in FAST if a != "--no-stats"]
    assert main(["train", "--data-dir", str(tiny_data), "--out", str(tmp_path / "run"), *args,
                 "--stats-every", "2", "--tensorboard"]) == 0
    run = tmp_path / "run"
    stats = load_stats(run)
    assert "block0.conv" in stats.modules and len(stats.steps) == 6 and list(stats.steps) == [0, 2, 4, 6, 8, 10]
    findings = json.loads((run / "findings.json").read_text())
    assert isinstance(findings, list)
    assert all({"kind", "module", "severity", "message", "fix", "evidence"} <= set(f) for f in findings)
    assert any((run / "tensorboard").iterdir())
    html = (run / "report.html").read_text()
    assert "block0.conv" in html and "Findings" in html
    assert "from 4096 values of every output and gradient" in html  # the report says the statistics are sampled


def test_stats_sample_option(tiny_data, tmp_path, capsys):
    from deepscope.stats import load_stats

    args = [a for a in FAST if a != "--no-stats"]
    counts = {}
    for sample in ("4096", "0"):
        out = tmp_path / f"run{sample}"
        assert main(["train", "--data-dir", str(tiny_data), "--out", str(out), *args, "--epochs", "1",
                     "--stats-sample", sample, "--no-report"]) == 0
        stats = load_stats(out)
        counts[sample] = stats.act_hist[0, stats.modules.index("block0.conv")].sum()
    assert counts["4096"] == 4096 and counts["0"] == 16 * 4 * 14 * 14  # 0: every value of the 16x4x14x14 output
    with pytest.raises(SystemExit) as info:
        main(["train", "--data-dir", str(tiny_data), "--out", str(tmp_path / "bad"), *args, "--stats-sample", "-1"])
    assert info.value.code == 2 and "--stats-sample: must be 0 or a positive whole number, got -1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
