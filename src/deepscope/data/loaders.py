"""Batches for the Learner.

The whole dataset stays in memory as tensors (on the training device once the Learner moves it), and a
batch is a slice of a shuffled index: no per-item Python work, no worker processes (airbench's approach).
The Learner also accepts any other iterable of `(x, y)` batches, a `torch.utils.data.DataLoader` included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from ..errors import ConfigError, DataError
from .datasets import load_raw


class TensorBatches:
    """Iterate `(x, y)` batches of in-memory tensors by slicing a (shuffled) index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None):
        if batch_size <= 0:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
        if len(x) != len(y):
            raise DataError(f"inputs hold {len(x)} items but targets hold {len(y)}; they must match")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = generator
        self.rank, self.world_size, self.even = 0, 1, False  # see shard
        self._order: torch.Tensor | None = None  # this pass's permutation (CPU), while shuffling
        self._position = 0                         # batches this pass has yielded
        self._resume: tuple[torch.Tensor | None, int] | None = None  # set by load_state_dict for the next pass

    def __len__(self) -> int:
        n = len(self.x)
        if self.even and self.world_size > 1 and not self.drop_last and n % self.batch_size % self.world_size:
            return n // self.batch_size  # a last global batch that does not split evenly is dropped
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def shard(self, rank: int, world_size: int, *, even: bool) -> "TensorBatches":
        """Make this the data of process `rank` of `world_size` (DistributedDataParallel): every process
        draws the same permutation (the generator must be seeded alike on all of them: the semantics of
        DistributedSampler.set_epoch, one permutation per pass), cuts it into the same global batches of
        `batch_size`, and takes every `world_size`-th item of each, starting at its rank. So the items
        of global batch i over all ranks are those a single process would put in its batch i, and the
        ranks see disjoint data. `even` (training): a last global batch that does not split evenly over
        the ranks is dropped, so every rank takes the same number of batches of the same size (DDP's
        averaged gradient then equals the single-process one). Otherwise (validation) ranks take what
        falls to them; a rank left with nothing in the last batch skips it. ConfigError when `even` and
        the batch size does not divide by `world_size`."""
        if even and self.batch_size % world_size:
            raise ConfigError(f"the batch size {self.batch_size} does not split evenly over {world_size} processes; "
                              f"use a multiple of {world_size} (it is the global batch, shared by the processes)")
        self.rank, self.world_size, self.even = rank, world_size, even
        return self

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        resume, self._resume = self._resume, None
        if resume is not None and (resume[0] is not None or not self.shuffle):
            cpu_order, start = resume
        elif self.shuffle:
            # The permutation is drawn on the CPU (so a seeded generator works on every device), then moved.
            cpu_order, start = torch.randperm(n, generator=self.generator), 0
        else:
            cpu_order, start = None, 0
        self._order, self._position = cpu_order, start
        order = cpu_order.to(self.x.device) if cpu_order is not None else None
        sharded = self.world_size > 1
        for i in range(start, len(self)):
            self._position = i + 1  # counted before the batch is used: a checkpoint after it continues at i + 1
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            if sharded:  # this rank's items of global batch i
                idx = (order[lo:hi] if order is not None else torch.arange(lo, hi, device=self.x.device))
                idx = idx[self.rank::self.world_size]
                if len(idx):
                    yield self.x[idx], self.y[idx]
            elif order is None:
                yield self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                yield self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        """Where the current pass is, for an exact resume: {"order": the pass's permutation ((N,) int64 on
        the CPU; None unshuffled), "position": batches yielded in the pass, "generator": the generator's state
        (None when the global one is used)}."""
        return {"order": self._order, "position": self._position,
                "generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """The next pass continues the one `state` describes, from its `position` (with "order" None and a
        shuffle, the next pass draws a new permutation: a new epoch). The generator gets its state back."""
        if state.get("generator") is not None:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(state["generator"])
        order = state.get("order")
        if order is not None and len(order) != len(self.x):
            raise DataError(f"the saved data order covers {len(order)} items but the data holds {len(self.x)}; "
                            f"resume with the data the checkpoint was taken with")
        self._resume = (order, int(state.get("position", 0))) if order is not None or not self.shuffle else None

    def to(self, device: torch.device | str, memory_format: torch.memory_format | None = None) -> "TensorBatches":
        """Move the whole dataset to `device` once, so batches are made there."""
        x = self.x.to(device)
        if memory_format is not None and x.dim() == 4:
            x = x.contiguous(memory_format=memory_format)
        self.x, self.y = x, self.y.to(device)
        return self


@dataclass
class DataLoaders:
    """A training and a validation iterable of `(x, y)` batches, plus what is known about the data."""
    train: Iterable
    valid: Iterable
    n_classes: int | None = None
    classes: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)  # dataset name, normalisation stats, source files...

    def to(self, device: torch.device | str, memory_format: torch.memory_format | None = None) -> "DataLoaders":
        for dl in (self.train, self.valid):
            if isinstance(dl, TensorBatches):
                dl.to(device, memory_format)
        return self


def normalise(x_train: torch.Tensor, x_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Scale both splits with the *training* set's mean and std (never the validation set's)."""
    mean, std = x_train.mean().item(), x_train.std().item()
    if not std > 0:  # also NaN, from a single pixel value
        raise DataError(f"every training pixel has the value {mean:.4g}: the images are blank, so there is nothing "
                        f"to learn and they cannot be normalised; check the image file")
    return (x_train - mean) / std, (x_valid - mean) / std, mean, std


def image_dls(
    name: str = "fashion_mnist",
    path: str | None = None,
    batch_size: int = 256,
    valid_batch_size: int | None = None,
    *,
    seed: int | None = None,
    download: bool = True,
    verify: bool = True,
    limit: int | None = None,
) -> DataLoaders:
    """MNIST-format images as normalised `(N, 1, 28, 28)` float tensors; the official test set validates.

    `limit` keeps the first N items of each split (smoke runs and tests).
    """
    if batch_size <= 0:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
    raw = load_raw(name, path, download_missing=download, verify_checksums=verify)
    x_tr, y_tr, x_te, y_te = raw.x_train, raw.y_train, raw.x_test, raw.y_test
    if limit is not None:
        x_tr, y_tr, x_te, y_te = x_tr[:limit], y_tr[:limit], x_te[:limit], y_te[:limit]
    to_float = lambda a: torch.from_numpy(a).float().div_(255).unsqueeze(1)  # (N, 1, H, W) in [0, 1]
    x_train, x_valid, mean, std = normalise(to_float(x_tr), to_float(x_te))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    train = TensorBatches(x_train, torch.from_numpy(y_tr).long(), batch_size, shuffle=True, generator=generator)
    valid = TensorBatches(x_valid, torch.from_numpy(y_te).long(), valid_batch_size or 2 * batch_size)
    info = {"dataset": raw.spec.name, "mean": mean, "std": std, "n_train": len(x_train), "n_valid": len(x_valid),
            "files": {k: str(v) for k, v in raw.source.items()}}
    return DataLoaders(train, valid, raw.spec.n_classes, raw.spec.classes, info)
