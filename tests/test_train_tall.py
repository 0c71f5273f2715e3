"""Training a TALL merge: task weights θ₀ + m_t ∘ τ_MTL are computed functionally in forward, so
mixed-task batches, summed losses of several tasks, torch.compile and DDP all train like any
other merged model (affines and heads through ``task_parameters()``)."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torchmerge as tm
from merge_helpers import task_vector_experts

LAM = 0.4
BUILDS = ["graph", "inject"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.fc2(self.fc1(x).relu()).relu())


def _setup(n=3):
    """A real base and n experts = base + a different task vector each (so the masks differ)."""
    torch.manual_seed(0)
    base = Net()
    experts = task_vector_experts(base, n)
    return base, experts


def _merge(build, correction=None):
    base, experts = _setup()
    data = [[torch.randn(8, 6, generator=torch.Generator().manual_seed(s)) for s in range(2)]
            for _ in experts]
    merged = tm.merge(experts, method="tall", base=base, data=data, align=None, correction=correction,
                      build=build, lam=LAM)
    return merged, base, experts


def _expected(base, experts, t):
    """Task t's weights computed here, independently of torchmerge: θ₀ + m_t ∘ τ_MTL."""
    theta0 = dict(base.named_parameters())
    out = {}
    for name, p0 in theta0.items():
        if name.startswith("head."):
            continue
        taus = [dict(e.named_parameters())[name].detach() - p0.detach() for e in experts]
        mtl = sum(taus)
        mask = taus[t].abs() >= LAM * (mtl - taus[t]).abs()
        out[name] = p0.detach() + mask * mtl
    return out


def _trainable(merged):
    for p in merged.parameters():
        p.requires_grad_(False)
    params = list(merged.task_parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def _targets(experts, x, ids):
    with torch.no_grad():
        return torch.stack([experts[t](x[i:i + 1])[0] for i, t in enumerate(ids.tolist())])


@pytest.mark.parametrize("build", BUILDS)
def test_task_weights_are_theta0_plus_masked_tau_and_no_parameters(build):
    merged, base, experts = _merge(build)
    x = torch.randn(5, 6)
    outs = []
    for t in range(3):
        want = _expected(base, experts, t)
        plain = copy.deepcopy(experts[t])
        plain.load_state_dict(want, strict=False)  # body: θ_t; head: expert t's
        with torch.no_grad():
            got = merged(x, task=t)
            assert torch.allclose(got, plain(x), atol=1e-5)
            assert torch.allclose(merged.export(task=t)(x), got, atol=1e-5)
        outs.append(got)
    masks = [_expected(base, experts, t)["fc1.weight"] for t in range(3)]
    assert not torch.equal(masks[0], masks[1])  # the tasks really have different weights
    assert not torch.allclose(outs[0], outs[1])
    # the masked tensors are no trainable (dead, stale) parameters of the merged model
    names = dict(merged.named_parameters())
    assert not any(n.endswith(("fc1.weight", "fc2.weight", "fc1.bias", "fc2.bias")) for n in names)
    assert {id(p) for p in merged.parameters()} == {id(p) for p in merged.task_parameters()}
    exported = merged.export(task=1)  # a plain module: its weights are parameters again
    assert {"fc1.weight", "fc2.weight"} <= {n for n, _ in exported.named_parameters()}


@pytest.mark.parametrize("build", BUILDS)
def test_mixed_batches_train_affines_and_heads(build):
    merged, _, experts = _merge(build, correction="affine")
    merged.train()
    params = _trainable(merged)
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x, ids = torch.randn(24, 6, generator=gen), torch.arange(24) % 3
    target = _targets(experts, x + 0.5, ids)  # a shifted task: something to learn
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = (merged(x, task=ids) - target).square().mean()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("build", BUILDS)
def test_summed_losses_of_alternating_tasks(build):
    """Forward task 0, switch task, forward task 1, one backward over the sum."""
    merged, _, experts = _merge(build, correction="affine")
    params = _trainable(merged)
    opt = torch.optim.SGD(params, lr=0.05)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    targets = [_targets(experts, x + 0.5, torch.full((8,), t)) for t in range(3)]
    losses = []
    for _ in range(20):
        opt.zero_grad()
        total = 0
        for t in range(3):
            merged.set_task(t)
            total = total + (merged(x) - targets[t]).square().mean()
        with merged.task(0):
            total = total + (merged(x, task=2) - targets[2]).square().mean()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.8 * losses[0]
    heads = [p for h in merged.heads().values() for p in h.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)


@pytest.mark.parametrize("build", BUILDS)
def test_state_dict_and_dtype_keep_task_weights(build, tmp_path):
    merged, _, _ = _merge(build, correction="affine")
    x, ids = torch.randn(6, 6), torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        want = merged(x, task=ids)
        assert not any("fc1.weight" in k and "task_weights" not in k for k in merged.state_dict())
        twin = copy.deepcopy(merged)
        twin.load_state_dict(merged.state_dict())
        assert torch.equal(twin(x, task=ids), want)
        double = copy.deepcopy(merged).to(torch.float64)
        assert torch.allclose(double(x.double(), task=ids), want.double(), atol=1e-5)
        merged.save(tmp_path / "m")
        again = tm.load(tmp_path / "m", Net())
        assert torch.equal(again(x, task=ids), want)


def _compile_or_skip(model):
    compiled = torch.compile(model)
    try:
        with torch.no_grad():
            compiled(torch.randn(2, 6), task=0)
    except Exception as e:  # no C++ toolchain / inductor backend on this build
        if "Inductor" in type(e).__name__ or "BackendCompilerFailed" in type(e).__name__ \
                or "CppCompileError" in type(e).__name__:
            pytest.skip(f"torch.compile is unavailable here: {type(e).__name__}")
        raise
    return compiled


@pytest.mark.parametrize("build", BUILDS)
def test_torch_compile_matches_eager_and_trains(build):
    merged, _, experts = _merge(build, correction="affine")
    compiled = _compile_or_skip(merged)
    x, ids = torch.randn(6, 6), torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        for t in range(3):
            assert torch.allclose(compiled(x, task=t), merged(x, task=t), atol=1e-5)
        assert torch.allclose(compiled(x, task=ids), merged(x, task=ids), atol=1e-5)
    params = _trainable(merged)
    grads = []
    for model in (compiled, merged):  # the same gradients, compiled or eager
        for p in params:
            p.grad = None
        loss = (model(x, task=ids) - _targets(experts, x, ids)).square().mean()
        for t in (0, 1):  # two tasks' losses, one backward
            loss = loss + (model(x, task=t) - _targets(experts, x, torch.full((6,), t))).square().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in params])
    assert all(g.abs().sum() > 0 for g in grads[0])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_ddp_mixed_batch_steps(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        merged, _, experts = _merge("graph", correction="affine")
        params = _trainable(merged)
        # every task in the batch: no unused parameters, so the default (find_unused_parameters=False)
        model = nn.parallel.DistributedDataParallel(merged)
        opt = torch.optim.SGD(params, lr=0.05)
        x, ids = torch.randn(12, 6), torch.arange(12) % 3
        target = _targets(experts, x + 0.5, ids)
        before = [p.detach().clone() for p in params]
        for _ in range(2):  # a second step: DDP checks that the first one reduced every gradient
            opt.zero_grad()
            (model(x, task=ids) - target).square().mean().backward()
            opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(before, params))
    finally:
        dist.destroy_process_group()
