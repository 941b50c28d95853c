import gc
import weakref

import pytest
import torch
from torch import nn

from deepscope.callback import Callback
from deepscope.data import DataLoaders
from deepscope.hooks import Hook, Hooks, floating_tensors, select_modules
from deepscope.learner import Learner


def mlp(inplace=False):
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=inplace), nn.Dropout(0.0),
                         nn.Sequential(nn.Linear(8, 8), nn.GELU()), nn.Linear(8, 3))


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_default_selection_is_leaves_with_params_activations_and_norms():
    names = [n for n, _ in select_modules(mlp())]
    assert names == ["0", "1", "2", "4.0", "4.1", "5"]  # no Dropout, no containers, no root


def test_selection_by_type_name_pattern_and_filter():
    model = mlp()
    assert [n for n, _ in select_modules(model, types=nn.Linear)] == ["0", "4.0", "5"]
    assert [n for n, _ in select_modules(model, types=(nn.ReLU, nn.GELU))] == ["2", "4.1"]
    assert [n for n, _ in select_modules(model, names=["5", "4.*"])] == ["4.0", "4.1", "5"]
    assert [n for n, _ in select_modules(model, names=["4"])] == ["4"]  # a container named exactly: a unit
    assert [n for n, _ in select_modules(model, names=["4*"])] == ["4.0", "4.1"]  # a pattern: leaves only
    assert [n for n, _ in select_modules(model, names=["4"], leaf_only=False)] == ["4"]
    assert [n for n, _ in select_modules(model, filter=lambda n, m: isinstance(m, nn.Linear) and m.out_features == 8)] == ["0", "4.0"]
    assert [n for n, _ in select_modules(model, types=nn.Linear, names=["4.*"])] == ["4.0"]


def test_floating_tensors_flattens_nested_outputs_and_skips_non_floating():
    a, b, c = torch.ones(2), torch.zeros(3, dtype=torch.float16), torch.arange(3)
    assert floating_tensors(a) == [a]
    assert floating_tensors(c) == []
    got = floating_tensors((a, [c, {"x": b, "y": c, "z": (a,)}], None, 3.0))
    assert len(got) == 3 and got[0] is a and got[1] is b and got[2] is a


class MultiOut(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind = nn.Linear(3, 3), kind

    def forward(self, x):
        y = self.lin(x)
        idx = torch.argmax(y, dim=1)
        if self.kind == "tuple":
            return y, idx
        if self.kind == "list":
            return [y, y * 2, idx]
        return {"out": y, "double": y * 2, "idx": idx}


@pytest.mark.parametrize("kind,n_float", [("tuple", 1), ("list", 2), ("dict", 2)])
def test_hooks_see_structured_outputs(kind, n_float):
    model = MultiOut(kind)
    seen, grads = [], []
    with Hook(model, lambda h, m, i, o: seen.append(floating_tensors(o))), \
            Hook(model, lambda h, m, gi, go: grads.append(go[0].clone()), kind="backward"):
        out = model(torch.randn(5, 3))
        sum(t.sum() for t in floating_tensors(out)).backward()
    assert len(seen) == 1 and len(seen[0]) == n_float
    assert len(grads) == n_float and all(g.shape == (5, 3) for g in grads)
    assert no_hooks_left(model)


def test_forward_hook_gets_output_and_name():
    model = mlp()
    got = {}
    with Hooks(select_modules(model, types=nn.Linear), lambda h, m, i, o: got.setdefault(h.name, o.detach())) as hooks:
        assert len(hooks) == 3 and hooks[0].name == "0" and hooks[0].module is model[0]
        x = torch.randn(6, 4)
        model(x)
    torch.testing.assert_close(got["0"], model[0](x))


def test_backward_hook_gives_output_gradient_with_inplace_relu():
    torch.manual_seed(0)
    model = mlp(inplace=True)
    x = torch.randn(6, 4)
    got = {}
    with Hooks(select_modules(model), lambda h, m, gi, go: got.__setitem__(h.name, go[0].clone()), kind="backward"):
        model(x).pow(2).sum().backward()
    # the same gradients by autograd, keeping the intermediate outputs
    model.zero_grad()
    lin0 = model[0](x)
    lin0.retain_grad()
    bn = model[1](lin0)
    bn.retain_grad()
    act = torch.relu(bn)
    act.retain_grad()
    model[5](model[4](act)).pow(2).sum().backward()
    assert set(got) == {"0", "1", "2", "4.0", "4.1", "5"}
    torch.testing.assert_close(got["0"], lin0.grad)
    torch.testing.assert_close(got["1"], bn.grad)  # before the in-place ReLU overwrote the tensor
    torch.testing.assert_close(got["2"], act.grad)
    assert no_hooks_left(model)


def test_hooks_removed_on_exit_on_exception_and_by_remove():
    model = mlp()
    with Hooks(select_modules(model), lambda *a: None) as hooks:
        assert not no_hooks_left(model)
    assert no_hooks_left(model) and all(h.removed for h in hooks)
    with pytest.raises(ZeroDivisionError):
        with Hooks(select_modules(model), lambda *a: None, kind="backward"):
            1 / 0
    assert no_hooks_left(model)
    hook = Hook(model[0], lambda *a: None)
    hooks = Hooks([model[0], ("x", model[2])], lambda *a: None)
    assert len(model[0]._forward_hooks) == 2
    hook.remove(), hook.remove(), hooks.remove(), hooks.remove()  # idempotent
    assert no_hooks_left(model)


def test_removed_backward_hook_does_not_fire_for_a_graph_built_before():
    model = mlp()
    calls = []
    hook = Hook(model[0], lambda *a: calls.append(1), kind="backward")
    loss = model(torch.randn(3, 4)).sum()
    hook.remove()
    loss.backward()
    assert calls == []


def test_hook_does_not_keep_the_activation_alive():
    model = mlp()
    refs = []
    fwd = Hooks(select_modules(model), lambda h, m, i, o: refs.append(weakref.ref(o)))
    bwd = Hooks(select_modules(model), lambda *a: None, kind="backward")
    out = model(torch.randn(5, 4))
    out.sum().backward()
    del out
    gc.collect()
    assert len(refs) == 6 and all(r() is None for r in refs)
    fwd.remove(), bwd.remove()


class HookOwner(Callback):
    def before_fit(self, learn):
        self.hooks = Hooks(select_modules(learn.model), lambda *a: None)
        self.grad_hooks = Hooks(select_modules(learn.model), lambda *a: None, kind="backward")

    def after_loss(self, learn):
        raise RuntimeError("boom")

    def cleanup_fit(self, learn):
        self.hooks.remove()
        self.grad_hooks.remove()


def test_hooks_owned_by_a_callback_are_removed_when_fit_fails():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    learn = Learner(model, DataLoaders(train=data, valid=data), cbs=[HookOwner()])
    with pytest.raises(Exception, match="boom"):
        learn.fit(1)
    assert no_hooks_left(model)


class Squash(nn.ReLU):  # a subclass of a torch activation, named nothing like one
    pass


class SquaredReLU(nn.Module):  # a user's own activation: no type names it
    def forward(self, x):
        return torch.relu(x) ** 2


def test_default_selection_finds_activations_by_type():
    from deepscope.hooks import ACTIVATION_TYPES
    from deepscope.layers import GeneralRelu

    class Leaky(GeneralRelu):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Squash(), Leaky(0.1, 0.4), GeneralRelu(), nn.Softmax(dim=1), nn.Identity())
    assert [n for n, _ in select_modules(model)] == ["0", "1", "2", "3", "4"]  # not the Identity
    assert nn.MultiheadAttention not in ACTIVATION_TYPES  # defined beside torch's activations, but is attention


def test_default_selection_falls_back_to_names_for_a_users_own_activation():
    model = nn.Sequential(nn.Linear(4, 4), SquaredReLU(), nn.Identity())
    model.add_module("act", nn.Identity())  # the attribute names its role
    assert [n for n, _ in select_modules(model)] == ["0", "1", "act"]
