"""`deepscope export RUN_DIR --format torchscript|exported|onnx`: a deployable model file from a run's weights."""
from __future__ import annotations

import argparse

from ..export import FILE_NAMES, FORMATS, ONNX_INSTALL, TOLERANCE, WEIGHT_CHOICES, export_run


def add_parser(subparsers) -> None:
    files = ", ".join(f"{f}: {name}" for f, name in FILE_NAMES.items())
    p = subparsers.add_parser(
        "export", help="write a deployable model file (TorchScript, torch.export or ONNX) from a run's weights",
        description="Rebuild a training run's model with its best or last weights and write it as one file that "
                    "runs without deepscope. The file is loaded back and checked against the model (largest "
                    f"difference at most {TOLERANCE:g} on two batch sizes) before it is put in place. Files: "
                    f"{files}. An unfinished run (RUN_DIR.partial) exports from its checkpoints.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `deepscope train`")
    p.add_argument("--format", choices=FORMATS, default="exported",
                   help="torchscript (torch.jit.load, also from C++), exported (torch.export.load(...).module(); "
                        f"the default) or onnx (onnxruntime and others; needs {ONNX_INSTALL})")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default=None,
                   help="best: checkpoints/best.safetensors (the best epoch by the monitored validation metric); "
                        "last: model.safetensors, or else the latest step checkpoint. Default: best when the run "
                        "has it, else last")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="the file to write (a folder gets the default file name inside it). Default: "
                        "RUN_DIR/export/<file>, listed among the run's files. Inside a run folder only its export/ "
                        "folder is allowed")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing file at --out that deepscope cannot tell it wrote (an export in the "
                        "run's export/ folder is replaced without it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    export_run(args.run_dir, args.format, weights=args.weights, out=args.out, overwrite=args.overwrite)
    return 0
