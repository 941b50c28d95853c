"""`deepscope ablate`: a grid of small CNNs (norm x batch size, init/activation variants) on a budget each."""
from __future__ import annotations

import argparse

from .options import device_name, positive_float, positive_int, thread_count


def _list(check, kind=str):
    """An argparse type: comma-separated items of `kind`, checked by `check` (one of AblationGrid's checks),
    so an empty, repeated or unknown item is an argparse error naming the option, before anything runs."""
    from ..errors import ConfigError

    def parse(text: str) -> list:
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
        try:
            return check(items)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {text!r}") from None


def add_parser(subparsers) -> None:
    from ..ablation import (
        DEFAULT_BATCH_SIZES, DEFAULT_NORMS, DEFAULT_VARIANTS, AblationGrid, check_batch_sizes, check_norms,
        check_variants,
    )

    d = AblationGrid()
    p = subparsers.add_parser(
        "ablate", help="compare norms, batch sizes, inits and activations on a fixed budget per run",
        description="Train a grid of small CNNs on Fashion-MNIST: every norm at every batch size (default init, "
                    "ReLU), plus init/activation variants on the no-norm CNN. Each run trains for exactly "
                    "--max-batches steps, on any machine; its wall time is reported beside the result and never "
                    "limits it. Writes ablation.csv, ablation.md, ablation.png and config.json into --out.")
    p.add_argument("--norms", type=_list(check_norms), default=list(DEFAULT_NORMS),
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--batch-sizes", type=_list(check_batch_sizes, _whole), default=list(DEFAULT_BATCH_SIZES),
                   help="comma-separated (default: %(default)s)")
    p.add_argument("--variants", type=_list(check_variants), default=list(DEFAULT_VARIANTS),
                   help="INIT-ACT, comma-separated; the first is used with every norm, the rest with norm none "
                        "(default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=d.seeds, help="repeats of each run (default: %(default)s)")
    p.add_argument("--max-batches", type=positive_int, default=d.max_batches,
                   help="training steps per run, the whole budget (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="AdamW lr, constant (default: %(default)s)")
    p.add_argument("--nfs", type=positive_int, nargs="+", default=list(d.nfs), metavar="N", help="CNN channels (default: %(default)s)")
    p.add_argument("--dataset", choices=["fashion_mnist", "mnist"], default="fashion_mnist")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="folder of the IDX files (default: searched as for train)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the MD5 check of the data files")
    p.add_argument("--threads", type=thread_count, default=1,
                   help="CPU threads for torch (default: %(default)s: these models are too small to gain from more, "
                        "and spare threads spinning on a busy machine slow every run down)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N, mps (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/ablate-<date>-<time>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (and, with --runs-dir, the grid's run folders there)")
    p.add_argument("--runs-dir", default=None, metavar="DIR",
                   help="also write every grid point as its own run folder DIR/<norm>-bs<N>-<init>-<act>-s<seed> "
                        "(config, metrics, per-step losses), which `deepscope compare` opens; beside --out, never "
                        "inside it (default: none, only the ablation folder)")
    p.add_argument("--runs-stats", action="store_true",
                   help="with --runs-dir: also record per-layer activation statistics (stats.npz) in each run "
                        "(slower; the `seconds` column includes the recording)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import math
    import time
    from pathlib import Path

    import torch

    from ..ablation import (
        AblationGrid, SaveRuns, check_runs_dir, markdown_table, plot_ablation, run_grid, run_name, summarise,
        write_csv,
    )
    from ..callbacks.device import default_device
    from ..data import image_dls
    from ..errors import ConfigError
    from ..plots import save_png
    from ..runfolder import ABLATION_CSV, ABLATION_MD, ABLATION_PNG, RunFolder, environment

    started = time.perf_counter()
    grid = AblationGrid(norms=args.norms, batch_sizes=args.batch_sizes, variants=args.variants, seeds=args.seeds,
                        max_batches=args.max_batches, lr=args.lr, nfs=args.nfs)
    device = default_device(args.device)  # a ConfigError here, before the data is read
    threads = torch.get_num_threads()
    if args.runs_stats and args.runs_dir is None:
        raise ConfigError("--runs-stats records statistics in the runs that --runs-dir writes; pass --runs-dir too")
    run_names = [run_name(*r) for r in grid.runs()]
    save = None
    if args.runs_dir is not None:
        save = SaveRuns(check_runs_dir(args.runs_dir, run_names), stats=args.runs_stats, overwrite=args.overwrite,
                        config={"dataset": args.dataset, "data_dir": args.data_dir, "verify": args.verify,
                                "threads": args.threads})
        # before the ablation's folder is made; again with its final path once it is prepared
        save.check(grid.runs(), beside=None if args.out is None else Path(args.out))
    with RunFolder.prepare(args.out, "ablate", overwrite=args.overwrite) as run:
        if save is not None:
            save.check(grid.runs(), beside=run.final)
        try:
            torch.set_num_threads(args.threads)
            data = image_dls(args.dataset, args.data_dir, 256, verify=args.verify)
            rows = run_grid(data, grid, str(device), save=save)
        finally:
            torch.set_num_threads(threads)
        summary = summarise(rows)
        table = markdown_table(summary)
        write_csv(rows, run.file(ABLATION_CSV))
        run.file(ABLATION_MD).write_text(table)
        save_png(plot_ablation(summary), run.file(ABLATION_PNG))
        seconds = time.perf_counter() - started
        options = {} if save is None else {"runs_dir": str(save.folder), "runs_stats": save.stats, "runs": run_names}
        run.write_config({**dataclasses.asdict(grid), "dataset": args.dataset, "threads": args.threads},
                         environment=environment(device), data=data.info, options=options, wall_seconds=seconds)
        run_dir = run.finish()
    print(table)
    print(f"{len(rows)} runs in {seconds:.0f} s; wrote {run_dir / ABLATION_CSV}, {ABLATION_MD}, {ABLATION_PNG}")
    if save is not None:
        hint = f"; compare them: deepscope compare {' '.join(str(save.folder / n) for n in run_names[:2])}"
        print(f"wrote {len(rows)} run folder{'s' if len(rows) != 1 else ''} into {save.folder}" + (hint if len(run_names) > 1 else ""))
    failed = [r for r in rows if not math.isfinite(r["train_loss"])]
    if failed:
        names = ", ".join(sorted({f"{r['norm']} at batch {r['batch_size']} ({r['init']}-{r['act']})" for r in failed}))
        print(f"training failed in {len(failed)} of {len(rows)} runs: the loss became NaN or infinite ({names}); "
              f"their rows are not results. Lower --lr.")
        return 1
    return 0
