"""What the short run showed: pure functions from a ProbeRecord (plain numbers) to findings."""
from __future__ import annotations

import math
import statistics

from .finding import Finding
from .records import ModuleRecord, ProbeRecord
from .setup_checks import exception_finding
from .thresholds import (
    ACT_COLLAPSE_RATIO, ACT_DRIFT_RATIO, ACT_EXPLOSION_RATIO, DEAD_LAYER_FRACTION, DEAD_UNIT_ACTIVE_FRACTION,
    LOSS_FLAT_CHANGE, LOSS_RISE_ERROR, LOSS_RISE_WARNING, LR_LOW_UPDATE_RATIO, LR_MIN_POINTS, LR_WINDOW,
    SATURATED_FRACTION,
)


def _saved(rec: ProbeRecord) -> str:
    return f" The batch is saved in {rec.saved}." if rec.saved else ""


def check_nonfinite(rec: ProbeRecord) -> list[Finding]:
    """The first producer of NaN/Inf: a module's forward, a module's backward, or the loss itself."""
    findings = []
    evidence = lambda d: {**d, "saved": rec.saved}
    fwd = rec.nonfinite_forward
    if fwd is not None and fwd.get("data"):
        findings.append(Finding("nonfinite_forward", "", "error",
                                f"The input batch at step {fwd['step']} contains NaN or Inf values.{_saved(rec)}",
                                "Clean the data: find the items where torch.isfinite(x) is False.", evidence(fwd)))
    elif fwd is not None:
        name = fwd["module"]
        kind = fwd.get("type") or (rec.modules[name].type if name in rec.modules else "module")
        where = f"Module {name!r} ({kind})" if name else "The model's own forward (outside its submodules)"
        findings.append(Finding("nonfinite_forward", name, "error",
                                f"{where} produced NaN/Inf at step {fwd['step']} from finite inputs; every module "
                                f"before it was finite.{_saved(rec)}",
                                "Guard the operation that can overflow or leave its domain there (log/sqrt/div of "
                                "values that can be <= 0: clamp(min=eps) or add eps; exp: subtract the max first); if "
                                "it only appears after some steps, lower the learning rate.", evidence(fwd)))
    bwd = rec.nonfinite_backward
    if bwd is not None:
        name = bwd["module"]
        findings.append(Finding("nonfinite_backward", name, "error",
                                f"The gradient became NaN/Inf in the backward pass of {name or 'the model'!r} at step "
                                f"{bwd['step']}: its output gradient was finite, its input gradient was not "
                                f"(found with {bwd['how']}).{_saved(rec)}",
                                "Look for an operation whose derivative is infinite where it is used (sqrt or "
                                "pow(<1) at 0, log at 0, a custom autograd Function's backward dividing by 0); add an "
                                "eps inside it or clamp its input.", evidence(bwd)))
    loss = rec.nonfinite_loss
    if loss is not None:
        findings.append(Finding("nonfinite_loss", "", "error",
                                f"The loss is {loss['loss']} at step {loss['step']} although the model's output is "
                                f"finite: the loss function itself produced it.{_saved(rec)}",
                                "In a hand-written loss, clamp before log (x.clamp_min(1e-7).log()) or use the "
                                "log-space form (F.log_softmax, F.cross_entropy, F.binary_cross_entropy_with_logits).",
                                evidence(loss)))
    return findings


def check_no_gradient(rec: ProbeRecord) -> list[Finding]:
    """Trainable parameters that never got a gradient over the run (unused, or cut off by detach)."""
    if not rec.grad_seen or not any(rec.grad_seen.values()):
        return []  # no backward pass completed: nothing to say
    by_module: dict[str, list[str]] = {}
    for name, seen in rec.grad_seen.items():
        if not seen:
            by_module.setdefault(rec.params.get(name, ""), []).append(name)
    return [Finding("no_gradient", module, "warning",
                    f"{len(names)} parameter{'s' if len(names) > 1 else ''} of {module or 'the model'!r} "
                    f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) got no gradient in "
                    f"{rec.steps} steps: the module is unused or its output is detached from the loss.",
                    "Remove the unused module, or find the .detach() / torch.no_grad() / .item() / .numpy() that cuts "
                    "it off; freeze it on purpose with requires_grad_(False).", {"parameters": names, "steps": rec.steps})
            for module, names in by_module.items()]


def _ordered(rec: ProbeRecord, skip_output: bool = True) -> list[ModuleRecord]:
    mods = sorted(rec.modules.values(), key=lambda m: m.order)
    return [m for m in mods if not (skip_output and m.name == rec.output_module)]


def dead_fraction(m: ModuleRecord) -> float | None:
    """Share of the module's channels that were on for fewer than DEAD_UNIT_ACTIVE_FRACTION of outputs."""
    if not m.n_active or not m.active:
        return None
    shares = [a / m.n_active for a in m.active]
    if any(math.isnan(s) for s in shares):
        return None
    return sum(s < DEAD_UNIT_ACTIVE_FRACTION for s in shares) / len(shares)


def check_dead_units(rec: ProbeRecord) -> list[Finding]:
    """Modules whose channels are (near) zero for almost every input; a chain of modules passing the same
    dead channels on (ReLU -> pool -> flatten) is reported once, at its first module."""
    findings, previous = [], None
    for m in _ordered(rec):
        frac = dead_fraction(m)
        dead = frac is not None and frac >= DEAD_LAYER_FRACTION
        if dead and not (previous is not None and len(previous.active) == len(m.active)):
            n = len(m.active)
            findings.append(Finding("dead_units", m.name, "error" if frac == 1 else "warning",
                                    f"{frac:.0%} of the {n} units of {m.name!r} ({m.type}) were zero for more than "
                                    f"{1 - DEAD_UNIT_ACTIVE_FRACTION:.0%} of the inputs over {m.n_active} recorded steps; "
                                    "dead units pass no gradient and do not recover.",
                                    "Lower the learning rate, use an init scaled for the activation (kaiming), add a "
                                    "norm layer before the activation, or use LeakyReLU/GELU.",
                                    {"dead_fraction": frac, "units": n, "steps": m.n_active}))
        previous = m if dead else None
    return findings


def check_activation_scale(rec: ProbeRecord) -> list[Finding]:
    """The first layer whose output std has grown or shrunk 100x relative to the input (through depth, at
    the first recorded step), or 100x over the run (over time)."""
    ref = rec.input_std if rec.input_std and math.isfinite(rec.input_std) else 1.0
    findings: dict[str, Finding] = {}
    fix_up = ("Scale the init to the fan-in (nn.init.kaiming_normal_ for ReLU), add normalisation layers, or "
              "lower the learning rate if it grows over time.")
    fix_down = ("Scale the init to the fan-in (kaiming init, or LSUV), or add normalisation layers "
                "(BatchNorm/LayerNorm) so the signal keeps std ~1 through depth.")
    for m in _ordered(rec):
        if not m.stds or not math.isfinite(m.stds[0]) or m.stds[0] <= 0:
            continue
        ratio = m.stds[0] / ref
        ev = {"std": m.stds[0], "input_std": ref, "ratio": ratio, "step": m.steps[0]}
        if ratio > ACT_EXPLOSION_RATIO and "activation_explosion" not in findings:
            findings["activation_explosion"] = Finding(
                "activation_explosion", m.name, "warning",
                f"The output std of {m.name!r} ({m.type}) is {m.stds[0]:.3g}, {ratio:.3g}x the input's {ref:.3g}: "
                f"activations grow layer after layer (threshold {ACT_EXPLOSION_RATIO:g}x).", fix_up, ev)
        if ratio < ACT_COLLAPSE_RATIO and "activation_collapse" not in findings:
            findings["activation_collapse"] = Finding(
                "activation_collapse", m.name, "warning",
                f"The output std of {m.name!r} ({m.type}) is {m.stds[0]:.3g}, {ratio:.2g}x the input's {ref:.3g}: "
                f"activations shrink layer after layer (threshold {ACT_COLLAPSE_RATIO:g}x).", fix_down, ev)
    for m in _ordered(rec):
        stds = [s for s in m.stds if math.isfinite(s)]
        if len(stds) < 4 or stds[0] <= 0:
            continue
        drift = stds[-1] / stds[0]
        ev = {"first_std": stds[0], "last_std": stds[-1], "ratio": drift, "steps": len(stds)}
        if drift > ACT_DRIFT_RATIO and "activation_explosion" not in findings:
            findings["activation_explosion"] = Finding(
                "activation_explosion", m.name, "warning",
                f"The output std of {m.name!r} grew from {stds[0]:.3g} to {stds[-1]:.3g} ({drift:.3g}x) during the run.",
                fix_up, ev)
        if 0 < drift < 1 / ACT_DRIFT_RATIO and "activation_collapse" not in findings:
            findings["activation_collapse"] = Finding(
                "activation_collapse", m.name, "warning",
                f"The output std of {m.name!r} shrank from {stds[0]:.3g} to {stds[-1]:.3g} ({drift:.2g}x) during the run.",
                fix_down, ev)
    return list(findings.values())


def check_saturation(rec: ProbeRecord) -> list[Finding]:
    """sigmoid/tanh layers (not the model's output) whose outputs pile up at their limits."""
    findings = []
    for m in _ordered(rec):
        if not m.saturated:
            continue
        share = statistics.fmean(m.saturated)
        if share > SATURATED_FRACTION:
            findings.append(Finding("saturation", m.name, "warning",
                                    f"{share:.0%} of the outputs of {m.name!r} ({m.type}) sit at its limits, where its "
                                    f"slope is almost 0, so little gradient passes (threshold {SATURATED_FRACTION:.0%}).",
                                    "Normalise the inputs, scale the init down (Xavier/Glorot for tanh and sigmoid), "
                                    "add a norm layer before it, or switch to ReLU/GELU.",
                                    {"saturated_fraction": share, "steps": len(m.saturated)}))
    return findings


def _quarters(values: list[float]) -> tuple[float, float]:
    q = max(1, len(values) // 4)
    return statistics.fmean(values[:q]), statistics.fmean(values[-q:])


def check_learning_rate(rec: ProbeRecord) -> list[Finding]:
    """lr_too_high: the loss rising (or rising then NaN) early on; lr_too_low: the loss flat while the
    updates are tiny relative to the weights."""
    window = rec.losses[:LR_WINDOW]
    finite = []
    for _, v in window:
        if not math.isfinite(v):
            break
        finite.append(v)
    became_nonfinite = len(finite) < len(window)
    if became_nonfinite and len(finite) >= 2 and max(finite[1:]) > finite[0] * LOSS_RISE_WARNING > 0:
        step = window[len(finite)][0]
        return [Finding("lr_too_high", "", "error",
                        f"The loss rose from {finite[0]:.4g} to {max(finite):.4g} and became NaN/Inf at step {step}: "
                        "the training diverged.", "Lower the learning rate 10x (run an LR finder), or add gradient "
                        "clipping and warm-up.", {"losses": finite, "nonfinite_step": step})]
    if len(finite) < LR_MIN_POINTS or became_nonfinite:
        return []
    first, last = _quarters(finite)
    evidence = {"first_quarter_loss": first, "last_quarter_loss": last, "points": len(finite)}
    peak = max(finite)
    if finite[0] > 0 and peak > finite[0] * LOSS_RISE_ERROR:
        at = window[finite.index(peak)][0]
        return [Finding("lr_too_high", "", "error",
                        f"The loss jumped from {finite[0]:.4g} to {peak:.4g} ({peak / finite[0]:.3g}x) at step {at}: "
                        "the steps overshoot.", "Lower the learning rate (3-10x), or use warm-up; an LR finder "
                        "shows the usable range.", {**evidence, "first_loss": finite[0], "peak_loss": peak, "peak_step": at})]
    if first > 0 and last > first * LOSS_RISE_WARNING:
        severity = "error" if last > first * LOSS_RISE_ERROR else "warning"
        return [Finding("lr_too_high", "", severity,
                        f"The loss went up from {first:.4g} to {last:.4g} ({last / first:.2f}x) over the first "
                        f"{len(finite)} recorded steps instead of down: the steps overshoot.",
                        "Lower the learning rate (3-10x), or use warm-up; an LR finder shows the usable range.", evidence)]
    ratios = [statistics.fmean(r) for n, r in rec.update_ratios.items() if r and rec.grad_nonzero.get(n, True)]
    if not ratios or first == 0:
        return []
    median = statistics.median(ratios)
    change = abs(last - first) / abs(first)
    if change < LOSS_FLAT_CHANGE and 0 < median < LR_LOW_UPDATE_RATIO:
        return [Finding("lr_too_low", "", "warning",
                        f"The loss barely moved ({first:.4g} -> {last:.4g}, {change:.2%}) and each step changes the "
                        f"weights by a median {median:.1e} of their size, far below the ~1e-3 that trains well.",
                        "Raise the learning rate (10-100x); an LR finder shows the usable range.",
                        {**evidence, "median_update_ratio": median})]
    return []


def analyse_probe(rec: ProbeRecord) -> list[Finding]:
    """All checks on the short run."""
    findings = [exception_finding(rec.error)] if rec.error else []
    for check in (check_nonfinite, check_no_gradient, check_dead_units, check_activation_scale,
                  check_saturation, check_learning_rate):
        findings += check(rec)
    return findings
