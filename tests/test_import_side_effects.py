"""Importing deepscope changes nothing outside it (STYLE.md: no side effects at import): the matplotlib
backend and rcParams stay as the user set them, as do torch's global settings, warning filters and the
environment. Plots still save PNGs headless with whatever backend is in use."""
import json
import os
import subprocess
import sys

import pytest

# Imports every deepscope module (but __main__, which runs the CLI) and prints what it changed. The backend
# is read with rcParams._get: reading rcParams["backend"] would itself resolve an unset backend.
IMPORT_ALL = """
import json, os, pkgutil, importlib, sys, warnings
import matplotlib, torch
{setup}
def snapshot():
    return {{"backend": repr(matplotlib.rcParams._get("backend")),
             "rc": {{k: repr(matplotlib.rcParams[k]) for k in list(matplotlib.rcParams) if k != "backend"}},
             "torch": [torch.get_num_threads(), str(torch.get_default_dtype()),
                       torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark],
             "warnings": repr(warnings.filters), "environ": dict(os.environ)}}
before = snapshot()
import deepscope
names = [m.name for m in pkgutil.walk_packages(deepscope.__path__, "deepscope.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
after = snapshot()
print(json.dumps({{"modules": len(names), "changed": sorted(k for k in before if before[k] != after[k]),
                  "plots": "deepscope.plots" in sys.modules, "backend": after["backend"]}}))
"""


def run_python(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY", "WAYLAND_DISPLAY")}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("setup, env", [
    ("", {"MPLBACKEND": "svg"}),  # the backend chosen by the environment
    ("matplotlib.use('pdf')", {}),  # the backend chosen in code
    ("", {}),  # none chosen yet: importing must not resolve it (that is pyplot's job when a figure is made)
])
def test_importing_every_module_changes_no_global_setting(setup, env):
    result = json.loads(run_python(IMPORT_ALL.format(setup=setup), **env))
    assert result["modules"] > 50 and result["plots"]
    assert result["changed"] == []


SAVE_HEADLESS = """
import matplotlib
from deepscope.ablation import plot_ablation
from deepscope.plots import lr_find_plot, plot_curve, save_png
import matplotlib.pyplot as plt
summary = [{"norm": "batch", "batch_size": 2, "init": "default", "act": "relu", "accuracy": 0.5}]
for k, fig in enumerate([plot_curve([3, 2, 1]), lr_find_plot([1e-4, 1e-3, 1e-2], [2, 1, 3], {"valley": 1e-3}),
                         plot_ablation(summary)]):
    assert save_png(fig, f"{k}.png").read_bytes().startswith(b"\\x89PNG"), k
assert plt.get_fignums() == []
print(matplotlib.get_backend())
"""


@pytest.mark.parametrize("backend", ["svg", None])
def test_plots_save_png_with_the_users_backend_and_no_display(backend, tmp_path):
    env = {"MPLBACKEND": backend} if backend else {}
    code = f"import os; os.chdir({str(tmp_path)!r})\n" + SAVE_HEADLESS
    used = run_python(code, **env)
    assert used == (backend or "agg")  # matplotlib's own choice without a display, not ours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.png", "1.png", "2.png"]
