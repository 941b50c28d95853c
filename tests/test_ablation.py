"""Ablation: the dead-fraction measure on hand-made cases, grid checks, and `deepscope ablate` end to end."""
import csv

import pytest
import torch
from torch import nn

from deepscope.ablation import (
    AblationGrid, activation_floor, dead_fraction, markdown_table, measure_dead, summarise,
)
from deepscope.cli import main
from deepscope.errors import ConfigError
from deepscope.layers import GeneralRelu


def test_dead_fraction_hand_made():
    out = torch.tensor([0.0, 0.0, 0.5, 2.0, 0.0, 1e-4])
    assert dead_fraction(out, 0.0) == pytest.approx(3 / 6)
    assert dead_fraction(out, 0.0, margin=1e-3) == pytest.approx(4 / 6)
    assert activation_floor(nn.ReLU()) == 0.0
    assert activation_floor(GeneralRelu(leak=0.1, sub=0.4)) == pytest.approx(-0.4)


def test_measure_dead_matches_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(5, 7))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(7, 3))
    x = torch.randn(32, 5)
    expected = float((torch.relu(model.lin(x)) <= 0).float().mean())
    assert measure_dead(model, x) == pytest.approx(expected)
    assert not model.act._forward_hooks  # hooks removed


def test_measure_dead_general_relu_counts_the_off_side():
    model = nn.Sequential()
    model.add_module("act", GeneralRelu(leak=0.1, sub=0.4))
    x = torch.tensor([[-2.0, -0.1, 0.0, 0.3, 1.0]])
    assert measure_dead(model, x) == pytest.approx(3 / 5)  # inputs <= 0 sit at or below -0.4


@pytest.mark.parametrize("kwargs, bad", [({"norms": ["batch", "bogus"]}, "bogus"), ({"batch_sizes": [16, 0]}, "0"),
                                         ({"variants": ["default-relu", "xavier-relu"]}, "xavier-relu"),
                                         ({"variants": ["default-swish"]}, "default-swish")])
def test_bad_grid_values_are_named(kwargs, bad):
    with pytest.raises(ConfigError, match=bad):
        AblationGrid(**kwargs)


def test_grid_runs():
    grid = AblationGrid(norms=["none", "batch"], batch_sizes=[2, 16], variants=["default-relu", "kaiming-general_relu"], seeds=2)
    runs = grid.runs()
    assert len(runs) == 2 * (2 * 2 + 2)
    assert ("batch", 16, "kaiming", "general_relu", 0) not in runs  # variants only on the no-norm CNN
    assert ("none", 2, "kaiming", "general_relu", 1) in runs


def test_summary_averages_seeds():
    rows = [{"norm": "batch", "batch_size": 2, "init": "default", "act": "relu", "seed": s, "accuracy": a,
             "train_loss": 1.0, "dead_fraction": 0.5, "seconds": 1.0, "steps": 10} for s, a in ((0, 0.5), (1, 0.7))]
    (s,) = summarise(rows)
    assert s["accuracy"] == pytest.approx(0.6) and s["seeds"] == 2 and s["accuracy_std"] == pytest.approx(0.1)
    assert "60.0% ± 10.0" in markdown_table([s])


def test_cli_tiny_grid(tiny_data, tmp_path, capsys):
    out = tmp_path / "abl"
    code = main(["ablate", "--data-dir", str(tiny_data), "--no-verify", "--device", "cpu", "--norms", "batch,running_batch",
                 "--batch-sizes", "2,16", "--max-batches", "5", "--nfs", "4", "8", "--out", str(out)])
    assert code == 0
    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert list(rows[0]) == ["norm", "batch_size", "init", "act", "seed", "accuracy", "train_loss", "dead_fraction",
                             "seconds", "steps"]
    assert {(r["norm"], r["batch_size"]) for r in rows} == {(n, b) for n in ("batch", "running_batch") for b in ("2", "16")}
    assert all(int(r["steps"]) == 5 and 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["dead_fraction"]) <= 1 for r in rows)
    table = (out / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| norm | batch size") and len(table) == 2 + 4
    assert (out / "ablation.png").stat().st_size > 1000 and (out / "config.json").is_file()
    assert "4 runs" in capsys.readouterr().out


def test_cli_bad_grid_value(tiny_data, tmp_path, capsys):
    code = main(["ablate", "--data-dir", str(tiny_data), "--no-verify", "--norms", "batch,wat", "--out", str(tmp_path / "a")])
    assert code == 2 and "'wat'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
