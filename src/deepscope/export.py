"""Export a trained model to one file that runs without deepscope: TorchScript, torch.export or ONNX.

Three ways to serialise a model, from the oldest to the newest (PyTorch docs: "TorchScript",
"torch.export", "Exporting a PyTorch model to ONNX"):

- `torchscript`: `torch.jit.trace` runs the model once and records the ops (`torch.jit.script` compiles the
  Python instead, when tracing fails). `torch.jit.load` reads it back, also from C++ (libtorch). torch 2.13
  warns that TorchScript is deprecated in favour of torch.export; it is what libtorch loads without Python.
- `exported`: `torch.export.export` captures the whole graph ahead of time, here with a dynamic batch
  dimension (`torch.export.Dim`); `torch.export.load(path).module()` reads it back. Loading unpickles, so load
  only files you trust.
- `onnx`: `torch.onnx.export` (its torch.export-based exporter, the default since torch 2.9, which needs the
  `onnx` and `onnxscript` packages) for onnxruntime and other runtimes; the optional extra
  `pip install 'deepscope[onnx]'` installs them with onnxruntime, which checks the file.

Every export checks itself before it counts: the file is written to a temporary name, loaded back, run on
random inputs of two batch sizes other than the one it was made with (1 and n + 3, which proves the batch
is dynamic) and compared with the eager model in eval mode; only when the largest difference is within
`TOLERANCE` is it renamed into place. A failed export leaves nothing behind.

Where a run's export goes: by default `RUN_DIR/export/<FILE_NAMES[format]>` (runfolder.EXPORT). It is
recorded in the run's marker, so `--overwrite` of the run removes it with the run, and re-exporting replaces
it without asking. An unfinished run (`<run>.partial`, from its checkpoints) can be exported too; its export
goes into that folder and shares its fate (kept when the run is resumed and finishes, removed when the run
is cleared), holding the weights of the moment it was made. `--out` may name another file in the run's `export/` folder,
or a path outside every run folder (an existing file there is replaced only with `overwrite`).

The file carries `deepscope.json` (TorchScript and torch.export: an extra file; ONNX: the model's
metadata_props): where the weights came from and how to prepare an input (pixels / 255, then
(x - mean) / std with the training set's mean and std).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import BEST, latest_checkpoint, model_weights
from .config import TrainConfig
from .data.datasets import get_spec
from .errors import CheckpointError, ConfigError, DataError, ExportError, OutputError
from .recipe import build_model
from .runfolder import CHECKPOINTS, CONFIG, EXPORT, STAGING_SUFFIX, WEIGHTS, read_config, read_marker, record_file
from .weights import load_state, load_weights

FORMATS = ("torchscript", "exported", "onnx")
FILE_NAMES = {"torchscript": "model.torchscript.pt", "exported": "model.pt2", "onnx": "model.onnx"}
WEIGHT_CHOICES = ("best", "last")
TOLERANCE = 1e-5  # largest |exported - eager| allowed on the check batches (float32 outputs)
INPUT_SHAPE = (1, 28, 28)  # (channels, height, width) of the MNIST-format images deepscope trains on
EXAMPLE_BATCH = 2  # the batch an export is made with: torch.export treats a batch of 1 as a constant
METADATA = "deepscope.json"  # name of the provenance record inside the exported file
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_INSTALL = "pip install 'deepscope[onnx]'"


# --- any model -------------------------------------------------------------------------------------------
def export_model(model: nn.Module, example: torch.Tensor, format: str, path: str | Path, *,
                 metadata: dict | None = None) -> float:
    """Write `model` as `format` to `path` and return the largest |exported - eager| it was checked with.

    `example`: an input batch, (N, ...) with N >= 2, on the model's device; the batch dimension is exported
    as dynamic. The model is exported in eval mode and put back in the mode it was in. `metadata` (JSON-able)
    is stored in the file as `deepscope.json`. Raises ConfigError for an unknown format, a batch of one, a
    torch.export file not named .pt2 or missing ONNX packages; ExportError when torch cannot export the
    model or the file does not reproduce it within TOLERANCE (then nothing is written at `path`). The folder
    of `path` must exist.
    """
    check_format(format)
    if example.ndim < 1 or example.shape[0] < 2:
        raise ConfigError(f"the example batch needs at least 2 rows (got shape {tuple(example.shape)}): torch.export "
                          f"would fix a batch of 1 as a constant")
    path = Path(path)
    check_name(format, path)
    if format == "onnx":
        require_onnx()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # the same suffix, .pt2 for torch.export
    text = json.dumps(metadata or {}, indent=2, default=str)
    was_training = model.training
    model.eval()
    try:
        _WRITERS[format](model, example, tmp, text)
        difference = _check(model, _loader(format)(tmp), example)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return difference


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {list(FORMATS)}")


def check_name(format: str, path: Path) -> None:
    if format == "exported" and path.suffix != ".pt2":
        raise ConfigError(f"a torch.export file's name ends in .pt2 (torch.export.load warns about any other), "
                          f"not {path.name!r}")


def require_onnx() -> None:
    """ConfigError naming the extra to install when an ONNX package is missing."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}, not installed here; install the ONNX extra "
                          f"({', '.join(ONNX_PACKAGES)}) with: {ONNX_INSTALL}")


def _failed(format: str, e: Exception) -> ExportError:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return ExportError(f"torch could not export the model as {format} ({type(e).__name__}: {first})")


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, metadata: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's; see the module docstring
        try:
            compiled = torch.jit.trace(model, example)
        except Exception:  # noqa: BLE001 - a model tracing cannot follow may still script
            try:
                compiled = torch.jit.script(model)
            except Exception as e:  # noqa: BLE001 - torch raises many types; the message says what failed
                raise _failed("torchscript", e) from e
        torch.jit.save(compiled, str(path), _extra_files={METADATA: metadata})


def _batch_dim() -> dict:
    return {0: torch.export.Dim("batch", min=1)}


def _write_exported(model: nn.Module, example: torch.Tensor, path: Path, metadata: str) -> None:
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
    except Exception as e:  # noqa: BLE001
        raise _failed("exported", e) from e
    torch.export.save(program, path, extra_files={METADATA: metadata})


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """The ONNX exporter logs that it skips torchvision's ops when torchvision is not installed (no model here
    uses them), and onnxscript warns about torch internals: noise to a user, hidden while it runs."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: str) -> None:
    try:
        with _quiet_onnx_exporter():
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=(_batch_dim(),),
                                        input_names=["input"], output_names=["output"], verbose=False)
    except Exception as e:  # noqa: BLE001
        raise _failed("onnx", e) from e
    program.model.metadata_props[METADATA] = metadata
    program.save(str(path), external_data=False)  # one self-contained file (models under 2 GB)


_WRITERS = {"torchscript": _write_torchscript, "exported": _write_exported, "onnx": _write_onnx}


def _loader(format: str) -> Callable[[Path], Callable[[torch.Tensor], torch.Tensor]]:
    """How to load a written file back as a function of an input batch."""
    def torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path))

    def exported(path):
        return torch.export.load(path).module()

    def onnx(path):
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    return {"torchscript": torchscript, "exported": exported, "onnx": onnx}[format]


def check_batches(example: torch.Tensor) -> list[torch.Tensor]:
    """Random normal inputs shaped like `example`, batches of 1 and N + 3 (fixed seed, example's device)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, *example.shape[1:], generator=g, dtype=example.dtype).to(example.device)
            for n in (1, example.shape[0] + 3)]


@torch.no_grad()
def _check(model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> float:
    """The largest |exported - eager| over the check batches; ExportError when it is above TOLERANCE."""
    worst = 0.0
    for x in check_batches(example):
        expected = model(x)
        if not torch.isfinite(expected).all():
            raise ExportError("the model's outputs on random inputs are not all finite (did its training diverge? "
                              "see the run's report); nothing was exported")
        try:
            got = exported(x)
        except Exception as e:  # noqa: BLE001 - whatever the runtime raises, the file is not usable
            raise ExportError(f"the exported model fails on a batch of {len(x)} ({type(e).__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:300]}); nothing was written") from e
        if got.shape != expected.shape:
            raise ExportError(f"the exported model gives outputs of shape {tuple(got.shape)} for a batch of {len(x)}, "
                              f"the model {tuple(expected.shape)}; nothing was written")
        difference = (got.to(expected.device, expected.dtype) - expected).abs().max().item()
        if not difference <= TOLERANCE:  # also NaN
            raise ExportError(f"the exported model differs from the model by up to {difference:.3g} on a batch of "
                              f"{len(x)} (more than {TOLERANCE:g}): it does not reproduce it (does its forward "
                              f"depend on the batch size, or on Python values tracing fixed?); nothing was written")
        worst = max(worst, difference)
    return worst


# --- a run ---------------------------------------------------------------------------------------------------
def find_run(run_dir: str | Path, log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """The run folder to export from and whether it is unfinished. `RUN` whose run never finished is found as
    `RUN.partial`. DataError when there is no such folder or it has no config.json."""
    folder = Path(run_dir)
    staging = folder.with_name(folder.name + STAGING_SUFFIX)
    if not folder.exists() and staging.is_dir():
        folder = staging
    if not folder.exists():
        raise DataError(f"{run_dir} does not exist; pass a run folder that `deepscope train` wrote "
                        f"(`deepscope runs` lists them)")
    if not folder.is_dir():
        raise DataError(f"{run_dir} is a file, not a run folder; pass the folder `deepscope train` wrote")
    marker = read_marker(folder)
    unfinished = marker is not None and marker.get("state") != "complete"
    if unfinished and not (folder / CONFIG).is_file():
        raise DataError(f"{folder} is an unfinished run that has no {CONFIG} yet, so its model cannot be rebuilt")
    if unfinished:
        log(f"note: {folder} is an unfinished run (interrupted, or still training)")
    return folder, unfinished


def choose_weights(run_dir: Path, weights: str | None = None,
                   log: Callable[[str], None] = print) -> tuple[Path, bool]:
    """The weights file of a run and whether it is a checkpoint (else a `save_weights` file).

    `best`: checkpoints/best.safetensors (the best epoch by the monitored validation metric); `last`:
    model.safetensors, or else the newest step checkpoint whose checksum matches; None: best when the run
    has it, else last. CheckpointError when the run has none of these.
    """
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise ConfigError(f"unknown weights {weights!r}; choose one of {list(WEIGHT_CHOICES)}")
    best = run_dir / CHECKPOINTS / BEST
    if weights == "best" or (weights is None and best.is_file()):
        if not best.is_file():
            raise CheckpointError(f"{run_dir} has no best checkpoint ({CHECKPOINTS}/{BEST}): it is kept when a run "
                                  f"saves checkpoints and validates; use --weights last")
        return best, True
    if (run_dir / WEIGHTS).is_file():
        return run_dir / WEIGHTS, False
    latest = latest_checkpoint(run_dir / CHECKPOINTS, log=log)
    if latest is None:
        raise CheckpointError(f"{run_dir} has no weights to export: no {WEIGHTS} and no step checkpoint in "
                              f"{CHECKPOINTS}/ whose checksum matches")
    return latest, True


def output_path(run_dir: Path, format: str, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Where to write the export (see the module docstring), made absolute. OutputError when it may not go
    there: inside a run folder other than in this run's `export/`, a link or folder, or an existing file
    deepscope cannot tell it wrote, without `overwrite`."""
    export_dir = Path(os.path.abspath(run_dir / EXPORT))
    if out is None:
        path = export_dir / FILE_NAMES[format]
    else:
        raw = Path(out).expanduser()
        if (raw.is_dir() and not raw.is_symlink()) or str(out).endswith(("/", os.sep)):
            raw = raw / FILE_NAMES[format]
        path = Path(os.path.abspath(raw))
    check_name(format, path)
    in_run = path.parent == export_dir
    if not in_run:
        for folder in path.parents:
            if folder.is_dir() and read_marker(folder) is not None:
                raise OutputError(f"{path} is inside {folder}, a run folder deepscope made; deepscope writes only its "
                                  f"own files there: leave out --out (for {export_dir / FILE_NAMES[format]}), or "
                                  f"pass a file in {export_dir} or outside run folders")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(f"{path} exists and is not a plain file (a folder or a link); choose another --out")
    if path.exists() and not overwrite and not (in_run and _written_by_deepscope(run_dir, path)):
        raise OutputError(f"{path} exists and deepscope cannot tell it wrote it; pass --overwrite to replace it, "
                          f"or choose another --out")
    return path


def _written_by_deepscope(run_dir: Path, path: Path) -> bool:
    """Whether an export in a run's export/ folder is deepscope's: listed in a complete run's marker, or in
    an unfinished run (whose export/ holds only deepscope's files, runfolder.OWN_PATTERNS)."""
    marker = read_marker(run_dir)
    if marker is None:
        return False
    return marker.get("state") != "complete" or f"{EXPORT}/{path.name}" in marker.get("files", [])


def _train_config(run_dir: Path, config: dict) -> TrainConfig:
    """The run's TrainConfig, set up to rebuild the model here: on the CPU, initialised plainly (the weights
    are loaded afterwards, so LSUV's data batch is not needed)."""
    try:
        return TrainConfig.from_dict({**config, "init": "default", "device": "cpu", "threads": None})
    except (ConfigError, TypeError) as e:
        raise DataError(f"{run_dir / CONFIG} does not describe a model this deepscope can build ({e})") from None


def export_run(run_dir: str | Path, format: str, weights: str | None = None, out: str | Path | None = None, *,
               overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Rebuild a training run's model with its best or last weights (`choose_weights`), export it as
    `format` (`export_model`, on the CPU, inputs (N, 1, 28, 28) float32) and return the file's path.

    Says through `log` which weights were used and how closely the file reproduces the model. Raises
    DataError (not a training run), CheckpointError (no weights, a corrupt checkpoint, weights of another
    model), ConfigError (unknown format or weights, missing ONNX packages), OutputError (see `output_path`),
    ExportError (torch cannot export the model, or the file does not reproduce it).
    """
    from . import __version__

    check_format(format)
    folder, unfinished = find_run(run_dir, log)
    cfg = read_config(folder)
    if cfg["kind"] != "train":
        raise DataError(f"{folder} is a {cfg['kind']} run; export needs a run of `deepscope train`, which saves "
                        f"weights")
    config = _train_config(folder, cfg["config"])
    source, is_checkpoint = choose_weights(folder, weights, log)
    path = output_path(folder, format, out, overwrite)
    if format == "onnx":
        require_onnx()  # before the model is built: say what to install first
    spec = get_spec(config.dataset)
    model = build_model(config, spec.n_classes)
    if is_checkpoint:
        load_state(model, model_weights(source), source)
    else:
        load_weights(model, source)
    name = source.relative_to(folder).as_posix()
    log(f"weights: {folder / name}")
    metadata = {"weights": name, "weights_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                "run": folder.name, "unfinished_run": unfinished, "model": config.model,
                "dataset": config.dataset, "classes": list(spec.classes),
                "input": {"shape": ["batch", *INPUT_SHAPE], "dtype": "float32",
                          "prepare": "pixels / 255, then (x - mean) / std",
                          "mean": cfg["data"].get("mean"), "std": cfg["data"].get("std")},
                "format": format, "torch": torch.__version__, "deepscope": __version__}
    example = torch.randn(EXAMPLE_BATCH, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    difference = _export_into_folder(model, example, format, path, metadata)
    if path.parent == Path(os.path.abspath(folder / EXPORT)):
        record_file(folder, f"{EXPORT}/{path.name}")  # a complete run lists it; an unfinished one owns export/*
    batches = " and ".join(str(len(x)) for x in check_batches(example))
    log(f"wrote {path} ({format}; checked against the model on batches of {batches}: max |difference| "
        f"{difference:.2g})")
    return path


def _export_into_folder(model: nn.Module, example: torch.Tensor, format: str, path: Path, metadata: dict) -> float:
    """`export_model`, making the folder of `path` first; a folder it made is removed again when it fails."""
    made = not path.parent.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot make the folder {path.parent} ({e.strerror or e}); choose another --out") from None
    try:
        return export_model(model, example, format, path, metadata=metadata)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only when empty: an OSError means something else is in it
        raise
