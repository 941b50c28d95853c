"""Several processes, one training: PyTorch's own `torchrun` and `DistributedDataParallel` (DDP).

deepscope has no launcher or scheduler of its own. `torchrun --nproc-per-node N -m deepscope train ...`
starts N processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init()` joins them in
a process group (gloo on the CPU, NCCL on CUDA) with a timeout, so that a rank that stopped cannot leave the
others waiting for ever. This module is the one owner of "which process am I": every other part asks it
(`rank`, `world_size`, `is_main`) and uses its collectives, which do nothing in a single process.

The `Distributed` callback (deepscope.callbacks) trains a Learner this way: the model is wrapped in DDP for
the training forward pass (gradients are averaged across ranks during backward), each rank takes its slice
of every global batch, and per-epoch metrics, the loss record and the statistics are combined across ranks,
so that rank 0 describes the whole batch. Only rank 0 writes files.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# How long a collective may wait for the other ranks before the job fails (torch's default is 30 minutes
# for gloo and 10 for NCCL): a rank that died or hangs ends the job within this time.
DEFAULT_TIMEOUT_S = 300


def launched() -> bool:
    """Whether this process was started as one of several (torchrun sets WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def launched_rank() -> int:
    """This process's rank as torchrun announced it (RANK), before or without a process group; 0 alone."""
    try:
        return int(os.environ.get("RANK", "0")) if launched() else 0
    except ValueError:
        return 0


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def backend_for(device: str | torch.device | None = "auto") -> str:
    """The process-group backend for training on `device` ("auto", "cpu", "cuda", "cuda:N", "mps" or a
    torch.device; None is "auto"): NCCL for CUDA GPUs (when CUDA is here), gloo for everything else. NCCL
    cannot move CPU tensors, so `--device cpu` on a machine with GPUs needs gloo."""
    kind = torch.device(device).type if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    return "nccl" if kind == "cuda" and torch.cuda.is_available() else "gloo"


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
         device: str | torch.device | None = "auto") -> bool:
    """Join the process group torchrun described in the environment (once; later calls do nothing). The
    backend, unless given, suits the device the job trains on (`backend_for`: NCCL for CUDA, else gloo).
    Returns whether this process is one of several."""
    if launched() and dist.is_available() and not dist.is_initialized():
        if backend is None:
            backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return active()


def shutdown() -> None:
    """Leave the process group (at the end of a job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control.clear()


def rank() -> int:
    """This process's rank: the group's once joined, before that what torchrun announced (RANK); 0 in a
    single process."""
    return dist.get_rank() if active() else launched_rank()


def world_size() -> int:
    """How many processes train together, 1 in a single process."""
    return dist.get_world_size() if active() else 1


def planned_world_size() -> int:
    """The processes of this job: the group's size once joined, else what torchrun's WORLD_SIZE announces."""
    if active():
        return world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK), which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or a single process)."""
    return rank() == 0


def device() -> torch.device:
    """The device of this rank when the job trains on "auto" or "cuda": its GPU (by LOCAL_RANK) under
    CUDA, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Combine `tensor` across ranks in place (op: "sum", "min", "max"); nothing in a single process.
    Every rank must call it at the same point, with a tensor of the same shape."""
    if active():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                    "max": dist.ReduceOp.MAX}[op])
    return tensor


def rank_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of every rank's `tensor` (a new tensor; `tensor` itself in a single process), e.g.
    of each rank's loss over its share of the batch, which is the loss of the whole batch when the shares are
    equal. Every rank must call it at the same point."""
    if not active():
        return tensor
    return all_reduce_(tensor.detach().clone(), "sum") / world_size()


_control = []  # the CPU (gloo) process group for small host-side agreements, made once when first needed


def any_rank(value: int) -> int:
    """The largest of every rank's `value` (e.g. a stop signal's number, 0 for none), agreed on the host:
    through a gloo group beside NCCL, so asking costs no GPU synchronisation. Every rank must call it."""
    if not active():
        return value
    return int(_on_host(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MAX)[0])


def host_sum(values: list[float]) -> list[float]:
    """Every rank's `values` added up, on the host (the gloo group beside NCCL); `values` in a single
    process. Every rank must call it, with as many values."""
    if not active():
        return list(values)
    return _on_host(torch.tensor(values, dtype=torch.float64), dist.ReduceOp.SUM).tolist()


def _on_host(tensor: torch.Tensor, op) -> torch.Tensor:
    if not _control:
        _control.append(dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None)
    dist.all_reduce(tensor, op=op, group=_control[0])
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (a picklable object made by deepscope itself, e.g. a path)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank ([obj] in a single process)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()
