"""`deepscope lr-find`: sweep the learning rate on the configured model and data; write lr_find.json/png."""
from __future__ import annotations

import argparse

from .options import positive_float, positive_int
from .train import add_config_arguments, config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "lr-find", help="run the learning-rate finder and suggest learning rates",
        description="Train briefly while the learning rate grows exponentially from --start-lr to --end-lr, "
                    "print the suggested learning rates and write lr_find.json and lr_find.png (plus config.json) "
                    "into --out. The model is the one `deepscope train` would build with the same flags.")
    add_config_arguments(p)
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--start-lr", type=positive_float, default=1e-7, help="first lr (default: %(default)s)")
    sweep.add_argument("--end-lr", type=positive_float, default=10.0, help="last lr (default: %(default)s)")
    sweep.add_argument("--num-it", type=positive_int, default=100, help="training batches in the sweep (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from ..callbacks import DeviceCallback
    from ..data import image_dls
    from ..errors import ConfigError
    from ..lr_find import lr_find
    from ..plots import save_png
    from ..recipe import build_learner
    from ..runfolder import LR_FIND, LR_FIND_PNG, RunFolder, environment
    from ..seed import set_seed

    started = time.perf_counter()
    config = config_from_args(args)
    if not args.start_lr < args.end_lr:
        raise ConfigError(f"--start-lr ({args.start_lr}) must be below --end-lr ({args.end_lr})")
    with RunFolder.prepare(config.out, "lr-find", overwrite=args.overwrite) as run:
        if config.threads:
            torch.set_num_threads(config.threads)
        set_seed(config.seed)
        dls = image_dls(config.dataset, config.data_dir, config.batch_size, seed=config.seed, verify=config.verify)
        learn = build_learner(config, dls, progress=False)
        result = lr_find(learn, args.start_lr, args.end_lr, args.num_it)
        run.write_json(LR_FIND, result.to_dict())
        save_png(result.plot(), run.file(LR_FIND_PNG))
        run.write_config(config.to_dict(), environment=environment(learn.get_cb(DeviceCallback).device),
                         data=dls.info, options={"start_lr": args.start_lr, "end_lr": args.end_lr, "num_it": args.num_it},
                         wall_seconds=time.perf_counter() - started)
        run_dir = run.finish()
    print(f"lr finder: {len(result.lrs)} of {args.num_it} batches, lr {result.lrs[0]:.2e} .. {result.lrs[-1]:.2e}"
          if result.lrs else "lr finder: no finite loss recorded")
    for name, lr in result.suggestions.items():
        print(f"  {name:>15}: {lr:.2e}")
    print(("warning: " if result.noisy else "") + result.message)
    print(f"wrote {run_dir / LR_FIND} and {run_dir / LR_FIND_PNG}")
    return 0 if result.lrs else 1
