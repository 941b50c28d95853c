"""deepscope.export and `deepscope export`: each format round-trips (outputs within 1e-5 of the eager model,
on batch sizes other than the one exported), best and last weights, unfinished runs, and errors that say
what to do and leave nothing behind. Run folders are made by hand (no training, no dataset)."""
import importlib.util
import json
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from deepscope.checkpoint import BEST, save_checkpoint, step_name
from deepscope.cli import main
from deepscope.config import TrainConfig
from deepscope.errors import ExportError
from deepscope.export import EXAMPLE_BATCH, FILE_NAMES, METADATA, TOLERANCE, export_model, export_run
from deepscope.recipe import build_model
from deepscope.runfolder import (
    CHECKPOINTS, CONFIG, EXPORT, MARKER, STAGING_SUFFIX, WEIGHTS, RunFolder, foreign_files, read_marker,
    remove_unfinished,
)
from deepscope.weights import save_weights

CONFIG_FIELDS = dict(nfs=[4, 8], init="lsuv", device="cpu")  # lsuv: export must not need a data batch
DATA = {"dataset": "fashion_mnist", "mean": 0.286, "std": 0.353}
# torch 2.13 warns that torch.jit is deprecated; these tests load TorchScript files on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def model(seed: int, **fields) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(TrainConfig(**{**CONFIG_FIELDS, "init": "default", **fields}), 10).eval()


def fill(folder, *, final=None, best=None, steps=()):
    """Write a run's files into `folder`: config.json, model.safetensors (`final`), checkpoints (`best`,
    and `steps`: [(step, model)])."""
    config = TrainConfig(**CONFIG_FIELDS).to_dict()
    (folder / CONFIG).write_text(json.dumps({"format": 1, "kind": "train", "config": config, "data": DATA}))
    if final is not None:
        save_weights(final, folder / WEIGHTS)
    (folder / CHECKPOINTS).mkdir(exist_ok=True)
    for name, m in ([(BEST, best)] if best is not None else []) + [(step_name(s), m) for s, m in steps]:
        save_checkpoint(folder / CHECKPOINTS / name, {"model": m.state_dict()})


def make_run(path, **files):
    with RunFolder.prepare(path, "train", log=lambda m: None) as run:
        fill(run.path, **files)
        run.finish()
    return path


def make_unfinished(path, **files):
    """What `kill -9` leaves: `<path>.partial` with its marker (state 'writing') and checkpoints."""
    staging = path.with_name(path.name + STAGING_SUFFIX)
    staging.mkdir()
    (staging / MARKER).write_text(json.dumps({"tool": "deepscope", "kind": "train", "state": "writing", "pid": 1}))
    fill(staging, **files)
    return staging


def load(format, path):
    """The exported file as a function of a batch, loaded with torch (or onnxruntime) alone."""
    if format == "torchscript":
        return torch.jit.load(str(path))
    if format == "exported":
        return torch.export.load(path).module()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def max_difference(exported, eager, shape=(7, 1, 28, 28)):
    """Largest |exported - eager| on a batch of 7: neither the batch exported with (EXAMPLE_BATCH) nor one
    the export checked itself on (1 and EXAMPLE_BATCH + 3), so the batch dimension is dynamic."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (exported(x) - eager(x)).abs().max().item()


@pytest.mark.parametrize("format", [
    "torchscript", "exported",
    pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs pip install deepscope[onnx]"))])
def test_each_format_round_trips_and_is_listed_in_the_run(tmp_path, format, capsys):
    best, last = model(1), model(2)
    run = make_run(tmp_path / "run", final=last, best=best)
    path = export_run(run, format)
    assert path == (run / EXPORT / FILE_NAMES[format]).absolute()
    out = capsys.readouterr().out
    assert f"weights: {run / CHECKPOINTS / BEST}" in out and "max |difference|" in out
    assert max_difference(load(format, path), best) <= TOLERANCE  # the best weights: the default when present
    assert max_difference(load(format, path), last) > 1e-3
    assert f"{EXPORT}/{FILE_NAMES[format]}" in read_marker(run)["files"] and foreign_files(run) == []
    assert sorted(p.name for p in (run / EXPORT).iterdir()) == [FILE_NAMES[format]]  # no temporary file left
    assert export_run(run, format) == path  # its own earlier export is replaced without asking


def test_the_file_says_where_its_weights_came_from_and_how_to_prepare_inputs(tmp_path):
    run = make_run(tmp_path / "run", final=model(2))
    extra = {METADATA: ""}
    torch.jit.load(str(export_run(run, "torchscript", log=lambda m: None)), _extra_files=extra)
    meta = json.loads(extra[METADATA])
    assert meta["weights"] == WEIGHTS and meta["input"]["mean"] == DATA["mean"] and meta["input"]["std"] == DATA["std"]
    assert meta["input"]["shape"] == ["batch", 1, 28, 28] and len(meta["classes"]) == 10
    with zipfile.ZipFile(run / EXPORT / FILE_NAMES["torchscript"]) as z:  # readable without torch, too
        assert any(name.endswith(f"extra/{METADATA}") for name in z.namelist())


def test_torchscript_loads_in_a_process_without_deepscope(tmp_path):
    path = export_run(make_run(tmp_path / "run", final=model(2)), "torchscript", log=lambda m: None)
    code = ("import sys, warnings; sys.modules['deepscope'] = None; warnings.simplefilter('ignore'); import torch\n"
            f"print(tuple(torch.jit.load({str(path)!r})(torch.randn(3, 1, 28, 28)).shape))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 10)"


def test_best_and_last_pick_different_weights(tmp_path, capsys):
    best, last = model(1), model(2)
    run = make_run(tmp_path / "run", final=last, best=best)
    for choice, eager, other in (("best", best, last), ("last", last, best)):
        out = tmp_path / f"{choice}.pt"
        assert main(["export", str(run), "--format", "torchscript", "--weights", choice, "--out", str(out)]) == 0
        assert max_difference(load("torchscript", out), eager) <= TOLERANCE
        assert max_difference(load("torchscript", out), other) > 1e-3
    printed = capsys.readouterr().out
    assert f"weights: {run / CHECKPOINTS / BEST}" in printed and f"weights: {run / WEIGHTS}" in printed
    plain = make_run(tmp_path / "no-best", final=last)  # without a best checkpoint, the default is last
    assert max_difference(load("torchscript", export_run(plain, "torchscript")), last) <= TOLERANCE


def test_an_unfinished_run_exports_its_latest_checkpoint_into_its_own_folder(tmp_path, capsys):
    older, newer = model(1), model(2)
    staging = make_unfinished(tmp_path / "run", steps=[(10, older), (20, newer)])
    assert main(["export", str(tmp_path / "run"), "--format", "torchscript"]) == 0  # found as run.partial
    out = capsys.readouterr().out
    assert "unfinished run" in out and f"weights: {staging / CHECKPOINTS / step_name(20)}" in out
    path = staging / EXPORT / FILE_NAMES["torchscript"]
    assert max_difference(load("torchscript", path), newer) <= TOLERANCE
    assert export_run(staging, "torchscript", log=lambda m: None) == path.absolute()  # replaced: deepscope's own
    assert remove_unfinished(staging) == [] and not staging.exists()  # the export is one of the run's own files


def _error(capsys, code, message):
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not a run", "not a deepscope run folder"),
    ("no best", "no best checkpoint"),
    ("no weights", "no weights to export"),
    ("corrupt best", "is corrupt"),
    ("other model", "different model"),
    ("out in a run", "a run folder deepscope made"),
    ("out exists", "pass --overwrite"),
    ("out not pt2", "ends in .pt2"),
    ("onnx missing", "pip install 'deepscope[onnx]'"),
])
def test_bad_input_is_one_message_and_writes_nothing(tmp_path, capsys, monkeypatch, case, message):
    run = tmp_path / "run"
    args = ["--format", "torchscript"]
    if case == "not a run":
        run.mkdir()
    elif case == "no best":
        make_run(run, final=model(2))
        args += ["--weights", "best"]
    elif case == "no weights":
        make_run(run)
    elif case == "corrupt best":
        make_run(run, final=model(2), best=model(1))
        data = bytearray((run / CHECKPOINTS / BEST).read_bytes())
        data[-5] ^= 0xFF  # a flipped bit in tensor data
        (run / CHECKPOINTS / BEST).write_bytes(bytes(data))
    elif case == "other model":
        make_run(run, final=model(2, nfs=[4, 16]))
    elif case == "out in a run":
        make_run(run, final=model(2))
        args += ["--out", str(run / "model.pt")]
    elif case == "out exists":
        make_run(run, final=model(2))
        (tmp_path / "model.pt").write_text("someone's file")
        args += ["--out", str(tmp_path / "model.pt")]
    elif case == "out not pt2":
        make_run(run, final=model(2))
        args = ["--format", "exported", "--out", str(tmp_path / "new" / "model.bin")]
    elif case == "onnx missing":
        make_run(run, final=model(2))
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importing it now fails, installed or not
        args = ["--format", "onnx"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _error(capsys, main(["export", str(run), *args]), message)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, no export/
    if case == "out exists":
        assert main(["export", str(run), *args, "--overwrite"]) == 0


class BatchDependent(nn.Module):
    """A forward that depends on a Python value: tracing fixes it, so the export cannot reproduce it."""

    def forward(self, x):
        return x.flatten(1) * (2.0 if x.shape[0] == EXAMPLE_BATCH else 1.0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the warning is the point of this model
def test_an_export_that_does_not_reproduce_the_model_leaves_nothing(tmp_path):
    with pytest.raises(ExportError, match="does not reproduce"):
        export_model(BatchDependent(), torch.randn(EXAMPLE_BATCH, 1, 28, 28), "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_export_model_takes_any_module_and_restores_its_mode(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    difference = export_model(net, torch.randn(4, 3, 4), "exported", tmp_path / "m.pt2")
    assert difference <= TOLERANCE and net.training  # exported (and checked) in eval mode, then put back
    assert max_difference(torch.export.load(tmp_path / "m.pt2").module(), net.eval(), (6, 3, 4)) <= TOLERANCE
