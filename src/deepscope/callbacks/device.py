"""Put the model and the data on a device."""
from __future__ import annotations

import torch

from ..callback import Callback
from ..data.loaders import TensorBatches


def default_device(preference: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; any other string is passed to torch.device."""
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
    as they come. `channels_last` stores 4-D image data NHWC, which CPU and GPU convolutions prefer."""

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
