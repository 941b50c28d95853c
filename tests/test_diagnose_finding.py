"""Finding: validation, JSON round trip, findings.json, ordering and text."""
import json

import pytest

from deepscope.diagnose import KINDS, Finding, format_findings, load_findings, problems, save_findings, sort_findings


def test_finding_round_trips_through_dict_and_file(tmp_path):
    f = Finding("dead_units", "block1.act", "warning", "80% of units are dead.", "Lower the lr.",
                {"dead_fraction": 0.8, "ratio": float("nan"), "shape": (3, 4)})
    d = f.to_dict()
    assert d["evidence"] == {"dead_fraction": 0.8, "ratio": "nan", "shape": [3, 4]}
    json.dumps(d)  # plain JSON, no NaN tokens
    path = save_findings(tmp_path / "findings.json", [f])
    assert isinstance(json.loads(path.read_text()), list)
    (back,) = load_findings(path)
    assert (back.kind, back.module, back.severity, back.message, back.fix) == (f.kind, f.module, f.severity, f.message, f.fix)
    assert back.evidence["dead_fraction"] == 0.8


def test_unknown_kind_severity_or_key_is_an_error():
    with pytest.raises(ValueError, match="unknown finding kind"):
        Finding("dead_unit", "", "error", "m", "f")
    with pytest.raises(ValueError, match="severity"):
        Finding("dead_units", "", "fatal", "m", "f")
    with pytest.raises(ValueError, match="unknown finding keys"):
        Finding.from_dict({"kind": "dead_units", "module": "", "severity": "error", "message": "", "fix": "", "x": 1})


def test_sorting_puts_errors_first_and_drops_duplicates():
    a = Finding("lr_too_low", "", "warning", "low", "raise")
    b = Finding("nonfinite_loss", "", "error", "nan", "clamp")
    c = Finding("input_not_normalized", "", "info", "fyi", "")
    assert sort_findings([c, a, b, a]) == [b, a, c]
    assert problems([a, b, c]) == [a, b]


def test_format_findings_is_readable():
    text = format_findings([Finding("nonfinite_forward", "1", "error", "Module '1' produced NaN.", "Clamp.")])
    assert "ERROR" in text and "nonfinite_forward" in text and "'1'" in text and "fix: Clamp." in text
    assert "nothing looks wrong" in format_findings([])


def test_kinds_cover_the_contract():
    for kind in ("nonfinite_forward", "nonfinite_backward", "nonfinite_loss", "dead_units", "activation_explosion",
                 "activation_collapse", "saturation", "softmax_before_cross_entropy", "probabilities_to_nll",
                 "target_mismatch", "symmetric_init", "no_gradient", "lr_too_high", "lr_too_low",
                 "batchnorm_small_batch", "input_not_normalized", "exception"):
        assert kind in KINDS
