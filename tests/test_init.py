"""Kaiming init against its formula and torch.nn.init; LSUV against measured activations."""
import math

import pytest
import torch
from torch import nn

from deepscope.errors import ConfigError
from deepscope.init import (fan, following_slopes, init_model, kaiming_gain, kaiming_normal_, kaiming_std,
                            kaiming_uniform_, lsuv_)
from deepscope.layers import GeneralRelu
from deepscope.norms import RunningBatchNorm

SHAPES = [(256, 64, 3, 3), (512, 400), (128, 32, 5), (300, 50)]
CASES = [(0.0, "fan_in", "relu"), (0.0, "fan_out", "relu"), (0.1, "fan_in", "leaky_relu"),
         (0.3, "fan_out", "leaky_relu"), (0.0, "fan_in", "linear")]


def torch_fan(shape, mode):
    receptive = math.prod(shape[2:])
    return (shape[1] if mode == "fan_in" else shape[0]) * receptive


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("a,mode,nonlinearity", CASES)
def test_kaiming_std_is_torch_gain_over_sqrt_fan(shape, a, mode, nonlinearity):
    w = torch.empty(shape)
    assert fan(w, mode) == torch_fan(shape, mode)
    expected = nn.init.calculate_gain(nonlinearity, a) / math.sqrt(torch_fan(shape, mode))
    assert kaiming_std(w, a, mode, nonlinearity) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("a,mode,nonlinearity", CASES)
def test_kaiming_normal_empirical_std(shape, a, mode, nonlinearity):
    ours = kaiming_normal_(torch.empty(shape), a, mode, nonlinearity)
    ref = nn.init.kaiming_normal_(torch.empty(shape), a, mode, nonlinearity)
    formula = math.sqrt(2 / (1 + a * a)) if nonlinearity != "linear" else 1.0
    formula /= math.sqrt(torch_fan(shape, mode))
    assert ours.std().item() == pytest.approx(formula, rel=0.03)
    assert ours.std().item() == pytest.approx(ref.std().item(), rel=0.04)
    assert abs(ours.mean().item()) < 0.05 * formula


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("a,mode,nonlinearity", CASES)
def test_kaiming_uniform_bound_and_std(shape, a, mode, nonlinearity):
    ours = kaiming_uniform_(torch.empty(shape), a, mode, nonlinearity)
    ref = nn.init.kaiming_uniform_(torch.empty(shape), a, mode, nonlinearity)
    bound = math.sqrt(3) * kaiming_std(ours, a, mode, nonlinearity)
    assert ours.abs().max().item() <= bound
    assert ours.abs().max().item() > 0.99 * bound
    assert ref.abs().max().item() == pytest.approx(ours.abs().max().item(), rel=0.01)
    assert ours.std().item() == pytest.approx(ref.std().item(), rel=0.04)


def test_kaiming_gain_rejects_unknown_nonlinearity():
    with pytest.raises(ValueError):
        kaiming_gain(0.0, "tanhh")


def test_kaiming_keeps_relu_activations_from_shrinking():
    """The point of the gain: 20 ReLU layers deep, the second moment stays the order of the input's."""
    x = torch.randn(512, 256)
    for _ in range(20):
        x = torch.relu(x @ kaiming_normal_(torch.empty(256, 256)).T)
    assert 0.2 < x.pow(2).mean().item() < 5


def deep_mlp(act):
    return nn.Sequential(nn.Linear(400, 600), act(), nn.Linear(600, 500), nn.BatchNorm1d(500), act(),
                         nn.Linear(500, 400))


def test_following_slopes_reads_general_relu_through_a_norm():
    model = deep_mlp(lambda: GeneralRelu(leak=0.2, sub=0.4))
    assert list(following_slopes(model).values()) == [0.2, 0.2, None]
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.LeakyReLU(0.3))
    assert list(following_slopes(model).values()) == [0.0, 0.3]


@pytest.mark.parametrize("kind", ["kaiming_normal", "kaiming_uniform"])
def test_init_model_uses_following_slope_and_zeroes_biases(kind):
    model = init_model(deep_mlp(lambda: GeneralRelu(leak=0.3)), kind=kind)
    first, second, last = model[0], model[2], model[5]
    for layer, gain in [(first, math.sqrt(2 / 1.09)), (second, math.sqrt(2 / 1.09)), (last, 1.0)]:
        assert layer.weight.std().item() == pytest.approx(gain / math.sqrt(layer.in_features), rel=0.02)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_init_model_given_leak_applies_everywhere():
    model = init_model(deep_mlp(nn.ReLU), leak=0.5)
    for layer in (model[0], model[2], model[5]):
        expected = nn.init.calculate_gain("leaky_relu", 0.5) / math.sqrt(layer.in_features)
        assert layer.weight.std().item() == pytest.approx(expected, rel=0.02)


def test_init_model_unknown_kind():
    with pytest.raises(ConfigError, match="kaiming_uniform"):
        init_model(nn.Linear(2, 2), kind="xavier")


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), GeneralRelu(0.1, 0.4), nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16), GeneralRelu(0.1, 0.4), nn.Conv2d(16, 16, 3, stride=2, bias=True), GeneralRelu(0.1, 0.4),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 10))


def layer_outputs(model, xb):
    """Reference measurement with plain forward hooks, independent of lsuv_'s own."""
    outs, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: outs.__setitem__(name, o)))
    try:
        with torch.no_grad():
            model(xb)
    finally:
        for h in handles:
            h.remove()
    return outs


def test_lsuv_gives_unit_variance_outputs_and_cleans_up():
    model = small_cnn()
    model.eval()
    bn_state = {k: v.clone() for k, v in model[3].state_dict().items()}
    xb = torch.randn(64, 3, 14, 14) * 5 + 2
    tol = 1e-3
    stats = lsuv_(model, xb, tol=tol)
    assert set(stats) == {"0", "2", "5", "8"}
    for m in model.modules():
        assert not m._forward_hooks
        assert not m.training
    for k, v in model[3].state_dict().items():
        assert torch.equal(v, bn_state[k]), k
    model.train()  # lsuv_ measures in train mode; check the same way
    outs = layer_outputs(model, xb)
    for name, out in outs.items():
        assert abs(out.mean().item()) < tol and abs(out.std().item() - 1) < tol, name
        assert stats[name].mean == pytest.approx(out.mean().item(), abs=1e-5)
        assert 1 <= stats[name].iterations <= 10
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_lsuv_given_modules_and_train_mode_kept():
    model = small_cnn().train()
    stats = lsuv_(model, torch.randn(32, 3, 14, 14), modules=[model[2]])
    assert list(stats) == ["2"]
    assert all(m.training for m in model.modules())
    assert torch.is_grad_enabled()


def test_lsuv_removes_hooks_on_error():
    model = small_cnn()
    with pytest.raises(RuntimeError):
        lsuv_(model, torch.randn(4, 5, 14, 14))  # wrong channel count fails inside the forward
    assert all(not m._forward_hooks for m in model.modules())


def test_lsuv_settles_with_running_batchnorm_and_restores_its_stats():
    """Each pass would fold the batch into RunningBatchNorm's sums; lsuv_ puts them back every time."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), RunningBatchNorm(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, bias=False), RunningBatchNorm(8), nn.ReLU())
    stats = lsuv_(model, torch.randn(16, 3, 10, 10) + 1)
    assert all(abs(s.std - 1) < 1e-3 and s.iterations <= 3 for s in stats.values()), stats
    assert all(float(b.count) == 0 for b in (model[1], model[4]))
