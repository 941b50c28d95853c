import pytest

from deepscope.cli import main
from deepscope.foundations import matmul_ladder, time_fn, time_interleaved


def _table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| case")]


def test_bench_matmul_prints_every_rung_with_speedups(capsys):
    assert main(["bench", "matmul", "--repeats", "1", "--sizes", "2x16x3", "3x8x2"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    for case in ("2x16 @ 16x3", "3x8 @ 8x2"):
        case_rows = [r for r in rows if r[0] == case]
        assert [r[1] for r in case_rows] == list(matmul_ladder())
        speedups = [float(r[4].rstrip("x").replace(",", "")) for r in case_rows]
        assert min(speedups) == 1.0  # the slowest candidate is the yardstick


def test_bench_conv_prints_loops_only_on_the_small_case(capsys):
    argv = ["bench", "conv", "--repeats", "1", "--small", "1", "2", "2", "5", "5", "--large", "2", "2", "3", "8", "8"]
    assert main(argv) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["loops", "unfold + matmul", "F.conv2d", "unfold + matmul", "F.conv2d"]


@pytest.mark.parametrize("argv, message", [
    (["bench", "matmul", "--repeats", "0"], "argument --repeats: must be a positive whole number, got 0"),
    (["bench", "matmul", "--threads", "-1"], "argument --threads: must be a positive whole number, got -1"),
    (["bench", "conv", "--threads", "two"], "argument --threads: expected a whole number, got 'two'"),
    (["bench", "conv", "--budget", "0"], "argument --budget: must be positive, got 0.0"),
])
def test_bad_numbers_stop_argparse_with_the_rule(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "matmul", "--sizes", "5x784"], "--sizes entries look like"),
    (["bench", "matmul", "--sizes", "5x0x10"], "--sizes entries must be positive"),
    (["bench", "conv", "--kernel", "0"], "--small, --large and --kernel must all be positive"),
])
def test_bad_shapes_are_config_errors(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_timers_skip_warmup_and_interleave():
    calls = []
    time_fn(lambda: calls.append("f"), repeats=3, warmup=2)
    assert calls == ["f"] * 5
    order = []
    result = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=1)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert {name: runs for name, (_, runs) in result.items()} == {"a": 2, "b": 2}


def test_budget_caps_repeats_of_slow_candidates_but_keeps_one_timed_run():
    result = time_interleaved({"slow": lambda: sum(range(1000)), "fast": lambda: None}, repeats=4,
                              warmup=0, budget_s=0.0)
    assert result["slow"][1] == 1 and result["fast"][1] == 1
    assert time_interleaved({"fast": lambda: None}, repeats=4, warmup=0, budget_s=None)["fast"][1] == 4
