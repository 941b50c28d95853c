"""The LR finder: pure suggestion functions on synthetic curves, the sweep's stop rule, exact restoring."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from deepscope.callbacks import Recorder
from deepscope.cli import main
from deepscope.data import DataLoaders, TensorBatches
from deepscope.errors import ConfigError
from deepscope.learner import Learner
from deepscope.lr_find import (
    longest_descent, lr_find, minimum_div_10, noise_check, steepest, suggest, valley,
)

LRS = np.logspace(-6, 1, 71)  # 10 points per decade


def u_curve():
    """Flat, then falling, lowest at lr=1e-1 (index 50), then rising: a textbook finder curve."""
    x = np.log10(LRS)
    return 2.0 - 1.5 * np.exp(-((x + 1) / 2.0) ** 2) + 0.5 * np.clip(x + 1, 0, None) ** 2


def test_suggestions_on_a_u_curve():
    losses = u_curve()
    i_min = int(np.argmin(losses))
    assert np.isclose(LRS[i_min], 1e-1)
    assert np.isclose(minimum_div_10(LRS, losses), 1e-2)  # one decade below the minimum
    s = steepest(LRS, losses)
    assert s < LRS[i_min]  # on the descending side
    assert np.gradient(losses, np.log(LRS))[list(LRS).index(s)] < 0
    v = valley(LRS, losses)
    first, last = longest_descent(losses)
    assert last == i_min and LRS[first] < v < LRS[i_min]
    for lr in suggest(LRS, losses).values():
        assert LRS[0] <= lr <= LRS[-1]


def test_suggestions_stay_inside_the_range():
    rising = np.linspace(1, 3, 30)  # lowest at the very first lr
    lrs = np.logspace(-3, 0, 30)
    for lr in suggest(lrs, rising).values():
        assert lrs[0] <= lr <= lrs[-1]
    assert minimum_div_10(lrs, rising) == lrs[0]


def test_longest_descent_skips_a_bump():
    assert longest_descent([5, 4, 4.5, 3, 2, 6, 1]) == (0, 6)  # 5,4,3,2,1


def test_noise_check():
    rng = np.random.default_rng(0)
    clean = u_curve()
    noisy, message = noise_check(clean, clean)
    assert not noisy and "clear curve" in message
    noisy_raw = clean + rng.normal(0, 2.0, len(clean))
    noisy, message = noise_check(clean, noisy_raw)
    assert noisy and "scatter" in message
    short, message = noise_check(clean[:5], clean[:5])
    assert short and "only 5 points" in message


def toy_learner(norm=False, bs=16, lr=1e-3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    layers = [nn.Linear(4, 16)] + ([nn.BatchNorm1d(16)] if norm else []) + [nn.ReLU(), nn.Linear(16, 2)]
    dls = DataLoaders(TensorBatches(x, y, bs, shuffle=True, generator=torch.Generator().manual_seed(2)),
                      TensorBatches(x[:64], y[:64], 64), n_classes=2)
    return Learner(nn.Sequential(*layers), dls, lr=lr, opt_func=torch.optim.Adam, cbs=[Recorder()])


def snapshot(learn):
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def test_restores_model_optimizer_and_a_later_fit_is_unchanged():
    twin, learn = toy_learner(norm=True), toy_learner(norm=True)
    twin.model.load_state_dict(learn.model.state_dict())
    learn.fit(1, valid=False)  # so the optimizer has state (Adam moments) and BatchNorm running stats moved
    twin.fit(1, valid=False)
    before, opt_before = snapshot(learn), {k: v.clone() for k, v in learn.opt.state_dict()["state"][0].items()}
    losses_before = list(learn.get_cb(Recorder).losses)
    result = lr_find(learn, 1e-5, 1.0, num_it=40)
    assert len(result.lrs) > 10
    after = snapshot(learn)
    assert before.keys() == after.keys() and any("running_mean" in k for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and buffers, bit for bit
    assert all(torch.equal(opt_before[k], v) for k, v in learn.opt.state_dict()["state"][0].items())
    assert learn.lr == 1e-3 and learn.get_cb(Recorder).losses == losses_before
    learn.fit(1, valid=False)
    twin.fit(1, valid=False)
    assert all(torch.equal(a, b) for a, b in zip(learn.model.state_dict().values(), twin.model.state_dict().values()))


def test_restores_after_a_failure_and_without_an_optimizer():
    learn = toy_learner()
    before = snapshot(learn)

    def step_then_fail(l):
        l.opt.step()  # the weights have moved when the error comes
        if l.train_iter == 3:
            raise RuntimeError("boom")

    learn.train_step.step = step_then_fail
    with pytest.raises(RuntimeError, match="boom"):
        lr_find(learn, num_it=20)
    assert learn.opt is None
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())


def test_stops_when_the_loss_diverges():
    learn = toy_learner(bs=8)
    result = lr_find(learn, 1e-4, 1e6, num_it=200)  # lrs up to 1e6 blow the loss up
    assert len(result.lrs) < 150
    assert result.losses[-1] > 4 * min(result.losses)  # stopped by the divergence rule, not by num_it
    assert all(np.isfinite(result.losses))
    assert result.lrs == sorted(result.lrs) and np.isclose(result.lrs[0], 1e-4)


def test_result_dict_and_plot():
    learn = toy_learner()
    result = learn.lr_find(start_lr=1e-4, end_lr=1.0, num_it=30)
    d = json.loads(json.dumps(result.to_dict()))
    assert set(d) >= {"lrs", "losses", "suggestions", "noisy", "message"}
    assert set(d["suggestions"]) == {"valley", "steepest", "minimum_div_10"}
    assert len(d["lrs"]) == len(d["losses"]) == 30
    fig = result.plot()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.get_legend().get_texts()) == 3


def test_bad_arguments():
    with pytest.raises(ConfigError, match="start_lr"):
        lr_find(toy_learner(), 1.0, 0.1)
    with pytest.raises(ConfigError, match="num_it"):
        lr_find(toy_learner(), num_it=1)


def test_cli(tiny_data, tmp_path, capsys):
    out = tmp_path / "lr"
    code = main(["lr-find", "--data-dir", str(tiny_data), "--no-verify", "--device", "cpu", "--nfs", "4", "8",
                 "--batch-size", "8", "--num-it", "30", "--start-lr", "1e-5", "--end-lr", "10", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "valley" in text and "steepest" in text and "minimum_div_10" in text
    d = json.loads((out / "lr_find.json").read_text())
    assert 0 < len(d["lrs"]) <= 30 and set(d["suggestions"]) == {"valley", "steepest", "minimum_div_10"}
    assert (out / "lr_find.png").stat().st_size > 1000 and (out / "config.json").is_file()
    assert not (tmp_path / "lr.partial").exists()


def test_cli_leaves_nothing_on_error(tmp_path, capsys):
    out = tmp_path / "lr"
    code = main(["lr-find", "--data-dir", str(tmp_path / "missing"), "--no-verify", "--device", "cpu", "--out", str(out)])
    assert code != 0
    assert not out.exists() and not (tmp_path / "lr.partial").exists()
