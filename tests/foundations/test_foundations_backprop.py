import pytest
import torch
import torch.nn.functional as F

from deepscope.foundations import MLP, MSE, Linear, ReLU, finite_difference_grad, train_mlp
from deepscope.foundations.bench import pinned_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads buy nothing, and on shared cores they made these tests ~5x slower."""
    with pinned_threads(1):
        yield


def _autograd_grads(model: MLP, x, y):
    """The same forward built with autograd from the model's current parameters."""
    lin1, _, lin2 = model.layers
    params = [t.clone().requires_grad_(True) for t in (lin1.w, lin1.b, lin2.w, lin2.b)]
    xr = x.clone().requires_grad_(True)
    w1, b1, w2, b2 = params
    loss = F.mse_loss((xr @ w1 + b1).relu() @ w2 + b2, y.reshape(-1, w2.shape[1]))
    loss.backward()
    return loss, [p.grad for p in params], xr.grad


@pytest.mark.parametrize("n_out", [1, 10])
def test_mlp_gradients_equal_autograd(n_out):
    g = torch.Generator().manual_seed(1)
    model = MLP(784, 50, n_out, generator=g, dtype=torch.float64)
    x = torch.randn(16, 784, dtype=torch.float64)
    y = torch.randn(16, n_out, dtype=torch.float64)
    loss_fn = MSE()
    loss = loss_fn.forward(model.forward(x), y)
    dx = model.backward(loss_fn.backward())

    ref_loss, ref_grads, ref_dx = _autograd_grads(model, x, y)
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-5, rtol=0)
    ours = [g for _, g in model.params_and_grads()]
    for mine, ref in zip(ours, ref_grads, strict=True):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=0)


def _check_layer_against_autograd(layer, torch_fn, x):
    """Forward output, input gradient and parameter gradients of one layer equal autograd's."""
    out = layer.forward(x)
    dout = torch.randn_like(out)
    dx = layer.backward(dout)
    params = {name: p.clone().requires_grad_(True) for name, p in layer.params().items()}
    xr = x.clone().requires_grad_(True)
    ref = torch_fn(xr, **params)
    ref.backward(dout)
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(dx, xr.grad)
    for name, p in params.items():
        torch.testing.assert_close(layer.grads[name], p.grad)


def test_linear_matches_torch_linear():
    layer = Linear(6, 4, dtype=torch.float64)
    layer.b = torch.randn(4, dtype=torch.float64)
    _check_layer_against_autograd(layer, lambda x, w, b: F.linear(x, w.T, b), torch.randn(5, 6, dtype=torch.float64))


def test_relu_matches_torch_relu():
    _check_layer_against_autograd(ReLU(), lambda x: torch.relu(x), torch.randn(5, 6, dtype=torch.float64))


def test_mse_matches_torch_mse_loss():
    pred = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(8, 3, dtype=torch.float64)
    loss_fn = MSE()
    loss = loss_fn.forward(pred.detach(), target)
    ref = F.mse_loss(pred, target)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(loss_fn.backward(), pred.grad)


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(2)
    model = MLP(5, 4, 2, generator=g, dtype=torch.float64)
    model.layers[0].b += 0.1  # keep pre-activations off the ReLU kink, where the derivative jumps
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    loss_fn = MSE()

    def loss():
        return loss_fn.forward(model.forward(x), y)

    loss()
    model.backward(loss_fn.backward())
    for param, grad in model.params_and_grads():
        numeric = finite_difference_grad(loss, param)
        torch.testing.assert_close(grad, numeric, atol=1e-6, rtol=1e-5)


def test_training_loop_reduces_loss_on_fashion_mnist_shaped_data():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(512, 784, generator=g)                # flattened 28x28 images in [0, 1]
    true_w = torch.randn(784, 1, generator=g) / 28
    y = (x - 0.5) @ true_w                               # (512, 1) a learnable target
    model = MLP(784, 50, 1, generator=g)
    losses = train_mlp(model, x, y, lr=0.05, epochs=5, batch_size=64, generator=g)
    assert len(losses) == 5 * 8
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first


def test_training_loop_with_ten_outputs_learns_one_hot_classes():
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(10, 784, generator=g)
    labels = torch.arange(10).repeat(40)                 # (400,)
    x = centres[labels] + 0.5 * torch.randn(400, 784, generator=g)
    y = F.one_hot(labels, 10).float()
    model = MLP(784, 50, 10, generator=g)
    train_mlp(model, x, y, lr=0.05, epochs=10, batch_size=32, generator=g)
    accuracy = (model.forward(x).argmax(dim=1) == labels).float().mean()
    assert accuracy > 0.9
