"""`deepscope lr-find`: sweep the learning rate on the configured model and data; write lr_find.json/png."""
from __future__ import annotations

import argparse

from .options import EVERY_RANK, positive_float, positive_int
from .train import add_compile_argument, add_config_arguments, config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lr-find", help="run the learning-rate finder and suggest learning rates",
        description="Train briefly while the learning rate grows exponentially from --start-lr to --end-lr, "
                    "print the suggested learning rates and write lr_find.json and lr_find.png (plus config.json) "
                    "into --out. The model is the one `deepscope train` would build with the same flags. Under "
                    "`torchrun --nproc-per-node N -m deepscope lr-find` the sweep trains with DistributedDataParallel "
                    "on the global --batch-size shared by the N processes, as `deepscope train` would, and stops on "
                    "the mean of their losses; rank 0 writes --out and prints.")
    add_config_arguments(p)
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--start-lr", type=positive_float, default=1e-7, help="first lr (default: %(default)s)")
    sweep.add_argument("--end-lr", type=positive_float, default=10.0, help="last lr (default: %(default)s)")
    sweep.add_argument("--num-it", type=positive_int, default=100, help="training batches in the sweep (default: %(default)s)")
    add_compile_argument(sweep)  # the sweep runs as `train --compile` would
    sweep.add_argument("--sync-batchnorm", action="store_true",
                       help="under torchrun: BatchNorm layers take their statistics over the whole global batch "
                            "(torch's SyncBatchNorm, CUDA only), as `deepscope train --sync-batchnorm` would")
    p.set_defaults(func=run, ddp=EVERY_RANK)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from .. import distributed
    from ..callbacks import DeviceCallback
    from ..callbacks.distributed import Distributed, check_world, everywhere, met_alike
    from ..data import image_dls
    from ..errors import ConfigError
    from ..lr_find import lr_find
    from ..plots import save_png
    from ..recipe import build_learner
    from ..runfolder import LR_FIND, LR_FIND_PNG, RunFolder, environment, shared_run
    from ..seed import set_seed

    started = time.perf_counter()
    with met_alike():  # every process has the same options: rank 0 alone says what is wrong with them
        config = config_from_args(args)
    distributed.init(device=config.device)  # under torchrun: join the other processes (nothing in a single process)
    if not args.start_lr < args.end_lr:
        raise everywhere(ConfigError(f"--start-lr ({args.start_lr}) must be below --end-lr ({args.end_lr})"))
    check_world(config.batch_size)
    run, _ = shared_run(lambda: (RunFolder.prepare(config.out, "lr-find", overwrite=args.overwrite), None))
    main = distributed.is_main()  # rank 0 writes and prints; the others sweep with it
    with run:
        if config.threads:
            torch.set_num_threads(config.threads)
        set_seed(config.seed)
        with met_alike():
            dls = image_dls(config.dataset, config.data_dir, config.batch_size, seed=config.seed, verify=config.verify)
        extra = [Distributed(sync_batchnorm=config.sync_batchnorm)] if distributed.active() else []
        learn = build_learner(config, dls, extra, progress=False)
        result = lr_find(learn, args.start_lr, args.end_lr, args.num_it)  # the same on every rank
        run.write_json(LR_FIND, result.to_dict())
        if main:
            save_png(result.plot(), run.file(LR_FIND_PNG))
        options = {"start_lr": args.start_lr, "end_lr": args.end_lr, "num_it": args.num_it}
        if distributed.active():
            options["processes"] = distributed.world_size()
        run.write_config(config.to_dict(), environment=environment(learn.get_cb(DeviceCallback).device),
                         data=dls.info, options=options, wall_seconds=time.perf_counter() - started)
        run_dir = run.finish()
    if not main:
        return 0 if result.lrs else 1
    processes = f" ({distributed.world_size()} processes, global batch {config.batch_size})" if distributed.active() else ""
    print(f"lr finder{processes}: {len(result.lrs)} of {args.num_it} batches, lr {result.lrs[0]:.2e} .. "
          f"{result.lrs[-1]:.2e}" if result.lrs else f"lr finder{processes}: no finite loss recorded")
    for name, lr in result.suggestions.items():
        print(f"  {name:>15}: {lr:.2e}")
    print(("warning: " if result.noisy else "") + result.message)
    print(f"wrote {run_dir / LR_FIND} and {run_dir / LR_FIND_PNG}")
    return 0 if result.lrs else 1
