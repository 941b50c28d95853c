"""`deepscope doctor`: check a training set-up before spending hours on it.

Builds the data and the model from the same options as `train`, runs `deepscope.diagnose` (pre-flight
checks, then a short instrumented run on a copy of the model), prints the findings and writes them to
`findings.json` in the output folder. Finding problems is the command's job, so it exits 0 either way.
"""
from __future__ import annotations

import argparse
import itertools

from .options import RANK0_WAITED, positive_int
from .train import add_config_arguments, config_from_args


class FirstBatches:
    """Re-iterable view of the first `n` batches of `batches` (for --limit-batches)."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return min(self.n, len(self.batches)) if hasattr(self.batches, "__len__") else self.n

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.n)


def _batchnorm_per_process(model, train, world: int) -> list:
    """The small-BatchNorm-batch finding for the batches one process of a `world`-process DDP job takes:
    rank 0's share of `train`, cut as the Distributed callback cuts it (a DataLoader's batch_size is already
    per process, a DistributedSampler sharing out the items)."""
    import copy

    from ..callbacks.distributed import batchnorm_findings

    share = copy.copy(train)
    if hasattr(share, "shard"):
        share.shard(0, world, even=True)
    return batchnorm_findings(model, share, world)


def add_parser(subparsers) -> None:
    from ..diagnose.thresholds import DOCTOR_STEPS

    p = subparsers.add_parser(
        "doctor", help="diagnose a training set-up: what is wrong, where, and what to try",
        description="Build the data and model as `deepscope train` would, check them before training (targets, "
                    "loss inputs, init, normalisation, batch size), then train a copy for a few steps with hooks on "
                    "every module and report NaNs, dead units, exploding or collapsing activations, saturation, "
                    "missing gradients and learning-rate trouble. Writes findings.json into --out "
                    "(default runs/doctor-<date>-<time>). Exits 0 even when it finds problems. Under `torchrun "
                    "--nproc-per-node N -m deepscope doctor` it runs once, in rank 0, on the global --batch-size "
                    "(the step DistributedDataParallel takes), and says what each of the N processes of the DDP job "
                    "would take per step; the other processes wait for it and exit with its exit code.",
    )
    add_config_arguments(p, run_prefix="doctor")
    p.add_argument("--steps", type=positive_int, default=DOCTOR_STEPS,
                   help="training steps of the instrumented run (default: %(default)s: a learning rate that "
                        "diverges after a few dozen steps, and a loss stuck at chance, need that many to show)")
    p.set_defaults(func=run, ddp=RANK0_WAITED)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import distributed
    from ..callbacks.device import default_device
    from ..callbacks.distributed import check_world
    from ..data import image_dls
    from ..diagnose import diagnose_run, moved_paths, save_findings
    from ..diagnose.finding import format_summary
    from ..recipe import build_model, make_optimizer_factory
    from ..runfolder import CHECKS, FINDINGS, RunFolder, environment
    from ..seed import set_seed

    config = config_from_args(args)
    world = distributed.planned_world_size()  # > 1 under torchrun, where this is rank 0 (deepscope.cli.main)
    check_world(config.batch_size)
    with RunFolder.prepare(config.out, "doctor", overwrite=args.overwrite) as run:
        if config.threads:
            torch.set_num_threads(config.threads)
        set_seed(config.seed)
        dls = image_dls(config.dataset, config.data_dir, config.batch_size, seed=config.seed, verify=config.verify)
        device = default_device(config.device)
        model = build_model(config, dls.n_classes or 10).to(device)
        batches = FirstBatches(dls.train, config.limit_batches) if config.limit_batches else dls.train
        analysis = diagnose_run(model, batches, torch.nn.functional.cross_entropy, steps=args.steps, lr=config.lr,
                                opt_func=make_optimizer_factory(config), save_dir=run.path)
        findings = analysis.findings
        if world > 1:  # BatchNorm in the DDP job normalises each process's share: judge that, not the global batch
            findings = [f for f in findings if f.kind != "batchnorm_small_batch"] + \
                _batchnorm_per_process(model, dls.train, world)
        # The batch was saved in the staging folder, which becomes the run folder: name the final place.
        findings = [moved_paths(f, str(run.path), str(run.final)) for f in findings]
        save_findings(run.file(FINDINGS), findings)
        run.write_json(CHECKS, analysis.to_dict())
        run.write_config(config.to_dict(), environment=environment(device), data=dls.info,
                         options={"steps": args.steps})
        run_dir = run.finish()
    print(format_summary(findings, analysis.summary(), str(run_dir / FINDINGS), info=True), end="")
    print(f"findings written to {run_dir / FINDINGS}")
    if world > 1:
        share = config.batch_size // world
        bn = f"; BatchNorm would normalise over those {share} unless `train --sync-batchnorm`" if config.norm == "batch" else ""
        print(f"doctor ran in one process (rank 0 of {world}) on the global batch of {config.batch_size}, the step "
              f"DDP takes; each of the {world} processes of the DDP job would take {share} items per step{bn}")
    return 0
