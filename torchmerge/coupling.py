"""Walk an fx graph and couple tensor axes that must share one permutation.

Each fx node gets a *value*: a list of layout terms (one per tensor axis, see :mod:`layout`), a
tuple of values for tuple outputs, or ``None`` for non-tensors. Rules in :mod:`rules` say how an
op maps its inputs' terms to its output's terms and which terms it unifies; an op without a rule
freezes every space it touches. Model inputs and outputs are frozen. After the walk each
tensor-valued node holds its :class:`~torchmerge.layout.AxisLayout` tuple in ``node.meta["layout"]``
(which axis carries channels), which the build reads to place per-channel affines.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from .layout import UNIT, Reason, Spaces, axes_of
from .trace import module_path


class Lazy:
    """A value whose spaces are frozen only if something consumes it (e.g. argmax indices)."""

    def __init__(self, layout, freeze_terms, why):
        self.layout, self.freeze_terms, self.why = layout, freeze_terms, why


class Ctx:
    """What a rule sees: the node, the values of its inputs, shapes and parameter layouts."""

    def __init__(self, walker: "Walker", node: fx.Node):
        self.w, self.node, self.spaces = walker, node, walker.spaces

    def reason(self, why: str) -> Reason:
        t = self.node.target
        op = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        if self.node.op == "call_module":
            op = type(self.w.gm.get_submodule(t)).__name__
        return Reason(why, op=op, module_path=module_path(self.node), node=self.node.name)

    def val(self, a):
        v = self.w.env.get(a) if isinstance(a, fx.Node) else None
        if isinstance(v, Lazy):
            for t in v.freeze_terms:
                self.spaces.freeze(t, self.reason(v.why))
            return v.layout
        return v

    @staticmethod
    def shape(a):
        return a.meta.get("shape") if isinstance(a, fx.Node) else None

    @property
    def out_shape(self):
        return self.node.meta.get("shape")

    def unify(self, t1, t2, why="shared channel space") -> None:
        self.spaces.unify(t1, t2, self.reason(f"cannot match block structure ({why})"))

    def freeze(self, terms, why: str) -> None:
        for t in terms:
            self.spaces.freeze(t, self.reason(why))

    def fixed(self, size: int, why="axis not derived from parameters", origin="data"):
        return self.spaces.atom(size, frozen=self.reason(why), origin=origin)

    def fixed_like(self, shape, why="axis not derived from parameters", origin="data"):
        """Frozen value for an output of ``shape`` (a tensor shape tuple, or a list for containers)."""
        if isinstance(shape, tuple):
            return [self.fixed(s, why, origin) for s in shape]
        if isinstance(shape, list):
            return tuple(self.fixed_like(s, why, origin) for s in shape)
        return None

    def param(self, qualname: str) -> list:
        return self.w.param_layout(qualname)

    def module_params(self, path: str, names) -> list:
        m = self.w.gm.get_submodule(path)
        return [self.param(f"{path}.{n}") if getattr(m, n, None) is not None else None for n in names]


def tensor_terms(value) -> list:
    """Every term inside a value (for freezing)."""
    if value is None:
        return []
    if isinstance(value, Lazy):
        return tensor_terms(value.layout)
    if isinstance(value, list):
        return list(value)
    return [t for v in value for t in tensor_terms(v)]


def _nodes_in(args) -> list:
    found = []
    fx.node.map_arg(args, found.append)
    return found


class Walker:
    """Runs the rules over a traced graph, building the union-find of spaces."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module, leaf_modules=()):
        from . import rules  # circular: rules use Ctx

        self.rules = rules
        self.gm, self.model, self.spaces = gm, model, Spaces()
        self.env: dict = {}
        self.params: dict = {}  # canonical name -> list of terms (creation order = graph order)
        self.canonical = _canonical_names(model)
        self.user_leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.user_leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
        self.sliced: list = []  # (term, kept?, reason): pieces slices kept or dropped

    def param_layout(self, qualname: str) -> list:
        tensor = _get_tensor(self.model, qualname)
        name = self.canonical.get(id(tensor), qualname)
        if name not in self.params:
            # integer tensors hold indices (position ids, masks): their order is data, never permuted
            frozen = None if tensor.is_floating_point() or tensor.is_complex() else Reason(
                "integer tensor (indices or counts)", op=str(tensor.dtype), module_path=name)
            origin = "data" if frozen else "param"
            self.params[name] = [self.spaces.atom(s, frozen=frozen, origin=origin) for s in tensor.shape]
        return self.params[name]

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            c = Ctx(self, node)
            try:
                value = self.rules.apply(c)
            except _Unsupported as e:
                value = self.fallback(c, str(e))
            if not _fits(self.spaces, value, node.meta.get("shape")):
                value = self.fallback(c, "rule produced a layout that does not fit the output shape")
            self.env[node] = value
        self._freeze_dropped()
        self._record_layouts()

    def _record_layouts(self) -> None:
        """``node.meta["layout"]``: the AxisLayout of each axis of every tensor-valued node."""
        ids: dict = {}
        for node, value in self.env.items():
            value = value.layout if isinstance(value, Lazy) else value
            if isinstance(value, list):
                node.meta["layout"] = axes_of(self.spaces, value, ids)

    def _freeze_dropped(self) -> None:
        """Freeze what slices dropped and no slice kept (see rules.slice_piece)."""
        kept = {id(self.spaces.find(a)) for t, k, _ in self.sliced if k for a in self.spaces.leaves(t)}
        for term, k, reason in self.sliced:
            if not k and not any(id(self.spaces.find(a)) in kept for a in self.spaces.leaves(term)):
                self.spaces.freeze(term, reason)

    def fallback(self, c: Ctx, why: str):
        """Freeze everything an unknown op touches; its output axes are fixed."""
        touched = [self.env.get(n) for n in _nodes_in((c.node.args, c.node.kwargs))]
        if c.node.op == "call_module":
            m = self.gm.get_submodule(c.node.target)
            for name, _ in list(m.named_parameters()) + list(m.named_buffers()):
                touched.append(self.param_layout(f"{c.node.target}.{name}"))
        for v in touched:
            c.freeze(tensor_terms(v), why)
        return c.fixed_like(c.out_shape, why, origin="unknown")


class _Unsupported(Exception):
    """Raised by rules for inputs they do not handle; the walker then freezes (never guesses)."""


def unsupported(why: str):
    raise _Unsupported(why)


def _fits(spaces, value, shape) -> bool:
    if value is None or isinstance(value, Lazy):
        return True
    if isinstance(value, list):
        return isinstance(shape, tuple) and len(shape) == len(value) and all(
            spaces.resolve(t).size == s for t, s in zip(value, shape))
    return isinstance(shape, list) and len(shape) == len(value) and all(
        _fits(spaces, v, s) for v, s in zip(value, shape))


def _canonical_names(model: nn.Module) -> dict:
    names = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        names.setdefault(id(t), name)
    return names


def _get_tensor(model: nn.Module, qualname: str) -> torch.Tensor:
    obj = model
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["Ctx", "Walker", "Lazy", "UNIT", "unsupported", "tensor_terms"]
