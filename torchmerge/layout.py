"""Channel-space algebra: which indices of which tensor axes must be permuted together.

Every tensor axis the discovery sees is described by a *term*:

* an :class:`Atom` — one permutable space of ``size`` indices (union-find element);
* a :class:`Prod` — an axis that is the row-major product of several terms
  (``flatten`` of ``(C, H, W)``, ``view`` into attention heads ``(h, d)``, grouped convs);
* a :class:`Cat` — an axis that is the concatenation of several terms (``torch.cat``, ``split``).

Unifying two terms says "these axes must see the same permutation". An atom may later be
*refined* into a product or concatenation (e.g. a Linear's output reshaped into heads): the
refinement applies to the whole class, which restricts its permutations to a subgroup that is
still a symmetry. When two terms cannot be matched, every atom in both is *frozen* (never
permuted) with a reason, so discovery is never silently wrong.

Each atom also records its *origins*: ``"param"`` (an axis of a parameter or float buffer),
``"data"`` (an axis the rules made from the inputs: batch, tokens, spatial, broadcast) or
``"unknown"`` (the output of an op without a rule). Origins merge with the classes and pass to the
pieces of a refinement, so :meth:`Spaces.axes` can tell which axis of a value carries channels
(:class:`AxisLayout`, kept in ``node.meta["layout"]`` by the coupling walk) and
:func:`channel_axis` picks the one the build puts a per-channel affine on.

>>> spaces = Spaces()
>>> a, b = spaces.atom(6), spaces.atom(6)
>>> spaces.unify(a, b)
>>> spaces.find(a) is spaces.find(b)
True
>>> h, d = spaces.split(a, (2, 3)).terms      # a is now heads x dims, and so is b
>>> spaces.resolve(b).size
6
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(eq=False)
class Atom:
    """One permutable space; ``definition`` is set when the space is refined into a product/cat."""

    size: int
    parent: "Atom | None" = None
    definition: "Term | None" = None
    frozen: "Reason | None" = None
    origins: frozenset = frozenset()  # "param" / "data" / "unknown" (see the module docstring)

    def __repr__(self) -> str:
        return f"Atom({self.size}, id={id(self) % 10007})"


@dataclass(frozen=True, eq=False)
class Prod:
    """Row-major product of terms: index = Σ_k i_k · stride_k."""

    terms: tuple

    @property
    def size(self) -> int:
        return math.prod(t.size for t in self.terms)


@dataclass(frozen=True, eq=False)
class Cat:
    """Concatenation of terms along one axis."""

    terms: tuple

    @property
    def size(self) -> int:
        return sum(t.size for t in self.terms)


Term = "Atom | Prod | Cat"
UNIT = Prod(())  # an axis of size 1: nothing to permute


@dataclass(frozen=True)
class Reason:
    """Why a space was frozen: the op, the module path and the fx node that forced it."""

    why: str
    op: str = ""
    module_path: str = ""
    node: str = ""


@dataclass
class Spaces:
    """Union-find over atoms with refinement and freezing."""

    atoms: list = field(default_factory=list)

    # -- creation ---------------------------------------------------------------------------
    def atom(self, size: int, frozen: Reason | None = None, origin: str | None = None) -> "Atom | Prod":
        if size == 1:
            return UNIT
        a = Atom(size, frozen=frozen, origins=frozenset((origin,) if origin else ()))
        self.atoms.append(a)
        return a

    def split(self, atom: Atom, sizes, kind=Prod) -> "Prod | Cat":
        """Refine an undefined root atom into a product (or concatenation) of fresh atoms."""
        root = self.find(atom)
        parts = tuple(self.atom(s, frozen=root.frozen) for s in sizes)
        for p in parts:
            if isinstance(p, Atom):
                p.origins = root.origins
        root.definition = kind(parts)
        return root.definition

    # -- union-find -------------------------------------------------------------------------
    def find(self, a: Atom) -> Atom:
        while a.parent is not None:
            if a.parent.parent is not None:
                a.parent = a.parent.parent  # path halving
            a = a.parent
        return a

    def resolve(self, t) -> "Atom | Prod | Cat":
        """Canonical form: atoms replaced by their root's definition, products flattened."""
        if isinstance(t, Atom):
            root = self.find(t)
            return self.resolve(root.definition) if root.definition is not None else root
        terms = [self.resolve(x) for x in t.terms]
        if isinstance(t, Prod):
            flat = []
            for x in terms:
                flat.extend(x.terms if isinstance(x, Prod) else (x,))
            flat = [x for x in flat if x.size != 1]
            return flat[0] if len(flat) == 1 else Prod(tuple(flat))
        terms = [x for x in terms if x.size != 0]
        return terms[0] if len(terms) == 1 else Cat(tuple(terms))

    def leaves(self, t) -> Iterator[Atom]:
        """Root atoms of a term, in index order."""
        r = self.resolve(t)
        if isinstance(r, Atom):
            yield r
        else:
            for x in r.terms:
                yield from self.leaves(x)

    # -- constraints ------------------------------------------------------------------------
    def freeze(self, t, reason: Reason) -> None:
        for leaf in self.leaves(t):
            if leaf.frozen is None:
                leaf.frozen = reason

    def unify(self, t1, t2, reason: Reason | None = None) -> None:
        """Require the axes described by ``t1`` and ``t2`` to be permuted identically."""
        r1, r2 = self.resolve(t1), self.resolve(t2)
        if r1.size != r2.size:
            raise RuntimeError(f"internal: unify sizes {r1.size} != {r2.size}")
        if r1 is r2 or r1.size == 1:
            return
        if isinstance(r1, Atom) and isinstance(r2, Atom):
            self._union(r1, r2)
        elif isinstance(r1, Atom) or isinstance(r2, Atom):
            atom, term = (r1, r2) if isinstance(r1, Atom) else (r2, r1)
            self._define(atom, term, reason)
        elif isinstance(r1, Prod) and isinstance(r2, Prod):
            self._unify_products(list(r1.terms), list(r2.terms), reason)
        elif isinstance(r1, Cat) and isinstance(r2, Cat) and _sizes(r1) == _sizes(r2):
            for x, y in zip(r1.terms, r2.terms):
                self.unify(x, y, reason)
        else:
            self._give_up(r1, r2, reason)

    def _union(self, a: Atom, b: Atom) -> None:
        b.parent = a
        a.frozen = a.frozen or b.frozen
        a.origins = a.origins | b.origins

    def _define(self, atom: Atom, term, reason) -> None:
        if any(leaf is atom for leaf in self.leaves(term)):
            self._give_up(atom, term, reason)  # x ~ (x, y): no finite refinement exists
            return
        for leaf in self.leaves(term):
            leaf.origins = leaf.origins | atom.origins
        if atom.frozen is not None:
            self.freeze(term, atom.frozen)
        atom.definition = term

    def _unify_products(self, xs: list, ys: list, reason) -> None:
        """Match two factor lists left to right, splitting atoms where sizes divide."""
        while xs and ys:
            x, y = self.resolve(xs.pop(0)), self.resolve(ys.pop(0))
            if x.size == y.size:
                self.unify(x, y, reason)
                continue
            big, small, rest = (x, y, xs) if x.size > y.size else (y, x, ys)
            if not isinstance(big, Atom) or big.size % small.size:
                self._give_up(Prod((x, *xs)), Prod((y, *ys)), reason)
                return
            head, tail = self.split(big, (small.size, big.size // small.size)).terms
            self.unify(head, small, reason)
            rest.insert(0, tail)

    def _give_up(self, t1, t2, reason: Reason | None) -> None:
        reason = reason or Reason("axes with incompatible block structure")
        self.freeze(t1, reason)
        self.freeze(t2, reason)


def _sizes(t) -> tuple:
    return tuple(x.size for x in t.terms)


# ---------------------------------------------------------------------------------------------
# layouts of values: which axis carries channels


@dataclass(frozen=True)
class AxisLayout:
    """What one tensor axis carries, as the coupling walk saw it.

    ``kind``: ``"channel"`` (only parameter spaces: a Linear's features, a conv's channels, a
    concatenation of them, attention heads merged back into features), ``"data"`` (batch, tokens,
    spatial positions), ``"mixed"`` (channels laid out with data, or a space that is both: a
    flattened ``C·H·W``, a conv's channels before a pixel shuffle, a model input's features,
    tokens a position parameter is added to), ``"unit"`` (size 1) or ``"unknown"`` (anything
    else, e.g. made by an op without a rule). ``spaces``: ids of the root spaces in index order
    (equal ids: the same space, within one walk); ``frozen``: never permuted.
    """

    kind: str
    size: int
    spaces: tuple = ()
    frozen: bool = False

    def __repr__(self) -> str:
        return f"{self.kind} {self.size}"


def _kind(origins: frozenset) -> str:
    p, d = "param" in origins, "data" in origins
    return "mixed" if p and d else "channel" if p else "data" if d else "unknown"


def axes_of(spaces: Spaces, terms, ids: dict) -> tuple:
    """The :class:`AxisLayout` of each term of a tensor value; ``ids`` numbers root spaces.

    >>> s = Spaces()
    >>> batch, feat = s.atom(2, Reason("model input"), "data"), s.atom(6, origin="param")
    >>> heads = s.split(feat, (2, 3))          # the features viewed as 2 heads x 3 dims
    >>> axes_of(s, [batch, heads], {}), channel_axis(axes_of(s, [batch, heads.terms[0], heads.terms[1]], {}))
    ((data 2, channel 6), None)
    """
    out = []
    for t in terms:
        leaves = list(spaces.leaves(t))
        size = spaces.resolve(t).size
        kinds = {_kind(leaf.origins) for leaf in leaves}
        kind = "unit" if size == 1 else kinds.pop() if len(kinds) == 1 else \
            "unknown" if "unknown" in kinds else "mixed"
        out.append(AxisLayout(kind, size, tuple(ids.setdefault(id(leaf), len(ids)) for leaf in leaves),
                              bool(leaves) and all(leaf.frozen is not None for leaf in leaves)))
    return tuple(out)


def channel_axis(layout, prefer: "int | None" = None) -> "int | None":
    """The (negative) axis that carries channels: ``prefer`` (the axis the producing layer
    defines, e.g. -1 after a Linear) where that axis carries channels, else the one ``"channel"``
    axis, else the one ``"mixed"`` axis; None where there is none or several
    (e.g. ``[B, heads, T, head_dim]`` before the heads are merged).

    >>> c, d, m = AxisLayout("channel", 4), AxisLayout("data", 4), AxisLayout("mixed", 8)
    >>> channel_axis((d, c, d, d)), channel_axis((d, d, m)), channel_axis((d, c, c)), channel_axis((d, c, c), -1)
    (-3, -1, None, -1)
    """
    n = len(layout)
    if prefer is not None and -n <= prefer < n and layout[prefer].kind in ("channel", "mixed"):
        return prefer % n - n
    for kind in ("channel", "mixed"):
        found = [i - n for i, a in enumerate(layout) if a.kind == kind]
        if found:
            return found[0] if len(found) == 1 else None
    return None
