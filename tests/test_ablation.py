"""Ablation: the dead-fraction measure on hand-made cases, grid checks, and `deepscope ablate` end to end."""
import csv
import json
import time

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from deepscope.ablation import (
    AblationGrid, SaveRuns, markdown_table, measure_dead, plot_ablation, run_grid, run_one, summarise,
)
from deepscope.dead import DEAD_TOLERANCE
from deepscope.cli import main
from deepscope.errors import ConfigError
from deepscope.layers import GeneralRelu


def test_measure_dead_matches_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(5, 7))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(7, 3))
    x = torch.randn(32, 5)
    expected = float((torch.relu(model.lin(x)) <= DEAD_TOLERANCE).float().mean())  # deepscope.dead's rule
    assert measure_dead(model, x) == pytest.approx(expected)
    assert not model.act._forward_hooks  # hooks removed


def test_measure_dead_finds_activations_by_type_not_attribute_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))  # the ReLU is called "1", not "act"
    model.add_module("act", nn.Identity())  # named like an activation, but is none: not counted
    x = torch.randn(32, 5)
    expected = float((torch.relu(model[0](x)) <= 0).float().mean())
    assert measure_dead(model, x) == pytest.approx(expected)


def test_measure_dead_general_relu_counts_the_off_side():
    model = nn.Sequential()
    model.add_module("act", GeneralRelu(leak=0.1, sub=0.4))
    x = torch.tensor([[-2.0, -0.1, 0.0, 0.3, 1.0]])
    assert measure_dead(model, x) == pytest.approx(3 / 5)  # inputs <= 0 sit at or below -0.4


@pytest.mark.parametrize("kwargs, bad", [
    ({"norms": ["batch", "bogus"]}, "bogus"), ({"batch_sizes": [16, 0]}, "0"),
    ({"variants": ["default-relu", "xavier-relu"]}, "xavier-relu"), ({"variants": ["default-swish"]}, "default-swish"),
    # an empty list would run an empty grid and write an empty table
    ({"norms": []}, "at least one norm"), ({"batch_sizes": []}, "at least one batch size"),
    ({"variants": []}, "at least one variant"),
    ({"norms": ["batch", "layer", "batch"]}, "norm batch is listed more than once"),
    ({"batch_sizes": [16, 2, 16]}, "batch size 16 is listed more than once"),
    ({"variants": ["default-relu", "default-relu"]}, "variant default-relu is listed more than once"),
    ({"norms": "batch"}, "norms must be a list"),  # a string's letters are not norms
    ({"batch_sizes": 16}, "batch sizes must be a list"),
    ({"seeds": 0}, "seeds must be a positive whole number, got 0"), ({"seeds": 1.5}, "seeds"),
    ({"max_batches": 0}, "max batches"), ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"nfs": []}, "nfs"), ({"nfs": [8, 0]}, "nfs"),
])
def test_bad_grid_values_are_named(kwargs, bad):
    with pytest.raises(ConfigError, match=bad):
        AblationGrid(**kwargs)


def test_the_budget_is_steps_not_time():
    """Nothing about the grid can be capped by wall time any more."""
    with pytest.raises(TypeError, match="budget_seconds"):
        AblationGrid(budget_seconds=8.0)


@pytest.fixture
def tiny_dls(tiny_data):
    from deepscope.data import image_dls

    return image_dls("fashion_mnist", str(tiny_data), 16, verify=False)


def test_a_slow_machine_gets_the_same_steps_and_result(tiny_dls, monkeypatch, one_thread):
    """A run's training must not depend on how busy the machine is: with a clock that jumps 100 s at every
    reading (a machine far slower than any budget), the run still takes every step, and reaches the same
    accuracy and loss as on a normal clock; only the reported seconds differ."""
    grid = AblationGrid(norms=["batch"], batch_sizes=[4], variants=["default-relu"], max_batches=12, nfs=[4, 8])
    quiet = run_one(tiny_dls, "batch", 4, "default", "relu", 0, grid)
    clock = iter(range(0, 10**9, 100))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    busy = run_one(tiny_dls, "batch", 4, "default", "relu", 0, grid)
    assert quiet["steps"] == busy["steps"] == 12 and busy["samples"] == 12 * 4
    assert busy["accuracy"] == quiet["accuracy"] and busy["train_loss"] == quiet["train_loss"]
    assert busy["seconds"] >= 100  # the slow clock is reported, beside the result


def test_a_batch_larger_than_the_data_is_an_error_not_an_empty_run(tiny_dls):
    grid = AblationGrid(norms=["none"], batch_sizes=[512], variants=["default-relu"], max_batches=2, nfs=[4])
    with pytest.raises(ConfigError, match="batch size 512 is larger than the 96 training images"):
        run_one(tiny_dls, "none", 512, "default", "relu", 0, grid)
    grid = AblationGrid(norms=["none"], batch_sizes=[2, 512], variants=["default-relu"], max_batches=2, nfs=[4])
    logged = []
    with pytest.raises(ConfigError, match="batch size 512"):
        run_grid(tiny_dls, grid, log=logged.append)
    assert logged == []  # found before the first run, not half-way through the grid


def test_grid_runs():
    grid = AblationGrid(norms=["none", "batch"], batch_sizes=[2, 16], variants=["default-relu", "kaiming-general_relu"], seeds=2)
    runs = grid.runs()
    assert len(runs) == 2 * (2 * 2 + 2)
    assert ("batch", 16, "kaiming", "general_relu", 0) not in runs  # variants only on the no-norm CNN
    assert ("none", 2, "kaiming", "general_relu", 1) in runs


def test_summary_averages_seeds():
    rows = [{"norm": "batch", "batch_size": 2, "init": "default", "act": "relu", "seed": s, "accuracy": a,
             "train_loss": 1.0, "dead_fraction": 0.5, "seconds": 1.0, "steps": 10, "samples": 20}
            for s, a in ((0, 0.5), (1, 0.7))]
    (s,) = summarise(rows)
    assert s["accuracy"] == pytest.approx(0.6) and s["seeds"] == 2 and s["accuracy_std"] == pytest.approx(0.1)
    assert "60.0% ± 10.0" in markdown_table([s])
    assert markdown_table([s]).splitlines()[2].endswith("| 10 | 20 | 1.0 |")  # steps, samples, seconds


@pytest.mark.parametrize("norm", ["a$b", "x$y$z", "enc\\layer", "$\\frac{1}{0}$", "$\\foo$", "_hidden", "50% {x}^2"])
def test_plot_ablation_draws_names_literally(norm):
    """Names in a summary are drawn as given: never mathtext (which raises on "$\\foo$"), never LaTeX."""
    summary = [{"norm": norm, "batch_size": 2, "init": "default", "act": "relu", "accuracy": 0.5},
               {"norm": "none", "batch_size": 2, "init": "kaiming", "act": "relu", "accuracy": 0.6}]
    fig = plot_ablation(summary)
    fig.canvas.draw()  # mathtext would be parsed here
    labels = fig.axes[0].get_xticklabels()
    assert [t.get_text() for t in labels] == [norm, "none\nkaiming\nrelu"]
    assert all(not t.get_parse_math() and not t.get_usetex() for t in labels)
    plt.close(fig)


def test_cli_tiny_grid(tiny_data, tmp_path, capsys):
    out = tmp_path / "abl"
    code = main(["ablate", "--data-dir", str(tiny_data), "--no-verify", "--device", "cpu", "--norms", "batch,running_batch",
                 "--batch-sizes", "2,16", "--max-batches", "5", "--nfs", "4", "8", "--out", str(out)])
    assert code == 0
    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert list(rows[0]) == ["norm", "batch_size", "init", "act", "seed", "accuracy", "train_loss", "dead_fraction",
                             "steps", "samples", "seconds"]
    assert {(r["norm"], r["batch_size"]) for r in rows} == {(n, b) for n in ("batch", "running_batch") for b in ("2", "16")}
    assert all(int(r["steps"]) == 5 and 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["dead_fraction"]) <= 1 for r in rows)
    assert all(int(r["samples"]) == 5 * int(r["batch_size"]) for r in rows)
    table = (out / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| norm | batch size") and len(table) == 2 + 4
    assert (out / "ablation.png").stat().st_size > 1000 and (out / "config.json").is_file()
    assert "4 runs" in capsys.readouterr().out
    # without --runs-dir nothing but the ablation's own folder is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abl", "data"]
    assert sorted(p.name for p in out.iterdir()) == [".deepscope-run.json", "ablation.csv", "ablation.md",
                                                     "ablation.png", "config.json"]
    assert json.loads((out / "config.json").read_text())["options"] == {}


RUNS_GRID = ["--no-verify", "--device", "cpu", "--norms", "batch,none", "--variants", "default-relu",
             "--batch-sizes", "16", "--max-batches", "4", "--nfs", "4", "8"]
RUN_NAMES = ["batch-bs16-default-relu-s0", "none-bs16-default-relu-s0"]


def test_cli_runs_dir_writes_each_point_as_a_run_that_compare_opens(tiny_data, tmp_path, capsys):
    from deepscope.runfolder import is_run_folder, read_config, read_marker

    runs, out = tmp_path / "runs", tmp_path / "runs" / "abl"  # the runs beside the ablation's folder
    assert main(["ablate", "--data-dir", str(tiny_data), *RUNS_GRID, "--out", str(out), "--runs-dir", str(runs),
                 "--runs-stats"]) == 0
    assert f"compare them: deepscope compare {runs / RUN_NAMES[0]} {runs / RUN_NAMES[1]}" in capsys.readouterr().out
    assert sorted(p.name for p in runs.iterdir()) == ["abl", *RUN_NAMES]
    assert all(p.is_file() for p in out.iterdir())  # nothing nested in the ablation's folder
    with (out / "ablation.csv").open() as f:
        rows = {f"{r['norm']}-bs{r['batch_size']}-{r['init']}-{r['act']}-s{r['seed']}": r for r in csv.DictReader(f)}
    assert sorted(rows) == RUN_NAMES
    for name in RUN_NAMES:
        run = runs / name
        assert is_run_folder(run) and read_marker(run)["kind"] == "train"
        cfg = read_config(run)
        assert cfg["kind"] == "train" and cfg["config"]["norm"] == rows[name]["norm"]
        assert cfg["config"]["batch_size"] == 16 and cfg["config"]["schedule"] == "constant"
        assert cfg["config"]["seed"] == 0 and cfg["config"]["nfs"] == [4, 8] and cfg["config"]["stats"] is True
        (metrics,) = json.loads((run / "metrics.json").read_text())
        assert metrics["valid_accuracy"] == pytest.approx(float(rows[name]["accuracy"]), abs=5e-5)
        assert metrics["train_loss"] == pytest.approx(float(rows[name]["train_loss"]), abs=5e-5)
        losses = json.loads((run / "recorder.json").read_text())["loss"]
        assert len(losses) == int(rows[name]["steps"]) == 4
        assert (run / "stats.npz").is_file()
    options = json.loads((out / "config.json").read_text())["options"]
    assert options == {"runs_dir": str(runs), "runs_stats": True, "runs": RUN_NAMES}
    page = tmp_path / "pages" / "compare.html"
    assert main(["compare", *(str(runs / n) for n in RUN_NAMES), "--out", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    assert all(name in html for name in RUN_NAMES)
    # a second ablate into the same --runs-dir is refused before any work, unless --overwrite
    assert main(["ablate", "--data-dir", str(tiny_data), *RUNS_GRID, "--out", str(tmp_path / "abl2"),
                 "--runs-dir", str(runs)]) == 2
    assert "already holds the run batch-bs16-default-relu-s0" in capsys.readouterr().err
    assert not (tmp_path / "abl2").exists()


def test_an_interrupted_grid_keeps_the_runs_already_finished(tiny_dls, tmp_path, monkeypatch, one_thread):
    """A stop during the second run: the first stays a complete run folder, the second leaves nothing."""
    import deepscope.ablation as ablation
    from deepscope.runfolder import is_run_folder

    real, calls = ablation.measure_dead, []

    def stop_in_the_second_run(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ablation, "measure_dead", stop_in_the_second_run)
    grid = AblationGrid(norms=["batch", "none"], batch_sizes=[16], variants=["default-relu"], max_batches=3, nfs=[4])
    with pytest.raises(KeyboardInterrupt):
        run_grid(tiny_dls, grid, save=SaveRuns(tmp_path / "runs"), log=lambda line: None)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [RUN_NAMES[0]]  # no .partial of the second
    assert is_run_folder(tmp_path / "runs" / RUN_NAMES[0])
    assert not (tmp_path / "runs" / RUN_NAMES[0] / "stats.npz").exists()  # statistics only when asked


@pytest.mark.parametrize("where, message", [
    ("abl/runs", "is inside the ablation's own folder"),
    ("abl.partial", "is inside the ablation's own folder"),
    ("old/runs", "a run folder deepscope made"),
])
def test_cli_runs_dir_inside_a_run_folder_is_refused(tiny_data, tmp_path, capsys, where, message):
    from deepscope.runfolder import RunFolder

    with RunFolder.prepare(tmp_path / "old", "train") as old:
        old.finish()
    code = main(["ablate", "--data-dir", str(tiny_data), *RUNS_GRID, "--out", str(tmp_path / "abl"),
                 "--runs-dir", str(tmp_path / where)])
    assert code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "old"]


def test_cli_runs_stats_needs_runs_dir(tiny_data, tmp_path, capsys):
    assert main(["ablate", "--data-dir", str(tiny_data), *RUNS_GRID, "--out", str(tmp_path / "a"), "--runs-stats"]) == 2
    assert "pass --runs-dir too" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("args, message", [
    (["--norms", "batch,wat"], "argument --norms: unknown norm 'wat'"),
    (["--norms", ""], "argument --norms: the grid needs at least one norm"),
    (["--norms", " , "], "argument --norms: the grid needs at least one norm"),
    (["--batch-sizes", ""], "argument --batch-sizes: the grid needs at least one batch size"),
    (["--variants", ""], "argument --variants: the grid needs at least one variant"),
    (["--norms", "batch,batch"], "argument --norms: norm batch is listed more than once"),
    (["--batch-sizes", "16,2,16"], "argument --batch-sizes: batch size 16 is listed more than once"),
    (["--variants", "default-relu,kaiming-relu,default-relu"], "argument --variants: variant default-relu is listed"),
    (["--variants", "default-swish"], "argument --variants: variant 'default-swish'"),
    (["--batch-sizes", "2,x"], "argument --batch-sizes: expected whole numbers, got 'x'"),
    (["--batch-sizes", "2,0"], "argument --batch-sizes: batch size 0"),
    (["--seeds", "0"], "argument --seeds: must be a positive whole number, got 0"),
    (["--budget-seconds", "8"], "unrecognized arguments: --budget-seconds"),  # no time cap any more
])
def test_cli_bad_grid_value_is_an_argparse_error(tiny_data, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["ablate", "--data-dir", str(tiny_data), "--no-verify", *args, "--out", str(tmp_path / "a")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
