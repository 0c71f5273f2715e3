"""Align two independently trained MLPs on scikit-learn's digits and watch the barrier drop.

Run: python examples/align_digits.py   (needs the `examples` extra: scikit-learn)
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import torchmerge as tm


def digits_batches(batch_size=128, seed=0):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def train_mlp(batches, seed, epochs=30):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def main():
    batches = digits_batches()
    train, test = batches[:10], batches[10:]
    a, b = train_mlp(train, seed=1), train_mlp(train, seed=2)
    spec = tm.discover(a, train[0][0])
    rows = [("none", b)]
    for method in ("weight", "activation"):
        perms = tm.align(a, b, spec, method=method, data=[x for x, _ in train])
        rows.append((method, tm.permute(b, spec, perms)))
    print(f"{'alignment':<12}{'loss barrier':>14}{'acc barrier':>13}{'acc at midpoint':>17}")
    for name, other in rows:
        curve = tm.analysis.interpolation_barrier(a, other, test, steps=11)
        print(f"{name:<12}{curve['loss_barrier']:>14.3f}{curve['accuracy_barrier']:>13.3f}"
              f"{curve['accuracy'][5]:>17.3f}")


if __name__ == "__main__":
    main()
