"""The saved statistics: the `Stats` dataclass and its `stats.npz` file (format described in the
package docstring, `deepscope.stats`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

FORMAT_VERSION = 1
FILE_NAME = "stats.npz"
# Fields holding lists of names, stored as unicode arrays.
_NAME_FIELDS = ("modules", "param_modules", "module_notes", "invisible", "dead_rules")
# Fields holding JSON objects, stored as one string each.
_JSON_FIELDS = ("observations", "structure")
_VALID_PREFIX = "valid_"


@dataclass
class Stats:
    """Per-step statistics of a training run; rows are recorded steps (possibly merged), see `steps`."""
    modules: list[str]             # M modules whose outputs were watched
    steps: np.ndarray              # (T,) int64, training step of each row (of its last member if merged)
    weights: np.ndarray            # (T,) int64, recorded steps merged into the row
    act_mean: np.ndarray           # (T, M) float32
    act_std: np.ndarray            # (T, M)
    act_min: np.ndarray            # (T, M)
    act_max: np.ndarray            # (T, M)
    act_dead: np.ndarray           # (T, M) fraction of values off by the module's rule (dead.py, `dead_rules`)
    act_nonfinite: np.ndarray      # (T, M) count of NaN/inf values
    act_hist: np.ndarray           # (T, M, B) counts of |a| per bin, beyond the range clamped into the last
    hist_edges: np.ndarray         # (B+1,)
    grad_mean: np.ndarray          # (T, M) of the gradient of each module's output; NaN: no gradient
    grad_std: np.ndarray           # (T, M)
    grad_norm: np.ndarray          # (T, M)
    grad_nonfinite: np.ndarray     # (T, M)
    param_modules: list[str]       # P modules owning parameters directly
    weight_norm: np.ndarray        # (T, P) before the update: the weights the step ran with
    param_grad_norm: np.ndarray    # (T, P)
    update_ratio: np.ndarray       # (T, P) ||w_after - w_before|| / ||w_before||
    dead_threshold: float
    valid: dict[str, np.ndarray] | None = None  # valid_steps, valid_weights, valid_act_* when collected
    module_notes: list[str] | None = None  # (M,) why a module has no statistics ("" when it has); see
    #                                         StatsRecorder.module_notes; None in files of older versions
    invisible: list[str] | None = None     # containers whose output functional code makes, unwatched
    #                                         (StatsRecorder.invisible_outputs; "" is the model itself)
    observations: dict | None = None       # what the training loop did at its updates (stats/loop.py)
    dead_rules: list[str] | None = None    # (M,) when a module's value counts as off, in words (dead.OffRule)
    structure: dict | None = None          # the model's input std, output module, call order and the per-unit
    #                                         census of floor activations (StatsRecorder.structure); None in
    #                                         files of older versions

    def __repr__(self) -> str:
        """One line (the arrays are many and long: `stats.act_std` and friends hold them)."""
        span = f"steps {int(self.steps[0])}-{int(self.steps[-1])}" if len(self.steps) else "no steps"
        return (f"Stats({len(self.modules)} modules, {len(self.param_modules)} with parameters, {len(self.steps)} "
                f"rows over {span})")

    def _repr_html_(self) -> str:
        """In a notebook: one row per module with its latest values (`last()`)."""
        import html

        num = lambda v: "" if v is None or v != v else f"{v:.3g}"  # noqa: E731 - NaN shows as blank
        rows = "".join(f"<tr><td>{html.escape(name or '(model)')}</td>"
                       + "".join(f"<td>{num(row[k])}</td>" for k in ("mean", "std", "dead", "grad_norm", "update_ratio"))
                       + "</tr>" for name, row in self.last().items())
        return (f"<div><b>{html.escape(repr(self))}</b><table><tr><th>module</th><th>act. mean</th><th>act. std</th>"
                f"<th>off fraction</th><th>grad norm</th><th>update ratio</th></tr>{rows}</table></div>")

    def notes(self) -> dict[str, str]:
        """{module: note} for the modules that have one."""
        return {m: n for m, n in zip(self.modules, self.module_notes or []) if n}

    def last(self) -> dict[str, dict[str, float]]:
        """The latest value per module, for a summary table: mean, std, dead, grad_norm, update_ratio
        (None where the module owns no parameters or nothing was recorded)."""
        if len(self.steps) == 0:
            return {name: {k: None for k in ("mean", "std", "dead", "grad_norm", "update_ratio")} for name in self.modules}
        params = {name: j for j, name in enumerate(self.param_modules)}
        table = {}
        for i, name in enumerate(self.modules):
            j = params.get(name)
            table[name] = {
                "mean": float(self.act_mean[-1, i]), "std": float(self.act_std[-1, i]),
                "dead": float(self.act_dead[-1, i]), "grad_norm": float(self.grad_norm[-1, i]),
                "update_ratio": None if j is None else float(self.update_ratio[-1, j]),
            }
        return table


def _file(path: str | Path) -> Path:
    path = Path(path)
    return path / FILE_NAME if path.is_dir() or not path.suffix else path


def save_stats(stats: Stats, path: str | Path) -> Path:
    """Write `stats` to `path` (a run folder gets `stats.npz`); returns the file written."""
    file = _file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"format_version": np.array(FORMAT_VERSION)}
    for f in dataclasses.fields(Stats):
        value = getattr(stats, f.name)
        if value is None:
            continue  # an optional field that was not recorded
        if f.name == "valid":
            arrays.update({k: np.asarray(v) for k, v in value.items()})
        elif f.name in _JSON_FIELDS:
            arrays[f.name] = np.array(json.dumps(value))
        elif f.name in _NAME_FIELDS:
            arrays[f.name] = np.array(value, dtype=np.str_)
        else:
            arrays[f.name] = np.asarray(value)
    try:
        np.savez_compressed(file, **arrays)
    except OSError as e:  # zipfile's errors do not name the file
        raise OSError(e.errno, e.strerror, str(file)) from None
    return file


def load_stats(path: str | Path) -> Stats:
    """Read `stats.npz` (or a run folder holding one) into a `Stats`; DataError if it is not one."""
    file = _file(path)
    if not file.is_file():
        raise DataError(f"no statistics at {file}: train with statistics on (ActivationStats) to write them")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        why = "it holds Python objects, which deepscope never writes" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise DataError(f"{file} is not a statistics file written by deepscope ({why})") from None
    version = arrays.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        raise DataError(f"{file} has statistics format version {None if version is None else int(version)}, "
                        f"this deepscope reads version {FORMAT_VERSION}: re-record the run with this version")
    needed = [f.name for f in dataclasses.fields(Stats) if f.default is dataclasses.MISSING]
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise DataError(f"{file} lacks the keys {missing}; it was not written by deepscope.stats or is damaged")
    values = {k: arrays[k] for k in needed}
    for k in _NAME_FIELDS:
        if k in values:
            values[k] = [str(s) for s in values[k]]
    try:
        values["dead_threshold"] = float(values["dead_threshold"])
    except (TypeError, ValueError):
        raise DataError(f"{file}: dead_threshold is not a number; the file is damaged") from None
    for key in _JSON_FIELDS:
        if key not in arrays:
            continue
        try:
            values[key] = json.loads(str(arrays[key]))
        except ValueError:
            raise DataError(f"{file}: {key} is not valid JSON; the file is damaged") from None
        if not isinstance(values[key], dict):
            raise DataError(f"{file}: {key} should be a JSON object; the file is damaged")
    if "dead_rules" in arrays:
        values["dead_rules"] = [str(n) for n in arrays["dead_rules"]]
    if "invisible" in arrays:
        values["invisible"] = [str(n) for n in arrays["invisible"]]
    if "module_notes" in arrays:
        values["module_notes"] = [str(n) for n in arrays["module_notes"]]
    valid = {k: v for k, v in arrays.items() if k.startswith(_VALID_PREFIX)}
    stats = Stats(**values, valid=valid or None)
    check_shapes(stats, file)
    return stats


def check_shapes(stats: Stats, file: str | Path = "statistics") -> None:
    """DataError naming the field when the arrays of `stats` do not fit together: every (T, M) field has
    a row per step and a column per module, (T, P) fields a column per parameter-owning module, the
    histogram B = len(hist_edges) - 1 bins, and all of them hold numbers."""
    edges = stats.hist_edges
    if not isinstance(edges, np.ndarray) or edges.ndim != 1 or len(edges) < 2 or not np.issubdtype(edges.dtype, np.number):
        raise DataError(f"{file}: hist_edges should be at least 2 numbers; the file is damaged")
    T, M, P = len(stats.steps), len(stats.modules), len(stats.param_modules)
    B = len(edges) - 1
    expected = {"steps": (T,), "weights": (T,), "act_hist": (T, M, B),
                **{k: (T, P) for k in ("weight_norm", "param_grad_norm", "update_ratio")}}
    for f in dataclasses.fields(Stats):
        value = getattr(stats, f.name)
        if not isinstance(value, np.ndarray) or f.name == "hist_edges":
            continue
        shape = expected.get(f.name, (T, M))
        if value.shape != shape:
            raise DataError(f"{file}: {f.name} has shape {value.shape}, but {T} steps, {M} modules, {P} modules "
                            f"with parameters and {B} histogram bins make {shape}; the file is damaged")
        if not np.issubdtype(value.dtype, np.number):
            raise DataError(f"{file}: {f.name} holds {value.dtype} values, not numbers; the file is damaged")
    if stats.module_notes is not None and len(stats.module_notes) != M:
        raise DataError(f"{file}: {len(stats.module_notes)} module notes for {M} modules; the file is damaged")
    if stats.dead_rules is not None and len(stats.dead_rules) != M:
        raise DataError(f"{file}: {len(stats.dead_rules)} dead rules for {M} modules; the file is damaged")
