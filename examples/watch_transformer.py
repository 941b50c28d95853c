"""Look inside your own model, trained by your own loop, with `deepscope.watch`.

A small Transformer encoder learns which of 8 tokens appears most often in a sequence of 16 (chance level:
ln 8 = 2.08). The loop is plain PyTorch; `deepscope.watch` records every layer's statistics beside it.

Run:  python examples/watch_transformer.py              # Adam at lr 1e-3 learns the task: no findings
      python examples/watch_transformer.py --lr 0.3     # too high: the loss spikes, and the findings say so
Writes report.html, mean_std.png, color_dim.png and update_ratio.png into --out (default
runs/watch-example); it refuses a folder that holds any other file. Synthetic data, CPU, about 10 s.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import deepscope
from deepscope import plots

VOCAB, SEQ_LEN = 8, 16
PLOTS = ("mean_std.png", "color_dim.png", "update_ratio.png")


def make_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens with one token planted 4 extra times, so most sequences have a clear winner."""
    x = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=g)  # (n, L) token ids
    planted = torch.randint(0, VOCAB, (n, 1), generator=g)  # (n, 1)
    where = torch.rand(n, SEQ_LEN, generator=g).argsort(1)[:, :4]  # (n, 4) distinct positions
    x.scatter_(1, where, planted.expand(-1, 4))
    y = F.one_hot(x, VOCAB).sum(1).argmax(1)  # (n,) the label is the true most frequent token (ties: lowest id)
    return x, y


class TokenCounter(nn.Module):
    """Embedding -> 2 Transformer encoder layers -> mean over positions -> linear head. No positional
    encoding: which token is most frequent does not depend on where the tokens are."""

    def __init__(self, d_model: int = 32, n_heads: int = 4, n_layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d_model)
        # activation as a module (not the default function F.relu), so watch can see its outputs
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=2 * d_model, dropout=0.0,
                                           activation=nn.ReLU(), batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.emb(x))  # (N, L, d_model)
        return self.head(h.mean(1))  # (N, VOCAB) logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (0.3 makes training diverge)")
    p.add_argument("--steps", type=int, default=200, help="training steps of 64 sequences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/watch-example"), help="folder for the report and plots")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")

    # Checked before training, so a wrong --out costs nothing and nothing of yours is overwritten.
    args.out.mkdir(parents=True, exist_ok=True)
    others = sorted(f.name for f in args.out.iterdir() if f.name not in ("report.html", *PLOTS))
    if others:
        sys.exit(f"{args.out} holds files this example did not write ({', '.join(others[:3])}); choose another --out")

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = TokenCounter()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    # Your loop, unchanged, inside `with deepscope.watch(...)`. Passing the optimiser adds weight,
    # gradient and update norms; w.step(loss, targets=yb) adds the loss history and, from the targets,
    # the number of classes, so the findings can compare the loss with chance level.
    with deepscope.watch(model, opt) as w:
        for _ in range(args.steps):
            xb, yb = make_batch(64, g)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss, targets=yb)
    # Leaving the block removed every hook: the model is plain PyTorch again.

    model.eval()
    with torch.no_grad():
        xv, yv = make_batch(2048, g)  # sequences the model has never seen
        accuracy = (model(xv).argmax(1) == yv).float().mean().item()
    losses = w.losses
    print(f"lr {args.lr:g}: {w.steps} steps recorded, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"accuracy on new sequences {accuracy:.1%}")

    s = w.stats()
    print(f"{len(s.modules)} modules watched: {', '.join(s.modules)}")
    for name, note in s.notes().items():  # modules that recorded nothing, and why
        print(f"  no statistics for {name}: {note}")

    analysis = w.analysis()  # the findings, and what was checked
    findings = analysis.findings
    for f in findings:
        print(f"{f.severity.upper():8}{f.kind}{f' [{f.module}]' if f.module else ''}: {f.message}")
    print("no findings" if not findings else f"fix: {findings[0].fix}")
    print(f"checked: {analysis.summary()}")

    # Plots are plain functions of the Stats; each returns a matplotlib figure.
    acts = [m for m in s.modules if m.endswith("activation")]  # the ReLUs inside the feed-forward blocks
    for name, fig in zip(PLOTS, (plots.mean_std_plot(s), plots.color_dim_grid(s, acts + ["head"]),
                                 plots.update_ratio_plot(s))):
        plots.save_png(fig, args.out / name)
    report = w.report(args.out / "report.html")  # one self-contained file: plots inlined, opens offline
    print(f"wrote {report} and {', '.join(PLOTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
