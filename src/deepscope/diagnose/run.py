"""`diagnose()`: pre-flight checks, then a short instrumented training run on a copy of the model, analysed
by the one analysis every entry point shares (`analysis.analyse_run`)."""
from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..callback import Callback, CallbackError, CancelFitException
from ..callbacks.device import to_device
from ..data.loaders import DataLoaders
from ..learner import Learner
from .analysis import Analysis, Record, analyse_run
from .callback import Diagnose
from .finding import Finding
from .preflight import inspect_setup
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
    training steps (at `lr` with `opt_func`) on a deep copy, with the recording engine on every step, all
    judged by the same analysis as the `Diagnose` callback and `watch().findings()`.

    `data` is any iterable of (x, y) batches or a DataLoaders (its `.train` is used). The model, the data and
    the global RNG are left as they were; an exception raised by the model, loss or data becomes a finding.
    The first step that makes NaN/Inf stops the run and is replayed to name the module that made it; with
    `save_dir` its batch is saved there as `nonfinite_batch.pt`. Returns the findings, causes first
    (`diagnose_run` also says what was checked). Raises ValueError for `steps` <= 0.
    """
    return diagnose_run(model, data, loss_func, steps=steps, lr=lr, opt_func=opt_func, save_dir=save_dir).findings


def diagnose_run(model: nn.Module, data, loss_func: Callable = F.cross_entropy, *, steps: int = DEFAULT_STEPS,
                 lr: float = 1e-3, opt_func: Callable = torch.optim.AdamW,
                 save_dir: str | Path | None = None) -> Analysis:
    """`diagnose()`'s whole analysis: the findings, the checks that ran and those that could not, and why."""
    if steps <= 0:
        raise ValueError(f"steps must be a positive number of training steps, got {steps}")
    device = _model_device(model)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # The caller's RNG streams are not consumed: torch's global ones, and a shuffling generator of the data's.
    generator = getattr(training_batches(data), "generator", None)
    shuffle_state = generator.get_state() if isinstance(generator, torch.Generator) else None
    try:
        with torch.random.fork_rng(devices=cuda):
            return _diagnose(model, data, loss_func, steps, lr, opt_func, save_dir)
    finally:
        if shuffle_state is not None:
            generator.set_state(shuffle_state)


class _Steps(Callback):
    """Ends the fit after `steps` training steps and notes what the step was doing, for an exception."""
    order = 31  # after Diagnose (30)

    def __init__(self, steps: int, device: torch.device):
        self.steps, self.device, self.where = steps, device, "optimizer"

    def before_fit(self, learn) -> None:
        self.where = "data"

    def before_batch(self, learn) -> None:
        if learn.training:
            learn.batch = to_device(learn.batch, self.device)
            self.where = "forward"

    def after_pred(self, learn) -> None:
        self.where = "loss"

    def after_loss(self, learn) -> None:
        self.where = "backward"

    def after_backward(self, learn) -> None:
        self.where = "step"

    def after_batch(self, learn) -> None:
        if learn.training:
            self.where = "data"
            if learn.train_iter + 1 >= self.steps:
                raise CancelFitException()


def _diagnose(model, data, loss_func, steps, lr, opt_func, save_dir) -> Analysis:
    batches = training_batches(data)
    failed = lambda error: analyse_run(Record([], error=error))  # noqa: E731
    try:
        if iter(batches) is batches:  # a one-shot iterator: keep the batches we use so they can be replayed
            batches = list(itertools.islice(batches, steps))
        first = next(iter(batches))
        x, y = first[0], first[1]  # (x, y, anything else): the Learner trains on the first two
    except StopIteration:
        return failed({"where": "data", "type": "StopIteration", "message": "the data yields no batches"})
    except Exception as e:  # noqa: BLE001 - broken data is a finding
        return failed(_error("data", e))
    if not any(p.requires_grad for p in model.parameters()):
        return failed({"where": "model", "type": "ValueError",
                       "message": "the model has no parameter with requires_grad=True, so training cannot change it"})
    try:
        probe_model = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001
        return failed(_error("copying the model", e))
    device = _model_device(probe_model)
    x, y = to_device((x, y), device)
    setup = inspect_setup(probe_model, x, y, loss_func, batches)
    if setup.error is not None:
        return analyse_run(Record([], setup=setup))
    diag, limit = Diagnose(save_dir, stop_on_nonfinite=True), _Steps(steps, device)
    n_batches = len(batches) if hasattr(batches, "__len__") else None
    epochs = math.ceil(steps / n_batches) if n_batches else steps
    learn = Learner(probe_model, DataLoaders(batches, None), loss_func, lr=lr, opt_func=opt_func, cbs=[diag, limit])
    error = None
    try:
        learn.fit(max(1, epochs), valid=False)
    except Exception as e:  # noqa: BLE001 - a broken model or loss is what we are here to report
        error = _error(limit.where if not isinstance(e, CallbackError) else "diagnosis", e, learn.train_iter)
    record = diag.record(learn)
    record.setup, record.error = setup, error
    return analyse_run(record)
