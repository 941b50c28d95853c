"""The one analysis of a recorded run. `doctor`, `diagnose()`, the `Diagnose` callback, `watch().findings()`
and the Lightning callback all call `analyse_run` on what they recorded: the recording engine's `Stats`
(every step, every watched module), the loss of every step, the pre-flight look at the first batch (when
there was one) and what replaying a step that made NaN found. Same checks, same thresholds, everywhere.

Besides the findings it says what was checked: which checks ran and on how many steps, and which could not
run and why (a run too short, no targets given, no statistics recorded), so "no findings" has a meaning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .finding import SEVERITIES, Finding, merge_findings, sort_findings
from .history import (
    check_activation_crash, check_dead_history, check_early_rise, check_gradient_explosion, check_loss_history,
    check_lr_too_low, check_nonfinite_history, check_not_learning, finite_prefix,
)
from .loop import analyse_loop
from .modules import (
    check_activation_scale, check_dead_units, check_no_gradient, check_nonfinite_counts, check_saturation,
    grad_nonzero,
)
from .setup_checks import analyse_setup, exception_finding
from .thresholds import HISTORY_MIN_POINTS, LR_MIN_POINTS, NOT_LEARNING_MIN_STEPS


@dataclass
class Record:
    """What a run recorded, for `analyse_run`. Everything is optional but the losses."""
    losses: list[float]                       # the training loss of every step, in order
    stats: object | None = None               # deepscope.stats.Stats from the recording engine
    n_classes: int | None = None              # classes of a classifier trained with cross-entropy/NLL
    valid_losses: list = field(default_factory=list)  # the validation loss of each epoch (None: none)
    setup: object | None = None               # SetupRecord of the pre-flight look (preflight.inspect_setup)
    batch_sizes: list[int] = field(default_factory=list)  # training batch sizes seen
    replay: list[Finding] = field(default_factory=list)   # what replaying the first non-finite step found
    error: dict | None = None                 # an exception that ended the run {"where", "type", "message"}
    extra: list[Finding] = field(default_factory=list)    # findings an adapter made itself (watch's output look)
    extra_checks: list[str] = field(default_factory=list)  # the names of the checks that made them
    extra_skipped: list[tuple[str, str]] = field(default_factory=list)  # checks an adapter could not run, and why


@dataclass(frozen=True)
class Check:
    """One check: its name, the kinds it can report, and the function that runs it on a Record, or says
    why it cannot (`why_not` returns a reason, or "" when it can run)."""
    name: str
    kinds: tuple[str, ...]
    why_not: Callable[["Record"], str]
    run: Callable[["Record"], list[Finding]]


def _steps(r: Record) -> int:
    stats_steps = int(r.stats.steps[-1]) + 1 if r.stats is not None and len(r.stats.steps) else 0
    return max(len(r.losses), stats_steps)


def _no_rows(stats) -> str:
    """Why a record holds no training step."""
    obs = stats.observations or {}
    if obs.get("updates") and obs.get("model_eval_updates", obs.get("eval_updates")) == obs.get("updates"):
        return "no training step was recorded: the model was in eval mode at every step (call model.train())"
    return "no training step was recorded"


def _needs_stats(min_rows: int = 1):
    def why(r: Record) -> str:
        if r.stats is None:
            return "no statistics were recorded"
        n = len(r.stats.steps)
        if n == 0:
            return _no_rows(r.stats)
        return f"needs {min_rows} recorded steps, saw {n}" if n < min_rows else ""
    return why


def _needs_losses(min_steps: int):
    def why(r: Record) -> str:
        n = len(finite_prefix(r.losses)) if r.losses else 0
        if not r.losses:
            return "no training loss was recorded"
        return f"needs {min_steps} steps, saw {n}" if n < min_steps and n == len(r.losses) else ""
    return why


def _needs_setup(r: Record) -> str:
    return "" if r.setup is not None else "no look at a batch before training: doctor, diagnose() and Diagnose take one"


def _needs_observations(min_checks: int = 1, key: str = "updates"):
    def why(r: Record) -> str:
        obs = r.stats.observations if r.stats is not None else None
        if not obs:
            return "the training loop was not observed"
        return f"needs {min_checks} optimizer steps, saw {obs.get(key, 0)}" if obs.get(key, 0) < min_checks else ""
    return why


def _needs_census(r: Record) -> str:
    if r.stats is None:
        return "no statistics were recorded"
    if len(r.stats.steps) == 0:
        return _no_rows(r.stats)
    census = ((r.stats.structure or {}).get("census") or {}).get("modules")
    if r.stats.structure is None:
        return ""  # an older file: the per-value check runs instead
    if census:
        return ""
    kinds = {rule.split(":", 1)[0] for rule in r.stats.dead_rules or []}
    if "negative" in kinds:
        return "the activations watched (leaky ReLU, GELU, ...) pass a gradient when off: their units cannot die"
    return "no ReLU-like activation module is watched (a functional F.relu has no module)"


def _dead(r: Record) -> list[Finding]:
    s = r.stats
    if s.structure is None:  # written before the census existed: judge the share of values at zero
        return check_dead_history(s.modules, s.steps, s.act_dead)
    return check_dead_units(s)


def _setup(r: Record) -> list[Finding]:
    if r.setup.error is not None:
        return analyse_setup(r.setup)
    nonzero = grad_nonzero(r.stats) if r.stats is not None and len(r.stats.steps) else None
    return analyse_setup(r.setup, r.batch_sizes, nonzero)


_DIVERGENCE = ("lr_too_high",)
CHECKS: tuple[Check, ...] = (
    Check("set-up before training (targets, loss input, init symmetry, BatchNorm batch, input scale)",
          ("target_mismatch", "softmax_before_cross_entropy", "probabilities_to_nll", "symmetric_init",
           "batchnorm_small_batch", "input_not_normalized", "softmax_wrong_dim", "loss_shape_mismatch", "exception"),
          _needs_setup, _setup),
    Check("non-finite losses", ("diverged",), _needs_losses(1),
          lambda r: check_nonfinite_history(r.losses, r.valid_losses)),
    Check("where NaN/Inf first appeared", ("nonfinite_forward", "nonfinite_backward", "nonfinite_loss"),
          _needs_stats(), lambda r: check_nonfinite_counts(r.stats, r.losses)),
    Check("loss rising early", _DIVERGENCE, _needs_losses(LR_MIN_POINTS), lambda r: check_early_rise(r.losses)),
    Check("loss spikes and a return to chance", _DIVERGENCE, _needs_losses(HISTORY_MIN_POINTS),
          lambda r: check_loss_history(r.losses, r.n_classes)),
    Check("loss stuck at its start or at chance", ("not_learning",), _needs_losses(NOT_LEARNING_MIN_STEPS),
          lambda r: check_not_learning(r.losses, r.n_classes)),
    Check("learning rate too low (flat loss, tiny updates)", ("lr_too_low",),
          lambda r: _needs_losses(LR_MIN_POINTS)(r) or _needs_stats()(r),
          lambda r: check_lr_too_low(r.losses, r.stats.update_ratio)),
    Check("dead units (per-unit census of ReLU-like activations)", ("dead_units",), _needs_census, _dead),
    Check("saturated sigmoid/tanh", ("saturation",), _needs_stats(), lambda r: check_saturation(r.stats)),
    Check("activation scale through depth and over time", ("activation_explosion", "activation_collapse"),
          _needs_stats(), lambda r: check_activation_scale(r.stats)),
    Check("activations that rose and crashed", ("activation_collapse",), _needs_stats(HISTORY_MIN_POINTS),
          lambda r: check_activation_crash(r.stats.modules, r.stats.steps, r.stats.act_std)),
    Check("parameters without gradients", ("no_gradient",), _needs_stats(), lambda r: check_no_gradient(r.stats)),
    Check("exploding gradients", ("gradient_explosion",), _needs_stats(HISTORY_MIN_POINTS),
          lambda r: check_gradient_explosion(r.stats.param_modules, r.stats.steps, r.stats.param_grad_norm)),
    Check("the training loop (eval mode, optimizer coverage, zero_grad, batch order)",
          ("model_in_eval_mode", "params_not_in_optimizer", "gradients_not_zeroed", "unshuffled_batches"),
          _needs_observations(), lambda r: analyse_loop(r.stats.observations)),
)


@dataclass
class Analysis:
    """The findings (causes first, see finding.sort_findings), the checks that ran, those that could not
    (name, why) and the number of training steps the record covers."""
    findings: list[Finding]
    ran: list[str]
    skipped: list[tuple[str, str]]
    steps: int
    caveats: list[str] = field(default_factory=list)  # what the record could not see (a module called twice)

    def summary(self) -> str:
        """One or two lines: "14 checks on 1,170 steps: no findings." and what could not be checked."""
        n = len(self.ran)
        head = f"{n} check{'s' if n != 1 else ''} on {self.steps:,} step{'s' if self.steps != 1 else ''}"
        found = len([f for f in self.findings if f.severity in ("error", "warning")])
        head += ": no problems found." if not found else f": {found} problem{'s' if found != 1 else ''} found."
        if self.skipped:
            head += " Not checked: " + "; ".join(f"{name} ({why})" for name, why in self.skipped) + "."
        if self.caveats:
            head += " Note: " + "; ".join(self.caveats) + "."
        return head

    def _repr_html_(self) -> str:
        """In a notebook: the findings as cards, then what was checked."""
        import html

        from .finding import findings_html

        return f"{findings_html(self.findings)}<p><small>{html.escape(self.summary())}</small></p>"

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "steps": self.steps, "ran": list(self.ran),
                "skipped": [list(s) for s in self.skipped], "caveats": list(self.caveats)}


def dedupe(findings: list[Finding]) -> list[Finding]:
    """One finding per (kind, module): the most severe, the first on a tie (two checks can see one problem:
    a loss that rose early and spiked is one lr_too_high)."""
    best: dict[tuple[str, str], Finding] = {}
    for f in findings:
        key = (f.kind, f.module)
        if key not in best or SEVERITIES.index(f.severity) < SEVERITIES.index(best[key].severity):
            best[key] = f
    return list(best.values())


def analyse_run(record: Record) -> Analysis:
    """Every check in CHECKS on `record`: the findings, causes first, and what was and was not checked."""
    findings = [exception_finding(record.error)] if record.error else []
    ran, skipped = [], []
    for check in CHECKS:
        why = check.why_not(record)
        if why:
            skipped.append((check.name, why))
            continue
        ran.append(check.name)
        findings += check.run(record)
    # what the replay of a non-finite step found is exact: it replaces the estimate from the sampled counts
    if record.replay:
        findings = [f for f in findings if not f.kind.startswith("nonfinite_")] + list(record.replay)
    findings = merge_findings([], dedupe(findings + list(record.extra)))
    ran += list(record.extra_checks)
    skipped += list(record.extra_skipped)
    caveats = [f"{m!r} is {note}" for m, note in (record.stats.notes().items() if record.stats is not None else ())
               if note.startswith("called")]
    return Analysis(sort_findings(findings), ran, skipped, _steps(record), caveats)


def analyse_record(stats, losses: list[float], n_classes: int | None = None,
                   valid_losses: list[float] = ()) -> list[Finding]:
    """The findings of `analyse_run` on a record without a pre-flight look (watch, Lightning)."""
    return analyse_run(Record(list(losses), stats, n_classes, list(valid_losses))).findings
