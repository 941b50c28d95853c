"""Train a Learner with DistributedDataParallel across the processes torchrun started (deepscope.distributed)."""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from .. import distributed
from ..callback import Callback
from ..data.loaders import TensorBatches
from ..errors import ConfigError
from ..learner import TrainStep, WrappedStep


class DistributedStep(WrappedStep):
    """The training forward pass goes through the DistributedDataParallel wrapper (which averages the
    gradients across ranks during backward); validation calls the model itself, so a rank's validation
    batches need no other rank. The rest is the step it wraps."""

    def __init__(self, inner: TrainStep, ddp: nn.Module):
        super().__init__(inner)
        self.ddp = ddp

    def forward_module(self, learn) -> nn.Module:
        return self.ddp if learn.training else self.inner.forward_module(learn)


class Distributed(Callback):
    """Train on every process of a `torchrun` job with torch's DistributedDataParallel; in a single process
    it does nothing, so the same script runs both ways.

    At before_fit (after DeviceCallback has put the model on this rank's device): joins the process group
    (deepscope.distributed.init: gloo on the CPU, NCCL on CUDA, a `timeout_s` on every collective), turns
    BatchNorm layers into SyncBatchNorm when `sync_batchnorm`, wraps the model for the training forward
    pass, and shards TensorBatches data by rank (`TensorBatches.shard`: every rank cuts the same permutation
    into the same global batches and takes its share of each; the training set's batch size is the global
    batch and must divide by the number of processes). MetricsCallback, Recorder and ActivationStats then
    combine their numbers across ranks (sample-weighted sums, the mean loss, the statistics rows), so rank
    0's history describes the whole batch; only rank 0 writes files (deepscope train checks
    `distributed.is_main()`). Other data (a DataLoader) must be sharded by you (DistributedSampler).
    The model's parameters are broadcast from rank 0 when it is wrapped. The model and train_step are
    restored at cleanup_fit.

    BatchNorm that normalises too few items is reported once, by rank 0, as a warning: the diagnosis's
    own check (`batchnorm_small_batch`, deepscope.diagnose.setup_checks.check_batchnorm_batch) on the
    batch each process's BatchNorm sees, its share of the global batch (the global batch with SyncBatchNorm).
    Small per-process batches make BatchNorm's statistics noisy (Wu & Johnson 2021, "Rethinking 'Batch' in
    BatchNorm").
    """

    order = -15  # after DeviceCallback (-20), before LimitBatches (-10) and everything that hooks the model

    def __init__(self, sync_batchnorm: bool = False, timeout_s: float = distributed.DEFAULT_TIMEOUT_S,
                 find_unused_parameters: bool = False):
        self.sync_batchnorm, self.timeout_s = sync_batchnorm, timeout_s
        self.find_unused_parameters = find_unused_parameters
        self._warned = False  # the small-BatchNorm warning is printed once
        self.ddp = None
        self._step: DistributedStep | None = None
        self._sharded: list[TensorBatches] = []
        self._model: nn.Module | None = None

    def before_fit(self, learn) -> None:
        self._step, self._sharded, self._model = None, [], None
        if not distributed.init(timeout_s=self.timeout_s, device=next(learn.model.parameters()).device):
            return
        rank, world = distributed.rank(), distributed.world_size()
        self._model = learn.model
        if self.sync_batchnorm and next(learn.model.parameters()).device.type != "cuda":
            raise everywhere(ConfigError("SyncBatchNorm runs on CUDA GPUs only (torch's implementation); on the CPU "
                                         "train without BatchNorm, or with GroupNorm or LayerNorm (--norm group, "
                                         "--norm layer)"))
        if self.sync_batchnorm:  # same Parameters and buffers: the optimizer keeps them, the model is put back
            learn.model = nn.SyncBatchNorm.convert_sync_batchnorm(learn.model)
        for dl, even in ((learn.dls.train, True), (learn.dls.valid, False)):
            if isinstance(dl, TensorBatches):
                self._sharded.append(dl.shard(rank, world, even=even))
        learn.iters_per_epoch = len(learn.dls.train) if hasattr(learn.dls.train, "__len__") else None
        train = learn.dls.train
        if not isinstance(train, TensorBatches) and not hasattr(getattr(train, "sampler", None), "set_epoch") \
                and distributed.is_main():
            print("deepscope: warning: the training data is not TensorBatches and has no DistributedSampler, so "
                  "every process may train on the same items; shard it (torch.utils.data.DistributedSampler)",
                  file=sys.stderr)
        if rank:  # each rank its own stream for dropout and other random layers; rank 0 keeps its own
            torch.manual_seed(torch.initial_seed() + rank)
        if distributed.is_main() and not self._warned:
            warning = batchnorm_warning(learn.model, learn.dls.train, world)
            if warning:
                print(warning, file=sys.stderr)
                self._warned = True
        device = next(learn.model.parameters()).device
        self.ddp = nn.parallel.DistributedDataParallel(
            learn.model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters)
        self._step = DistributedStep.wrap(learn, self.ddp)

    def before_epoch(self, learn) -> None:
        sampler = getattr(learn.dls.train, "sampler", None)
        if self.ddp is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(learn.epoch)  # a DistributedSampler draws each epoch's order from the epoch number

    def cleanup_fit(self, learn) -> None:
        if self._step is not None:
            self._step.unwrap(learn)
            self._step = None
        if self._model is not None:
            learn.model, self._model = self._model, None
        self.ddp = None


def batchnorm_findings(model: nn.Module, train, world: int) -> list:
    """The diagnosis's `batchnorm_small_batch` finding (or none) for `model`'s BatchNorm layers over `world`
    processes, from the training data one process takes, `train`: a sharded TensorBatches, or a DataLoader
    whose batch_size is already per process."""
    from ..diagnose.preflight import is_batchnorm, last_batch_size, process_batch_size
    from ..diagnose.setup_checks import check_batchnorm_batch

    batch = process_batch_size(train)
    if batch is None:
        return []
    bns = [n for n, m in model.named_modules() if is_batchnorm(m)]
    synced = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    return check_batchnorm_batch(bns, batch, last_batch_size(train), world_size=world, synced=synced)


def batchnorm_warning(model: nn.Module, train, world: int) -> str | None:
    """The warning to print when `model`'s BatchNorm layers normalise too few items per process
    (`batchnorm_findings`), or None."""
    found = batchnorm_findings(model, train, world)
    return "\n".join(f"deepscope: warning: {f.message} {f.fix}" for f in found) or None


def check_world(batch_size: int) -> None:
    """ConfigError before any data is read when the batch does not split over the processes of the job
    (joined or announced by torchrun; every rank raises it, rank 0 alone prints it)."""
    world = distributed.planned_world_size()
    if world > 1 and batch_size % world:
        raise everywhere(ConfigError(f"the batch size {batch_size} does not split evenly over {world} processes; "
                                     f"use a multiple of {world} (it is the global batch, shared by the processes)"))


@contextlib.contextmanager
def met_alike():
    """Errors raised inside are met alike by every rank (the same options, the same files: reading the data,
    building the model), so rank 0 alone prints them."""
    try:
        yield
    except Exception as e:
        raise everywhere(e)


def everywhere(error: Exception) -> Exception:
    """Mark an error that every rank meets alike, so that only rank 0 prints it (deepscope.cli)."""
    if not distributed.is_main():
        error.told_by_rank0 = True
    return error
