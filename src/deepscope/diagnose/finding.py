"""A Finding: what is wrong, where, how we know, and what to try. Saved as `findings.json` in a run folder."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# The kinds of finding, in the order they usually matter: a crash or NaN first, then the set-up, then
# what the short run showed.
KINDS = (
    "exception", "nonfinite_forward", "nonfinite_backward", "nonfinite_loss",
    "target_mismatch", "softmax_before_cross_entropy", "probabilities_to_nll", "symmetric_init",
    "batchnorm_small_batch", "input_not_normalized", "no_gradient", "dead_units",
    "activation_explosion", "activation_collapse", "saturation", "lr_too_high", "lr_too_low",
    "diverged", "not_learning", "model_in_eval_mode", "params_not_in_optimizer", "gradients_not_zeroed",
    "gradient_explosion", "softmax_wrong_dim", "unshuffled_batches", "loss_shape_mismatch",
)
SEVERITIES = ("error", "warning", "info")  # error: training cannot work; warning: it works badly; info: worth knowing


@dataclass
class Finding:
    kind: str  # one of KINDS
    module: str  # name as in model.named_modules(); "" for the whole model, the loss or the data
    severity: str  # one of SEVERITIES
    message: str  # one plain sentence with the evidence in numbers
    fix: str  # what to try
    evidence: dict = field(default_factory=dict)  # the numbers behind the message
    caused_by: str = ""  # the kind of the finding that explains this one ("" for a root cause); see CAUSES

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; kinds are {', '.join(KINDS)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}; use one of {SEVERITIES}")

    def _repr_html_(self) -> str:
        return findings_html([self])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["evidence"] = _jsonable(d["evidence"])
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "Finding":
        known = {"kind", "module", "severity", "message", "fix", "evidence", "caused_by"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown finding keys {unknown}; expected {sorted(known)}")
        return cls(**{"evidence": {}, "module": "", "fix": "", **data})


def _jsonable(value):
    """Plain JSON: tuples become lists, NaN and infinities become the strings "nan", "inf", "-inf"."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def save_findings(path: str | Path, findings: list[Finding]) -> Path:
    """Write findings as a JSON list of dicts (the report renders this file)."""
    path = Path(path)
    path.write_text(json.dumps([f.to_dict() for f in findings], indent=2) + "\n")
    return path


def load_findings(path: str | Path) -> list[Finding]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of findings, got {type(data).__name__}")
    return [Finding.from_dict(d) for d in data]


# Root causes and the symptoms each explains, most fundamental first: a finding can only be caused by a
# kind listed before its own (so two kinds never explain each other). A symptom found beside its cause is
# linked to it (`caused_by`) and listed under it: one divergent learning rate is one card with its dead
# layers and collapsed activations, not five separate problems. Bugs in the loop and the data come first,
# then the learning rate, then what a divergence does to the layers.
_DIVERGENCE_SYMPTOMS = ("dead_units", "activation_collapse", "activation_explosion", "saturation",
                        "gradient_explosion", "nonfinite_forward", "nonfinite_backward", "nonfinite_loss", "diverged",
                        "not_learning")
_NAN_SYMPTOMS = ("diverged", "dead_units", "activation_collapse", "activation_explosion", "saturation",
                 "not_learning", "no_gradient")
CAUSES: dict[str, tuple[str, ...]] = {
    "params_not_in_optimizer": ("not_learning", "lr_too_low"),
    "model_in_eval_mode": ("not_learning",),
    "gradients_not_zeroed": ("lr_too_high",) + _DIVERGENCE_SYMPTOMS,
    # batches of one class each pull the model back and forth: the loss swings and can end near chance
    "unshuffled_batches": ("lr_too_high", "not_learning"),
    # an (N, 1) prediction against (N,) targets is one bug, reported from the loss's side and the targets';
    # the loss of all pairs, not the intended one, also moves oddly
    "loss_shape_mismatch": ("target_mismatch", "lr_too_high", "not_learning"),
    # targets of a dtype or shape the loss refuses: the exception it raised is the same problem, quoted
    "target_mismatch": ("exception",),
    # a softmax over the batch: the loss is not the one of a classifier, so ln(classes) is not its chance level
    "softmax_wrong_dim": ("not_learning", "lr_too_high"),
    # raw-scale inputs: the first layers' outputs are far from the input's scale, and steps overshoot
    "input_not_normalized": ("activation_collapse", "activation_explosion", "saturation", "lr_too_high"),
    # steps too small to move the weights: the loss stays where it started
    "lr_too_low": ("not_learning",),
    "lr_too_high": _DIVERGENCE_SYMPTOMS,
    "gradient_explosion": ("diverged", "nonfinite_forward", "nonfinite_backward", "nonfinite_loss", "dead_units",
                           "activation_collapse", "activation_explosion", "saturation"),
    # the module or loss that made the first NaN explains the NaN losses and what they did to the layers
    "nonfinite_forward": _NAN_SYMPTOMS,
    "nonfinite_backward": _NAN_SYMPTOMS,
    "nonfinite_loss": _NAN_SYMPTOMS,
    "diverged": ("dead_units", "activation_collapse", "activation_explosion", "saturation", "not_learning"),
    # a signal that shrinks to ~0 sits within the off tolerance of the floor (units look dead), and grows
    # back by orders of magnitude as training rescales it
    "activation_collapse": ("dead_units", "activation_explosion", "not_learning"),
    # a layer whose units are all dead passes nothing: the model cannot learn past it
    "dead_units": ("not_learning",),
}


def link_causes(findings: list[Finding]) -> list[Finding]:
    """Set `caused_by` on each finding that a root cause found beside it explains (CAUSES); a finding
    already linked keeps its cause. Only errors and warnings count as causes."""
    present = {f.kind for f in findings if f.severity in ("error", "warning")}
    rank = {c: i for i, c in enumerate(CAUSES)}  # earlier in CAUSES is more fundamental: no cycles
    out = []
    for f in findings:
        if not f.caused_by:
            cause = next((c for c, symptoms in CAUSES.items()
                          if c in present and c != f.kind and f.kind in symptoms
                          and rank[c] < rank.get(f.kind, len(rank))), "")
            if cause:
                f = replace(f, caused_by=cause)
        out.append(f)
    return out


class Findings(list):
    """A list of findings that a notebook shows as cards, causes first, and `print` as text."""

    def _repr_html_(self) -> str:
        return findings_html(self)

    def __str__(self) -> str:
        return format_findings(self)


_COLOURS = {"error": "#b00020", "warning": "#a15c00", "info": "#335"}


def findings_html(findings: list[Finding]) -> str:
    """Findings as HTML cards for a notebook: kind, module, severity, message and fix; symptoms indented
    under their cause."""
    import html

    if not findings:
        return "<div>No findings: nothing looks wrong.</div>"
    cards = []
    for f in findings:
        where = f" in <code>{html.escape(f.module)}</code>" if f.module else ""
        because = f" <small>(caused by {html.escape(f.caused_by)})</small>" if f.caused_by else ""
        fix = f"<br><i>fix:</i> {html.escape(f.fix)}" if f.fix and not f.caused_by else ""
        cards.append(f"<div style=\"margin:4px 0 4px {24 if f.caused_by else 0}px;padding:4px 8px;border-left:4px solid "
                     f"{_COLOURS.get(f.severity, '#333')}\"><b>{f.severity}</b> {html.escape(f.kind)}{where}{because}"
                     f"<br>{html.escape(f.message)}{fix}</div>")
    return "<div>" + "".join(cards) + "</div>"


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Causes first: each root cause (errors, then warnings, then info; within a severity in KINDS order),
    followed by the findings it explains (see `link_causes`). Duplicates are dropped."""
    seen, unique = set(), []
    for f in findings:
        key = (f.kind, f.module, f.severity, f.message)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    order = lambda f: (SEVERITIES.index(f.severity), KINDS.index(f.kind))  # noqa: E731
    linked = sorted(link_causes(unique), key=order)
    out: list[Finding] = []
    for root in (f for f in linked if not f.caused_by):
        out.append(root)
        out.extend(f for f in linked if f.caused_by == root.kind and f not in out)
    out.extend(f for f in linked if f not in out)  # a symptom whose cause is itself a symptom: last
    return Findings(out)


def merge_findings(known: list[Finding], new: list[Finding]) -> list[Finding]:
    """`known` plus the `new` findings about a kind and module not yet known. Where both saw the same kind
    in the same module, the more severe one stays (the known one on a tie)."""
    merged = list(known)
    where = {(f.kind, f.module): i for i, f in enumerate(known)}
    for f in new:
        i = where.get((f.kind, f.module))
        if i is None:
            merged.append(f)
        elif SEVERITIES.index(f.severity) < SEVERITIES.index(merged[i].severity):
            merged[i] = f
    return sort_findings(merged)


def problems(findings: list[Finding]) -> list[Finding]:
    """The findings that need action: errors and warnings."""
    return [f for f in findings if f.severity in ("error", "warning")]


def format_findings(findings: list[Finding]) -> str:
    """Findings as readable text, one block each."""
    if not findings:
        return "No findings: nothing looks wrong.\n"
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    summary = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n)
    lines = [f"{len(findings)} finding{'s' if len(findings) != 1 else ''} ({summary}):", ""]
    for f in findings:
        where = f"module {f.module!r}" if f.module else "model/loss/data"
        pad = "    " if f.caused_by else ""
        because = f" (caused by {f.caused_by})" if f.caused_by else ""
        lines.append(f"{pad}{f.severity.upper():<8}{f.kind} [{where}]{because}")
        lines.append(f"{pad}  {f.message}")
        if f.fix and not f.caused_by:  # a symptom's fix is its cause's
            lines.append(f"{pad}  fix: {f.fix}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def format_summary(findings: list[Finding], checked: str = "", details: str = "", *, info: bool = False) -> str:
    """The terminal's summary: one line per error or warning (and info, with `info`), causes first, each
    root cause followed by its fix and the findings it explains (indented); then `checked`
    (Analysis.summary()) on its own line. `details` says where the full findings are."""
    found = findings if info else problems(findings)
    lines = []
    if found:
        errors = sum(f.severity == "error" for f in found)
        warnings_ = sum(f.severity == "warning" for f in found)
        infos = f" and {len(found) - errors - warnings_} info" if info and len(found) > errors + warnings_ else ""
        where = f" (details in {details})" if details else ""
        lines.append(f"diagnosis found {errors} error(s), {warnings_} warning(s){infos}, causes first{where}:")
        for f in found:
            pad = "      " if f.caused_by else "  "
            because = f" (caused by {f.caused_by})" if f.caused_by else ""
            lines.append(f"{pad}{f.severity} {f.kind}{f' in {f.module!r}' if f.module else ''}{because}: {f.message}")
            if not f.caused_by and f.fix:
                lines.append(f"{pad}  fix: {f.fix}")
    if checked:
        lines.append(f"diagnosis: {checked}")
    return "\n".join(lines) + ("\n" if lines else "")


def moved_paths(finding: Finding, old: str, new: str) -> Finding:
    """The finding with file paths under `old` rewritten to `new` (a run folder renamed once complete)."""
    d = finding.to_dict()
    d["message"] = d["message"].replace(old, new)
    d["evidence"] = {k: v.replace(old, new) if isinstance(v, str) else v for k, v in d["evidence"].items()}
    return Finding.from_dict(d)
