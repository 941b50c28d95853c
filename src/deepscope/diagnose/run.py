"""`diagnose()`: pre-flight checks, then a short instrumented training run on a copy of the model."""
from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..callback import CallbackError
from ..callbacks.device import to_device
from ..data.loaders import DataLoaders
from ..learner import Learner
from .analyse import analyse_probe
from .finding import Finding, sort_findings
from .preflight import inspect_setup
from .probe import Probe
from .records import ProbeRecord
from .setup_checks import analyse_setup, exception_finding
from .thresholds import DEFAULT_STEPS


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _error(where: str, e: BaseException, step: int | None = None) -> dict:
    if isinstance(e, CallbackError):  # a deepscope callback failed: name it, quote the original error
        where, e = f"{where} ({e.callback.name}.{e.event})", e.error
    return {"where": where, "type": type(e).__name__, "message": str(e).strip(), "step": step}


def training_batches(data):
    """The training iterable: `data.train` for deepscope's DataLoaders, else `data` itself."""
    return data.train if isinstance(data, DataLoaders) or hasattr(data, "train") else data


def diagnose(model: nn.Module, data, loss_func: Callable = F.cross_entropy, *, steps: int = DEFAULT_STEPS,
             lr: float = 1e-3, opt_func: Callable = torch.optim.AdamW, save_dir: str | Path | None = None) -> list[Finding]:
    """Find what is wrong with training `model` on `data` with `loss_func`: pre-flight checks, then `steps`
    training steps (at `lr` with `opt_func`) on a deep copy, with hooks recording what happens inside.

    `data` is any iterable of (x, y) batches or a DataLoaders (its `.train` is used). The model, the data and
    the global RNG are left as they were; an exception raised by the model, loss or data becomes a finding.
    With `save_dir`, a batch that produces NaN/Inf is saved there as `nonfinite_batch.pt`.
    Returns the findings, errors first.
    """
    if steps <= 0:
        raise ValueError(f"steps must be a positive number of training steps, got {steps}")
    device = _model_device(model)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # The caller's RNG streams are not consumed: torch's global ones, and a shuffling generator of the data's.
    generator = getattr(training_batches(data), "generator", None)
    shuffle_state = generator.get_state() if isinstance(generator, torch.Generator) else None
    try:
        with torch.random.fork_rng(devices=cuda):
            return sort_findings(_diagnose(model, data, loss_func, steps, lr, opt_func, save_dir))
    finally:
        if shuffle_state is not None:
            generator.set_state(shuffle_state)


def _diagnose(model, data, loss_func, steps, lr, opt_func, save_dir) -> list[Finding]:
    batches = training_batches(data)
    try:
        if iter(batches) is batches:  # a one-shot iterator: keep the batches we use so they can be replayed
            batches = list(itertools.islice(batches, steps))
        x, y = next(iter(batches))
    except StopIteration:
        return [exception_finding({"where": "data", "type": "StopIteration", "message": "the data yields no batches"})]
    except Exception as e:  # noqa: BLE001 - broken data is a finding
        return [exception_finding(_error("data", e))]
    try:
        probe_model = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001
        return [exception_finding(_error("copying the model", e))]
    device = _model_device(probe_model)
    x, y = to_device((x, y), device)
    setup = inspect_setup(probe_model, x, y, loss_func, batches)
    if setup.error is not None:
        return analyse_setup(setup)
    record = run_probe(probe_model, batches, loss_func, steps=steps, lr=lr, opt_func=opt_func, save_dir=save_dir,
                       device=device)
    return analyse_setup(setup, record.batch_sizes, record.grad_nonzero) + analyse_probe(record)


def run_probe(model: nn.Module, batches, loss_func: Callable, *, steps: int, lr: float, opt_func: Callable,
              save_dir=None, device: torch.device | None = None) -> ProbeRecord:
    """Train `model` in place for `steps` steps with a Probe on every step; exceptions are recorded."""
    probe = Probe(every=1, max_steps=steps, save_dir=save_dir, device=device)
    n_batches = len(batches) if hasattr(batches, "__len__") else None
    epochs = math.ceil(steps / n_batches) if n_batches else steps
    learn = Learner(model, DataLoaders(batches, None), loss_func, lr=lr, opt_func=opt_func, cbs=[probe])
    try:
        learn.fit(max(1, epochs), valid=False)
    except Exception as e:  # noqa: BLE001 - a broken model or loss is what we are here to report
        probe.record.error = _error(probe.where if not isinstance(e, CallbackError) else "diagnosis", e,
                                    learn.train_iter)
    return probe.record
