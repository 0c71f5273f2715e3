"""The merged model: rewriter, TaskHeads, TaskAffine, set_task, export, save/load, training.

Every architecture of the discovery table goes through the same invariants: identity affines
change nothing, ``export(t)`` equals the task-conditioned model with random affines, a mixed-task
batch equals the per-task runs stacked.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import torchmerge as tm
from merge_helpers import TABLE, check_mixed_batch, plain_average as _plain_merge
from merge_helpers import task_vector_experts
from merge_helpers import inputs_of as _inputs, randomize_sites as _randomize_sites
from architectures import BY_NAME, randomize_

# heads that auto-detection cannot place (the head is a bare parameter, or the output is the
# residual stream itself): covered by the bad-input tests below instead


def _experts(case, n=2):
    """n experts of one architecture, different weights (and BatchNorm statistics)."""
    base = case.make_model()
    out = [base]
    for i in range(1, n):
        other = copy.deepcopy(base)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(i)
            buffers = [b for n, b in other.named_buffers() if b.is_floating_point()
                       and not n.endswith("mask")]  # causal masks are structural
            for t in list(other.parameters()) + buffers:
                t.add_(0.1 * torch.randn(t.shape, generator=gen)).abs_() if t.dim() == 1 and \
                    t.min() > 0 else t.add_(0.1 * torch.randn(t.shape, generator=gen))
        out.append(other)
    return out


def _merged(case, experts=None, **kw):
    experts = experts or _experts(case)
    kw = {"method": "average", "align": None, "correction": None, **kw}
    return tm.merge(experts, example_inputs=_inputs(case), **kw).eval(), experts


def _close(a, b, atol=1e-5):
    if isinstance(a, (tuple, list)):
        return all(_close(x, y, atol) for x, y in zip(a, b))
    return torch.allclose(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("rank", [0, 2], ids=["affine", "low_rank"])
@pytest.mark.parametrize("case", TABLE, ids=str)
def test_merged_model_invariants(case, rank):
    """Identity affines = the plain merge; export(t) = task t; mixed batch = per-task runs — with
    per-channel affines, and with low-rank maps at the sites too (``rank``)."""
    merged, experts = _merged(case)
    x = _inputs(case)
    with torch.no_grad():
        assert _close(merged(*x, task=1), _plain_merge(merged, experts, task=1)(*x))
        _randomize_sites(merged, rank=rank)
        for t in range(merged.num_tasks):
            exported = merged.export(task=t).eval()
            assert not any(isinstance(m, (tm.TaskAffine, tm.TaskHeads)) for m in exported.modules())
            assert _close(exported(*x), merged(*x, task=t))
            if any(isinstance(m, tm.ChannelAffine) for m in exported.modules()):
                with pytest.raises(tm.TorchMergeError, match="follow no foldable layer"):
                    merged.export(task=t, like=experts[t])
            else:  # the same model as an instance of the expert's own class
                own = merged.export(task=t, like=experts[t]).eval()
                assert type(own) is type(experts[t]) and own is not experts[t]
                assert _close(own(*x), merged(*x, task=t))
        check_mixed_batch(merged, case, _close)


def test_exported_folds_conv_bn_chain():
    """resnet: the affine after each BatchNorm is folded away (no ChannelAffine is left)."""
    merged, _ = _merged(BY_NAME["resnet_basic"])
    _randomize_sites(merged)
    exported = merged.export(task=0)
    assert not any(isinstance(m, tm.ChannelAffine) for m in exported.modules())
    assert sum(p.numel() for p in exported.parameters()) == \
        sum(p.numel() for p in BY_NAME["resnet_basic"].make_model().parameters())


def test_export_like_expert_adds_folded_biases_and_checks_shapes():
    """export(like=expert): the expert's own class; a shift folded into a bias-free conv becomes a
    new bias of the copy; an expert with another head size or a non-module is refused."""
    def net(classes, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, classes)).eval()
    experts = [net(3, 0), net(5, 1)]
    merged = tm.merge(experts, example_inputs=(torch.randn(2, 3, 6, 6),), method="average",
                      align=None, correction=None).eval()
    _randomize_sites(merged)
    x = torch.randn(4, 3, 6, 6)
    own = merged.export(task=1, like=experts[1])
    assert isinstance(own, nn.Sequential) and own[0].bias is not None and experts[1][0].bias is None
    with torch.no_grad():
        assert _close(own(x), merged(x, task=1))
    with pytest.raises(tm.TorchMergeError, match=r"'3.weight' \(5, 64\) has no counterpart .*shape \(3, 64\)"):
        merged.export(task=1, like=experts[0])
    with pytest.raises(tm.TorchMergeError, match="takes an expert module"):
        merged.export(task=0, like=experts[0].state_dict())


def test_fold_affine_keeps_function():
    layers = [nn.Linear(5, 4), nn.Conv2d(3, 4, 3), nn.Conv1d(3, 4, 1, bias=False),
              nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4)]
    inputs = [torch.randn(2, 5), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 7), torch.randn(2, 3, 4, 4),
              torch.randn(2, 4, 3, 3), torch.randn(2, 6, 4), torch.randn(2, 4, 5)]
    axes = [-1, 1, 1, 1, 1, -1, 1]
    for layer, x, axis in zip(layers, inputs, axes):
        layer = layer.eval()
        scale, shift = torch.rand(4) + 0.5, torch.randn(4)
        shape = [1] * x.dim()
        shape[axis] = 4
        want = layer(x) * scale.view(shape) + shift.view(shape)
        folded = copy.deepcopy(layer)
        assert tm.rewrite.fold_affine(folded, scale, shift)
        assert torch.allclose(folded(x), want, atol=1e-5), type(layer).__name__


def test_tied_weights_are_not_folded():
    case = BY_NAME["tied_head_lm"]
    merged, _ = _merged(case, heads=[])
    _randomize_sites(merged)
    x = _inputs(case)
    with torch.no_grad():
        assert _close(merged.export(0)(*x), merged(*x, task=0))


def test_set_task_context_manager_and_names():
    merged, _ = _merged(BY_NAME["mlp"], task_names=["digits", "letters"])
    _randomize_sites(merged)
    x = _inputs(BY_NAME["mlp"])
    with torch.no_grad():
        merged.set_task("letters")
        y1 = merged(*x)
        assert torch.equal(y1, merged(*x, task=1))
        with merged.task("digits"):
            assert torch.equal(merged(*x), merged(*x, task=0))
        assert merged.active_task == 1
    assert "digits" in repr(merged) and "sites=" in repr(merged)


def test_heads_of_different_sizes_and_mixed_batch_error():
    from zoo_ops import MLP
    experts = [randomize_(MLP(num_classes=k), seed=k) for k in (3, 5)]
    merged = tm.merge(experts, method="average", example_inputs=torch.randn(2, 8), align=None,
                      correction=None)
    assert merged(torch.randn(2, 8), task=0).shape == (2, 3)
    assert merged(torch.randn(2, 8), task=1).shape == (2, 5)
    with pytest.raises(tm.TorchMergeError, match="equal output shapes"):
        merged(torch.randn(2, 8), task=torch.tensor([0, 1]))
    assert merged(torch.randn(2, 8), task=torch.tensor([1, 1])).shape == (2, 5)


@pytest.mark.parametrize("task, match", [
    (5, "out of range"), ("nope", "unknown task"), (torch.tensor([0, 1, 0]), "entries but the batch"),
    (torch.tensor([[0, 1, 0, 1]]), "1-D LongTensor"), (torch.tensor([0.0, 1, 0, 1]), "1-D LongTensor"),
    (-1, "out of range"), (1.5, "int or a 1-D"),
])
def test_bad_task_ids(task, match):
    merged, _ = _merged(BY_NAME["mlp"])
    with pytest.raises(tm.TorchMergeError, match=match):
        merged(*_inputs(BY_NAME["mlp"]), task=task)


def test_bad_heads():
    case = BY_NAME["functional_params"]
    with pytest.raises(tm.TorchMergeError, match="not inside a module"):
        _merged(case)
    with pytest.raises(tm.TorchMergeError, match="unknown head modules"):
        _merged(BY_NAME["mlp"], heads=["nope"])


def test_state_dict_round_trip_and_deepcopy():
    case = BY_NAME["vit"]
    merged, experts = _merged(case)
    _randomize_sites(merged)
    x = _inputs(case)
    buffer = io.BytesIO()
    torch.save(merged.state_dict(), buffer)
    fresh, _ = _merged(case, experts=experts)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    with torch.no_grad():
        for t in range(2):
            assert torch.equal(fresh(*x, task=t), merged(*x, task=t))
            assert torch.equal(copy.deepcopy(merged)(*x, task=t), merged(*x, task=t))


def test_to_dtype_follows():
    merged, _ = _merged(BY_NAME["mlp"])
    merged = merged.to(torch.float64)
    assert merged(torch.randn(2, 8, dtype=torch.float64), task=1).dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in merged.task_parameters())


def test_training_step_changes_only_task_parameters():
    case = BY_NAME["resnet_basic"]
    merged, _ = _merged(case)
    merged.train()
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    trainable = list(merged.task_parameters())
    for p in merged.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.SGD(trainable, lr=0.1)
    out = merged(*_inputs(case), task=torch.tensor([0, 1, 0, 1]))
    out.square().mean().backward()
    opt.step()
    trainable_ids = {id(p) for p in trainable}
    names = {n for n, p in merged.named_parameters() if id(p) in trainable_ids}
    after = merged.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    changed_params = {k for k in changed if k in dict(merged.named_parameters())}
    assert changed_params and changed_params <= names
    assert all(k.startswith(("body.sites.", "body.fc.")) for k in changed_params)


TALL_LAM = 0.5


def tall_setup(case, n=3):
    """A real base θ₀ and n experts θ₀ + τ_t with different random τ_t (so TALL masks differ)."""
    torch.manual_seed(0)
    base = case.make_model().eval()
    experts = task_vector_experts(base, n)
    return base, experts


def tall_reference(base, experts, t, lam=TALL_LAM, head="head."):
    """Task t's model computed here: a plain copy of expert t holding θ₀ + m_t ∘ τ_MTL (own head)."""
    theta0, out = base.state_dict(), copy.deepcopy(experts[t])
    state = out.state_dict()
    for name, p0 in theta0.items():
        if name.startswith(head) or not p0.is_floating_point():
            continue
        taus = [e.state_dict()[name] - p0 for e in experts]
        mtl = sum(taus)
        mask = taus[t].abs() >= lam * (mtl - taus[t]).abs()
        state[name] = p0 + mask * mtl
    out.load_state_dict(state)
    return out.eval()


def test_tall_weights_switch_with_task():
    """Each task computes θ₀ + m_t∘τ_MTL (checked against a plain model); tasks really differ."""
    case = BY_NAME["mlp"]
    base, experts = tall_setup(case)
    merged, _ = _merged(case, experts=experts, method="tall", base=base, lam=TALL_LAM)
    x = _inputs(case)
    with torch.no_grad():
        per_task = [merged(*x, task=t) for t in range(3)]
        refs = [tall_reference(base, experts, t)(*x) for t in range(3)]
        mixed = merged(*x, task=torch.tensor([2, 0, 1, 2]))
    for t in range(3):
        assert torch.allclose(per_task[t], refs[t], atol=1e-5), t
    bodies = [tall_reference(base, experts, t).fc1.weight for t in range(3)]
    assert not torch.equal(bodies[0], bodies[1]) and not torch.equal(bodies[1], bodies[2])  # masks differ
    assert not torch.allclose(per_task[0], per_task[1], atol=1e-3)
    for i, t in enumerate([2, 0, 1, 2]):
        assert torch.allclose(mixed[i], per_task[t][i], atol=1e-6)
    assert merged.task_weights is not None and merged.task_weights.num_tasks == 3


def test_experts_are_untouched():
    case = BY_NAME["resnet_basic"]
    experts = _experts(case)
    before = [copy.deepcopy(e.state_dict()) for e in experts]
    data = [[_inputs(case, 8, s)[0] for s in range(2)] for _ in experts]
    tm.merge(experts, method="ties", data=data, align="weight", correction="affine")
    for e, b in zip(experts, before):
        assert all(torch.equal(v, b[k]) for k, v in e.state_dict().items())


@pytest.mark.slow
def test_torch_compile_preserves_outputs():
    case = BY_NAME["mlp"]
    merged, _ = _merged(case)
    _randomize_sites(merged)
    x = _inputs(case)
    compiled = torch.compile(merged)
    with torch.no_grad():
        assert torch.allclose(compiled(*x, task=1), merged(*x, task=1), atol=1e-5)
        ids = torch.tensor([0, 1, 1, 0])
        assert torch.allclose(compiled(*x, task=ids), merged(*x, task=ids), atol=1e-5)


def test_absorbed_batchnorm_fused_equals_two_steps():
    """Sites after a BatchNorm own its call; the fused batch_norm equals norm then affine."""
    case = BY_NAME["resnet_basic"]
    merged, _ = _merged(case)
    _randomize_sites(merged)
    absorbed = [s for s in merged.sites().values() if s.norm_path is not None]
    assert absorbed
    x = _inputs(case)
    with torch.no_grad():
        fused = merged(*x, task=1)
        for s in absorbed:
            s.fuse = False
        assert torch.allclose(merged(*x, task=1), fused, atol=1e-5)
