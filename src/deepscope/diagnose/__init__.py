"""Diagnosis: find what is wrong with a training run, name the module, suggest the fix.

Record (the recording engine's `Stats`, the losses, `preflight`'s look at the first batch, `replay` of a
step that made NaN), analyse (`analysis.analyse_run`, the one analysis: `setup_checks`, `history`, `modules`,
`loop` are pure functions of the record), report (`Finding`, `findings.json`). Entry points: `diagnose()`
for a short instrumented run on a copy of the model, the `Diagnose` callback for a real fit,
`deepscope.watch(...).findings()` for a plain loop, and `deepscope doctor` on the command line.
"""
from .analysis import CHECKS, Analysis, Record, analyse_record, analyse_run
from .callback import Diagnose
from .finding import (
    KINDS, SEVERITIES, Finding, format_findings, load_findings, merge_findings, moved_paths, problems, save_findings,
    sort_findings,
)
from .history import analyse_history
from .preflight import inspect_setup, loss_kind
from .records import LayerWeight, SetupRecord
from .replay import NONFINITE_BATCH_FILE, locate_nonfinite
from .run import diagnose, diagnose_run
from .setup_checks import analyse_setup

__all__ = ["diagnose", "diagnose_run", "Diagnose", "Finding", "KINDS", "SEVERITIES", "format_findings",
           "load_findings", "problems", "save_findings", "moved_paths", "sort_findings", "merge_findings",
           "analyse_run", "analyse_record", "Analysis", "Record", "CHECKS", "analyse_history", "analyse_setup",
           "inspect_setup", "loss_kind", "locate_nonfinite", "NONFINITE_BATCH_FILE", "LayerWeight", "SetupRecord"]
