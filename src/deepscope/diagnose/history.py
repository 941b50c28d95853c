"""What the whole run's history showed: pure functions of recorded arrays (the loss of every step, the
recording engine's per-step statistics) to findings: a loss that rose, spiked, turned NaN, stayed flat or
ended at chance level; a layer that rose and then crashed (lesson 10's plain CNN at a high learning rate);
gradients that exploded. `modules.py` judges each module; `analysis.py` runs everything.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from .finding import Finding
from .thresholds import (
    ACT_CRASH_FLOOR, ACT_CRASH_RATIO, CHANCE_LEARNED_MARGIN, CHANCE_SMOOTH, CHANCE_TOLERANCE, DEAD_VALUES_ERROR,
    DEAD_VALUES_WARNING, HISTORY_MIN_POINTS, HISTORY_TAIL_MIN, LOSS_RISE_ERROR, LOSS_SPIKE_RATIO,
    NOT_LEARNING_DROP, NOT_LEARNING_MIN_STEPS, GRAD_EXPLOSION_ONSET, GRAD_EXPLOSION_RATIO, LOSS_FLAT_CHANGE,
    LOSS_RISE_WARNING, LR_LOW_UPDATE_RATIO, LR_MIN_POINTS, LR_WINDOW, CHANCE_RETURN_MIN_STEPS, GRAD_EXPLOSION_FLOOR,
    SPIKE_NOISE_MULTIPLE,
)

_FIX_DIVERGED = ("Lower the learning rate (3-10x; an LR finder shows the usable range) or warm it up; add "
                 "normalisation layers (BatchNorm) with a kaiming init so the scale cannot run away; retrain from "
                 "the start, as dead units do not recover.")


def tail_size(n: int) -> int:
    """How many of `n` rows count as "the end of the run": the last 10%, at least HISTORY_TAIL_MIN, at most
    half of them."""
    return max(1, min(n // 2, max(HISTORY_TAIL_MIN, n // 10)))


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def check_activation_crash(modules: list[str], steps: np.ndarray, act_std: np.ndarray) -> list[Finding]:
    """The first module (in the order given, the model's) whose output std ended below ACT_CRASH_RATIO of
    its peak and below ACT_CRASH_FLOOR: the rise-and-crash of a too-high learning rate. `act_std` is (T, M);
    NaN/inf rows are skipped (the NaN checks report those)."""
    T = len(steps)
    if T < HISTORY_MIN_POINTS:
        return []
    k = tail_size(T)
    crashed = []
    for j, name in enumerate(modules):
        col = _finite(act_std[:, j])
        if np.isnan(col[:-k]).all() or np.isnan(col[-k:]).all():
            continue
        # the std held over k rows in a row: a crash that lasts, whether or not the layer recovers later
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            held = np.array([np.nanmean(col[t:t + k]) for t in range(T - k + 1)])
        i = int(np.nanargmax(col[:-k]))
        after = held[i + 1:] if i + 1 < len(held) else held[-1:]
        if np.isnan(after).all():
            continue
        low_at = i + 1 + int(np.nanargmin(after)) if i + 1 < len(held) else len(held) - 1
        peak, low, final = float(col[i]), float(held[low_at]), float(held[-1])
        if low < peak * ACT_CRASH_RATIO and low < ACT_CRASH_FLOOR:
            first = float(col[~np.isnan(col)][0])
            crashed.append({"module": name, "peak_std": peak, "peak_step": int(steps[i]), "first_std": first,
                            "low_std": low, "low_steps": [int(steps[low_at]), int(steps[low_at + k - 1])],
                            "final_std": final, "ratio": low / peak})
    if not crashed:
        return []
    c = crashed[0]
    rose = f"rose from {c['first_std']:.3g} to" if c["peak_std"] > c["first_std"] else "was"
    others = [d["module"] for d in crashed[1:]]
    also = f" So did {len(others)} later layer{'s' if len(others) > 1 else ''} ({', '.join(others[:4])}" \
           f"{', ...' if len(others) > 4 else ''})." if others else ""
    a, b = c["low_steps"]
    recovered = "" if c["final_std"] <= c["low_std"] * 1.5 else f", and was back to {c['final_std']:.3g} at the end"
    return [Finding("activation_collapse", c["module"], "warning",
                    f"The output std of {c['module']!r} {rose} {c['peak_std']:.3g} at step {c['peak_step']}, then "
                    f"crashed to {c['low_std']:.3g} over steps {a}-{b} ({c['ratio']:.2g}x its peak; threshold "
                    f"{ACT_CRASH_RATIO:g}x and below {ACT_CRASH_FLOOR:g}){recovered}: training switched the layer "
                    f"off{' for a stretch' if recovered else ''}.{also}",
                    _FIX_DIVERGED, {**c, "end_rows": k, "collapsed": [d["module"] for d in crashed]})]


def check_dead_history(modules: list[str], steps: np.ndarray, act_dead: np.ndarray) -> list[Finding]:
    """Modules whose outputs are (near) zero for more than DEAD_VALUES_WARNING of their values at the end
    of the run. `act_dead` is (T, M), the fraction of values at or below the dead threshold per row."""
    T = len(steps)
    if T < HISTORY_MIN_POINTS:
        return []
    k = tail_size(T)
    findings = []
    for j, name in enumerate(modules):
        end = _finite(act_dead[-k:, j])
        if np.isnan(end).all():
            continue
        frac = float(np.nanmean(end))
        if frac <= DEAD_VALUES_WARNING:
            continue
        first = _finite(act_dead[:, j])
        first = float(first[~np.isnan(first)][0])
        findings.append(Finding(
            "dead_units", name, "error" if frac >= DEAD_VALUES_ERROR else "warning",
            f"{frac:.0%} of the output values of {name!r} were zero over the last {k} recorded steps (steps "
            f"{int(steps[-k])}-{int(steps[-1])}; {first:.0%} at the first); ReLU outputs are ~50% zero in a healthy "
            f"network (threshold {DEAD_VALUES_WARNING:.0%}). Zero outputs pass no gradient.",
            "Lower the learning rate, use an init scaled for the activation (kaiming), add a norm layer before "
            "the activation, or use LeakyReLU/GELU.",
            {"dead_fraction": frac, "first_dead_fraction": first, "end_rows": k, "last_step": int(steps[-1])}))
    return findings


def finite_prefix(losses: list[float]) -> list[float]:
    """The losses up to the first NaN/Inf (the NaN checks report what comes after)."""
    values = []
    for v in losses:
        if not math.isfinite(v):
            break
        values.append(float(v))
    return values


def check_loss_history(losses: list[float], n_classes: int | None = None) -> list[Finding]:
    """lr_too_high from the training loss of every step: ending at chance level (ln n_classes, for a
    classifier trained with cross-entropy) after having been lower, or a spike above LOSS_SPIKE_RATIO x
    the first loss. Losses after the first NaN/Inf are ignored (the NaN checks report those)."""
    values = finite_prefix(losses)
    if len(values) < HISTORY_MIN_POINTS:
        return []
    v = np.array(values)
    k = tail_size(len(v))
    start, final = float(v[0]), float(v[-k:].mean())
    at = int(v.argmax())
    peak = float(v[at])
    evidence = {"first_loss": start, "peak_loss": peak, "peak_step": at, "final_loss": final, "end_steps": k,
                "steps": len(v)}
    if n_classes is not None and n_classes >= 2 and len(v) >= CHANCE_RETURN_MIN_STEPS:
        chance = math.log(n_classes)
        smooth = np.convolve(v, np.ones(CHANCE_SMOOTH) / CHANCE_SMOOTH, mode="valid")
        low_at = int(smooth.argmin())
        low = float(smooth[low_at])
        # back at chance (within CHANCE_TOLERANCE either side) after the lowest point, for k steps in a row
        at_chance = np.abs(smooth[low_at:] - chance) <= chance * CHANCE_TOLERANCE
        stretch, longest, begin, where = 0, 0, 0, 0
        for t, hit in enumerate(at_chance):
            stretch = stretch + 1 if hit else 0
            if stretch > longest:
                longest, begin = stretch, t - stretch + 1
        where = low_at + begin + CHANCE_SMOOTH // 2
        ended = abs(final - chance) <= chance * CHANCE_TOLERANCE
        if low <= chance * (1 - CHANCE_LEARNED_MARGIN) and longest >= k:
            spike_at = low_at + int(v[low_at:].argmax())
            spiked = f", spiked to {v[spike_at]:.4g} at step {spike_at}" if v[spike_at] > low * LOSS_SPIKE_RATIO else ""
            end = (f" and ended there ({final:.4g})" if ended else
                   f" for {longest} steps (from step {where}), and was only back to {final:.4g} at the end")
            died = " Training diverged and the network died." if ended else \
                " Training diverged: what the network had learned was lost, and it is relearning from chance."
            return [Finding("lr_too_high", "", "error",
                            f"The model fell back to predicting no better than chance: the training loss had come down to {low:.4g} (around "
                            f"step {low_at + CHANCE_SMOOTH // 2}){spiked}, then went back to chance level "
                            f"ln({n_classes}) = {chance:.4g}{end}.{died}",
                            _FIX_DIVERGED,
                            {**evidence, "n_classes": n_classes, "chance_loss": chance, "lowest_loss": low,
                             "steps_at_chance": longest, "back_at_chance_from": where})]
    # batch-to-batch noise: the median change between consecutive losses. A small-batch regression loss
    # swings 2x from one batch to the next while training fine; an overshoot stands far out of that noise
    noise = float(np.median(np.abs(np.diff(v)))) if len(v) > 1 else 0.0
    evidence["batch_noise"] = noise
    if start > 0 and peak > start * LOSS_SPIKE_RATIO and peak - start > SPIKE_NOISE_MULTIPLE * noise:
        return [Finding("lr_too_high", "", "error" if peak > start * LOSS_RISE_ERROR else "warning",
                        f"The training loss spiked from {start:.4g} to {peak:.4g} ({peak / start:.3g}x) at step {at} "
                        f"(threshold {LOSS_SPIKE_RATIO:g}x) and ended at {final:.4g}: a step overshot.",
                        "Lower the learning rate (3-10x) or warm it up; add gradient clipping; an LR finder shows "
                        "the usable range.", evidence)]
    return []


def check_nonfinite_history(losses: list[float], valid_losses: list[float] = ()) -> list[Finding]:
    """'diverged' when a recorded training loss (every step) or an epoch's validation loss is NaN or
    infinite. The probe's NaN checks look at some steps only; this one sees every step, so a run that
    ends in NaN is never reported as healthy. It names the step, not the module: `deepscope doctor`
    (or `diagnose()`) finds the module that produced the first NaN."""
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        before = f"; the last finite loss was {losses[bad - 1]:.4g}" if bad > 0 else ""
        return [Finding("diverged", "", "error",
                        f"The training loss became {losses[bad]} at step {bad} ({len(losses)} step{'s' if len(losses) != 1 else ''} recorded{before}): "
                        f"training diverged, and every later step trained on non-finite numbers.",
                        _FIX_DIVERGED + " `deepscope doctor` with the same options names the module that "
                        "produced the first NaN.", {"step": bad, "steps": len(losses), "loss": str(losses[bad])})]
    epoch = next((i for i, v in enumerate(valid_losses) if v is not None and not math.isfinite(v)), None)
    if epoch is not None:
        return [Finding("diverged", "", "error",
                        f"The validation loss was {valid_losses[epoch]} after epoch {epoch + 1} while every training "
                        f"loss was finite: the last training step(s) of that epoch made the weights non-finite.",
                        _FIX_DIVERGED, {"epoch": epoch + 1, "valid_loss": str(valid_losses[epoch])})]
    return []


def check_not_learning(losses: list[float], n_classes: int | None = None) -> list[Finding]:
    """'not_learning' once NOT_LEARNING_MIN_STEPS finite losses are recorded: a classifier whose loss never
    came CHANCE_LEARNED_MARGIN below chance, ln(n_classes), and ends at chance (error: it predicts no better
    than guessing), or a loss of unknown chance level whose last quarter is within NOT_LEARNING_DROP of its
    first steps (warning). Loss that went down and came back is lr_too_high's, not this check's."""
    values = finite_prefix(losses)
    if len(values) < NOT_LEARNING_MIN_STEPS:
        return []
    v = np.array(values)
    k = tail_size(len(v))
    first, final = float(v[:CHANCE_SMOOTH].mean()), float(v[-max(k, len(v) // 4):].mean())
    lowest = float(np.convolve(v, np.ones(CHANCE_SMOOTH) / CHANCE_SMOOTH, mode="valid").min())
    evidence = {"first_losses_mean": first, "final_loss": final, "lowest_loss": lowest, "steps": len(v)}
    fix = ("Check that the labels match the inputs (shuffle them together), that the parameters are trainable "
           "and given to the optimizer, and that the learning rate is not far too low (an LR finder shows the "
           "usable range).")
    if n_classes is not None and n_classes >= 2:
        chance = math.log(n_classes)
        if lowest > chance * (1 - CHANCE_LEARNED_MARGIN) and final >= chance * (1 - CHANCE_TOLERANCE):
            return [Finding("not_learning", "", "error",
                            f"After {len(v)} steps the training loss is {final:.4g}, chance level for {n_classes} "
                            f"classes (ln {n_classes} = {chance:.4g}), and it never came more than "
                            f"{CHANCE_LEARNED_MARGIN:.0%} below it: the model predicts no better than guessing.",
                            fix, {**evidence, "n_classes": n_classes, "chance_loss": chance})]
        return []
    if first > 0 and final >= first * (1 - NOT_LEARNING_DROP) and lowest >= first * (1 - 2 * NOT_LEARNING_DROP):
        return [Finding("not_learning", "", "warning",
                        f"After {len(v)} steps the training loss is {final:.4g}, within {NOT_LEARNING_DROP:.0%} of "
                        f"where it started ({first:.4g}): the model is not learning.", fix, evidence)]
    return []


def _quarters(values) -> tuple[float, float]:
    q = max(1, len(values) // 4)
    return float(np.mean(values[:q])), float(np.mean(values[-q:]))


def check_early_rise(losses: list[float]) -> list[Finding]:
    """lr_too_high from the first LR_WINDOW training losses: rising 20% (LOSS_RISE_WARNING) from the first
    quarter to the last instead of falling, or rising and then turning NaN/Inf."""
    window = losses[:LR_WINDOW]
    finite = finite_prefix(window)
    if len(finite) < len(window) and len(finite) >= 2 and max(finite[1:]) > finite[0] * LOSS_RISE_WARNING > 0:
        step = len(finite)
        return [Finding("lr_too_high", "", "error",
                        f"The loss rose from {finite[0]:.4g} to {max(finite):.4g} and became NaN/Inf at step {step}: "
                        "the training diverged.", "Lower the learning rate 10x (run an LR finder), or add gradient "
                        "clipping and warm-up.", {"losses": finite, "nonfinite_step": step})]
    if len(finite) < LR_MIN_POINTS or len(finite) < len(window):
        return []
    first, last = _quarters(finite)
    q = max(1, len(finite) // 4)
    spread = float(np.std(finite[:q]) + np.std(finite[-q:])) / math.sqrt(q)  # standard error of the two means
    if first > 0 and last > first * LOSS_RISE_WARNING and last - first > 3 * spread:
        return [Finding("lr_too_high", "", "error" if last > first * LOSS_RISE_ERROR else "warning",
                        f"The loss went up from {first:.4g} to {last:.4g} ({last / first:.2f}x) over the first "
                        f"{len(finite)} steps instead of down: the steps overshoot.",
                        "Lower the learning rate (3-10x), or use warm-up; an LR finder shows the usable range.",
                        {"first_quarter_loss": first, "last_quarter_loss": last, "points": len(finite)})]
    return []


def check_lr_too_low(losses: list[float], update_ratio: np.ndarray) -> list[Finding]:
    """lr_too_low: over the whole run the loss moved less than LOSS_FLAT_CHANGE (first quarter vs last)
    while the median update-to-weight ratio (every recorded step and module, `update_ratio` (T, P)) stayed
    below LR_LOW_UPDATE_RATIO."""
    values = finite_prefix(losses)
    ratios = np.asarray(update_ratio, dtype=np.float64)
    ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
    if len(values) < LR_MIN_POINTS or len(values) < len(losses) or not len(ratios):
        return []
    first, last = _quarters(values)
    median = float(np.median(ratios))
    if first == 0:
        return []
    change = abs(last - first) / abs(first)
    if change < LOSS_FLAT_CHANGE and median < LR_LOW_UPDATE_RATIO:
        return [Finding("lr_too_low", "", "warning",
                        f"The loss barely moved in {len(values)} steps ({first:.4g} -> {last:.4g}, {change:.2%}) and "
                        f"each step changed the weights by a median {median:.1e} of their size, far below the ~1e-3 "
                        f"that trains well.", "Raise the learning rate (10-100x); an LR finder shows the usable range.",
                        {"first_quarter_loss": first, "last_quarter_loss": last, "points": len(values),
                         "median_update_ratio": median})]
    return []


def check_gradient_explosion(param_modules: list[str], steps: np.ndarray, grad_norm: np.ndarray) -> list[Finding]:
    """'gradient_explosion' when a module's parameter-gradient norm (T, P) ends GRAD_EXPLOSION_RATIO times
    above its early level; names the module where it started: the first to pass GRAD_EXPLOSION_ONSET times
    its own early level (RNNs without clipping, a learning rate past the stable range)."""
    T = len(steps)
    if T < HISTORY_MIN_POINTS or not len(param_modules):
        return []
    g = np.asarray(grad_norm, dtype=np.float64)
    exploding, onsets = [], {}
    for j, name in enumerate(param_modules):
        series = g[:, j]
        # up to the first non-finite norm after finite ones: a NaN made elsewhere (a module's forward, the
        # loss) turns every gradient NaN at once, which the NaN checks report; an explosion grows first
        finite = np.isfinite(series)
        started = np.flatnonzero(finite)
        if len(started):
            broke = np.flatnonzero(~finite[started[0]:])
            if len(broke):
                series = series[:started[0] + broke[0]]
        ended_in_nan = len(series) < T
        # a run that ended in NaN may have exploded within a few steps: 3 finite norms show the growth
        if len(series) < (3 if ended_in_nan else HISTORY_MIN_POINTS):
            continue
        head, tail = max(1, len(series) // 10), max(2, len(series) // 4)
        with warnings.catch_warnings():  # an all-NaN stretch (no gradient) is expected here
            warnings.simplefilter("ignore", RuntimeWarning)
            early = np.nanmedian(series[:head])
            # a run that ended in NaN: its last finite norms are the explosion, however few
            late = np.nanmax(series[-tail:]) if ended_in_nan else np.nanmedian(series[-tail:])
        if not (np.isfinite(early) and early > 0):
            continue
        # a transient burst (one step's norm 1,000x the early level) is an explosion too, clipped or not
        late = max(late, float(np.nanmax(series)))
        if late >= GRAD_EXPLOSION_RATIO * early and late >= GRAD_EXPLOSION_FLOOR:
            exploding.append((name, early, late))
            above = np.flatnonzero(series > GRAD_EXPLOSION_ONSET * early)
            onsets[name] = int(above[0]) if len(above) else T
    if not exploding:
        return []
    first = min(exploding, key=lambda e: (onsets[e[0]], -(e[2] / e[1] if np.isfinite(e[2]) else np.inf)))
    name, early, late = first
    at = int(steps[min(onsets[name], T - 1)])
    others = [e[0] for e in exploding if e[0] != name]
    also = f"; then in {', '.join(repr(o) for o in others[:4])}" if others else ""
    growth = f"{late / early:.3g}x" if np.isfinite(late) else "to NaN/inf"
    return [Finding("gradient_explosion", name, "error",
                    f"The gradient norm of {name!r} reached {growth} its early level ({late:.3g}, from {early:.3g}), "
                    f"passing {GRAD_EXPLOSION_ONSET:g}x its early level first, at step {at}{also}.",
                    "Clip the gradient norm (deepscope.GradClip / torch.nn.utils.clip_grad_norm_), lower the "
                    "learning rate, and for recurrent layers use LSTM/GRU or a smaller recurrent-weight init.",
                    {"early_norm": float(early), "late_norm": float(late), "onset_step": at,
                     "exploding": [e[0] for e in exploding]})]


def analyse_history(modules: list[str], steps: np.ndarray, act_std: np.ndarray, act_dead: np.ndarray,
                    losses: list[float], n_classes: int | None = None,
                    valid_losses: list[float] = ()) -> list[Finding]:
    """All checks on the run's history (pass empty arrays for what was not recorded); `valid_losses` is
    the validation loss of each epoch, when there is one."""
    return (check_nonfinite_history(losses, valid_losses) + check_activation_crash(modules, steps, act_std)
            + check_dead_history(modules, steps, act_dead) + check_loss_history(losses, n_classes)
            + check_not_learning(losses, n_classes))
