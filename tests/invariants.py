"""Shared invariant checks for a discovered PermutationSpec (used by the table and hypothesis tests).

Each check states one property of the public contract:

* the spec is well formed (names, sizes, members that exist, axes that fit);
* ``random_perms`` returns valid permutations, deterministically;
* ``tm.permute`` returns a new module computing the same function (eval and train mode), whose
  tensors are re-orderings of the originals, and leaves the original untouched.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

import torchmerge as tm

RTOL, ATOL = 1e-4, 1e-5


# --------------------------------------------------------------------------- small utilities

def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def run(model: nn.Module, x):
    with torch.no_grad():
        return model(*as_tuple(x))


def tensors(model: nn.Module) -> dict:
    """Every parameter and buffer (persistent or not) by qualified name; tied tensors once."""
    out = dict(model.named_parameters())
    out.update(model.named_buffers())
    return out


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}


def assert_state_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: state_dict keys differ: {set(a) ^ set(b)}"
    for k in a:
        assert a[k].shape == b[k].shape, f"{what}: {k} changed shape {a[k].shape} -> {b[k].shape}"
        assert torch.equal(a[k], b[k]), f"{what}: {k} changed"


def assert_close(y, y2, what: str):
    if isinstance(y, (tuple, list)):
        for i, (a, b) in enumerate(zip(y, y2)):
            assert_close(a, b, f"{what}[{i}]")
        return
    assert y.shape == y2.shape, f"{what}: output shape {tuple(y.shape)} != {tuple(y2.shape)}"
    err = (y - y2).abs().max().item() if y.numel() else 0.0
    assert torch.allclose(y, y2, rtol=RTOL, atol=ATOL), f"{what}: outputs differ, max abs err {err:.3g}"


def member_name_axis(member):
    """Members are ``(tensor_name, axis)``; tolerate richer tuples (e.g. with a slice) too."""
    assert isinstance(member, tuple) and len(member) >= 2, f"bad member {member!r}"
    name, axis = member[0], member[1]
    assert isinstance(name, str) and isinstance(axis, int), f"bad member {member!r}"
    return name, axis


def inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return inv


def shift_perms(spec) -> dict:
    """A permutation that moves every index of every group (cyclic shift by one)."""
    return {name: torch.roll(torch.arange(g.size), 1) for name, g in spec.groups.items()}


def _row_multiset(t: torch.Tensor, axis: int) -> list:
    rows = t.detach().movedim(axis, 0).reshape(t.shape[axis], -1).sort(dim=1).values
    return sorted(tuple(r.tolist()) for r in rows)


# --------------------------------------------------------------------------- spec checks

def _is_cat(expr) -> bool:
    return isinstance(expr, tuple) and (expr[0] == "cat" or (
        expr[0] == "prod" and any(_is_cat(e) for e in expr[1])))


def _mentions(expr, gname) -> bool:
    if expr[0] == "g":
        return expr[1] == gname
    return expr[0] in ("prod", "cat") and any(_mentions(e, gname) for e in expr[1])


def notable_frozen(spec) -> list:
    """Frozen spaces other than the routine ones every model has (model input/output axes,
    spatial axes, kernel positions, vocabulary rows)."""
    from torchmerge.spec import ROUTINE
    return [f for f in spec.frozen if f.reason not in ROUTINE]


def check_spec(spec, model: nn.Module):
    """Groups are named, of size > 1, and every member is a real tensor axis that fits the size."""
    named = tensors(model)
    assert isinstance(spec.groups, dict)
    for gname, g in spec.groups.items():
        assert isinstance(gname, str) and gname, f"group name {gname!r}"
        assert isinstance(g.size, int) and g.size > 1, f"group {gname}: size {g.size!r} (must be > 1)"
        assert len(g.members) > 0, f"group {gname} has no members"
        for m in g.members:
            name, axis = member_name_axis(m)
            assert name in named, f"group {gname}: member {name!r} is not a parameter/buffer"
            t = named[name]
            assert -t.dim() <= axis < t.dim(), f"group {gname}: {name} has no axis {axis} (shape {tuple(t.shape)})"
            if _is_cat(getattr(spec, "axes", {}).get((name, axis))):
                # torch.cat / split: the axis is a concatenation of blocks of several groups
                # (DenseNet); divisibility holds per block, not for the whole axis.
                assert _mentions(spec.axes[(name, axis)], gname), f"{gname} not in axis expr of {name}"
                assert spec.axes[(name, axis)][-1] == t.shape[axis], f"{name}: axis expr size mismatch"
                continue
            assert t.shape[axis] % g.size == 0, (
                f"group {gname} (size {g.size}): member {name} axis {axis} has size {t.shape[axis]}")
    assert isinstance(spec.frozen, (list, tuple))
    for f in spec.frozen:
        for attr in ("reason", "op", "module_path", "node", "size", "members"):
            assert hasattr(f, attr), f"FrozenSpace lacks {attr}: {f!r}"
        assert isinstance(f.reason, str) and f.reason
    assert isinstance(str(spec), str) and str(spec)


def check_perms(spec, perms: dict):
    assert set(perms) == set(spec.groups), "random_perms must cover exactly the groups"
    for name, p in perms.items():
        size = spec.groups[name].size
        assert isinstance(p, torch.Tensor) and p.dtype == torch.long, f"{name}: {type(p)} {getattr(p, 'dtype', '')}"
        assert p.shape == (size,), f"{name}: shape {tuple(p.shape)} != ({size},)"
        assert torch.equal(p.sort().values, torch.arange(size)), f"{name}: not a permutation: {p.tolist()}"


def member_tensors(spec) -> dict:
    """{tensor name: {axis: [group names]}}."""
    out: dict = {}
    for gname, g in spec.groups.items():
        for m in g.members:
            name, axis = member_name_axis(m)
            out.setdefault(name, {}).setdefault(axis, []).append(gname)
    return out


# --------------------------------------------------------------------------- permute checks

def check_weights_permuted(model: nn.Module, twin: nn.Module, spec, perms: dict):
    """The twin holds the same tensors, each a re-ordering of the original along member axes;
    tensors in no group are bit-identical; members of a moved group really moved."""
    before, after = tensors(model), tensors(twin)
    assert before.keys() == after.keys(), f"tensor names differ: {set(before) ^ set(after)}"
    members = member_tensors(spec)
    moved = {n for n, p in perms.items() if not torch.equal(p, torch.arange(p.numel()))}
    for name, t in before.items():
        t2 = after[name]
        assert t.shape == t2.shape and t.dtype == t2.dtype, f"{name}: {t.shape}/{t.dtype} -> {t2.shape}/{t2.dtype}"
        if name not in members:
            assert torch.equal(t, t2), f"{name} is in no group but was changed"
            continue
        if t.is_floating_point():
            assert torch.equal(t.flatten().sort().values, t2.flatten().sort().values), (
                f"{name}: values are not a re-ordering of the original")
        for axis, gnames in members[name].items():
            assert _row_multiset(t, axis) == _row_multiset(t2, axis), (
                f"{name}: slices along axis {axis} are not a permutation of the original slices")
        if any(g in moved for gs in members[name].values() for g in gs) and t.numel() > 1:
            assert not torch.equal(t, t2), f"{name}: member of a permuted group but unchanged"


def check_equivalent(model: nn.Module, twin: nn.Module, make_input, spec=None, perms=None, seed=0):
    """Same outputs in eval mode, and in train mode for one forward pass on copies (batch
    statistics); after that train step the twin's buffers are the permuted model's buffers."""
    x = make_input(batch=4, seed=seed)
    m, t = copy.deepcopy(model).eval(), copy.deepcopy(twin).eval()
    assert_close(run(m, x), run(t, x), "eval mode")
    m.train(), t.train()
    assert_close(run(m, x), run(t, x), "train mode")
    if spec is not None:
        m.eval(), t.eval()
        again = tm.permute(m, spec, perms)
        a, b = tensors(again), tensors(t)
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=RTOL, atol=ATOL), (
                f"after one train-mode forward, {k} of the twin != permuted {k} of the model")


def check_case(model: nn.Module, make_input, seeds=(0, 1, 2)):
    """discover + every invariant; returns the spec."""
    x = make_input(batch=4, seed=0)
    before, was_training = snapshot(model), model.training
    spec = tm.discover(model, x)
    assert_state_equal(before, snapshot(model), "discover modified the model")
    assert model.training == was_training, "discover changed model.training"
    check_spec(spec, model)
    for seed in seeds:
        perms = spec.random_perms(seed=seed)
        check_perms(spec, perms)
        twin = tm.permute(model, spec, perms)
        assert twin is not model
        assert_state_equal(before, snapshot(model), "permute modified the model")
        check_weights_permuted(model, twin, spec, perms)
        check_equivalent(model, twin, make_input, spec, perms, seed=seed + 100)
    return spec
