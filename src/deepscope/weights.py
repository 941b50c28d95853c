"""Model weights as safetensors: no pickle, so loading a file never runs code."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save
from torch import nn

from .errors import CheckpointError


def save_weights(model: nn.Module, path: str | Path) -> None:
    # safetensors stores dense row-major tensors: channels_last weights are made contiguous first.
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Serialised in memory and written by Python, so a full disk is an OSError that names the file
    # (safetensors' own writer reports it as its own error type).
    data = save(state)
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by `save_weights`; a file from another model is a CheckpointError saying why."""
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return load_state(model, state, path)


def load_state(model: nn.Module, state: dict, source: str | Path) -> nn.Module:
    """Load a state_dict into `model` (onto its devices); one from another model is a CheckpointError
    naming `source` and saying which keys or shapes differ."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        details = "; ".join(filter(None, [
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else "",
            f"shape mismatch {wrong_shape[:3]}" if wrong_shape else "",
        ]))
        raise CheckpointError(f"{source} was saved from a different model ({details}); build the model with the "
                              f"config saved beside the weights")
    model.load_state_dict({k: v.to(expected[k].device) for k, v in state.items()})
    return model
