"""Diagnosis at the edges of what it sees: modules it does not watch, a module called several times, a
model in eval mode, activations that cannot die, losses of odd shapes, weights that blow up at once."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deepscope
from deepscope.diagnose import diagnose, diagnose_run, problems
from deepscope.errors import ConfigError
from test_diagnose_fixtures import make_batches

pytestmark = pytest.mark.usefixtures("one_thread")


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


def loop(model, steps=40, lr=3e-3, train=True, loss_func=F.cross_entropy, targets=True):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = make_batches(n=640)
    model.train(train)
    with deepscope.watch(model, opt) as w:
        for step in range(steps):
            x, y = batches[step % len(batches)]
            loss = loss_func(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss, targets=y if targets else None)
    return w


def test_watch_names_unwatched_modules_that_may_have_made_the_nan():
    """The log layer has no parameters and is no activation, so watch does not watch it: the first watched
    module to hold NaN is the ReLU after it, and the finding says which unwatched module ran before."""
    model = nn.Sequential(nn.Linear(16, 32), Log(), nn.ReLU(), nn.Linear(32, 4))
    found = loop(model, steps=5).findings()
    (f,) = [f for f in found if f.kind == "nonfinite_forward"]
    assert f.module == "2" and f.evidence["unwatched_before"] == ["1"] and "'1'" in f.message


def test_a_module_called_several_times_is_noted_in_the_summary():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.relu = nn.Linear(16, 16), nn.Linear(16, 4), nn.ReLU()

        def forward(self, x):
            return self.fc2(self.relu(self.fc1(self.relu(x))))

    analysis = loop(Shared(), steps=10).analysis()
    assert "'relu' is called 2 times in a step: only its first call is recorded" in analysis.summary()


def test_eval_mode_says_why_nothing_was_recorded():
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    analysis = loop(model, steps=10, train=False).analysis()
    assert [f.kind for f in problems(analysis.findings)] == ["model_in_eval_mode"]
    assert "the model was in eval mode at every step" in analysis.summary()


def test_leaky_activations_are_said_to_be_unable_to_die():
    model = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(), nn.Linear(32, 4))
    analysis = loop(model, steps=10).analysis()
    assert "pass a gradient when off: their units cannot die" in analysis.summary()


def test_watch_says_the_target_checks_need_targets():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    assert "needs targets= in w.step" in loop(model, steps=10, targets=False).analysis().summary()
    assert "needs targets=" not in loop(model, steps=10).analysis().summary()


def test_a_loss_of_several_values_is_a_clear_error_in_watch_and_a_finding_in_diagnose():
    model = nn.Sequential(nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_batches()[0]
    with deepscope.watch(model, opt) as w:
        loss = F.cross_entropy(model(x), y, reduction="none")
        loss.mean().backward()
        opt.step()
        with pytest.raises(ConfigError, match=rf"shape \({len(y)},\).*loss.mean\(\)"):
            w.step(loss)
    unreduced = diagnose(model, make_batches(), lambda out, t: F.cross_entropy(out, t, reduction="none"))
    assert [f.kind for f in problems(unreduced)] == ["exception"]  # backward() refuses it: quoted, no crash
    one = diagnose(model, make_batches(), lambda out, t: F.cross_entropy(out, t).reshape(1))
    assert problems(one) == []  # a (1,) loss is a loss


def test_weights_that_blow_up_at_once_are_the_learning_rate_not_the_targets():
    """SGD at lr 1e6: after one update the logits are ~1e37 and cross_entropy overflows from finite
    outputs. The replay sees the huge outputs: the learning rate, not the targets or the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    analysis = diagnose_run(model, make_batches(), lr=1e6, opt_func=torch.optim.SGD)
    roots = [f for f in problems(analysis.findings) if not f.caused_by]
    assert [f.kind for f in roots] == ["lr_too_high"], analysis.findings
    assert all(f.caused_by == "lr_too_high" for f in problems(analysis.findings)[1:])
    assert not any("ignore_index" in f.message for f in analysis.findings)


@pytest.mark.parametrize("loss, bad", [
    (lambda o, t: F.nll_loss(torch.log(F.softmax(o, dim=0)), t), True),   # over the batch, in the loss
    (lambda o, t: F.nll_loss(o.log_softmax(0), t), True),
    (lambda o, t: F.nll_loss(F.log_softmax(o, dim=-1), t), False),         # over the classes: fine
    (lambda o, t: F.nll_loss(torch.log_softmax(o, 1), t), False),
])
def test_a_softmax_over_the_batch_inside_the_loss_is_found(loss, bad):
    from test_diagnose_fixtures import healthy_mlp

    kinds = [f.kind for f in problems(diagnose(healthy_mlp(), make_batches(), loss))]
    assert (kinds == ["softmax_wrong_dim"]) == bad and (kinds == []) == (not bad), kinds


def regression_loop(lr, steps=128, bs=32):
    torch.manual_seed(0)
    x = torch.randn(2048, 8)
    y = x @ torch.randn(8) + 0.1 * torch.randn(2048)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with deepscope.watch(model, opt) as w:
        for step in range(steps):
            i = (step * bs) % 2048
            loss = F.mse_loss(model(x[i:i + bs]).squeeze(1), y[i:i + bs])
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss, targets=y[i:i + bs])
    return w


@pytest.mark.parametrize("lr", [1e-4, 1e-3, 3e-3])
def test_batch_noise_of_a_regression_loss_is_not_a_spike(lr):
    """A small-batch MSE swings 2-4x from batch to batch while it trains: no lr_too_high for that."""
    assert problems(regression_loop(lr).findings()) == []


def test_a_real_spike_still_stands_out_of_the_noise():
    w = regression_loop(0.5)
    assert "lr_too_high" in {f.kind for f in problems(w.findings())}


def test_an_empty_batch_does_not_break_the_users_loop():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches()
    x, y = batches[0]
    batches.insert(2, (x[:0], y[:0]))
    with deepscope.watch(model, opt) as w:
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb) if len(xb) else model(xb).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss)
    assert len(w.stats().steps) == len(batches)


def test_nan_in_the_data_is_blamed_on_the_data_in_watch_too():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = make_batches(n=1024)
    batches[5][0][3, 2] = float("nan")
    with deepscope.watch(model, opt) as w:
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss, targets=yb)
    (f,) = [f for f in w.findings() if f.kind == "nonfinite_forward"]
    assert (f.module, f.evidence["step"], f.evidence["data"]) == ("", 5, True) and "input batch" in f.message


def test_a_dict_output_says_which_output_checks_it_could_not_run():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            return {"logits": self.fc(x)}

    w = loop(Dict(), steps=5, loss_func=lambda out, t: F.cross_entropy(out["logits"], t))
    assert "the model returns a dict" in w.analysis().summary()


def test_gradient_accumulation_and_a_replay_are_not_modules_called_twice():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with deepscope.watch(model, opt) as w:
        for i, (xb, yb) in enumerate(make_batches(n=512)):
            F.cross_entropy(model(xb), yb).div(4).backward()
            if i % 4 == 3:  # four micro-batches per update
                opt.step()
                opt.zero_grad()
    assert "called" not in w.analysis().summary()
    nan_model = nn.Sequential(nn.Linear(16, 32), Log(), nn.ReLU(), nn.Linear(32, 4))
    assert "called" not in diagnose_run(nan_model, make_batches()).summary()  # the replay is not the step


def test_batches_with_more_than_x_and_y_are_diagnosed():
    from test_diagnose_fixtures import healthy_mlp

    batches = [(x, y, torch.arange(len(x))) for x, y in make_batches()]
    assert problems(diagnose(healthy_mlp(), batches)) == []
