"""Merge experts of a hand-written model: custom attention, residual blocks, an untraceable module.

The model reads an 8×8 scikit-learn digit as 8 row tokens and runs a hand-written self-attention
block and an MLP block (both residual, with their own forward code) over them. Its input module,
``RobustScale``, has data-dependent control flow (``if x.max() > ...``) that torch.fx cannot trace:
``leaf_modules=(RobustScale,)`` keeps it opaque (torchmerge freezes the channels it touches and
reports them). ``tm.merge`` discovers which axes permute together — the residual stream, the query/key
and value/output pairs, the MLP hidden units — aligns the experts, merges and corrects.

Three experts from three *different* initialisations (non-local) learn: digits 0-4, digits 5-9
and parity, each with its own head size.

Run: python examples/custom_model.py   (needs scikit-learn; about 10-30 s on a laptop CPU)
"""
import math

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import torchmerge as tm


class RobustScale(nn.Module):
    """Rescale a batch whose values look like raw 0-16 pixel counts — data-dependent, untraceable."""

    def forward(self, x):
        if x.max() > 2.0:  # Python `if` on a tensor value: torch.fx cannot trace this
            x = x / 16.0
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention written by hand, with a residual connection and pre-norm."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):                                        # x: [B, T, D]
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)  # [B, H, T, T]
        ctx = (att @ v).transpose(1, 2).reshape(b, t, d)
        return x + self.out(ctx)


class ResidualMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class RowTransformer(nn.Module):
    def __init__(self, num_classes, dim=48, heads=4):
        super().__init__()
        self.scale = RobustScale()
        self.embed = nn.Linear(8, dim)                          # one token per image row
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.attn = SelfAttention(dim, heads)
        self.mlp = ResidualMLP(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):                                       # x: [B, 64] raw pixel counts
        x = self.scale(x).reshape(x.shape[0], 8, 8)
        x = self.mlp(self.attn(self.embed(x) + self.pos))
        return self.head(self.norm(x).mean(1))


TASKS = {  # name: (digits used, label function, classes)
    "digits0-4": ((0, 1, 2, 3, 4), lambda y: y, 5),
    "digits5-9": ((5, 6, 7, 8, 9), lambda y: y - 5, 5),
    "parity": (tuple(range(10)), lambda y: y % 2, 2),
}


def task_data(x, y, digits, label, batch_size=64):
    keep = torch.isin(y, torch.tensor(digits))
    x, y = x[keep], label(y[keep])
    cut = int(0.8 * len(x))
    train = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, cut, batch_size)]
    test = [(x[cut:], y[cut:])]
    return train, test


def train_expert(num_classes, train, seed, epochs=25):
    torch.manual_seed(seed)  # a different init per expert: a non-local merge
    model = RowTransformer(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, test, **kw):
    return sum(int((model(x, **kw).argmax(-1) == y).sum()) for x, y in test) / sum(len(y) for _, y in test)


def main():
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y)[order]   # raw counts 0..16
    splits = {name: task_data(x, y, digits, label) for name, (digits, label, _) in TASKS.items()}
    experts = [train_expert(k, splits[name][0], seed=i) for i, (name, (_, _, k)) in enumerate(TASKS.items())]

    spec = tm.discover(experts[0], x[:4], leaf_modules=(RobustScale,))
    print(f"discovered {len(spec.groups)} permutation groups: "
          + ", ".join(f"{name} ({g.size})" for name, g in spec.groups.items()))
    for f in spec.frozen:  # what was left un-permuted, and why
        print(f"  frozen: {f.size} channels at '{f.module_path or f.node}' ({f.op}): {f.reason}")

    print(f"\n{'':24}" + "".join(f"{name:>11}" for name in TASKS))
    print(f"{'experts':24}" + "".join(f"{accuracy(e, splits[n][1]):>11.3f}" for e, n in zip(experts, TASKS)))
    data = [splits[name][0] for name in TASKS]
    for method, correction in (("task_arithmetic", None), ("task_arithmetic", "affine"),
                               ("ties", "affine"), ("regmean", "affine")):
        merged = tm.merge(experts, method=method, data=data, align="weight", correction=correction,
                          task_names=list(TASKS), leaf_modules=(RobustScale,))
        accs = [accuracy(merged, splits[n][1], task=n) for n in TASKS]
        print(f"{method + ' + ' + str(correction):24}" + "".join(f"{a:>11.3f}" for a in accs))

    plain = merged.export(task="parity")  # an ordinary module for one task, affines folded in
    print(f"\nexported 'parity' model: {accuracy(plain, splits['parity'][1]):.3f}")


if __name__ == "__main__":
    main()
