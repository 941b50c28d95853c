"""Diagnosis: find what is wrong with a training run, name the module, suggest the fix.

Record (`preflight`, `probe`), analyse (`setup_checks`, `analyse`, `history`: pure functions of the records), report
(`Finding`, `findings.json`). Entry points: `diagnose()` for a short instrumented run on a copy of the model,
the `Diagnose` callback for a real fit, and `deepscope doctor` on the command line.
"""
from .analyse import analyse_probe
from .callback import Diagnose
from .finding import (
    KINDS, SEVERITIES, Finding, format_findings, load_findings, merge_findings, moved_paths, problems, save_findings,
    sort_findings,
)
from .history import analyse_history
from .preflight import inspect_setup, loss_kind
from .probe import NONFINITE_BATCH_FILE, Probe
from .records import LayerWeight, ModuleRecord, ProbeRecord, SetupRecord
from .run import diagnose
from .setup_checks import analyse_setup

__all__ = ["diagnose", "Diagnose", "Finding", "KINDS", "SEVERITIES", "format_findings", "load_findings",
           "problems", "save_findings", "moved_paths", "sort_findings", "merge_findings", "analyse_probe",
           "analyse_history", "analyse_setup", "inspect_setup",
           "loss_kind", "Probe", "NONFINITE_BATCH_FILE", "LayerWeight", "ModuleRecord", "ProbeRecord", "SetupRecord"]
