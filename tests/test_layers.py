"""GeneralRelu against the same composition of torch functions: outputs and input gradients."""
import pytest
import torch
import torch.nn.functional as F

from deepscope.layers import GeneralRelu


def reference(x, leak, sub, maxv):
    y = F.leaky_relu(x, leak) if leak is not None else F.relu(x)
    if sub is not None:
        y = y - sub
    if maxv is not None:
        y = torch.clamp(y, max=maxv)
    return y


@pytest.mark.parametrize("leak,sub,maxv", [
    (None, None, None),
    (0.1, None, None),
    (None, 0.4, None),
    (0.1, 0.4, None),
    (0.1, 0.4, 1.5),
    (None, None, 0.5),
])
@pytest.mark.parametrize("shape", [(7,), (4, 5), (2, 3, 6, 6)])
def test_general_relu_matches_torch_functions(leak, sub, maxv, shape):
    x = torch.randn(shape, dtype=torch.float64) * 2
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    out = GeneralRelu(leak, sub, maxv)(x1)
    ref = reference(x2, leak, sub, maxv)
    torch.testing.assert_close(out, ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_plain_relu_is_recovered():
    x = torch.randn(100)
    torch.testing.assert_close(GeneralRelu()(x), torch.relu(x))


@pytest.mark.parametrize("leak,slope", [(None, 0.0), (0.2, 0.2), (0.0, 0.0)])
def test_negative_slope_reports_leak(leak, slope):
    assert GeneralRelu(leak=leak).negative_slope == slope


def test_sub_recentres_mean():
    x = torch.randn(200_000)
    assert abs(GeneralRelu(sub=0.4)(x).mean().item()) < abs(torch.relu(x).mean().item())
