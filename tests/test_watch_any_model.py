"""The recording engine on the models users bring (issue: "any model"): multi-part outputs (LSTM,
attention, dicts, PackedSequence), containers watched as a unit, modules never called, in-place
operations and non-float outputs; each checked against a direct computation with plain hooks/autograd."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import deepscope


def values(*tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def run_once(model, x, loss_fn, *, modules=None, subsample=None, capture=()):
    """One watched training step; `capture` names modules whose raw output (and its parts' gradients)
    are kept with plain hooks for the direct computation."""
    kept = {}

    def keep(name):
        def hook(m, i, out):
            if name in kept:
                return
            parts = [t for t in _floats(out)]
            for t in parts:
                if t.requires_grad:
                    t.retain_grad()
            kept[name] = parts
        return hook

    named = dict(model.named_modules())
    handles = [named[n].register_forward_hook(keep(n)) for n in capture]
    with deepscope.watch(model, modules=modules, subsample=subsample) as w:
        loss_fn(model(x)).backward()
        w.step()
    for h in handles:
        h.remove()
    return w.stats(), kept


def _floats(out):
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _floats(o)]
    return []


def check(stats, name, parts, *, grad=True):
    i = stats.modules.index(name)
    v = values(*parts)
    assert stats.act_mean[0, i] == pytest.approx(v.mean().item(), rel=1e-4, abs=1e-6), name
    assert stats.act_std[0, i] == pytest.approx(v.std().item(), rel=1e-3), name
    if grad:
        grads = [t.grad for t in parts if t.grad is not None]
        assert grads, "the direct computation needs a gradient"
        g = values(*grads)
        assert stats.grad_norm[0, i] == pytest.approx(g.norm().item(), rel=1e-4), f"{name}: every part's gradient"


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.head = nn.Embedding(20, 8), nn.LSTM(8, 12, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(self.emb(x))
        return self.head(out[:, -1]) + h[0].sum(-1, keepdim=True)  # both out and h feed the loss, c does not


@pytest.mark.parametrize("subsample", [None, 4096])  # exact reductions; a whole copy in the sample buffer
def test_lstm_statistics_cover_every_part_and_every_gradient(subsample):
    torch.manual_seed(0)
    model = LSTMClassifier()
    x = torch.randint(0, 20, (4, 5))
    stats, kept = run_once(model, x, lambda out: out.pow(2).mean(), subsample=subsample, capture=["lstm", "emb"])
    check(stats, "lstm", kept["lstm"])
    check(stats, "emb", kept["emb"])


def test_packed_sequences_are_summarised_by_their_data():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            packed = pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=True)
            out, _ = self.lstm(packed)
            return out.data

    stats, kept = run_once(Packed(), torch.randn(5, 2, 3), lambda out: out.sum(), capture=["lstm"])
    check(stats, "lstm", kept["lstm"])


def test_attention_returning_weights_and_its_out_proj_never_called():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            out, weights = self.attn(x, x, x)
            return out.sum() + weights.pow(2).sum()

    model = Attn()
    stats, kept = run_once(model, torch.randn(2, 4, 8), lambda out: out, modules=["attn", "attn.out_proj"],
                           capture=["attn"])
    check(stats, "attn", kept["attn"])
    notes = stats.notes()
    assert notes == {"attn.out_proj": "not called in any recorded step"}
    assert "attn" not in notes


def test_dict_outputs():
    torch.manual_seed(0)

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return {"logits": self.a(x), "aux": self.b(x), "ids": torch.arange(len(x))}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = Heads()

        def forward(self, x):
            out = self.heads(x)
            return out["logits"].sum() + out["aux"].pow(2).sum()

    stats, kept = run_once(Model(), torch.randn(6, 4), lambda out: out, modules=["heads"], capture=["heads"])
    check(stats, "heads", kept["heads"])


def test_a_residual_block_is_watched_as_a_unit():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            return torch.relu(self.lin(x)) + x  # a functional ReLU and a residual sum: no leaf shows them

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = Block(), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.block(x))

    stats, kept = run_once(Net(), torch.randn(8, 6), lambda out: out.pow(2).sum(), modules=["block", "head"],
                           capture=["block"])
    assert stats.modules == ["block", "head"]
    check(stats, "block", kept["block"])


@pytest.mark.parametrize("subsample", [None, 4096])
def test_in_place_activations_give_the_out_of_place_statistics(subsample):
    def net(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 2), nn.ReLU(inplace=inplace))

    x = torch.randn(10, 5)
    a, _ = run_once(net(False), x, lambda out: out.sum(), subsample=subsample)
    b, _ = run_once(net(True), x, lambda out: out.sum(), subsample=subsample)
    for field in ("act_mean", "act_std", "act_dead", "act_min", "act_max", "grad_norm", "grad_mean"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-6, err_msg=field)


def test_integer_outputs_are_skipped_with_a_note():
    class Argmax(nn.Module):
        def forward(self, x):
            return x.argmax(-1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.pick = nn.Linear(4, 3), Argmax()

        def forward(self, x):
            y = self.lin(x)
            self.pick(y)
            return y

    stats, _ = run_once(Net(), torch.randn(5, 4), lambda out: out.sum(), modules=["lin", "pick"])
    assert "torch.int64" in stats.notes()["pick"]
    assert np.isnan(stats.act_mean[0, stats.modules.index("pick")])
    assert np.isfinite(stats.act_mean[0, stats.modules.index("lin")])


def test_notes_survive_the_stats_file(tmp_path):
    from deepscope.stats import load_stats, save_stats

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with deepscope.watch(model, modules=["0", "1"]) as w:
        model[0](torch.randn(2, 3)).sum().backward()  # model[1] never runs
        w.step()
    s = w.stats()
    assert s.notes() == {"1": "not called in any recorded step"}
    save_stats(s, tmp_path)
    assert load_stats(tmp_path).notes() == s.notes()


def test_expanded_and_sliced_gradients_are_read_as_their_values():
    from deepscope.stats.collect import flat
    from deepscope.stats.sample import memory_order

    expanded = torch.tensor(2.0).expand(10, 2)  # the gradient of x.sum(): one value, stride 0
    sliced = torch.arange(24.0).view(4, 6)[:, ::2]
    for t in (expanded, sliced):
        assert torch.equal(flat(t).sort().values, t.reshape(-1).sort().values)
        base, offset = memory_order(t)
        assert torch.equal(base.as_strided((t.numel(),), (1,), offset).sort().values, t.reshape(-1).sort().values)


def test_containers_whose_output_functional_code_makes_are_named():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.lin(x)) + x  # the block's output: no module inside made it

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # its output is its last child's

        def forward(self, x):
            return self.seq(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.plain, self.head = Block(), Plain(), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.plain(self.block(x)))

    model = Net()
    with deepscope.watch(model) as w:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
            w.step()
    assert w.stats().invisible == ["block"]
    with deepscope.watch(model, modules=["block", "head"]) as w:
        model(torch.randn(3, 4)).sum().backward()
        w.step()
    assert w.stats().invisible == [], "a watched container is seen"
    assert all(not m._forward_hooks for m in model.modules()), "the discovery hooks are gone"


def test_transformer_encoder_layer_against_plain_hooks():
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 16)
            self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.layer(self.emb(x)).mean(1))

    model = Encoder()
    x = torch.randint(0, 12, (4, 7))
    names = ["emb", "layer.self_attn", "layer.linear1", "layer.linear2", "layer.norm2", "layer", "head"]
    stats, kept = run_once(model, x, lambda out: out.pow(2).sum(), modules=names, subsample=None, capture=names)
    for name in names:
        check(stats, name, kept[name])
    assert stats.notes() == {}
