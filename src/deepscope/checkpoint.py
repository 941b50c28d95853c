"""Checkpoints: the whole state of a fit in one file, so that a run stopped at a batch boundary resumes
bit-exactly (on the CPU) from where it stopped.

A checkpoint is one safetensors file. Its tensors are every tensor of the state (model weights under
`model/<name>`, the optimizer's moments, random-generator states, the data order, the statistics
history...); the rest of the state (numbers, strings, lists, the structure) is a JSON tree in the file's
metadata, in which each tensor appears as a reference. Loading it therefore runs no pickle, whatever the
torch version: a checkpoint from someone else can be read without running their code (`torch.load`
without `weights_only` can run any code, and its `weights_only` mode had a bypass before torch 2.6).

Beside each file, `<file>.sha256` holds its SHA-256 in `sha256sum` format (`sha256sum -c` checks it). Loading
checks it, because neither safetensors nor torch.load notices a flipped bit in tensor data. Files are
written atomically: a temporary file, fsync, the checksum, then a rename; a checkpoint without its
checksum is never loaded.

What a checkpoint of a Learner holds is `Learner.state_dict`'s contract; the `Checkpoint` callback
(deepscope.callbacks.checkpoint) decides when to write them; runfolder.CHECKPOINTS is their folder in a run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .runfolder import fsync_dir

FORMAT = 1  # version of the layout below
META_KEY = "deepscope.checkpoint"
SUFFIX = ".safetensors"
CHECKSUM_SUFFIX = ".sha256"
TMP_SUFFIX = ".tmp"
BEST = "best" + SUFFIX
_STEP_NAME = re.compile(r"^step-(\d+)\.safetensors$")


def step_name(step: int) -> str:
    """File name of the checkpoint taken after `step` training steps."""
    return f"step-{step:08d}{SUFFIX}"


# --- the JSON tree and its tensors ---------------------------------------------------------------------
def _flatten(obj, tensors: dict[str, torch.Tensor], path: str):
    """`obj` as JSON-able data, each tensor (and numpy array) moved into `tensors` under a key made from
    its path. Tuples, non-string dict keys and non-finite floats are tagged so they come back as they were."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:
            key += "'"
        t = obj.detach()
        if t.is_sparse or t.is_quantized or t.is_complex():
            raise CheckpointError(f"cannot store the tensor at {path!r} ({t.layout}, {t.dtype}) in a checkpoint")
        tensors[key] = t.to("cpu", copy=True).contiguous()
        return {"__tensor__": key, "device": str(t.device)}
    if isinstance(obj, np.ndarray):
        raw = torch.frombuffer(bytearray(obj.tobytes()), dtype=torch.uint8) if obj.nbytes else \
            torch.zeros(0, dtype=torch.uint8)
        ref = _flatten(raw, tensors, path)
        return {"__ndarray__": ref["__tensor__"], "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return _flatten(obj.item(), tensors, path)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _flatten(v, tensors, f"{path}/{k}" if path else k) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise CheckpointError(f"cannot store the dict key {k!r} at {path!r} in a checkpoint (keys must be "
                                      f"strings or numbers)")
            items.append([_flatten(k, tensors, path), _flatten(v, tensors, f"{path}/{k}")])
        return {"__dict__": items}
    raise CheckpointError(f"cannot store a {type(obj).__name__} at {path!r} in a checkpoint: a state_dict may hold "
                          f"tensors, numpy arrays, numbers, strings, None, and lists, tuples and dicts of them")


def _unflatten(obj, tensors: dict[str, torch.Tensor], device_map):
    if isinstance(obj, list):
        return [_unflatten(v, tensors, device_map) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        t = tensors[obj["__tensor__"]]
        device = device_map(obj.get("device", "cpu"))
        return t if device.type == "cpu" else t.to(device)
    if "__ndarray__" in obj:
        raw = tensors[obj["__ndarray__"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_unflatten(v, tensors, device_map) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_unflatten(k, tensors, device_map): _unflatten(v, tensors, device_map) for k, v in obj["__dict__"]}
    return {k: _unflatten(v, tensors, device_map) for k, v in obj.items()}


def _device_map(where: str | torch.device | None):
    """Where tensors go on load: `where` for all of them, or (None) back on their own device when this
    machine has it, else on the CPU."""
    if where is not None:
        target = torch.device(where)
        return lambda _: target

    def own(name: str) -> torch.device:
        device = torch.device(name)
        if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
            return torch.device("cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            return torch.device("cpu")
        return device

    return own


def encode(state: dict) -> bytes:
    """The checkpoint file's bytes for `state` (see the module docstring)."""
    from safetensors.torch import save

    from . import __version__

    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, "")
    meta = {"format": FORMAT, "deepscope": __version__, "torch": torch.__version__, "state": tree}
    return save(tensors, metadata={META_KEY: json.dumps(meta, allow_nan=False)})


def _header(data: bytes, name: str) -> dict:
    """The safetensors header (a JSON object after an 8-byte little-endian length)."""
    if len(data) < 8:
        raise CheckpointError(f"{name} is not a checkpoint (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        return json.loads(data[8:8 + n])
    except ValueError:
        raise CheckpointError(f"{name} is not a checkpoint (no safetensors header)") from None


def decode(data: bytes, name: str = "checkpoint", map_location=None) -> dict:
    """The state stored by `encode`. CheckpointError when the bytes are not a deepscope checkpoint."""
    from safetensors.torch import load

    meta_text = (_header(data, name).get("__metadata__") or {}).get(META_KEY)
    if meta_text is None:
        raise CheckpointError(f"{name} is a safetensors file but not a deepscope checkpoint (no {META_KEY} metadata); "
                              f"weights alone load with deepscope.weights.load_weights")
    meta = json.loads(meta_text)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{name} has checkpoint format {meta.get('format')!r}; this deepscope reads format "
                              f"{FORMAT} (written by deepscope {meta.get('deepscope', '?')})")
    try:
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{name} is damaged ({e})") from None
    return _unflatten(meta["state"], tensors, _device_map(map_location))


# --- files ----------------------------------------------------------------------------------------------
def _write_synced(path: Path, data: bytes) -> None:
    """`data` into `path`, on the disk before this returns."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> str:
    """Write checkpoint bytes to `path` with its checksum file; returns the SHA-256 (hex). The checksum is
    written before the checkpoint is renamed into place, so a checkpoint file always has one."""
    path = Path(path)
    digest = hashlib.sha256(data).hexdigest()
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        _write_synced(tmp, data)
        _write_atomic(checksum_path(path), f"{digest}  {path.name}\n".encode())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # a failed write() does not name its file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return digest


def save_checkpoint(path: str | Path, state: dict) -> str:
    """Write `state` as a checkpoint at `path` (atomically, with `<path>.sha256`); returns the SHA-256.
    CheckpointError when the state holds something a checkpoint cannot store."""
    return write_bytes(path, encode(state))


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def verify(path: str | Path) -> bytes:
    """The bytes of checkpoint `path` once its SHA-256 matches the recorded one. CheckpointError when the
    file or its checksum is missing or they differ."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None
    try:
        expected = checksum_path(path).read_text().split()[0].lower()
    except (OSError, IndexError):
        raise CheckpointError(f"{path} has no checksum file {checksum_path(path).name}, so it cannot be checked "
                              f"(it may be incomplete); deepscope does not load unchecked checkpoints") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{path} is corrupt: its SHA-256 is {actual[:16]}..., but {expected[:16]}... was "
                              f"recorded when it was written; use an earlier checkpoint")
    return data


def load_checkpoint(path: str | Path, map_location=None) -> dict:
    """The state in checkpoint `path`, after checking its SHA-256. Tensors go back to the device they were
    on when this machine has it (else the CPU), or all to `map_location`. Raises CheckpointError."""
    path = Path(path)
    return decode(verify(path), str(path), map_location)


def step_checkpoints(folder: str | Path) -> list[Path]:
    """The step checkpoints in `folder`, oldest (fewest steps) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path, log=None) -> Path | None:
    """The newest step checkpoint in `folder` whose checksum matches (None when there is none). A newer
    one that fails its check is skipped, saying so through `log`."""
    for path in reversed(step_checkpoints(folder)):
        try:
            verify(path)
        except CheckpointError as e:
            if log is not None:
                log(f"skipping {path.name}: {e}")
            continue
        return path
    return None


def sweep_temporary(folder: str | Path) -> list[str]:
    """Remove the temporary files a killed write left in `folder`; returns their names."""
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.endswith(TMP_SUFFIX) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's weights (its state_dict) from a checkpoint file, on the CPU, checksum checked."""
    state = load_checkpoint(path, map_location="cpu")
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no model weights")
    return weights


# --- random streams ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every global random stream: Python's, NumPy's, torch's CPU generator and each CUDA device's (when CUDA
    has been initialised). deepscope's own generators (data order, statistics sampling) are saved by their
    owners."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back the streams `rng_state` saved. CUDA states are restored only where this machine has as many
    devices; otherwise the CPU streams are restored and CUDA keeps its own (not bit-exact on the GPU)."""
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _as_python_state(state):
    """random.setstate wants tuples all the way down."""
    return tuple(_as_python_state(s) for s in state) if isinstance(state, (list, tuple)) else state
