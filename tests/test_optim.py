"""Hand-written optimisers against torch.optim on the same problem, start and schedule (float64)."""
import copy

import pytest
import torch
from torch import nn

from deepscope.errors import ConfigError
from deepscope.optim import OPTIMIZERS, SGD, Adam, AdamW, Momentum, RMSProp, get_optimizer

TOL = dict(atol=1e-6, rtol=1e-6)

# (ours, torch's, our kwargs, torch kwargs) — same hyper-parameters under each API's names.
PAIRS = [
    (SGD, torch.optim.SGD, dict(lr=0.1), dict(lr=0.1)),
    (SGD, torch.optim.SGD, dict(lr=0.1, weight_decay=0.05), dict(lr=0.1, weight_decay=0.05)),
    (Momentum, torch.optim.SGD, dict(lr=0.05), dict(lr=0.05, momentum=0.9)),
    (Momentum, torch.optim.SGD, dict(lr=0.05, mom=0.7, weight_decay=0.05),
     dict(lr=0.05, momentum=0.7, weight_decay=0.05)),
    (RMSProp, torch.optim.RMSprop, dict(lr=0.01), dict(lr=0.01)),
    (RMSProp, torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.05),
     dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.05)),
    (Adam, torch.optim.Adam, dict(lr=0.05), dict(lr=0.05)),
    (Adam, torch.optim.Adam, dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
     dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    (AdamW, torch.optim.AdamW, dict(lr=0.05), dict(lr=0.05)),
    (AdamW, torch.optim.AdamW, dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.1),
     dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.1)),
]
IDS = [f"{p[0].__name__}-{i}" for i, p in enumerate(PAIRS)]


def regression():
    """A small noisy linear regression with its model, in float64."""
    x = torch.randn(64, 5, dtype=torch.float64)
    y = x @ torch.randn(5, 2, dtype=torch.float64) + 0.1 * torch.randn(64, 2, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    return x, y, model


def train(model, opt, x, y, steps, scheduler=None):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("ours,theirs,kw,torch_kw", PAIRS, ids=IDS)
def test_matches_torch(ours, theirs, kw, torch_kw):
    x, y, model = regression()
    ref = copy.deepcopy(model)
    train(model, ours(model.parameters(), **kw), x, y, steps=10)
    train(ref, theirs(ref.parameters(), **torch_kw), x, y, steps=10)
    assert_same_params(model, ref)
    assert not torch.equal(model[0].weight, regression()[2][0].weight)  # it did move


@pytest.mark.parametrize("ours,theirs,kw,torch_kw", PAIRS, ids=IDS)
def test_one_cycle_schedule_drives_it_like_torch(ours, theirs, kw, torch_kw):
    """torch's OneCycleLR writes lr and momentum/betas into param_groups; ours must obey them."""
    x, y, model = regression()
    ref = copy.deepcopy(model)
    opt, ref_opt = ours(model.parameters(), **kw), theirs(ref.parameters(), **torch_kw)
    cycle_momentum = "momentum" in torch_kw or "betas" in ref_opt.defaults
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12, cycle_momentum=cycle_momentum)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=12,
                                                    cycle_momentum=cycle_momentum)
    train(model, opt, x, y, 12, sched)
    train(ref, ref_opt, x, y, 12, ref_sched)
    assert_same_params(model, ref)


@pytest.mark.parametrize("ours,theirs,kw,torch_kw", PAIRS, ids=IDS)
def test_state_dict_round_trip_resumes_exactly(ours, theirs, kw, torch_kw):
    x, y, model = regression()
    opt = ours(model.parameters(), **kw)
    train(model, opt, x, y, 4)
    resumed_model = copy.deepcopy(model)
    resumed = ours(resumed_model.parameters(), **kw)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, x, y, 4)
    train(resumed_model, resumed, x, y, 4)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_param_group_lr_is_what_the_step_uses():
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = SGD([p], lr=1.0)
    opt.param_groups[0]["lr"] = 0.25
    p.grad = torch.full_like(p, 2.0)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full_like(p, 0.5))
    opt.zero_grad()
    assert p.grad is None or torch.all(p.grad == 0)


def test_parameters_without_grad_are_left_alone():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    a.grad = torch.ones(2)
    for cls in OPTIMIZERS.values():
        cls([a, b], lr=0.1).step()
    assert torch.equal(b.detach(), torch.ones(2))


def test_registry_and_lookup():
    assert set(OPTIMIZERS) == {"sgd", "momentum", "rmsprop", "adam", "adamw"}
    assert get_optimizer("adamw") is AdamW
    assert AdamW([nn.Parameter(torch.ones(1))], lr=1e-3).defaults["weight_decay"] == 0.01
    with pytest.raises(ConfigError, match="rmsprop"):
        get_optimizer("lamb")
