"""The run folder: everything a report needs, written so that a failure leaves nothing half-written.

A run is written into `<name>.partial/` next to its final place and renamed when complete; the folder is
checked for writability before training starts, so a bad `--out` costs seconds, not a training run.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from .errors import OutputError


def default_run_dir(prefix: str = "train", root: str | Path = "runs") -> Path:
    return Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Create `<out>.partial` (after checking we may write there) and return it."""
    out = Path(out)
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and (out.is_file() or not overwrite):
        raise OutputError(f"output folder {out} already exists and is not empty; pick another --out or pass --overwrite")
    staging = out.with_name(out.name + ".partial")
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        probe = staging / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write the output folder {out} ({e.strerror or e}); choose a writable --out") from None
    return staging


def finish_run_dir(staging: Path) -> Path:
    """Move the completed staging folder to its final name (replacing an old run there if allowed)."""
    final = staging.with_name(staging.name.removesuffix(".partial"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def abandon_run_dir(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def environment(device: torch.device | str) -> dict:
    """What produced a result: versions, device, threads."""
    import numpy

    from . import __version__

    env = {"deepscope": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
