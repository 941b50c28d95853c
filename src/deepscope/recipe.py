"""The training job behind `deepscope train`: config -> data, model, Learner -> run folder."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .callbacks import (
    CosineSchedule, DeviceCallback, LimitBatches, MetricsCallback, OneCycle, ProgressCallback, Recorder,
)
from .config import TrainConfig
from .data import DataLoaders, image_dls
from .errors import ConfigError
from .learner import Learner
from .models import get_model
from .rundir import (
    abandon_run_dir, default_run_dir, environment, finish_run_dir, prepare_run_dir, write_json,
)
from .seed import set_seed
from .weights import save_weights


def make_optimizer_factory(config: TrainConfig):
    """A torch.optim factory from the config's name; deepscope's hand-written optimizers when available."""
    wd = config.weight_decay
    factories = {
        "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
        "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, weight_decay=wd),
        "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
    }
    if config.opt not in factories:
        raise ConfigError(f"unknown optimizer {config.opt!r}; choose one of {sorted(factories)}")
    return factories[config.opt]


def build_model(config: TrainConfig, n_classes: int) -> nn.Module:
    return get_model(config.model, nfs=config.nfs, n_out=n_classes, act=config.act, norm=config.norm)


def schedule_callbacks(config: TrainConfig) -> list:
    if config.schedule == "one_cycle":
        return [OneCycle(config.lr)]
    if config.schedule == "cosine":
        return [CosineSchedule(config.lr)]
    return []


def build_learner(config: TrainConfig, dls: DataLoaders, extra_cbs=(), progress: bool = True) -> Learner:
    model = build_model(config, dls.n_classes or 10)
    device = DeviceCallback(config.device, channels_last=True)
    cbs = [device, MetricsCallback(), Recorder(), *schedule_callbacks(config), *extra_cbs]
    if progress:
        cbs.append(ProgressCallback())
    if config.limit_batches:
        cbs.append(LimitBatches(config.limit_batches, config.limit_batches))
    return Learner(model, dls, nn.functional.cross_entropy, lr=config.lr, opt_func=make_optimizer_factory(config), cbs=cbs)


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict]
    seconds: float


def train(config: TrainConfig, *, progress: bool = True, overwrite: bool = False) -> RunResult:
    """Train as configured and write the run folder (config, metrics, weights, report)."""
    started = time.perf_counter()
    out = Path(config.out) if config.out else default_run_dir()
    staging = prepare_run_dir(out, overwrite=overwrite)  # fail fast on an unwritable folder
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        set_seed(config.seed)
        dls = image_dls(config.dataset, config.data_dir, config.batch_size, seed=config.seed, verify=config.verify)
        learn = build_learner(config, dls, progress=progress)
        learn.fit(config.epochs)
        metrics = learn.get_cb(MetricsCallback)
        recorder = learn.get_cb(Recorder)
        device = learn.get_cb(DeviceCallback).device
        seconds = time.perf_counter() - started
        write_json(staging / "config.json", {"config": config.to_dict(), "environment": environment(device),
                                             "data": dls.info, "wall_seconds": seconds})
        write_json(staging / "metrics.json", metrics.history)
        write_json(staging / "recorder.json", {"loss": recorder.losses, "lr": recorder.lrs, "momentum": recorder.moms})
        save_weights(learn.model, staging / "model.safetensors")
        from .report import write_report

        write_report(staging)
        run_dir = finish_run_dir(staging)
    except BaseException:
        abandon_run_dir(staging)
        raise
    return RunResult(run_dir, metrics.history, time.perf_counter() - started)
