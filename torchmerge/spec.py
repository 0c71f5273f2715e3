"""PermutationSpec: which (parameter, axis) pairs share a permutation, as frozen plain data.

An axis is described by a small expression: ``("g", name, size)`` — permuted by group ``name``;
``("fixed", size)``; ``("prod", parts, size)`` — row-major product (flatten, attention heads,
grouped convs); ``("cat", parts, size)`` — concatenation (``torch.cat`` / ``split``).
Permuting sets ``W' = W.index_select(axis, index(expr))`` on every member, so every tensor in a
space is re-indexed identically and the model's function is unchanged.

>>> import torch, torchmerge as tm
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> spec = tm.discover(net, torch.randn(4, 3))
>>> list(spec.groups), spec.groups["0.weight:0"].size
(['0.weight:0'], 8)
>>> twin = tm.permute(net, spec, spec.random_perms(seed=0))
>>> torch.allclose(twin(torch.ones(1, 3)), net(torch.ones(1, 3)), atol=1e-6)
True
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SpecError


@dataclass(frozen=True)
class Group:
    """One permutable space: ``members`` are the (parameter or buffer name, axis) pairs it acts on."""

    name: str
    size: int
    members: tuple


@dataclass(frozen=True)
class FrozenSpace:
    """A space discovery could not prove safe to permute, and why (op, module path, fx node)."""

    reason: str
    op: str
    module_path: str
    node: str
    size: int
    members: tuple


@dataclass(frozen=True)
class Probe:
    """A module output where a group is visible: ``axis`` (negative, from the end) has ``expr``."""

    module_path: str
    axis: int
    expr: tuple


@dataclass(frozen=True)
class PermutationSpec:
    """Result of :func:`torchmerge.discover`; see the module docstring for the axis expressions."""

    groups: dict
    axes: dict  # (param name, axis) -> expression
    frozen: tuple = ()
    unused: tuple = field(default=())  # parameters the trace never touched (left as they are)
    probes: dict = field(default_factory=dict)  # group -> module outputs where it is observable

    @property
    def heads(self) -> tuple:
        """Parameters touching the model's output axes (task heads): never matched or merged."""
        names = [p for f in self.frozen if f.reason == "model output" for p, _ in f.members]
        return tuple(dict.fromkeys(names))

    def members_of(self, group: str) -> list:
        """(param, axis, expr) for every axis on which ``group`` acts."""
        return [(p, a, e) for (p, a), e in self.axes.items() if group in _names(e)]

    def positions(self, expr, group: str, perms: dict):
        """Indices along an axis for each element of ``group``: LongTensor [group size, k].

        Row i lists the axis positions that element i of the group occupies (the other factors
        of a product permuted by ``perms``); ``None`` if the group is not on this axis.
        """
        kind = expr[0]
        if kind == "g":
            return torch.arange(expr[2])[:, None] if expr[1] == group else None
        if kind == "fixed":
            return None
        offset = 0
        for j, part in enumerate(expr[1]):
            inner = self.positions(part, group, perms)
            if inner is not None:
                break
            offset += part[-1]
        else:
            return None
        if kind == "cat":
            return inner + offset
        parts = expr[1]
        before = math.prod(p[-1] for p in parts[:j])
        after = math.prod(p[-1] for p in parts[j + 1:])
        lead = self.index(("prod", parts[:j], before), perms)
        tail = self.index(("prod", parts[j + 1:], after), perms)
        # position = lead * (this part's size * after) + inner * after + tail, for every combination
        pos = (lead[None, :, None, None] * (part[-1] * after) + inner[:, None, :, None] * after
               + tail[None, None, None, :])
        return pos.reshape(inner.shape[0], -1)

    def random_perms(self, seed: int = 0) -> dict:
        """A uniformly random permutation for every group, reproducible from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        return {name: torch.randperm(g.size, generator=gen) for name, g in self.groups.items()}

    def identity_perms(self) -> dict:
        return {name: torch.arange(g.size) for name, g in self.groups.items()}

    def index(self, expr, perms: dict) -> torch.Tensor:
        """The index vector that permutes one axis described by ``expr``."""
        kind = expr[0]
        if kind == "g":
            p = perms.get(expr[1])
            return p if p is not None else torch.arange(expr[2])
        if kind == "fixed":
            return torch.arange(expr[1])
        parts = [self.index(e, perms) for e in expr[1]]
        if kind == "cat":
            offsets = torch.tensor([0] + [e[-1] for e in expr[1]]).cumsum(0)
            return torch.cat([p + o for p, o in zip(parts, offsets)])
        if not parts:
            return torch.zeros(1, dtype=torch.long)
        idx = parts[0]
        for e, p in zip(expr[1][1:], parts[1:]):
            idx = (idx[:, None] * e[-1] + p[None, :]).reshape(-1)
        return idx

    def check_perms(self, perms: dict) -> dict:
        """Validate user permutations; return them as CPU LongTensors."""
        if not isinstance(perms, dict):
            raise SpecError(f"perms must be a dict {{group name: permutation}}, got {type(perms).__name__}")
        out = {}
        for name, p in perms.items():
            if name not in self.groups:
                raise SpecError(f"unknown group {name!r}; valid groups: {sorted(self.groups)}")
            size = self.groups[name].size
            p = torch.as_tensor(p).reshape(-1) if not isinstance(p, torch.Tensor) else p
            ok = p.dim() == 1 and p.numel() == size and not p.is_floating_point()
            if not ok or not torch.equal(p.sort().values.cpu(), torch.arange(size)):
                raise SpecError(
                    f"perms[{name!r}] must be a permutation of range({size}) (1-D integer tensor), "
                    f"got shape {tuple(p.shape)} dtype {p.dtype}")
            out[name] = p.long().cpu()
        return out

    def __str__(self) -> str:
        lines = [f"PermutationSpec: {len(self.groups)} groups, {len(self.frozen)} frozen spaces"]
        for g in self.groups.values():
            lines.append(f"  group {g.name:<40} size {g.size:<6} {_members(g.members)}")
        routine = [f for f in self.frozen if f.reason in ROUTINE]
        if routine:
            lines.append(f"  frozen (routine: {', '.join(sorted({f.reason for f in routine}))}): "
                         f"{len(routine)} spaces")
        for f in self.frozen:
            if f.reason in ROUTINE:
                continue
            where = f"module '{f.module_path}'" if f.module_path else "model"
            lines.append(f"  frozen size {f.size:<5} {f.reason} [{f.op} at {where}, node {f.node}] "
                         f"{_members(f.members)}")
        if self.unused:
            lines.append(f"  unused in the trace (left as is): {', '.join(self.unused[:6])}"
                         + (" ..." if len(self.unused) > 6 else ""))
        return "\n".join(lines)

    __repr__ = __str__


# Positional axes every such model has; reported in one line by __str__.
ROUTINE = frozenset({"model input", "model output", "spatial axis", "convolution kernel positions",
                     "embedding rows are indexed by input ids", "sub-pixel position", "stack index"})


def _names(e) -> list:
    if e[0] == "g":
        return [e[1]]
    return [] if e[0] == "fixed" else [n for part in e[1] for n in _names(part)]


def _members(members, limit=4) -> str:
    text = ", ".join(f"{p}[{a}]" for p, a in members[:limit])
    return text + (f", ... ({len(members)} in all)" if len(members) > limit else "")


def permute_state_dict(state: dict, spec: PermutationSpec, perms: dict) -> dict:
    """Permuted copy of a state dict (tensors re-indexed along every spec'd axis)."""
    if not isinstance(spec, PermutationSpec):
        raise SpecError(f"expected a PermutationSpec from tm.discover, got {type(spec).__name__}")
    perms = spec.check_perms(perms)
    out = dict(state)
    for (name, axis), expr in spec.axes.items():
        if name not in out:
            raise SpecError(f"spec member {name!r} is not in the state dict; was the spec discovered "
                            "on a model with the same parameter names?")
        t = out[name]
        if t.shape[axis] != expr[-1]:
            raise SpecError(f"{name} has size {t.shape[axis]} on axis {axis}, spec expects {expr[-1]}")
        out[name] = t.index_select(axis, spec.index(expr, perms).to(t.device))
    return out


def permute(model: nn.Module, spec: PermutationSpec, perms: dict) -> nn.Module:
    """A new module with every spec'd axis permuted; it computes the same function.

    >>> import torch, torchmerge as tm
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> spec = tm.discover(net, torch.randn(3, 2))
    >>> twin = tm.permute(net, spec, {"0.weight:0": torch.tensor([3, 2, 1, 0])})
    >>> torch.equal(twin[0].weight, net[0].weight.flip(0))
    True
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(spec, PermutationSpec):
        raise SpecError(f"expected a PermutationSpec from tm.discover, got {type(spec).__name__}")
    perms = spec.check_perms(perms)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    permuted: dict = {}
    for (name, axis), expr in spec.axes.items():
        if name not in tensors:
            raise SpecError(f"spec member {name!r} is not a parameter or buffer of "
                            f"{type(model).__name__}; discover the spec on this model")
        t = permuted.get(name, tensors[name].detach())
        if t.shape[axis] != expr[-1]:
            raise SpecError(f"{name} has size {t.shape[axis]} on axis {axis}, spec expects {expr[-1]}")
        permuted[name] = t.index_select(axis, spec.index(expr, perms).to(t.device))
    # deepcopy with the permuted tensors pre-seeded in its memo: each tensor is copied once
    memo = {}
    for name, t in permuted.items():
        orig = tensors[name]
        memo[id(orig)] = nn.Parameter(t, orig.requires_grad) if isinstance(orig, nn.Parameter) else t
    return copy.deepcopy(model, memo)
