"""Hand-written norms against torch.nn: outputs, input and parameter grads, running stats, train and eval."""
import pytest
import torch
from torch import nn

from deepscope.errors import ConfigError
from deepscope.norms import (NORM_KINDS, BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RunningBatchNorm,
                             group_count, make_norm)

TOL = dict(atol=1e-5, rtol=1e-5)


def same_params(mine: nn.Module, ref: nn.Module) -> None:
    """Give both modules the same random affine parameters, so the affine path is really exercised."""
    with torch.no_grad():
        for (name, p), (ref_name, q) in zip(mine.named_parameters(), ref.named_parameters(), strict=True):
            assert name == ref_name
            p.copy_(torch.randn_like(p))
            q.copy_(p)


def step_and_compare(mine: nn.Module, ref: nn.Module, shape: tuple[int, ...]) -> None:
    """One forward and backward through both; outputs and every gradient must agree."""
    x = (torch.randn(shape) * 3 + 1.5)  # off-centre, not unit scale: normalisation has work to do
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref_out = mine(x1), ref(x2)
    torch.testing.assert_close(out, ref_out, **TOL)
    g = torch.randn_like(out)
    out.backward(g)
    ref_out.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for p, q in zip(mine.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    mine.zero_grad()
    ref.zero_grad()


def check_against_torch(mine: nn.Module, ref: nn.Module, shape: tuple[int, ...], steps: int = 3) -> None:
    same_params(mine, ref)
    for _ in range(steps):
        step_and_compare(mine.train(), ref.train(), shape)
    for name in ("running_mean", "running_var"):
        if hasattr(ref, name) and getattr(ref, name) is not None:
            torch.testing.assert_close(getattr(mine, name), getattr(ref, name), **TOL)
    step_and_compare(mine.eval(), ref.eval(), shape)


@pytest.mark.parametrize("shape,ref_cls", [((16, 5), nn.BatchNorm1d), ((4, 5, 7), nn.BatchNorm1d),
                                           ((2, 5), nn.BatchNorm1d), ((8, 5, 6, 6), nn.BatchNorm2d),
                                           ((2, 5, 3, 4), nn.BatchNorm2d)])
@pytest.mark.parametrize("momentum,affine", [(0.1, True), (0.3, True), (0.1, False)])
def test_batchnorm(shape, ref_cls, momentum, affine):
    check_against_torch(BatchNorm(5, momentum=momentum, affine=affine),
                        ref_cls(5, momentum=momentum, affine=affine), shape)


@pytest.mark.parametrize("shape,normalized_shape", [((8, 10), 10), ((4, 3, 10), (10,)), ((2, 3, 5, 6), (5, 6)),
                                                    ((2, 3, 5, 6), (3, 5, 6))])
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm(shape, normalized_shape, affine):
    check_against_torch(LayerNorm(normalized_shape, elementwise_affine=affine),
                        nn.LayerNorm(normalized_shape, elementwise_affine=affine), shape)


@pytest.mark.parametrize("shape", [(4, 3, 6, 6), (1, 3, 5, 7), (2, 3, 2, 2)])
@pytest.mark.parametrize("affine,track", [(False, False), (True, False), (False, True), (True, True)])
def test_instancenorm(shape, affine, track):
    check_against_torch(InstanceNorm(3, affine=affine, track_running_stats=track),
                        nn.InstanceNorm2d(3, affine=affine, track_running_stats=track), shape)


@pytest.mark.parametrize("groups,shape", [(1, (4, 6, 5, 5)), (2, (4, 6, 5, 5)), (3, (2, 6, 4, 7)),
                                          (6, (4, 6, 5, 5)), (2, (8, 6)), (3, (1, 6, 9))])
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm(groups, shape, affine):
    check_against_torch(GroupNorm(groups, 6, affine=affine), nn.GroupNorm(groups, 6, affine=affine), shape)


def test_instancenorm_defaults_match_torch():
    mine, ref = InstanceNorm(4), nn.InstanceNorm2d(4)
    assert (mine.weight is None, mine.track_running_stats) == (ref.weight is None, ref.track_running_stats)


def test_batchnorm_rejects_single_value_per_channel_in_training():
    with pytest.raises(ValueError):
        BatchNorm(3)(torch.randn(1, 3))


def trained_rbn(steps: int = 30, bs: int = 2) -> RunningBatchNorm:
    rbn = RunningBatchNorm(4)
    for _ in range(steps):
        rbn(torch.randn(bs, 4, 5, 5) * 2 + 1)
    return rbn


def test_running_batchnorm_eval_equals_train_with_same_stats():
    rbn = trained_rbn()
    x = torch.randn(2, 4, 5, 5) * 2 + 1
    train_out = rbn.train()(x)  # folds x into the stats, then normalises with them
    eval_out = rbn.eval()(x)  # same stats, no update
    torch.testing.assert_close(train_out, eval_out)


def test_running_batchnorm_does_not_jump_between_train_and_eval():
    rbn = trained_rbn(steps=200)
    x = torch.randn(2, 4, 5, 5) * 2 + 1
    before = rbn.eval()(x)
    after = rbn.train()(x)
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_running_batchnorm_stats_follow_the_data():
    # At batch size 2 each batch weighs 0.1, so the estimate pools ~19 batches of 50 values per channel:
    # sd ~0.065 for the mean (true 1) and ~0.22 for the variance (true 4, Var(x^2) = 48); bounds ~4 sd.
    rbn = trained_rbn(steps=300)
    mean, var = rbn.stats()
    torch.testing.assert_close(mean, torch.ones(4), atol=0.25, rtol=0)
    torch.testing.assert_close(var, torch.full((4,), 4.0), atol=0.9, rtol=0)


def test_running_batchnorm_first_batch_is_debiased():
    """After one batch the running mean is that batch's mean, not shrunk towards the zero start."""
    rbn = RunningBatchNorm(3)
    x = torch.randn(2, 3, 4, 4) + 5
    rbn(x)
    torch.testing.assert_close(rbn.stats()[0], x.mean((0, 2, 3)))


@pytest.mark.parametrize("bs", [1, 2])
@pytest.mark.parametrize("shape", [(4, 5, 5), (4,)])
def test_running_batchnorm_small_batches_are_finite_and_scaled(bs, shape):
    rbn = RunningBatchNorm(4)
    outs = [rbn(torch.randn(bs, *shape) * 3 + 2) for _ in range(100)]
    out = torch.cat(outs)
    assert torch.isfinite(out).all()
    assert abs(out.mean().item()) < 0.3
    assert 0.6 < out.std().item() < 1.5


def test_running_batchnorm_cnn_trains_at_batch_size_2():
    torch.manual_seed(0)
    n = 128
    y = torch.randint(0, 2, (n,))
    x = torch.randn(n, 1, 8, 8) * 0.5
    x[y == 1, :, :4] += 1.0  # class 1 is bright in the top half
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), RunningBatchNorm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), RunningBatchNorm(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    for i in range(0, n, 2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 2]), y[i:i + 2]).backward()
        with torch.no_grad():  # plain SGD by hand: torch.optim's first step costs seconds of lazy imports
            for p in model.parameters():
                p -= 0.1 * p.grad
    xt = torch.randn(200, 1, 8, 8) * 0.5
    yt = torch.randint(0, 2, (200,))
    xt[yt == 1, :, :4] += 1.0
    with torch.no_grad():
        acc = (model.eval()(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.9


@pytest.mark.parametrize("kind,cls", [("batch", BatchNorm), ("layer", GroupNorm), ("instance", InstanceNorm),
                                      ("group", GroupNorm), ("running_batch", RunningBatchNorm)])
def test_make_norm_kinds(kind, cls):
    norm = make_norm(kind, 16)
    assert isinstance(norm, cls)
    x = torch.randn(4, 16, 5, 5)
    assert norm(x).shape == x.shape


def test_make_norm_none_and_kinds_constant():
    assert make_norm("none", 8) is None
    assert set(NORM_KINDS) == {"none", "batch", "layer", "instance", "group", "running_batch"}


def test_make_norm_layer_is_layernorm_over_channels_and_space():
    x = torch.randn(3, 6, 4, 5)
    torch.testing.assert_close(make_norm("layer", 6)(x), nn.LayerNorm((6, 4, 5))(x), **TOL)


@pytest.mark.parametrize("channels,groups", [(1, 1), (2, 1), (3, 1), (8, 4), (12, 6), (16, 8), (64, 32),
                                             (256, 32), (96, 32), (40, 20)])
def test_group_count(channels, groups):
    assert group_count(channels) == groups
    assert make_norm("group", channels).num_groups == groups


def test_make_norm_linear_features():
    assert make_norm("batch", 5, ndim=0)(torch.randn(4, 5)).shape == (4, 5)
    with pytest.raises(ConfigError):
        make_norm("instance", 5, ndim=0)


def test_make_norm_unknown_kind_names_the_valid_ones():
    with pytest.raises(ConfigError, match="running_batch"):
        make_norm("batchnorm", 8)
