"""The headline claim on real data: the affine correction never hurts, for every merge method."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchmerge as tm

datasets = pytest.importorskip("sklearn.datasets")

TASKS = [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
METHODS = ["average", "task_arithmetic", "ties", "tall", "regmean"]


class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.fc2(self.fc1(x).relu()).relu())


def _task_data():
    """Per task: (train x, train y, test x, test y) of load_digits restricted to the task's classes."""
    x, y = datasets.load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    out = []
    for classes in TASKS:
        keep = torch.isin(y, torch.tensor(classes))
        xt, yt = x[keep], torch.searchsorted(torch.tensor(classes), y[keep])
        cut = int(0.7 * len(yt))
        out.append((xt[:cut], yt[:cut], xt[cut:], yt[cut:]))
    return out


def _train(seed, xs, ys, steps=300):
    torch.manual_seed(seed)
    init = Net()
    model = copy.deepcopy(init)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(ys), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return init.eval(), model.eval()


@pytest.fixture(scope="module")
def setting():
    data = _task_data()
    pairs = [_train(10 + t, xs, ys) for t, (xs, ys, _, _) in enumerate(data)]
    return data, [p[0] for p in pairs], [p[1] for p in pairs]


def _accuracy(merged, data):
    with torch.no_grad():
        return sum(float((merged(xt, task=t).argmax(1) == yt).float().mean())
                   for t, (_, _, xt, yt) in enumerate(data)) / len(data)


def _merge(method, experts, inits, calib, correction):
    base = inits if method in ("task_arithmetic", "ties", "tall") else None
    return tm.merge(experts, method=method, base=base, data=calib, align="weight",
                    correction=correction).eval()


@pytest.mark.parametrize("method", METHODS)
def test_affine_correction_does_not_lower_accuracy(setting, method):
    """Mean test accuracy over tasks with correction="affine" >= with correction=None."""
    data, inits, experts = setting
    calib = [list(xs.split(128)) for xs, _, _, _ in data]
    expert_acc = sum(float((e(xt).argmax(1) == yt).float().mean())
                     for e, (_, _, xt, yt) in zip(experts, data)) / len(data)
    assert expert_acc > 0.9, expert_acc  # the experts did learn their tasks
    plain = _accuracy(_merge(method, experts, inits, calib, None), data)
    fixed = _accuracy(_merge(method, experts, inits, calib, "affine"), data)
    assert fixed >= plain, (method, plain, fixed, expert_acc)
