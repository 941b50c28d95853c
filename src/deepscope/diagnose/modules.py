"""What each module did over the run: pure functions of the recording engine's `Stats` (every recorded
step, every watched module) to findings. `history.py` judges the losses; `analysis.py` runs both.

The structure the engine saw (`Stats.structure`: the model's input std, the module whose output the model
returned, the order modules ran in, the per-unit census of floor activations) decides where "first" is
and which module is the output, which these checks leave alone (a sigmoid output is meant to be near 0 or 1).
"""
from __future__ import annotations

import math

import numpy as np

from ..dead import DEAD_UNIT_ON_FRACTION
from .finding import Finding
from .history import _finite, tail_size
from .thresholds import (
    ACT_COLLAPSE_RATIO, ACT_DRIFT_RATIO, ACT_EXPLOSION_RATIO, DEAD_LAYER_FRACTION, SATURATED_FRACTION,
)

_FIX_DEAD = ("Lower the learning rate, use an init scaled for the activation (kaiming), add a norm layer before "
             "the activation, or use LeakyReLU/GELU.")


def _structure(stats) -> dict:
    return stats.structure or {}


def call_order(stats) -> list[int]:
    """Indices of the watched modules in the order they ran (registration order when not recorded)."""
    order = _structure(stats).get("order") or []
    index = {name: i for i, name in enumerate(stats.modules)}
    seen = [index[n] for n in order if n in index]
    return seen + [i for i in range(len(stats.modules)) if i not in seen]


def rule_kind(stats, i: int) -> str:
    """The kind of module i's off rule ("floor", "negative", "saturating", "zero"; "" when not recorded)."""
    rules = stats.dead_rules or []
    return rules[i].split(":", 1)[0] if i < len(rules) else ""


def _hidden(stats) -> list[int]:
    """Modules in call order, without the one whose output the model returned."""
    out = _structure(stats).get("output_module")
    return [i for i in call_order(stats) if stats.modules[i] != out]


def check_dead_units(stats) -> list[Finding]:
    """Floor activations (ReLU, GeneralRelu) with at least DEAD_LAYER_FRACTION of their units dead over the
    last window of censuses (deepscope.dead: a unit on for fewer than 1% of its values)."""
    census = (_structure(stats).get("census") or {}).get("modules") or {}
    findings = []
    for i in call_order(stats):
        name = stats.modules[i]
        c = census.get(name)
        if c is None or c.get("dead") is None or not math.isfinite(c["dead"]) or c["dead"] < DEAD_LAYER_FRACTION:
            continue
        share, first, (start, end) = c["dead"], c.get("first_dead"), c["steps"]
        at_start = f"; {first:.0%} at the start" if first is not None and end > 0 and first != share else ""
        findings.append(Finding(
            "dead_units", name, "error" if share >= 0.999 else "warning",
            f"{share:.0%} of the {c['units']} units of {name!r} sat {c['rule']} for more than "
            f"{1 - DEAD_UNIT_ON_FRACTION:.0%} of their values over steps {start}-{end}{at_start} (threshold "
            f"{DEAD_LAYER_FRACTION:.0%} of the units): dead units pass no gradient and do not recover.",
            _FIX_DEAD, {"dead_fraction": share, "first_dead_fraction": first, "units": c["units"],
                        "steps": [start, end], "censuses": c.get("censuses")}))
    return findings


def check_saturation(stats) -> list[Finding]:
    """Saturating activations (sigmoid, tanh, ...; not the model's output) with more than SATURATED_FRACTION
    of their values at the ends of their range over the last rows of the run."""
    T = len(stats.steps)
    if T == 0:
        return []
    k = tail_size(T) if T > 1 else 1
    findings = []
    for i in _hidden(stats):
        if rule_kind(stats, i) != "saturating":
            continue
        end = _finite(stats.act_dead[-k:, i])
        if np.isnan(end).all():
            continue
        share = float(np.nanmean(end))
        if share > SATURATED_FRACTION:
            name = stats.modules[i]
            findings.append(Finding(
                "saturation", name, "warning",
                f"{share:.0%} of the outputs of {name!r} sat at the ends of its range over the last {k} recorded "
                f"steps, where its slope is almost 0, so little gradient passes (threshold {SATURATED_FRACTION:.0%}).",
                "Normalise the inputs, scale the init down (Xavier/Glorot for tanh and sigmoid), add a norm layer "
                "before it, or switch to ReLU/GELU.", {"saturated_fraction": share, "end_rows": k}))
    return findings


def check_activation_scale(stats) -> list[Finding]:
    """activation_explosion / activation_collapse through depth: the first hidden module (in call order)
    whose output std at the first recorded step is ACT_EXPLOSION_RATIO times the input's, or
    ACT_COLLAPSE_RATIO of it; explosion over time: an output std that ends ACT_DRIFT_RATIO times its first
    (a collapse over time is history.check_activation_crash's)."""
    if len(stats.steps) == 0:
        return []
    ref = _structure(stats).get("input_std") or 1.0
    fix_up = ("Scale the init to the fan-in (nn.init.kaiming_normal_ for ReLU), add normalisation layers, or "
              "lower the learning rate if it grows over time.")
    fix_down = ("Scale the init to the fan-in (kaiming init, or LSUV), or add normalisation layers "
                "(BatchNorm/LayerNorm) so the signal keeps std ~1 through depth.")
    found: dict[str, Finding] = {}
    step0 = int(stats.steps[0])
    for i in _hidden(stats):
        std, name = float(stats.act_std[0, i]), stats.modules[i]
        if not math.isfinite(std) or std <= 0:
            continue
        ratio = std / ref
        ev = {"std": std, "input_std": ref, "ratio": ratio, "step": step0}
        if ratio > ACT_EXPLOSION_RATIO and "activation_explosion" not in found:
            found["activation_explosion"] = Finding(
                "activation_explosion", name, "warning",
                f"The output std of {name!r} is {std:.3g} at step {step0}, {ratio:.3g}x the input's {ref:.3g}: "
                f"activations grow layer after layer (threshold {ACT_EXPLOSION_RATIO:g}x).", fix_up, ev)
        if ratio < ACT_COLLAPSE_RATIO and "activation_collapse" not in found:
            found["activation_collapse"] = Finding(
                "activation_collapse", name, "warning",
                f"The output std of {name!r} is {std:.3g} at step {step0}, {ratio:.2g}x the input's {ref:.3g}: "
                f"activations shrink layer after layer (threshold {ACT_COLLAPSE_RATIO:g}x).", fix_down, ev)
    T = len(stats.steps)
    if T >= 4 and "activation_explosion" not in found:
        k = tail_size(T)
        for i in _hidden(stats):
            col = _finite(stats.act_std[:, i])
            ok = col[~np.isnan(col)]
            if len(ok) < 4 or ok[0] <= 0 or np.isnan(col[-k:]).all():
                continue
            last = float(np.nanmean(col[-k:]))
            if last > ok[0] * ACT_DRIFT_RATIO:
                name = stats.modules[i]
                found["activation_explosion"] = Finding(
                    "activation_explosion", name, "warning",
                    f"The output std of {name!r} grew from {ok[0]:.3g} to {last:.3g} ({last / ok[0]:.3g}x) during the "
                    f"run (threshold {ACT_DRIFT_RATIO:g}x).", fix_up,
                    {"first_std": float(ok[0]), "last_std": last, "ratio": last / float(ok[0]), "end_rows": k})
                break
    return list(found.values())


def check_no_gradient(stats) -> list[Finding]:
    """Modules owning trainable parameters whose gradient norm was never measured (no .grad) in any row
    where another module's was: unused, or cut off from the loss by a detach."""
    g = np.asarray(stats.param_grad_norm, dtype=np.float64)
    if g.size == 0:
        return []
    has = ~np.isnan(g)
    rows = has.any(axis=1)           # rows where some module got a gradient (skipped updates have none)
    if not rows.any():
        return []
    steps = int(rows.sum())
    return [Finding("no_gradient", name, "warning",
                    f"The parameters of {name or 'the model'!r} got no gradient in any of {steps} recorded steps: the "
                    f"module is unused or its output is detached from the loss.",
                    "Remove the unused module, or find the .detach() / torch.no_grad() / .item() / .numpy() that cuts "
                    "it off; freeze it on purpose with requires_grad_(False).", {"steps": steps})
            for j, name in enumerate(stats.param_modules) if not has[rows, j].any()]


def grad_nonzero(stats) -> dict[str, bool]:
    """{"<module>.weight": whether that module's gradient norm was ever above 0}, for the symmetric-init check."""
    g = np.asarray(stats.param_grad_norm, dtype=np.float64)
    return {f"{name}.weight" if name else "weight": bool((np.nan_to_num(g[:, j]) > 0).any())
            for j, name in enumerate(stats.param_modules)}


def unwatched_before(stats, name: str) -> list[str]:
    """Leaf modules that are not watched and sit, in the model's registration order, between the watched
    module before `name` and `name` itself: they may have run in between (a log, a custom layer)."""
    leaves = _structure(stats).get("leaves") or []
    if name not in leaves:
        return []
    watched, at = set(stats.modules), leaves.index(name)
    before = [i for i, n in enumerate(leaves[:at]) if n in watched]
    start = before[-1] + 1 if before else 0
    return [n for n in leaves[start:at] if n not in watched]


def first_nonfinite(stats) -> dict | None:
    """Where NaN/Inf first shows in the per-step counts: {"step", "where": "forward"|"backward", "module",
    "modules"} for the first row with a non-finite activation (the first such module in call order) or,
    with finite activations, a non-finite output gradient (the last such module in call order: the backward
    pass runs in reverse, so the module after it, or the loss, made it). None when every count is 0."""
    acts = np.nan_to_num(np.asarray(stats.act_nonfinite, dtype=np.float64)) > 0
    grads = np.nan_to_num(np.asarray(stats.grad_nonfinite, dtype=np.float64)) > 0
    bad = np.flatnonzero(acts.any(axis=1) | grads.any(axis=1))
    if not len(bad):
        return None
    r = int(bad[0])
    order = call_order(stats)
    if acts[r].any():
        hit = [stats.modules[i] for i in order if acts[r, i]]
        return {"step": int(stats.steps[r]), "where": "forward", "module": hit[0], "modules": hit[:8]}
    hit = [stats.modules[i] for i in order if grads[r, i]]
    return {"step": int(stats.steps[r]), "where": "backward", "module": hit[-1], "modules": hit[:8]}


def check_nonfinite_counts(stats, losses: list[float]) -> list[Finding]:
    """nonfinite_forward / nonfinite_backward from `first_nonfinite`, and nonfinite_loss when the loss turned
    NaN/Inf at a step whose activations and gradients were all counted finite. Values are counted in a
    sample of each output (stats.sample), so a module that makes a handful of NaN can show first in the
    module after it; replaying the step (`replay.locate_nonfinite`) names the producer exactly."""
    first = first_nonfinite(stats)
    bad_loss = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    bad_input = _structure(stats).get("first_nonfinite_input")
    if bad_input is not None and (first is None or bad_input <= first["step"]):
        return [Finding("nonfinite_forward", "", "error",
                        f"The input batch at step {bad_input} contains NaN or Inf values (the model's input, before "
                        f"any module).", "Clean the data: find the items where torch.isfinite(x) is False.",
                        {"step": bad_input, "data": True, "source": "per-step counts"})]
    if first is not None and first["where"] == "backward" and bad_loss is not None and bad_loss <= first["step"]:
        first = None  # the loss was non-finite first: its gradient is what the backward pass carried
    fix_fwd = ("Guard the operation that can overflow or leave its domain there (log/sqrt/div of values that can be "
               "<= 0: clamp(min=eps) or add eps; exp: subtract the max first); if it only appears after some steps, "
               "lower the learning rate.")
    if first is not None and (bad_loss is None or first["step"] <= bad_loss):
        ev = {**first, "source": "per-step counts"}
        if first["where"] == "forward":
            hidden = unwatched_before(stats, first["module"])
            maybe = (f" Modules that are not watched ran before it ({', '.join(repr(h) for h in hidden[:4])}): one of "
                     f"them may have made it; watch them too (modules=[...]) or replay the step with "
                     f"deepscope.diagnose to be sure.") if hidden else ""
            return [Finding("nonfinite_forward", first["module"], "error",
                            f"NaN/Inf first appeared at step {first['step']} in the output of {first['module']!r}, the "
                            f"first watched module in call order whose output held any.{maybe}", fix_fwd,
                            {**ev, "unwatched_before": hidden[:8]})]
        return [Finding("nonfinite_backward", first["module"], "error",
                        f"At step {first['step']} every output was finite, but the gradient of {first['module']!r}'s "
                        f"output was NaN/Inf: the backward pass of the module after it (or of the loss) made it.",
                        "Look for an operation whose derivative is infinite where it is used (sqrt or pow(<1) at 0, log "
                        "at 0, a custom autograd Function's backward dividing by 0); add an eps inside it or clamp its "
                        "input.", ev)]
    if bad_loss is not None and len(stats.steps) and bad_loss <= int(stats.steps[-1]) \
            and bad_loss in set(int(s) for s in stats.steps):
        return [Finding("nonfinite_loss", "", "error",
                        f"The loss is {losses[bad_loss]} at step {bad_loss} although every recorded output was "
                        f"finite: the loss function itself produced it.",
                        "See what makes the loss non-finite from finite inputs: a log or division of a value that can "
                        "be 0 in a hand-written loss (clamp it, or use F.log_softmax / F.cross_entropy / "
                        "F.binary_cross_entropy_with_logits), or a batch whose every target is ignored (ignore_index), "
                        "which makes a mean over nothing.", {"step": bad_loss, "loss": str(losses[bad_loss])})]
    return []
