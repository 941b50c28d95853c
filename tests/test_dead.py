"""deepscope.dead, the one definition of "off" and "dead": the rule per activation, and the statistics,
the census and the diagnosis that use it."""
import numpy as np
import pytest
import torch
from torch import nn

from deepscope.dead import DEAD_TOLERANCE, off_rule, on_share_per_unit, unit_axis
from deepscope.diagnose.modules import check_dead_units
from deepscope.layers import GeneralRelu
from deepscope.stats.engine import StatsRecorder

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.tensor([-3.0, -0.5, -1e-4, 0.0, 5e-4, 0.3, 0.995, 2.0])


@pytest.mark.parametrize("module, kind, off", [
    (nn.ReLU(), "floor", lambda y: y <= DEAD_TOLERANCE),
    (GeneralRelu(sub=0.4), "floor", lambda y: y <= -0.4 + DEAD_TOLERANCE),    # the floor is -sub, not 0
    (GeneralRelu(sub=0.4, maxv=6.0), "floor", lambda y: y <= -0.4 + DEAD_TOLERANCE),
    (nn.ReLU6(), "floor", lambda y: y <= DEAD_TOLERANCE),
    (nn.LeakyReLU(0.1), "negative", lambda y: y <= 0),                        # off, never dead
    (GeneralRelu(leak=0.1, sub=0.4), "negative", lambda y: y <= -0.4),
    (nn.GELU(), "negative", lambda y: y <= 0),
    (nn.Softplus(), "negative", lambda y: y <= np.log(2)),
    (nn.PReLU(3), "negative", lambda y: y <= 0),                              # per-channel: f(0) = 0
    (nn.Tanh(), "saturating", lambda y: y.abs() >= 0.98),
    (nn.Sigmoid(), "saturating", lambda y: (y <= 0.01) | (y >= 0.99)),
    (nn.Hardtanh(-2.0, 2.0), "saturating", lambda y: y.abs() >= 2.0 - 0.04),
    (nn.Linear(8, 8), "zero", lambda y: y.abs() <= DEAD_TOLERANCE),
])
def test_off_rule_per_activation_matches_its_own_parameters(module, kind, off):
    rule = off_rule(module)
    assert rule.kind == kind and rule.can_die == (kind == "floor")
    y = X if isinstance(module, (nn.Linear, nn.PReLU)) else module(X)  # judge the module's own outputs
    assert rule.off(y).tolist() == off(y).tolist()
    assert rule.zero_is_off == bool(rule.off(torch.zeros(1)))


def test_off_rule_does_not_run_the_modules_hooks():
    act, calls = nn.ReLU(), []
    act.register_forward_hook(lambda *a: calls.append(1))
    off_rule(act)
    assert calls == []


def test_on_share_per_unit_on_the_unit_axis():
    out = torch.zeros(4, 6, 3)            # (N, L, C): features on the last axis
    out[..., 0] = 1.0                     # feature 0 always on, 1 half the time, 2 never
    out[:2, :, 1] = 1.0
    share = on_share_per_unit(out, off_rule(nn.ReLU()), unit_axis(nn.Embedding(2, 3), out))
    assert share.tolist() == [1.0, 0.5, 0.0]


def record(model, x, steps=12, census_every=1):
    rec = StatsRecorder(model, census_every=census_every)
    rec.attach()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(steps):
        rec.start_step(step)
        model(x).pow(2).mean().backward()
        rec.before_update(optimizer=opt)
        opt.step()
        rec.after_update()
        opt.zero_grad()
        rec.end_step()
    rec.remove()
    return rec.stats()


def test_statistics_count_general_relu_values_at_its_floor():
    """Our own GeneralRelu's off units sit at -sub: |a| <= 1e-3 missed nearly all of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), GeneralRelu(sub=0.4), nn.Linear(32, 2))
    x = torch.randn(64, 8)
    stats = record(model, x, steps=1)
    with torch.no_grad():
        expected = float((model[1](model[0](x)) <= -0.4 + DEAD_TOLERANCE).float().mean())
    assert expected > 0.3
    assert stats.act_dead[0, 1] == pytest.approx(expected)
    assert stats.dead_rules[1].startswith("floor: at the floor -0.4")


@pytest.mark.parametrize("subsample", [None, 16])  # exact, and sampled (padding zeros are not "off" here)
def test_padding_zeros_are_off_only_where_zero_is_off(subsample):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())  # 8 values per step: fewer than the sample slot
    with torch.no_grad():
        model[0].weight.fill_(10.0)
    stats = StatsRecorder(model, subsample=subsample or None)
    stats.attach()
    stats.start_step(0)
    y = model(torch.ones(2, 3))
    stats.end_step()
    s = stats.stats()
    assert s.act_dead[0, 1] == pytest.approx(float((y.abs() >= 0.98).float().mean()))


def test_census_judges_embedding_features_not_sequence_positions():
    torch.manual_seed(0)
    L, C, V = 10, 16, 30

    class SeqModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.act, self.head = nn.Embedding(V, C), nn.ReLU(), nn.Linear(C, 4)
            with torch.no_grad():
                self.emb.weight[:, :10] = -1.0  # features 0-9 negative for every token: dead after the ReLU

        def forward(self, x):
            return self.head(self.act(self.emb(x)).mean(1))

    stats = record(SeqModel(), torch.randint(0, V, (32, L)))
    census = stats.structure["census"]["modules"]
    assert list(census) == ["act"]                       # only floor activations can have dead units
    assert census["act"]["units"] == C and census["act"]["dead"] == pytest.approx(10 / C)
    assert stats.structure["output_module"] == "head" and stats.structure["order"] == ["emb", "act", "head"]
    (f,) = check_dead_units(stats)
    assert (f.module, f.evidence["units"]) == ("act", C)


def test_census_verdict_is_the_last_window_not_the_start():
    """Units that die during the run: the last window of censuses decides, the first is kept as evidence."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    rec = StatsRecorder(model, census_every=1)
    rec.attach()
    for step in range(20):
        if step == 10:
            with torch.no_grad():
                model[0].bias.fill_(-100.0)  # every unit off from now on
        rec.start_step(step)
        model(x).sum().backward()
        rec.before_update()
        rec.after_update()
        model.zero_grad()
        rec.end_step()
    rec.remove()
    c = rec.stats().structure["census"]["modules"]["1"]
    assert c["dead"] == 1.0 and c["first_dead"] < 0.5 and c["steps"] == [17, 19]  # the last 3 censuses
