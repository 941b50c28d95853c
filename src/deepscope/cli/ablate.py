"""`deepscope ablate`: a grid of small CNNs (norm x batch size, init/activation variants) on a budget each."""
from __future__ import annotations

import argparse

from .options import positive_float, positive_int


def _list(kind):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [kind(t) for t in items] if kind is str else [_whole(t) for t in items]
    return parse


def _whole(text: str):
    try:
        return int(text)
    except ValueError:
        return text  # AblationGrid names it in a ConfigError


def add_parser(subparsers) -> None:
    from ..ablation import AblationGrid, DEFAULT_BATCH_SIZES, DEFAULT_NORMS, DEFAULT_VARIANTS

    d = AblationGrid()
    p = subparsers.add_parser(
        "ablate", help="compare norms, batch sizes, inits and activations on a fixed budget per run",
        description="Train a grid of small CNNs on Fashion-MNIST: every norm at every batch size (default init, "
                    "ReLU), plus init/activation variants on the no-norm CNN. Each run stops after --max-batches "
                    "batches or --budget-seconds seconds, whichever first. Writes ablation.csv, ablation.md, "
                    "ablation.png and config.json into --out.")
    p.add_argument("--norms", type=_list(str), default=list(DEFAULT_NORMS), help="comma-separated (default: %(default)s)")
    p.add_argument("--batch-sizes", type=_list(int), default=list(DEFAULT_BATCH_SIZES), help="comma-separated (default: %(default)s)")
    p.add_argument("--variants", type=_list(str), default=list(DEFAULT_VARIANTS),
                   help="INIT-ACT, comma-separated; the first is used with every norm, the rest with norm none "
                        "(default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=d.seeds, help="repeats of each run (default: %(default)s)")
    p.add_argument("--budget-seconds", type=positive_float, default=d.budget_seconds, help="time cap per run (default: %(default)s)")
    p.add_argument("--max-batches", type=positive_int, default=d.max_batches, help="step cap per run (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="AdamW lr, constant (default: %(default)s)")
    p.add_argument("--nfs", type=positive_int, nargs="+", default=list(d.nfs), metavar="N", help="CNN channels (default: %(default)s)")
    p.add_argument("--dataset", choices=["fashion_mnist", "mnist"], default="fashion_mnist")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="folder of the IDX files (default: searched as for train)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the MD5 check of the data files")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads for torch (default: %(default)s: these models are too small to gain from more, "
                        "and spare threads spinning on a busy machine slow every run down)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/ablate-<date>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import time
    from pathlib import Path

    from ..ablation import AblationGrid, markdown_table, plot_ablation, run_grid, summarise, write_csv
    from ..data import image_dls
    from ..plots import save_png
    from ..rundir import abandon_run_dir, default_run_dir, environment, finish_run_dir, prepare_run_dir, write_json

    import torch

    started = time.perf_counter()
    grid = AblationGrid(norms=args.norms, batch_sizes=args.batch_sizes, variants=args.variants, seeds=args.seeds,
                        budget_seconds=args.budget_seconds, max_batches=args.max_batches, lr=args.lr, nfs=args.nfs)
    out = Path(args.out) if args.out else default_run_dir("ablate")
    staging = prepare_run_dir(out, overwrite=args.overwrite)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads)
        data = image_dls(args.dataset, args.data_dir, 256, verify=args.verify)
        rows = run_grid(data, grid, args.device)
        summary = summarise(rows)
        table = markdown_table(summary)
        write_csv(rows, staging / "ablation.csv")
        (staging / "ablation.md").write_text(table)
        save_png(plot_ablation(summary), staging / "ablation.png")
        seconds = time.perf_counter() - started
        write_json(staging / "config.json", {"kind": "ablation", "config": {"ablation": dataclasses.asdict(grid),
                                             "dataset": args.dataset, "threads": args.threads}, "data": data.info,
                                             "environment": environment(args.device), "wall_seconds": seconds})
        run_dir = finish_run_dir(staging)
    except BaseException:
        abandon_run_dir(staging)
        raise
    finally:
        torch.set_num_threads(threads)
    print(table)
    print(f"{len(rows)} runs in {seconds:.0f} s; wrote {run_dir}/ablation.csv, ablation.md, ablation.png")
    return 0
