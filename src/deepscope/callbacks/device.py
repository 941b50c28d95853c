"""Put the model and the data on a device."""
from __future__ import annotations

import torch

from ..callback import Callback
from ..errors import ConfigError
from ..data.loaders import TensorBatches


def default_device(preference: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; any other string names a device (`cpu`, `cuda`,
    `cuda:N`, `mps`) that must exist here. Raises ConfigError for an unknown name or a device this torch
    build or this machine does not have, before any data is loaded."""
    if preference != "auto":
        return check_device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(name: str | torch.device) -> torch.device:
    """`name` as a torch.device, or ConfigError saying why it cannot be used here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(name)!r}; choose auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ConfigError(f"device {str(name)!r}: this torch ({torch.__version__}) was built without CUDA; "
                              f"use --device cpu (or auto), or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(name)!r}: no CUDA GPU is available on this machine; use --device cpu "
                              f"(or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {str(name)!r}: this machine has {count} CUDA device(s), numbered 0 to "
                              f"{count - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {str(name)!r}: Apple's MPS is not available here; use --device cpu (or auto)")
    elif device.type != "cpu":
        raise ConfigError(f"device {str(name)!r}: deepscope runs on cpu, cuda or mps, not {device.type}")
    return device


def to_device(batch, device: torch.device, non_blocking: bool = False):
    """Move a tensor, or a tuple/list/dict of them, to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch


class DeviceCallback(Callback):
    """Moves the model (and in-memory datasets, once) to the device before fitting; moves other batches
    as they come. `channels_last` stores 4-D image data NHWC, which CPU and GPU convolutions prefer. It
    takes part in the LR finder's sweep (the sweep must run where training runs)."""

    order = -20

    def __init__(self, device: str | torch.device = "auto", channels_last: bool = False):
        self.device = default_device(device) if isinstance(device, str) else device
        self.memory_format = torch.channels_last if channels_last else None

    def before_fit(self, learn) -> None:
        if self.memory_format is not None:
            learn.model.to(memory_format=self.memory_format)
        learn.model.to(self.device)
        if hasattr(learn.dls, "to"):  # deepscope's DataLoaders move in-memory datasets once
            learn.dls.to(self.device, self.memory_format)

    def before_batch(self, learn) -> None:
        if not isinstance(learn.dl, TensorBatches):
            learn.batch = to_device(learn.batch, self.device, non_blocking=self.device.type == "cuda")
