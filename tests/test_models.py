import pytest
import torch
from torch import nn

from deepscope.errors import ConfigError
from deepscope.models import cnn, conv_block, get_model, resnet


def test_cnn_shapes_and_names():
    model = cnn(nfs=(8, 16, 32, 64), norm="batch")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    names = dict(model.named_modules())
    assert {"block0.conv", "block0.norm", "block0.act", "block3.conv", "pool", "head"} <= set(names)
    assert isinstance(names["block1.norm"], nn.BatchNorm2d) and names["block1.conv"].bias is None
    assert names["block1.conv"].stride == (2, 2) and names["block0.conv"].kernel_size == (5, 5)


def test_cnn_spatial_sizes_follow_the_strides():
    model = cnn(nfs=(4, 8, 16), first_stride=1)
    x, sizes = torch.randn(1, 1, 28, 28), []
    for name, block in model.named_children():
        x = block(x)
        if name.startswith("block"):
            sizes.append(x.shape[-1])
    assert sizes == [28, 14, 7]


def test_without_norm_convs_have_bias_and_no_norm_layer():
    model = cnn(norm=None, act="gelu")
    assert model.block0.conv.bias is not None and not hasattr(model.block0, "norm")
    assert isinstance(model.block0.act, nn.GELU)


def test_custom_activation_and_norm_factories():
    block = conv_block(3, 6, act=lambda: nn.LeakyReLU(0.2), norm=lambda nf: nn.GroupNorm(2, nf))
    assert isinstance(block.norm, nn.GroupNorm) and block.act.negative_slope == 0.2


def test_resnet_forward_backward():
    model = resnet(nfs=(8, 16, 32))
    out = model(torch.randn(3, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (3, 10) and model.res1.shortcut.proj.weight.grad is not None


def test_get_model_and_bad_specs():
    assert isinstance(get_model("cnn", nfs=[4, 8]), nn.Sequential)
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        get_model("vgg")
    with pytest.raises(ConfigError, match="unknown activation 'swish2'"):
        cnn(act="swish2")
    with pytest.raises(ConfigError, match="positive channel counts"):
        cnn(nfs=[8, 0])
