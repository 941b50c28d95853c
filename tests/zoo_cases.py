"""The diagnosis zoo: defect and healthy training set-ups, each run through deepscope and judged.

A case is a name, an architecture, the finding kind it should produce (None for a healthy run), the
entry point it goes through and a function that runs it and returns the findings. Most cases train
through `deepscope.watch` in a plain loop (the main path); the kinds that describe the set-up before
training, or that only `diagnose()`'s short instrumented run measures (NaN producers, no_gradient,
saturation, activation scale through depth), go through `deepscope.diagnose.diagnose`; each case says
which (`entry`), and lr_too_low and activation_collapse are tried through both. Everything is seeded: the data by fixed `torch.Generator`s, the models
and the loop by `torch.manual_seed` inside a forked RNG, so a case gives the same findings every time.

Used by tests/test_diagnose_zoo.py and docs/zoo.py (the table in docs/diagnosis.md). No tests here.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

import deepscope
from deepscope.diagnose import KINDS, diagnose

C = 4            # classes
N = 2000         # samples per data set
BS = 32          # batch size
STEPS = 120      # training steps of a watched run (not_learning needs >= 100)
DIAG_STEPS = 30  # steps of diagnose()'s short run
LR = 1e-3


# --- data: synthetic, learnable, seeded -------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def tabular(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 20) features: a class-dependent Gaussian mean plus N(0, 1) noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, 20, generator=g) * 0.5
    y = torch.randint(0, C, (N,), generator=g)
    return means[y] + torch.randn(N, 20, generator=g), y


@functools.lru_cache(maxsize=None)
def images(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 12, 12) images: stripes whose orientation is the class (horizontal, vertical, two
    diagonals), at a random phase, plus noise; standardised."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    i = torch.arange(12).view(12, 1).expand(12, 12)
    j = torch.arange(12).view(1, 12).expand(12, 12)
    coord = torch.stack([i, j, i + j, i - j + 12])  # one per class
    phase = torch.randint(0, 3, (N, 1, 1), generator=g)
    pattern = ((coord[y] + phase) % 3 == 0).float()
    x = pattern + 0.6 * torch.randn(N, 12, 12, generator=g)
    x = (x - x.mean()) / x.std()
    return x.unsqueeze(1), y


@functools.lru_cache(maxsize=None)
def sequences(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 12, 8) sequences: a class-dependent vector at every step plus N(0, 1) noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, 8, generator=g) * 0.5
    y = torch.randint(0, C, (N,), generator=g)
    return means[y].unsqueeze(1) + torch.randn(N, 12, 8, generator=g), y


VOCAB, TOKENS = 40, 10


@functools.lru_cache(maxsize=None)
def tokens(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 10) token ids from a vocabulary of 40, drawn from a class-dependent distribution."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(C, VOCAB, generator=g) * 1.5, 1)
    y = torch.randint(0, C, (N,), generator=g)
    return torch.multinomial(probs[y], TOKENS, replacement=True, generator=g), y


@functools.lru_cache(maxsize=None)
def regression(seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 20) features and a float (N,) target: a fixed linear function plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 20, generator=g)
    return x, x @ torch.randn(20, generator=g) * 0.3 + 0.1 * torch.randn(N, generator=g)


DATA = {"MLP": tabular, "CNN": images, "ResNet": images, "LSTM": sequences, "Transformer": sequences,
        "Embedding": tokens}


# --- the architectures ------------------------------------------------------------------------------------
def mlp(d_in: int = 20, width: int = 64, depth: int = 2, act=nn.ReLU, c: int = C, dropout: float = 0.0,
        batchnorm: bool = False) -> nn.Sequential:
    layers, n = [], d_in
    for _ in range(depth):
        layers.append(nn.Linear(n, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
        if dropout:
            layers.append(nn.Dropout(dropout))
        n = width
    return nn.Sequential(*layers, nn.Linear(n, c))


def cnn(c: int = C, act=nn.ReLU, batchnorm: bool = True) -> nn.Sequential:
    norm = (lambda n: nn.BatchNorm2d(n)) if batchnorm else (lambda n: nn.Identity())
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), norm(16), act(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), norm(32), act(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, c))


class ResBlock(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(n, n, 3, padding=1, bias=False), nn.BatchNorm2d(n), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(n, n, 3, padding=1, bias=False), nn.BatchNorm2d(n), nn.ReLU()

    def forward(self, x):
        return self.relu2(x + self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, c: int = C, n: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, n, 3, padding=1, bias=False), nn.BatchNorm2d(n), nn.ReLU())
        self.blocks = nn.Sequential(ResBlock(n), ResBlock(n))
        self.pool, self.flat, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n, c)

    def forward(self, x):
        return self.head(self.flat(self.pool(self.blocks(self.stem(x)))))


class LSTMNet(nn.Module):
    """nn.LSTM over the sequence; the last step's output is classified."""
    def __init__(self, d_in: int = 8, hidden: int = 32, c: int = C):
        super().__init__()
        self.lstm, self.head = nn.LSTM(d_in, hidden, batch_first=True), nn.Linear(hidden, c)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TransformerNet(nn.Module):
    """A linear projection, nn.TransformerEncoder (batch_first), mean pooling over the steps, a head."""
    def __init__(self, d_in: int = 8, d: int = 32, c: int = C, layers: int = 2):
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, c)

    def forward(self, x):
        return self.head(self.encoder(self.proj(x)).mean(1))


class EmbeddingNet(nn.Module):
    """nn.Embedding, mean over the tokens, then a ReLU MLP."""
    def __init__(self, c: int = C, dim: int = 16, width: int = 64):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, c))

    def forward(self, x):
        return self.mlp(self.emb(x).mean(1))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": mlp, "CNN": cnn, "ResNet": ResNet, "LSTM": LSTMNet, "Transformer": TransformerNet,
    "Embedding": EmbeddingNet,
}
ARCHS = tuple(MODELS)


# --- heads and modules that carry a defect ------------------------------------------------------------------
class Softmax0Log(nn.Module):
    """log(softmax over dim 0): normalised over the batch instead of the classes."""
    def forward(self, x):
        return torch.log_softmax(x, dim=0)


class Log(nn.Module):
    """A hand-written layer taking the log of its input: NaN for negative inputs."""
    def forward(self, x):
        return torch.log(x)


class MaskedSqrt(nn.Module):
    """sqrt(x * (x > 0)): a finite forward, but sqrt's slope at 0 is infinite and the mask multiplies it by 0:
    NaN in the backward pass (relu/clamp would mask the gradient with a select instead and stay finite)."""
    def forward(self, x):
        return torch.sqrt(x * (x > 0))


class Detach(nn.Module):
    def forward(self, x):
        return x.detach()


def kl_onehot(out, y):
    """A hand-written KL divergence to one-hot targets: t * log(t) is 0 * -inf = NaN where t is 0."""
    t = F.one_hot(y, out.shape[1]).float()
    return (t * (torch.log(t) - torch.log_softmax(out, 1))).sum(1).mean()


def mse_regression(out, y):
    return F.mse_loss(out, y)


# --- running a case ---------------------------------------------------------------------------------------
def _order(n: int, steps: int, bs: int, shuffle: bool, seed: int) -> list[torch.Tensor]:
    """Batch indices for `steps` steps: reshuffled each epoch with a seeded generator, or in order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        out += [perm[i:i + bs] for i in range(0, n - bs + 1, bs)]
    return out[:steps]


LAST_LOSSES: list[float] = []  # the last watched run's losses (to check that healthy runs learn)


def train_watched(model: nn.Module, data, *, lr: float = LR, opt: str = "adamw", steps: int = STEPS, bs: int = BS,
                  shuffle: bool = True, zero_grad: bool = True, train_mode: bool = True,
                  loss_fn: Callable = F.cross_entropy, make_opt: Callable | None = None,
                  after_opt: Callable[[nn.Module], None] | None = None, momentum: float = 0.0,
                  seed: int = 0) -> list:
    """A plain training loop under `deepscope.watch`; returns `w.findings()`."""
    x, y = data
    model.train(train_mode)
    if make_opt is not None:
        optimizer = make_opt(model)
    elif opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    if after_opt is not None:
        after_opt(model)
    with deepscope.watch(model, optimizer) as w:
        for idx in _order(len(x), steps, bs, shuffle, seed):
            xb, yb = x[idx], y[idx]
            loss = loss_fn(model(xb), yb)
            if zero_grad:
                optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            w.step(loss, targets=yb)
    LAST_LOSSES[:] = w.losses
    return w.findings()


def run_diagnose(model: nn.Module, data, *, lr: float = LR, opt: str = "adamw", steps: int = DIAG_STEPS,
                 bs: int = BS, loss_fn: Callable = F.cross_entropy, seed: int = 0) -> list:
    """`deepscope.diagnose.diagnose` on seeded, shuffled batches; returns its findings."""
    x, y = data
    batches = [(x[i], y[i]) for i in _order(len(x), steps, bs, True, seed)]
    opt_func = torch.optim.SGD if opt == "sgd" else torch.optim.AdamW
    return diagnose(model, batches, loss_fn, steps=steps, lr=lr, opt_func=opt_func)


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    kind: str | None  # the finding kind the case should produce; None: a healthy run
    entry: str  # "watch" (a plain loop under deepscope.watch) or "diagnose" (deepscope.diagnose.diagnose)
    run: Callable[[], list] = field(repr=False)
    accepted: frozenset = frozenset()  # other kinds this defect legitimately also produces
    note: str = ""  # what the defect is

    @property
    def available(self) -> bool:
        """Whether deepscope knows the kind yet (kinds being added are listed before they exist)."""
        return self.kind is None or self.kind in KINDS


@dataclass
class Outcome:
    case: Case
    findings: list
    seconds: float = 0.0

    @property
    def problems(self) -> list:
        return [f for f in self.findings if f.severity in ("error", "warning")]

    @property
    def found(self) -> bool | None:
        """Defect cases: a warning/error of the expected kind is present. Healthy cases: None."""
        if self.case.kind is None:
            return None
        return any(f.kind == self.case.kind for f in self.problems)

    @property
    def false_alarms(self) -> list:
        """Warnings/errors of a kind neither expected nor accepted, and not explained by another finding."""
        allowed = {self.case.kind, *self.case.accepted}
        return [f for f in self.problems if f.kind not in allowed and not f.caused_by]

    @property
    def consequences(self) -> list:
        """Warnings/errors linked to a cause (`caused_by`): listed, not counted as false alarms."""
        return [f for f in self.problems if f.caused_by and f.kind != self.case.kind]


def run_case(case: Case) -> Outcome:
    """Run one case deterministically (its own seed, one forked RNG, warnings silenced)."""
    import time

    start = time.perf_counter()
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        findings = case.run()
    return Outcome(case, list(findings), time.perf_counter() - start)


# --- the cases ----------------------------------------------------------------------------------------------
CASES: list[Case] = []


def _add(name, arch, kind, entry, note, fn, accepted=()):
    CASES.append(Case(name, arch, kind, entry, fn, frozenset(accepted), note))


def _model(arch: str) -> nn.Module:
    return MODELS[arch]()


# healthy: every architecture trained correctly, through watch and through diagnose
for _arch in ARCHS:
    _add(f"healthy-{_arch}", _arch, None, "watch", "shuffled data, zero_grad, AdamW lr 1e-3, model.train()",
         functools.partial(lambda a: train_watched(_model(a), DATA[a]()), _arch))
    _add(f"healthy-{_arch}-diagnose", _arch, None, "diagnose", "diagnose() with AdamW lr 1e-3 on shuffled batches",
         functools.partial(lambda a: run_diagnose(_model(a), DATA[a]()), _arch))


def _each(kind: str, archs, entry: str, note: str, make: Callable[[str], list], accepted=(), suffix: str = ""):
    for a in archs:
        _add(f"{kind}-{a}{suffix}", a, kind, entry, note, functools.partial(make, a), accepted)


# What a divergence legitimately also shows (most of these get `caused_by` anyway).
_DIVERGENCE = ("diverged", "dead_units", "activation_collapse", "activation_explosion", "gradient_explosion",
               "saturation", "not_learning", "lr_too_high")

# --- the loop and the run (watch) ---
# (an LSTM trains well with SGD at lr 2, as LSTMs classically do: it gets lr 30)
_HIGH_LR = {"LSTM": 30.0}
_each("lr_too_high", ["MLP", "CNN", "LSTM", "Transformer", "Embedding"], "watch",
      "SGD at lr 2 with momentum 0.9 (LSTM: lr 30)",
      lambda a: train_watched(_model(a), DATA[a](), opt="sgd", lr=_HIGH_LR.get(a, 2.0), momentum=0.9),
      accepted=_DIVERGENCE)

_each("lr_too_low", ["MLP", "CNN", "Embedding"], "diagnose", "AdamW at lr 1e-7",
      lambda a: run_diagnose(_model(a), DATA[a](), lr=1e-7), accepted=("not_learning",))
_each("lr_too_low", ["MLP", "CNN", "Embedding"], "watch", "AdamW at lr 1e-7",
      lambda a: train_watched(_model(a), DATA[a](), lr=1e-7), accepted=("not_learning",), suffix="-watch")


def _random_labels(a: str):
    x, y = DATA[a]()
    g = torch.Generator().manual_seed(11)
    return x, y[torch.randperm(len(y), generator=g)]


_each("not_learning", ["MLP", "CNN", "LSTM", "Embedding"], "watch",
      "labels permuted independently of the inputs", lambda a: train_watched(_model(a), _random_labels(a)))


def _frozen_but_head_bias(a: str) -> nn.Module:
    m = _model(a)
    for p in m.parameters():
        p.requires_grad_(False)
    head = m.head if hasattr(m, "head") else m[-1] if isinstance(m, nn.Sequential) else m.mlp[-1]
    head.bias.requires_grad_(True)
    return m


_each("not_learning", ["ResNet", "Transformer"], "watch", "every parameter frozen except the output bias",
      lambda a: train_watched(_frozen_but_head_bias(a), DATA[a]()), suffix="-frozen")


def _dead(a: str) -> nn.Module:
    """A large negative bias on 80% of the units before a ReLU (BatchNorm's bias where there is one)."""
    m = _model(a)
    target = {"MLP": lambda: m[0], "CNN": lambda: m[1], "ResNet": lambda: m.stem[1],
              "Embedding": lambda: m.mlp[0]}[a]()
    with torch.no_grad():
        k = int(0.8 * target.bias.numel())
        target.bias[:k] = -10.0
    return m


_each("dead_units", ["MLP", "CNN", "ResNet", "Embedding"], "watch", "bias -10 on 80% of a ReLU layer's units",
      lambda a: train_watched(_dead(a), DATA[a]()))

_each("gradients_not_zeroed", ["MLP", "CNN", "LSTM", "Transformer", "Embedding"], "watch", "no opt.zero_grad()",
      lambda a: train_watched(_model(a), DATA[a](), zero_grad=False), accepted=_DIVERGENCE)


def _with_dropout(a: str) -> nn.Module:
    return mlp(dropout=0.3) if a == "MLP" else _model(a)


_each("model_in_eval_mode", ["MLP", "CNN", "ResNet", "Transformer"], "watch",
      "model.eval() before the loop (BatchNorm/Dropout in the model)",
      lambda a: train_watched(_with_dropout(a), DATA[a](), train_mode=False))


def _attach_head(m: nn.Module) -> None:
    """Replace the output layer after the optimizer was created."""
    if isinstance(m, nn.Sequential):
        m[-1] = nn.Linear(m[-1].in_features, C)
    elif hasattr(m, "head"):
        m.head = nn.Linear(m.head.in_features, C)
    else:
        m.mlp[-1] = nn.Linear(m.mlp[-1].in_features, C)


_each("params_not_in_optimizer", ["MLP", "CNN", "LSTM", "Transformer", "Embedding"], "watch",
      "output layer replaced after the optimizer was created",
      lambda a: train_watched(_model(a), DATA[a](), after_opt=_attach_head), accepted=("not_learning", "lr_too_low"))


class RNNNet(nn.Module):
    """A vanilla ReLU RNN (nn.RNN) over the sequence, orthogonal recurrent weights scaled by `scale`."""
    def __init__(self, d_in: int = 8, hidden: int = 32, c: int = C, scale: float = 1.0):
        super().__init__()
        self.rnn, self.head = nn.RNN(d_in, hidden, batch_first=True, nonlinearity="relu"), nn.Linear(hidden, c)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
            self.rnn.weight_hh_l0.mul_(scale)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _deep_mlp(scale: float, depth: int = 8, act=nn.ReLU) -> nn.Module:
    m = mlp(width=64, depth=depth, act=act)
    for layer in m:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            layer.weight.data.mul_(scale)
            nn.init.zeros_(layer.bias)
    return m


_add("gradient_explosion-RNN", "RNN", "gradient_explosion", "watch",
     "vanilla ReLU RNN, recurrent weights orthogonal x1.2, SGD lr 0.2, no clipping",
     lambda: train_watched(RNNNet(scale=1.2), sequences(), opt="sgd", lr=0.2), accepted=_DIVERGENCE)
_add("gradient_explosion-MLP", "MLP", "gradient_explosion", "watch", "8-layer MLP, kaiming init x1.5, SGD lr 0.05",
     lambda: train_watched(_deep_mlp(1.5), tabular(), opt="sgd", lr=0.05), accepted=_DIVERGENCE)
_add("gradient_explosion-Embedding", "Embedding", "gradient_explosion", "watch",
     "embedding + 8-layer MLP, kaiming init x1.5, SGD lr 0.05",
     lambda: train_watched(_deep("Embedding", 1.5), tokens(), opt="sgd", lr=0.05), accepted=_DIVERGENCE)


def _no_bn(a: str) -> nn.Module:
    return cnn(batchnorm=False) if a == "CNN" else _model(a)


_each("diverged", ["MLP", "CNN", "Transformer", "Embedding"], "watch", "SGD at lr 1e4: the loss becomes NaN (CNN without BatchNorm)",
      lambda a: train_watched(_no_bn(a), DATA[a](), opt="sgd", lr=1e4), accepted=_DIVERGENCE)


def _softmax0(a: str) -> nn.Module:
    return nn.Sequential(_model(a), Softmax0Log())


_each("softmax_wrong_dim", ["MLP", "CNN", "LSTM", "Transformer", "Embedding"], "watch",
      "the model ends in log_softmax(dim=0), trained with nll_loss",
      lambda a: train_watched(_softmax0(a), DATA[a](), loss_fn=F.nll_loss))


def _sorted_by_class(a: str):
    x, y = DATA[a]()
    order = torch.argsort(y, stable=True)
    return x[order], y[order]


_each("unshuffled_batches", ["MLP", "CNN", "LSTM", "Embedding"], "watch", "data sorted by class, shuffle off",
      lambda a: train_watched(_model(a), _sorted_by_class(a), shuffle=False))


def _regression_data(a: str):
    """A float (N,) target: a linear function of the features (MLP); the class index as a number (CNN, LSTM)."""
    if a == "MLP":
        return regression()
    x, y = DATA[a]()
    return x, y.float()


_each("loss_shape_mismatch", ["MLP", "CNN", "LSTM"], "watch",
      "MSE of (N, 1) predictions against (N,) targets (broadcast to (N, N))",
      lambda a: train_watched(MODELS[a](c=1), _regression_data(a), loss_fn=mse_regression))

# --- the set-up and what only the short run measures (diagnose) ---
def _insert_after_first_layer(a: str, module: nn.Module) -> nn.Module:
    m = _model(a)
    if a == "Embedding":
        m.mlp.insert(1, module)
    else:
        m.insert(1, module)
    return m


_each("nonfinite_forward", ["MLP", "CNN", "Embedding"], "diagnose", "a module takes the log of negative values",
      lambda a: run_diagnose(_insert_after_first_layer(a, Log()), DATA[a]()))
_each("nonfinite_backward", ["MLP", "CNN", "Embedding"], "diagnose", "sqrt(x * (x > 0)): infinite slope at 0 times a 0 mask",
      lambda a: run_diagnose(_insert_after_first_layer(a, MaskedSqrt()), DATA[a]()))
_each("nonfinite_loss", ["MLP", "CNN", "LSTM"], "diagnose", "a hand-written KL divergence to one-hot targets (log of 0)",
      lambda a: run_diagnose(_model(a), DATA[a](), loss_fn=kl_onehot))


def _off_by_one(a):
    x, y = DATA[a]()
    return x, y + 1


def _column_targets(a):
    x, y = DATA[a]()
    return x, y[:, None]


def _float_targets(a):
    x, y = DATA[a]()
    return x, y.float()


# the loss raising on those targets is the same problem, quoted (an `exception` finding, not linked by caused_by)
_RAISES = ("exception",)
_add("target_mismatch-MLP", "MLP", "target_mismatch", "diagnose", "labels 1..4 for 4 outputs (off by one)",
     lambda: run_diagnose(mlp(), _off_by_one("MLP")), accepted=_RAISES)
_add("target_mismatch-CNN", "CNN", "target_mismatch", "diagnose", "targets of shape (N, 1) for cross_entropy",
     lambda: run_diagnose(cnn(), _column_targets("CNN")), accepted=_RAISES)
_add("target_mismatch-LSTM", "LSTM", "target_mismatch", "diagnose", "float class indices for cross_entropy",
     lambda: run_diagnose(LSTMNet(), _float_targets("LSTM")), accepted=_RAISES)
_add("target_mismatch-Embedding", "Embedding", "target_mismatch", "diagnose", "labels 1..4 for 4 outputs",
     lambda: run_diagnose(EmbeddingNet(), _off_by_one("Embedding")), accepted=_RAISES)


def _softmax_head(a: str) -> nn.Module:
    return nn.Sequential(_model(a), nn.Softmax(dim=1))


_each("softmax_before_cross_entropy", ["MLP", "CNN", "LSTM", "Transformer", "Embedding"], "diagnose",
      "the model ends in nn.Softmax(dim=1), trained with cross_entropy",
      lambda a: run_diagnose(_softmax_head(a), DATA[a]()))
_each("probabilities_to_nll", ["MLP", "CNN", "LSTM", "Embedding"], "diagnose", "nll_loss on raw logits",
      lambda a: run_diagnose(_model(a), DATA[a](), loss_fn=F.nll_loss))
_each("probabilities_to_nll", ["MLP", "CNN"], "diagnose", "nll_loss on softmax probabilities",
      lambda a: run_diagnose(_softmax_head(a), DATA[a](), loss_fn=F.nll_loss), suffix="-probs")


def _constant_init(a: str) -> nn.Module:
    m = _model(a)
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            nn.init.constant_(mod.weight, 0.05)
    return m


_each("symmetric_init", ["MLP", "CNN", "Embedding"], "diagnose", "every Linear/Conv weight set to the same constant",
      lambda a: run_diagnose(_constant_init(a), DATA[a]()), accepted=("not_learning", "lr_too_low"))
_each("batchnorm_small_batch", ["MLP", "CNN", "ResNet"], "diagnose", "batch size 2 with BatchNorm",
      lambda a: run_diagnose(mlp(batchnorm=True) if a == "MLP" else _model(a), DATA[a](), bs=2),
      accepted=("lr_too_high",))


def _raw(a: str):
    x, y = DATA[a]()
    return x * 60 + 128, y  # raw 0-255 style values


_each("input_not_normalized", ["MLP", "CNN", "LSTM", "Transformer"], "diagnose", "raw 0-255 style inputs",
      lambda a: run_diagnose(_model(a), _raw(a)), accepted=("saturation", "activation_explosion", "lr_too_high"))


def _unused(a: str) -> nn.Module:
    m = _model(a)
    m.unused = nn.Linear(4, 4)  # registered, never called
    return m


def _detached_embedding() -> nn.Module:
    m = EmbeddingNet()
    m.mlp.insert(0, Detach())
    return m


_add("no_gradient-LSTM", "LSTM", "no_gradient", "diagnose", "a registered layer the forward never uses",
     lambda: run_diagnose(_unused("LSTM"), sequences()))
_add("no_gradient-Transformer", "Transformer", "no_gradient", "diagnose", "a registered layer the forward never uses",
     lambda: run_diagnose(_unused("Transformer"), sequences()))
_each("no_gradient", ["MLP", "CNN"], "diagnose", "the first layer's output is detached",
      lambda a: run_diagnose(_insert_after_first_layer(a, Detach()), DATA[a]()))
_add("no_gradient-Embedding", "Embedding", "no_gradient", "diagnose", "the embedding's output is detached",
     lambda: run_diagnose(_detached_embedding(), tokens()))


def _shape_bug(a: str) -> nn.Module:
    m = _model(a)
    if isinstance(m, nn.Sequential):
        m[-1] = nn.Linear(m[-1].in_features + 1, C)
    else:
        m.head = nn.Linear(m.head.in_features + 1, C)
    return m


_each("exception", ["MLP", "CNN", "LSTM"], "diagnose", "the output layer expects one feature more than it gets",
      lambda a: run_diagnose(_shape_bug(a), DATA[a]()))


def _saturating(a: str) -> nn.Module:
    m = {"MLP": lambda: mlp(act=nn.Tanh), "CNN": lambda: cnn(act=nn.Tanh, batchnorm=False),
         "Embedding": lambda: EmbeddingNet()}[a]()
    if a == "Embedding":
        m.mlp[1], m.mlp[3] = nn.Tanh(), nn.Tanh()
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            mod.weight.data.mul_(20)
    return m


_each("saturation", ["MLP", "CNN", "Embedding"], "diagnose", "tanh layers with the init scaled 20x",
      lambda a: run_diagnose(_saturating(a), DATA[a]()), accepted=("activation_explosion",))


def _deep(a: str, scale: float) -> nn.Module:
    if a == "MLP":
        return _deep_mlp(scale)
    if a == "CNN":
        layers, n = [], 1
        for _ in range(6):
            conv = nn.Conv2d(n, 16, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            conv.weight.data.mul_(scale)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            n = 16
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, C))
    m = EmbeddingNet()
    m.mlp = _deep_mlp(scale)
    m.mlp[0] = nn.Linear(16, 64)
    nn.init.kaiming_normal_(m.mlp[0].weight, nonlinearity="relu")
    m.mlp[0].weight.data.mul_(scale)
    return m


_each("activation_explosion", ["MLP", "CNN", "Embedding"], "diagnose", "8-layer ReLU net, kaiming init x3, no norm",
      lambda a: run_diagnose(_deep(a, 3.0), DATA[a]()), accepted=_DIVERGENCE)
_each("activation_collapse", ["MLP", "CNN", "Embedding"], "diagnose", "8-layer ReLU net, kaiming init x0.1, no norm",
      lambda a: run_diagnose(_deep(a, 0.1), DATA[a]()), accepted=("lr_too_low", "not_learning"))
_each("activation_collapse", ["MLP", "CNN", "Embedding"], "watch", "8-layer ReLU net, kaiming init x0.1 (watch)",
      lambda a: train_watched(_deep(a, 0.1), DATA[a]()), accepted=("lr_too_low", "not_learning"), suffix="-watch")


def by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(f"no zoo case {name!r}; cases: {', '.join(c.name for c in CASES)}")


def healthy_cases() -> list[Case]:
    return [c for c in CASES if c.kind is None]


def defect_cases() -> list[Case]:
    return [c for c in CASES if c.kind is not None]


assert len({c.name for c in CASES}) == len(CASES), "zoo case names must be unique"
