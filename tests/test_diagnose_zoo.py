"""The diagnosis zoo (tests/zoo_cases.py): healthy runs of every architecture get no warning or error, and
each defect case finds its kind. docs/zoo.py writes the same results as a table in docs/diagnosis.md."""
import pytest
import torch

from deepscope.diagnose import format_findings

from zoo_cases import ARCHS, CASES, run_case


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest and keeps the results independent of the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


HEALTHY = [c for c in CASES if c.kind is None]
DEFECTS = [c for c in CASES if c.kind is not None]


def test_the_zoo_covers_every_architecture_healthy_through_watch():
    assert {c.arch for c in HEALTHY if c.entry == "watch"} == set(ARCHS)


@pytest.mark.parametrize("case", HEALTHY, ids=lambda c: c.name)
def test_a_healthy_run_has_no_warning_or_error(case):
    outcome = run_case(case)
    assert not outcome.problems, f"{case.name} ({case.note}):\n{format_findings(outcome.findings)}"


@pytest.mark.parametrize("case", DEFECTS, ids=lambda c: c.name)
def test_a_defect_is_found(case):
    if not case.available:
        pytest.skip(f"kind {case.kind!r} not available in this deepscope")
    outcome = run_case(case)
    assert outcome.found, f"{case.name} ({case.note}) missed {case.kind}:\n{format_findings(outcome.findings)}"
