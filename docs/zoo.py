"""The diagnosis zoo: run every case of tests/zoo_cases.py and write how often diagnosis is right.

    python docs/zoo.py                 # run every case, rewrite the table in docs/diagnosis.md, print a summary
    python docs/zoo.py --readme        # ...and the one-line summary in README.md (between its zoo-summary markers)
    python docs/zoo.py --list          # the cases
    python docs/zoo.py --only NAME     # run one case (repeatable) and print its findings; writes nothing
    python docs/zoo.py --no-write      # run every case, print the table, write nothing

For each finding kind: the defect cases tried, how many found the kind (a warning or error of that kind),
how many missed it, and the false alarms (warnings/errors of another kind, neither accepted for that case
nor linked to a cause by `caused_by`); the healthy cases (six architectures, trained correctly, through
`watch` and through `diagnose()`) are the last row: any warning or error there is a false alarm.
Deterministic: every case seeds its data, model and loop. One CPU thread.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import zoo_cases as zoo  # noqa: E402

from deepscope.diagnose import KINDS, format_findings  # noqa: E402

DOC = ROOT / "docs" / "diagnosis.md"
README = ROOT / "README.md"
START, END = "<!-- zoo:start -->", "<!-- zoo:end -->"
SUMMARY_START, SUMMARY_END = "<!-- zoo-summary:start -->", "<!-- zoo-summary:end -->"
HEADING = "## The zoo: how often diagnosis is right"


def run_all(cases, verbose: bool = True) -> list:
    outcomes = []
    for case in cases:
        if not case.available:
            if verbose:
                print(f"  {case.name:<42} kind {case.kind!r} not available", flush=True)
            continue
        o = zoo.run_case(case)
        outcomes.append(o)
        if verbose:
            verdict = "healthy" if case.kind is None else ("found" if o.found else "MISSED")
            alarms = f", {len(o.false_alarms)} false alarm(s)" if o.false_alarms else ""
            print(f"  {case.name:<42} {verdict}{alarms} ({o.seconds:.1f} s)", flush=True)
    return outcomes


def _kind_order(kind: str) -> tuple:
    return (KINDS.index(kind), "") if kind in KINDS else (len(KINDS), kind)


def tally(outcomes: list, cases: list) -> dict:
    """Counts per kind and for the healthy cases, and the totals."""
    rows = {}
    for kind in sorted({c.kind for c in cases if c.kind}, key=_kind_order):
        mine = [o for o in outcomes if o.case.kind == kind]
        entries = sorted({c.entry for c in cases if c.kind == kind})
        rows[kind] = {"available": kind in KINDS, "entry": " + ".join(entries), "tried": len(mine),
                      "found": sum(bool(o.found) for o in mine), "missed": sum(not o.found for o in mine),
                      "false": sum(len(o.false_alarms) for o in mine),
                      "not_available": sum(1 for c in cases if c.kind == kind and not c.available)}
    healthy = [o for o in outcomes if o.case.kind is None]
    defects = [o for o in outcomes if o.case.kind is not None]
    totals = {"defects": len(defects), "found": sum(bool(o.found) for o in defects),
              "missed": sum(not o.found for o in defects), "defect_false": sum(len(o.false_alarms) for o in defects),
              "healthy": len(healthy), "healthy_false": sum(len(o.false_alarms) for o in healthy),
              "healthy_clean": sum(not o.false_alarms for o in healthy),
              "kinds": sum(r["tried"] > 0 for r in rows.values()),
              "unavailable": [k for k, r in rows.items() if not r["available"]]}
    return {"rows": rows, "totals": totals}


def table(outcomes: list, cases: list) -> str:
    t = tally(outcomes, cases)
    lines = ["| kind | entry point | defect cases | found | missed | false alarms |", "|---|---|---|---|---|---|"]
    for kind, r in t["rows"].items():
        if not r["available"]:
            lines.append(f"| `{kind}` | {r['entry']} | {r['not_available']} (kind not available) | - | - | - |")
            continue
        lines.append(f"| `{kind}` | {r['entry']} | {r['tried']} | {r['found']} | {r['missed']} | {r['false']} |")
    tt = t["totals"]
    lines.append(f"| healthy (no defect) | watch + diagnose | {tt['healthy']} healthy | - | - | {tt['healthy_false']} |")
    lines.append(f"| **total** | | {tt['defects']} defect + {tt['healthy']} healthy | {tt['found']} | "
                 f"{tt['missed']} | {tt['defect_false'] + tt['healthy_false']} |")
    return "\n".join(lines)


def details(outcomes: list) -> str:
    """The missed cases and the false alarms, by name."""
    missed = [o.case.name for o in outcomes if o.case.kind is not None and not o.found]
    alarms = [f"{o.case.name} ({', '.join(sorted({f.kind for f in o.false_alarms}))})"
              for o in outcomes if o.false_alarms]
    return (f"Missed: {', '.join(missed) if missed else 'none'}.\n\n"
            f"False alarms: {'; '.join(alarms) if alarms else 'none'}.")


def alarms(n: int) -> str:
    return f"{n} false alarm{'' if n == 1 else 's'}"


def summary(outcomes: list, cases: list) -> str:
    tt = tally(outcomes, cases)["totals"]
    unavailable = (f" Kinds not in this deepscope yet: {', '.join(tt['unavailable'])}." if tt["unavailable"] else "")
    return (f"Diagnosis found the planted defect in {tt['found']} of {tt['defects']} defect cases "
            f"({tt['kinds']} finding kinds; MLP, CNN, ResNet, LSTM, vanilla RNN, Transformer and embedding models) "
            f"and missed {tt['missed']}; it raised {alarms(tt['defect_false'])} in the defect cases (warnings or errors "
            f"of another kind that neither the defect explains nor a `caused_by` link accounts for), and "
            f"{tt['healthy_false']} in the {tt['healthy']} healthy runs ({tt['healthy_clean']} with no warning or "
            f"error).{unavailable}")


def readme_line(outcomes: list, cases: list) -> str:
    tt = tally(outcomes, cases)["totals"]
    return (f"Diagnosis zoo: {tt['found']}/{tt['defects']} planted defects found across {tt['kinds']} finding "
            f"kinds and seven architectures, {alarms(tt['defect_false'] + tt['healthy_false'])} "
            f"({tt['healthy_false']} in {tt['healthy']} healthy runs); table in "
            f"[docs/diagnosis.md](docs/diagnosis.md#the-zoo-how-often-diagnosis-is-right).")


def section(outcomes: list, cases: list) -> str:
    import deepscope

    return "\n".join([
        START,
        f"Written by `python docs/zoo.py` (deepscope {deepscope.__version__}, torch {torch.__version__}, "
        "1 CPU thread, seeded: the same numbers every run). The cases are in `tests/zoo_cases.py` (each names "
        "its defect, its architecture and the entry point it goes through: `watch` is a plain training loop "
        f"of {zoo.STEPS} steps under `deepscope.watch`, `diagnose` is `diagnose()`'s {zoo.DIAG_STEPS}-step "
        "run, used for the kinds `watch` does not report). A defect case is found when a warning or error of "
        "its kind is present; every other warning or error is a false alarm unless the case accepts it as a "
        "consequence of its defect or another finding explains it (`caused_by`).",
        "",
        table(outcomes, cases),
        "",
        summary(outcomes, cases),
        "",
        details(outcomes),
        END,
    ])


def replace_between(text: str, start: str, end: str, new_block: str) -> str:
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    return pattern.sub(lambda m: new_block, text, count=1)


def write_doc(block: str, path: Path = DOC) -> None:
    text = path.read_text()
    if START in text and END in text:
        text = replace_between(text, START, END, block)
    else:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
    path.write_text(text)


def write_readme(line: str, path: Path = README) -> bool:
    text = path.read_text()
    if SUMMARY_START not in text or SUMMARY_END not in text:
        return False
    path.write_text(replace_between(text, SUMMARY_START, SUMMARY_END, f"{SUMMARY_START}{line}{SUMMARY_END}"))
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--only", action="append", metavar="NAME", help="run this case only (repeatable)")
    parser.add_argument("--readme", action="store_true", help="also rewrite the summary line in README.md")
    parser.add_argument("--no-write", action="store_true", help="write nothing, print the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    if args.list:
        for c in zoo.CASES:
            kind = c.kind or "(healthy)"
            na = "" if c.available else "  [kind not available]"
            print(f"{c.name:<42} {c.arch:<12} {kind:<30} {c.entry:<9} {c.note}{na}")
        return 0
    if args.only:
        for name in args.only:
            case = zoo.by_name(name)
            print(f"{case.name}: {case.arch}, {case.note}; expects {case.kind or 'no warning/error'} "
                  f"(through {case.entry})")
            if not case.available:
                print(f"  kind {case.kind!r} is not available in this deepscope")
                continue
            o = zoo.run_case(case)
            print(format_findings(o.findings))
            verdict = "healthy" if case.kind is None else ("found" if o.found else "MISSED")
            print(f"=> {verdict}; false alarms: {len(o.false_alarms)}; consequences (caused_by): "
                  f"{len(o.consequences)}; {o.seconds:.1f} s\n")
        return 0

    start = time.perf_counter()
    print(f"Running {len(zoo.CASES)} zoo cases on one CPU thread...")
    outcomes = run_all(zoo.CASES)
    print()
    print(table(outcomes, zoo.CASES))
    print()
    print(summary(outcomes, zoo.CASES))
    print()
    print(details(outcomes))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if not args.no_write:
        write_doc(section(outcomes, zoo.CASES))
        print(f"Wrote the table to {DOC.relative_to(ROOT)}.")
        if args.readme:
            line = readme_line(outcomes, zoo.CASES)
            if write_readme(line):
                print(f"Wrote the summary line to {README.relative_to(ROOT)}.")
            else:
                print(f"{README.relative_to(ROOT)} has no {SUMMARY_START} ... {SUMMARY_END} markers; the line "
                      f"would be:\n{line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
