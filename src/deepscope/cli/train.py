"""`deepscope train`: train a model on Fashion-MNIST (or MNIST) and write a run folder."""
from __future__ import annotations

import argparse

from ..config import PRECISIONS, TrainConfig
from ..errors import ConfigError
from .options import (
    EVERY_RANK, device_name, non_negative_float, non_negative_int, positive_float, positive_int, thread_count,
)

DEFAULTS = TrainConfig()


def add_config_arguments(p: argparse.ArgumentParser, run_prefix: str = "train") -> None:
    """The flags shared by `train` and the commands that train (doctor, lr-find); each maps onto a
    TrainConfig field of the same name."""
    d = DEFAULTS
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=["fashion_mnist", "mnist"], default=d.dataset, help="dataset (default: %(default)s)")
    data.add_argument("--data-dir", default=d.data_dir, metavar="DIR",
                      help="folder holding the four IDX files (.gz or raw). Default: search $DEEPSCOPE_DATA, the "
                           "cache (~/.cache/deepscope), /usr/share/datasets/<dataset>, then download into the cache")
    data.add_argument("--no-verify", dest="verify", action="store_false",
                      help="skip the MD5 check of the data files (for your own IDX files)")
    model = p.add_argument_group("model")
    model.add_argument("--model", choices=["cnn", "resnet"], default=d.model, help="architecture (default: %(default)s)")
    model.add_argument("--nfs", type=positive_int, nargs="+", default=d.nfs, metavar="N",
                       help="channels of each block (default: %(default)s)")
    model.add_argument("--act", default=d.act, help="activation: relu, leaky_relu, gelu, silu, tanh, sigmoid, "
                                                     "general_relu (default: %(default)s)")
    model.add_argument("--norm", default=d.norm, help="normalisation layer: none, batch, layer, instance, group, "
                                                       "running_batch (default: %(default)s)")
    model.add_argument("--init", choices=["default", "kaiming", "lsuv"], default=d.init,
                       help="weight initialisation (default: %(default)s = torch's own)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over the training set (default: %(default)s)")
    opt.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate (default: %(default)s)")
    opt.add_argument("--schedule", choices=["one_cycle", "cosine", "constant"], default=d.schedule,
                     help="learning-rate schedule (default: %(default)s)")
    opt.add_argument("--opt", default=d.opt, help="optimizer: adamw, adam, sgd (momentum 0.9), rmsprop from torch.optim, "
                                                   "or deepscope's hand-written ds_sgd, ds_momentum, ds_rmsprop, "
                                                   "ds_adam, ds_adamw (default: %(default)s)")
    opt.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay, help="weight decay (default: %(default)s)")
    opt.add_argument("--batch-size", "--bs", type=positive_int, default=d.batch_size,
                     help="training batch size; validation uses twice this (default: %(default)s)")
    opt.add_argument("--clip", type=positive_float, default=d.clip, metavar="NORM",
                     help="clip the global gradient norm to NORM before each step (default: no clipping)")
    opt.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                     help="fp32, or mixed precision: bf16 (bfloat16 autocast), fp16 (float16 autocast with loss "
                          "scaling; for GPUs) (default: %(default)s)")
    opt.add_argument("--early-stop", type=positive_int, default=d.early_stop, metavar="EPOCHS",
                     help="stop after EPOCHS epochs without a lower validation loss (default: run every epoch)")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    run.add_argument("--device", type=device_name, default=d.device, help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps "
                                                         "(default: %(default)s)")
    run.add_argument("--threads", type=thread_count, default=d.threads, help="CPU threads for torch (default: torch's choice)")
    run.add_argument("--limit-batches", type=positive_int, default=d.limit_batches, metavar="N",
                     help="stop each training and validation pass after N batches (smoke runs)")
    run.add_argument("--no-stats", dest="stats", action="store_false", help="do not collect per-layer statistics")
    run.add_argument("--stats-every", type=positive_int, default=d.stats_every, metavar="N",
                     help="record per-layer statistics every N training steps (default: %(default)s)")
    run.add_argument("--stats-sample", type=non_negative_int, default=d.stats_sample, metavar="N",
                     help="summarise N values of each output and gradient per step (default: %(default)s, about "
                          "1.1x the step time on a 2-core CPU); 0 summarises all of them, exactly, at about 1.6x")
    run.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files into the run folder")
    run.add_argument("--out", default=d.out, metavar="DIR", help=f"run folder to write (default: runs/{run_prefix}-<date>-<time>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace --out if it holds a deepscope run (and nothing else): the new run is written "
                          "beside it and swapped in when complete, then only the files deepscope wrote into the "
                          "old run are deleted. A folder of other files is never touched")


def add_compile_argument(group) -> None:
    """--compile [BACKEND] (TrainConfig.compile), for the commands that train with the Learner."""
    group.add_argument("--compile", nargs="?", const="inductor", default=DEFAULTS.compile, metavar="BACKEND",
                       help="run the forward pass through torch.compile (BACKEND: inductor when not given; "
                            "aot_eager only traces, to check that the model compiles). The first batch pays the "
                            "compilation; statistics hooks run outside the compiled graph, which is cut at each "
                            "watched module (--no-stats keeps it whole)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model and write a run folder with metrics, weights and report.html",
        description="Train a model on Fashion-MNIST (or MNIST) and write a run folder: config.json, metrics.json "
                    "(one record per epoch), recorder.json (loss and lr per batch), model.safetensors and "
                    "report.html. With no options: the default BatchNorm CNN with a one-cycle schedule.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p)
    d = DEFAULTS
    long = p.add_argument_group("long runs")
    long.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every, metavar="N",
                      help="also write a checkpoint every N training steps (one is always written at the end of "
                           "each epoch, and when Ctrl-C or SIGTERM stops the run)")
    long.add_argument("--keep-checkpoints", type=positive_int, default=d.keep_checkpoints, metavar="K",
                      help="step checkpoints to keep, newest first; the best epoch's is kept besides "
                           "(default: %(default)s)")
    long.add_argument("--profile", type=positive_int, default=DEFAULTS.profile, metavar="N",
                      help="record N training steps of the first epoch with torch.profiler, after a short warm-up "
                           "(1 skipped and 1 warm-up step): writes profile_trace.json (open it in "
                           "https://ui.perfetto.dev or chrome://tracing) and lists the top operators in the report")
    long.add_argument("--sync-batchnorm", action="store_true",
                      help="under torchrun: BatchNorm layers take their statistics over the whole global batch "
                           "(torch's SyncBatchNorm) instead of each process's share")
    add_compile_argument(long)
    long.add_argument("--no-replay", dest="replay", action="store_false",
                      help="do not check each training step for NaN/Inf to replay the first bad one (the check is "
                           "one read-back per step, which on a GPU is a sync); the statistics still show where NaN "
                           "first appeared")
    long.add_argument("--resume", metavar="RUN_DIR",
                      help="continue an interrupted or killed run from its last checkpoint, with the settings it "
                           "started with (RUN_DIR is its --out, with or without .partial); bit for bit on the CPU")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write report.html (it takes a few seconds per layer); `deepscope report RUN_DIR` "
                        "writes it later")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the per-epoch table is still printed)")
    p.set_defaults(func=run, parser=p, ddp=EVERY_RANK)


# Options that may go with --resume: they change how the run is shown, not what it computes.
RESUME_OPTIONS = {"resume", "quiet", "report"}


def _given(args: argparse.Namespace) -> list[str]:
    """The options given on the command line (by their dest), from the parser's actions and the argv."""
    argv = getattr(args, "argv", None) or []
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    parser = getattr(args, "parser", None)
    given = []
    for action in getattr(parser, "_actions", []):
        # a flag names an option exactly or, as argparse allows, by an unambiguous prefix (--epo for --epochs)
        if any(f == o or (o.startswith("--") and f.startswith("--") and len(f) > 2 and o.startswith(f))
               for o in action.option_strings for f in flags):
            given.append(action.dest)
    return given


def run(args: argparse.Namespace) -> int:
    from ..callbacks.distributed import met_alike
    from ..recipe import train

    with met_alike():  # the options are every process's: under torchrun rank 0 alone says what is wrong
        if args.resume:
            extra = [d for d in _given(args) if d not in RESUME_OPTIONS]
            if extra:
                names = ", ".join("--" + d.replace("_", "-") for d in extra)
                raise ConfigError(f"--resume continues the run with the settings it started with (its "
                                  f"config.json); drop {names}, or start a new run with them")
            config = None
        else:
            config = config_from_args(args)
    result = train(config, quiet=args.quiet, overwrite=args.overwrite, resume=args.resume,
                   report=None if args.report else False)
    from .. import distributed

    if not distributed.is_main():  # under torchrun, rank 0 speaks for the job
        return 0
    report = result.run_dir / "report.html"
    where = (f"run folder {result.run_dir} (no report: --no-report; write it with `deepscope report {result.run_dir}`)"
             if not report.exists() and "report" not in result.failed_steps else
             f"run folder {result.run_dir} (open {report})" if "report" not in result.failed_steps else
             f"run folder {result.run_dir} (no report: rebuild it with `deepscope report {result.run_dir}`)")
    if result.problem:
        print(f"training failed after {result.seconds:.1f} s: {result.problem}. Lower the learning rate (--lr) "
              f"or run `deepscope doctor` with the same options; {where}")
    else:
        rest = "the run folder and report" if report.exists() else "the run folder"
        split = (f" ({result.train_seconds:.1f} s reading the data and training, as config.json's wall_seconds; "
                 f"the rest writing {rest})" if result.train_seconds else "")
        print(f"done in {result.seconds:.1f} s{split}: {_accuracy(result)}{where}")
        from ..callbacks.timing import TIMING_KEY, summary_line

        line = summary_line((result.history[-1] if result.history else {}).get(TIMING_KEY))
        if line:
            print(f"{line} (per epoch: metrics.json and the report)")
    from ..diagnose.finding import format_summary

    print(format_summary(result.findings, result.checked, "findings.json and the report"), end="")
    if result.failed_steps:
        print(f"warning: the run is complete but these could not be written: {', '.join(result.failed_steps)} "
              f"(the reason is printed above)")
    return 1 if result.problem or result.failed_steps else 0


def _accuracy(result) -> str:
    """What the last validation pass measured, and on how many images."""
    acc = (result.history[-1] if result.history else {}).get("valid_accuracy")
    if acc is None:
        return ""
    partial = result.valid_samples is not None and result.n_valid and result.valid_samples < result.n_valid
    measured = f" on {result.valid_samples:,} of {result.n_valid:,} test images (--limit-batches)" if partial else ""
    return f"{'valid' if partial else 'test'} accuracy {100 * acc:.2f}%{measured}, "
