"""The training job behind `deepscope train`: config -> data, model, Learner -> run folder."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .callbacks import (
    Checkpoint, Compile, CosineSchedule, DeviceCallback, EarlyStopping, GradClip, LimitBatches, MetricsCallback,
    MixedPrecision, OneCycle, PhaseTimer, ProgressCallback, Recorder,
)
from .checkpoint import latest_checkpoint, load_checkpoint
from .config import TrainConfig
from .data import DataLoaders, image_dls
from .diagnose import Diagnose, moved_paths, save_findings
from . import distributed
from .callbacks.distributed import Distributed, check_world, met_alike
from .errors import CheckpointError, ConfigError
from .init import init_model, lsuv_
from .learner import Learner
from .models import get_model
from .norms import NORM_KINDS
from .optim import OPTIMIZERS
from .runfolder import (
    CHECKPOINTS, CHECKS, EXPORT, FINDINGS, METRICS, RECORDER, REPORT, STATS, WEIGHTS, RunFolder, environment, has_checkpoints,
    read_config, resume_command, shared_run, unfinished_config,
)
from .seed import set_seed
from .stats import ActivationStats
from .weights import save_weights


# torch.optim's versions are the defaults (fused C++ loops); the `ds_` names pick deepscope's hand-written
# optimizers from the foundations (deepscope.optim), which give the same numbers, more slowly.
TORCH_OPTIMIZERS = {
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
    "rmsprop": lambda params, lr, wd: torch.optim.RMSprop(params, lr=lr, weight_decay=wd),
}
OPTIMIZER_NAMES = (*TORCH_OPTIMIZERS, *(f"ds_{name}" for name in OPTIMIZERS))


def make_optimizer_factory(config: TrainConfig):
    """An optimizer factory `(params, lr) -> Optimizer` from the config's name."""
    wd, name = config.weight_decay, config.opt
    if name in TORCH_OPTIMIZERS:
        return lambda params, lr: TORCH_OPTIMIZERS[name](params, lr, wd)
    if name.startswith("ds_") and name[3:] in OPTIMIZERS:
        cls = OPTIMIZERS[name[3:]]
        return lambda params, lr: cls(params, lr=lr, weight_decay=wd)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZER_NAMES)}")


def build_model(config: TrainConfig, n_classes: int, init_batch: torch.Tensor | None = None) -> nn.Module:
    """The configured architecture, initialised as asked (`lsuv` needs a batch of inputs)."""
    if config.norm not in NORM_KINDS:
        raise ConfigError(f"unknown norm {config.norm!r}; choose one of {list(NORM_KINDS)}")
    model = get_model(config.model, nfs=config.nfs, n_out=n_classes, act=config.act, norm=config.norm)
    if config.init in ("kaiming", "lsuv"):
        init_model(model, "kaiming_normal")
    if config.init == "lsuv":
        if init_batch is None:
            raise ConfigError("LSUV init needs a batch of training inputs")
        lsuv_(model, init_batch)
    return model


def schedule_callbacks(config: TrainConfig) -> list:
    if config.schedule == "one_cycle":
        return [OneCycle(config.lr)]
    if config.schedule == "cosine":
        return [CosineSchedule(config.lr)]
    return []


def step_callbacks(config: TrainConfig) -> list:
    """How each step is taken and when the fit stops: gradient clipping, mixed precision, early stopping."""
    cbs: list = []
    if config.clip is not None:
        cbs.append(GradClip(config.clip))
    if config.precision != "fp32":
        cbs.append(MixedPrecision(torch.bfloat16 if config.precision == "bf16" else torch.float16))
    if config.early_stop is not None:
        cbs.append(EarlyStopping("valid_loss", patience=config.early_stop))
    return cbs


def looking_inside_callbacks(config: TrainConfig, run_dir: Path | None) -> list:
    """Statistics (unless --no-stats), diagnosis, and TensorBoard and torch.profiler (when asked) for a
    training run."""
    cbs: list = [Diagnose(save_dir=run_dir, record_stats=config.stats,  # --no-stats: no statistics at all
                          replay=config.replay)]  # --no-replay: no read-back in a step
    stats = ActivationStats(every=config.stats_every, subsample=config.stats_sample or None) if config.stats else None
    if stats is not None:
        cbs.append(stats)
    if config.tensorboard and run_dir is not None:
        from .tensorboard import TensorBoardCallback

        cbs.append(TensorBoardCallback(run_dir / "tensorboard", stats=stats, hparams=config.to_dict(),
                                       every=config.stats_every))  # each recorded step, as stats.npz has them
    if config.profile and run_dir is not None:
        from .profile import Profile

        cbs.append(Profile(config.profile, run_dir))
    return cbs


def build_learner(config: TrainConfig, dls: DataLoaders, extra_cbs=(), progress: bool = True,
                  quiet: bool = False) -> Learner:
    """The configured Learner. `progress` adds the per-epoch table (and bars and live plot unless `quiet`)."""
    init_batch = next(iter(dls.train))[0] if config.init == "lsuv" else None
    model = build_model(config, dls.n_classes or 10, init_batch)
    device_name = config.device
    if distributed.active() and config.device in ("auto", "cuda"):
        device_name = str(distributed.device())  # each process its own GPU (torchrun's LOCAL_RANK), or the CPU
    device = DeviceCallback(device_name, channels_last=True)
    cbs = [device, MetricsCallback(), Recorder(), PhaseTimer(), *schedule_callbacks(config), *step_callbacks(config),
           *([Compile(config.compile)] if config.compile else []), *extra_cbs]
    if progress:
        cbs.append(ProgressCallback(bars=False, plot=False) if quiet else ProgressCallback())
    if config.limit_batches:
        cbs.append(LimitBatches(config.limit_batches, config.limit_batches))
    return Learner(model, dls, nn.functional.cross_entropy, lr=config.lr, opt_func=make_optimizer_factory(config), cbs=cbs)


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict]
    seconds: float
    valid_samples: int | None = None  # images the last validation pass measured (fewer under --limit-batches)
    n_valid: int | None = None  # images in the validation set
    problem: str | None = None  # why the training failed (a non-finite loss), or None
    failed_steps: tuple[str, ...] = ()  # optional steps (the report) that could not be written
    findings: tuple = ()  # the diagnosis of the run (Findings, causes first)
    checked: str = ""  # what the diagnosis checked, in a line (Analysis.summary)
    train_seconds: float | None = None  # the training alone (config.json's wall_seconds); `seconds` is the whole run


def _open_run(config: TrainConfig | None, overwrite: bool, resume) -> tuple:
    """(run folder, config, checkpoint to resume from or None) of a single process, or of rank 0."""
    if resume is not None:
        run = RunFolder.reopen(resume, "train")
        try:
            config = TrainConfig.from_dict(read_config(run.path)["config"])
            checkpoint = latest_checkpoint(run.path / CHECKPOINTS, log=run.log)
            if checkpoint is None:
                raise CheckpointError(no_checkpoint_message(run.path / CHECKPOINTS))
        except BaseException:
            run._release()
            raise
        return run, config, checkpoint
    if config.tensorboard:
        from .tensorboard import _summary_writer_class

        _summary_writer_class()  # a missing tensorboard package stops the run before the data is read
    return RunFolder.prepare(config.out, "train", overwrite=overwrite), config, None


def _planned_device(config: TrainConfig | None, resume) -> str:
    """The device a run will train on, before the process group exists (its backend depends on it): the
    config's, or for a resumed run the one in its config.json (this machine's copy; "auto" if unreadable)."""
    if config is not None:
        return config.device
    saved = unfinished_config(resume)
    return (saved or {}).get("config", {}).get("device", "auto")


def no_checkpoint_message(folder: Path) -> str:
    """Why there is nothing to resume from in `folder`, and what to do."""
    from .checkpoint import step_checkpoints

    found = step_checkpoints(folder)
    if not found:
        return (f"{folder.parent} holds no checkpoint: the run stopped before its first one; start it again "
                f"(with --overwrite to replace it)")
    return (f"none of the {len(found)} checkpoints in {folder} passed its SHA-256 check (see above: a missing "
            f".sha256 file, or a damaged checkpoint). If you trust a checkpoint whose .sha256 was lost, write it "
            f"again with `sha256sum FILE > FILE.sha256` in {folder}, then resume")


def _shared_run(config: TrainConfig | None, overwrite: bool, resume) -> tuple:
    """Under torchrun: rank 0 prepares (or reopens) the run folder, and every rank learns its path, the
    config and the checkpoint to resume from (runfolder.shared_run); an error on rank 0 is raised on every
    rank (and printed by rank 0 only, deepscope.cli)."""
    def open_run():
        run, opened, checkpoint = _open_run(config, overwrite, resume)
        return run, (opened.to_dict(), str(checkpoint) if checkpoint else None)

    run, (config_dict, checkpoint) = shared_run(open_run)
    return run, TrainConfig.from_dict(config_dict), Path(checkpoint) if checkpoint else None


def _check_same_config(state: dict, config: TrainConfig, path: Path) -> None:
    """CheckpointError naming the settings that differ when a checkpoint was not taken with `config`."""
    saved = (state.get("extra") or {}).get("config")
    if saved is None:
        return
    now = config.to_dict()
    defaults = TrainConfig().to_dict()  # a setting added since the checkpoint was written had its default then
    differ = sorted(k for k in set(saved) | set(now)
                    if saved.get(k, defaults.get(k)) != now.get(k, defaults.get(k)) and k != "out")
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k, defaults.get(k))!r} in the checkpoint, {now.get(k)!r} in config.json"
                          for k in differ[:6])
        raise CheckpointError(f"{path} was taken with other settings than this run's config.json ({shown}); it "
                              f"belongs to another run")


def _write_results(run: RunFolder, learn: Learner) -> tuple[list, str]:
    """Metrics, per-batch record, weights, findings, checks and statistics of what ran, into the run."""
    metrics, recorder = learn.get_cb(MetricsCallback), learn.get_cb(Recorder)
    run.write_json(METRICS, metrics.history)
    run.write_json(RECORDER, {"loss": recorder.losses, "lr": recorder.lrs, "momentum": recorder.moms})
    save_weights(learn.model, run.file(WEIGHTS))
    diagnosis = learn.get_cb(Diagnose)
    findings = [moved_paths(f, str(run.path), str(run.final)) for f in diagnosis.findings]
    checked = diagnosis.analysis.summary() if diagnosis.analysis is not None else ""
    save_findings(run.file(FINDINGS), findings)
    if diagnosis.analysis is not None:
        run.write_json(CHECKS, diagnosis.analysis.to_dict())
    if learn.get_cb(ActivationStats) is not None:
        learn.get_cb(ActivationStats).save(run.file(STATS))
    return findings, checked


def _keep_what_ran(run: RunFolder, learn: Learner, config: TrainConfig, error: BaseException, started: float) -> None:
    """The fit stopped after writing checkpoints: keep the unfinished run to be resumed, and (for a stop
    asked for at a batch boundary) write what ran and its report. A second Ctrl-C skips the writing."""
    from .errors import Interrupted

    checkpoints = learn.get_cb(Checkpoint)
    where = checkpoints.stopped_at or checkpoints.last or latest_checkpoint(run.path / CHECKPOINTS)
    how = {2: "Ctrl-C", 15: "SIGTERM"}.get(getattr(error, "signum", None), type(error).__name__)
    at = f"stopped ({how}) at training step {learn.train_iter}" if isinstance(error, KeyboardInterrupt) else \
        f"failed at training step {learn.train_iter}"
    old = (f" The old run in {run.final} is intact; the resumed run replaces it when it completes."
           if run.final.is_dir() and any(run.final.iterdir()) else "")
    run.keep_unfinished(f"{at}; the run so far is kept in {run.path} with its checkpoints (latest: "
                        f"{where.name if where else 'none'}). Resume it with: {resume_command(run.final)}.{old}")
    if isinstance(error, Interrupted) and getattr(error, "at_batch_boundary", False):
        run.log(f"writing what ran{' and its report' if config.report else ''} (press Ctrl-C again to skip)")
        wrote = run.optional("results", lambda: _write_results(run, learn))
        run.write_config(config.to_dict(), environment=environment(learn.get_cb(DeviceCallback).device),
                         data=learn.dls.info, wall_seconds=time.perf_counter() - started,
                         options={"stopped_at_step": learn.train_iter})
        if wrote and config.report:
            from .report import write_report

            if run.optional("report", lambda: write_report(run.path)):
                run.outcome += f" (report of what ran: {run.path / 'report.html'})"


def nonfinite_loss(losses: list[float], history: list[dict]) -> str | None:
    """A sentence naming the first non-finite training loss or epoch metric, or None when all are finite."""
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        return f"the training loss became {losses[bad]} at step {bad} ({len(losses)} step{'s' if len(losses) != 1 else ''} recorded)"
    for record in history:
        for key in ("train_loss", "valid_loss"):
            value = record.get(key)
            if value is not None and not math.isfinite(value):
                return f"{key.replace('_', ' ')} was {value} in epoch {record.get('epoch', '?')}"
    return None


def valid_samples(config: TrainConfig, dls: DataLoaders) -> int | None:
    """How many validation images one validation pass measures (all of them unless --limit-batches)."""
    n = getattr(dls.valid, "x", None)
    if n is None:
        return None
    n = len(n)
    if config.limit_batches:
        n = min(n, config.limit_batches * dls.valid.batch_size)
    return n


def train(config: TrainConfig | None, *, progress: bool = True, quiet: bool = False, overwrite: bool = False,
          resume: str | Path | None = None, report: bool | None = None) -> RunResult:
    """Train as configured and write the run folder (config, metrics, weights, findings, statistics,
    checkpoints, report). Raises OutputError before any work when `config.out` may not be written (see
    deepscope.runfolder), DataError/ConfigError for bad data or options. A run that trains to a
    non-finite loss is still written, and its `problem` says so.

    Checkpoints (deepscope.callbacks.Checkpoint) go to `<run>/checkpoints`: at each epoch's end, every
    `config.checkpoint_every` steps, and when Ctrl-C or SIGTERM stops the run at a batch boundary. A run that
    stops after its first checkpoint (an error, an interruption, or a kill) stays in `<out>.partial`, with
    what ran written out when the process could; `resume` (that folder, with or without `.partial`; then
    `config` is None: the run's own config.json is used) continues it from its latest checkpoint. `report`
    (None: as the config says) whether to write report.html."""
    started = time.perf_counter()
    if distributed.launched():  # one of several processes started by torchrun: rank 0 owns the run folder
        distributed.init(device=_planned_device(config, resume))
        run, config, checkpoint = _shared_run(config, overwrite, resume)
    else:
        run, config, checkpoint = _open_run(config, overwrite, resume)
    main = distributed.is_main()
    with run:
        if distributed.active():
            check_world(config.batch_size)  # before the data is read
        elif config.sync_batchnorm:
            print("deepscope: warning: --sync-batchnorm has no effect in a single process (BatchNorm already sees "
                  "the whole batch); it is for jobs started with torchrun", file=sys.stderr)
        if checkpoint is None:  # first, so that a killed run can be resumed with its own settings
            run.write_config(config.to_dict(), environment=environment(config.device))
        else:
            run.discard(REPORT)  # the report of what ran before the stop; the finished run gets its own
            run.discard(EXPORT)  # models exported from the unfinished run: not the finished run's weights
        if config.threads:
            torch.set_num_threads(config.threads)
        set_seed(config.seed)
        with met_alike():  # every rank reads the same files: rank 0 alone says what is wrong with them
            dls = image_dls(config.dataset, config.data_dir, config.batch_size, seed=config.seed, verify=config.verify)
        checkpoints = Checkpoint(run.path / CHECKPOINTS, every=config.checkpoint_every,
                                 keep_last=config.keep_checkpoints, monitor="valid_loss",
                                 extra={"config": config.to_dict()})
        extra = [*looking_inside_callbacks(config, run.path if main else None), checkpoints]
        if distributed.active():
            extra.append(Distributed(sync_batchnorm=config.sync_batchnorm))
        learn = build_learner(config, dls, extra, progress=progress and main, quiet=quiet)
        state = None
        if checkpoint is not None:
            state = load_checkpoint(checkpoint)
            _check_same_config(state, config, checkpoint)
            progress_at = state["progress"]
            run.log(f"resuming {run.final} from {checkpoint.name}: epoch {progress_at['epoch'] + 1}, after "
                    f"{progress_at['batch']} of its training batches ({progress_at['train_iter']} steps done)")
        try:
            learn.fit(config.epochs, resume_from=state)
        except BaseException as e:
            if not main or not has_checkpoints(run.path):
                raise
            _keep_what_ran(run, learn, config, e, started)
            raise
        metrics = learn.get_cb(MetricsCallback)
        recorder = learn.get_cb(Recorder)
        device = learn.get_cb(DeviceCallback).device
        seconds = time.perf_counter() - started
        options = {"resumed_from": checkpoint.name} if checkpoint is not None else {}
        run.write_config(config.to_dict(), environment=environment(device), data=dls.info, wall_seconds=seconds,
                         options=options)
        if main:
            findings, checked = _write_results(run, learn)
        else:
            findings, checked = [], ""
        if main and (config.report if report is None else report):
            from .report import write_report

            run.optional("report", lambda: write_report(run.path))
        run_dir = run.finish()
    return RunResult(run_dir, metrics.history, time.perf_counter() - started, valid_samples(config, dls),
                     len(dls.valid.x) if hasattr(dls.valid, "x") else None,
                     nonfinite_loss(recorder.losses, metrics.history), tuple(run.failed_optional), tuple(findings),
                     checked, seconds)
