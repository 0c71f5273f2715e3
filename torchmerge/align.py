"""Align experts by permutation: Git Re-Basin weight matching and activation matching.

Both methods maximise a sum of per-group linear objectives by coordinate ascent: visit the groups
in a seeded random order, build the group's score matrix ``A[i, j]`` (how well element ``i`` of the
reference matches element ``j`` of the other model, with every other group's current permutation
applied) and solve the linear assignment problem. A group whose neighbours did not change since
its last solve is skipped: its answer would be the same. Expensive score terms are kept between
visits and updated only in the columns whose permutation moved. Groups that share no parameter
and come next to each other in the order are solved in parallel threads: the same answer, sooner.
Task heads never take part.

>>> import torch, torchmerge as tm
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> spec = tm.discover(net, torch.randn(2, 4))
>>> shuffled = tm.permute(net, spec, spec.random_perms(seed=5))
>>> perms = tm.align(net, shuffled, spec)
>>> torch.equal(tm.permute(shuffled, spec, perms)[0].weight, net[0].weight)
True
"""
from __future__ import annotations

import math
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .errors import TorchMergeError
from .progress import bar, scoped, stage
from .spec import PermutationSpec, _names


_LARGE_GROUP = 256  # groups this size or larger bound a wave of parallel solves (see sweep)
_KEEP_MIN_FLOPS = 2**28  # score terms at least this costly (and no larger than their operands) are kept


class _Kept(NamedTuple):
    """A kept score term: the permutations its rows were gathered by, its column index, Rg·Ogᵀ."""

    rows_by: tuple
    index: torch.Tensor
    term: torch.Tensor


@dataclass
class AlignResult:
    """Permutations for the other model, the objective after each sweep, per-group sources, and
    whether coordinate ascent converged (a sweep changed nothing) within ``max_iter`` sweeps."""

    perms: dict
    objective: list = field(default_factory=list)
    sweeps: int = 0
    sources: dict = field(default_factory=dict)  # group -> "weight" | "activation"
    converged: bool = True


@scoped
def align(reference: nn.Module, other: nn.Module, spec: PermutationSpec, method: str = "weight",
          data=None, *, max_iter: int = 100, seed: int = 0, exclude=None, max_batches=None,
          probes_per_group: int = 4, return_result: bool = False, progress: bool | None = None,
          _scorers=None):
    """Permutations that bring ``other`` into ``reference``'s unit order (apply with ``tm.permute``).

    ``method="weight"``: Git Re-Basin weight matching (Ainsworth et al. 2022). ``"activation"``:
    match the Pearson correlation of activations over ``data`` (an iterable of batches) at module
    outputs where each group is visible; groups visible nowhere fall back to weights.
    ``exclude``: parameter names left out of matching (default: the task heads, ``spec.heads``).
    ``progress``: tqdm bars for the data pass and the sweeps (None: when stderr is a terminal).
    """
    ref_state, other_state = _shared_states(reference, other, spec, exclude)
    if method == "weight":
        scorers = {}
    elif method == "activation" and _scorers is not None:
        scorers = _scorers  # from align_many's one pass over the data
    elif method == "activation":
        if data is None:
            raise TorchMergeError("align(method='activation') needs data=<iterable of batches> that "
                                  "both models accept; use method='weight' to align without data")
        with stage("align activation: data pass"):
            scorers = _activation_scorers(reference, other, spec, data, max_batches, probes_per_group)
    else:
        raise TorchMergeError(f"unknown alignment method {method!r}; valid: 'weight', 'activation'")
    with stage(f"align {method}: sweep"):
        result = _Matcher(spec, ref_state, other_state, scorers).run(max_iter, seed)
    if not result.converged:
        warnings.warn(f"align(method={method!r}): coordinate ascent stopped at max_iter={max_iter} "
                      "sweeps with permutations still changing (result.converged=False), so they are "
                      "not a local optimum of the matching objective; raise max_iter (in tm.merge: "
                      "alignment={'max_iter': ...})", UserWarning,
                      stacklevel=2)
    return result if return_result else result.perms


@scoped
def align_many(experts, spec: PermutationSpec, reference: int = 0, bases=None, *,
               return_results: bool = False, **kwargs) -> list:
    """Permutations aligning every expert to ``experts[reference]`` (identity for the reference).

    With ``bases`` (one base module per expert, the init or pretraining it descends from), the
    distinct bases are aligned to the reference's base and each expert takes its base's
    permutation — how Sharma et al. (2024) align non-local experts. ``return_results``: return
    ``(perms, results)``, ``results[i]`` the :class:`AlignResult` for expert i (None for the
    reference).
    """
    experts = list(experts)
    if not 0 <= reference < len(experts):
        raise TorchMergeError(f"reference={reference} is not an index into {len(experts)} experts")
    identity = spec.identity_perms()
    if bases is None:
        models, anchor = experts, experts[reference]
    else:
        models = list(bases)
        if len(models) != len(experts):
            raise TorchMergeError(f"bases has {len(models)} entries for {len(experts)} experts: give "
                                  "one base (init/pretraining) per expert, repeating shared ones")
        anchor = models[reference]
    others = list({id(m): m for m in models if m is not anchor}.values())
    scorers = _shared_pass(anchor, others, spec, kwargs)
    results = {id(anchor): None}
    for m, sc in zip(others, scorers):
        i = next(i for i, x in enumerate(models) if x is m)
        with stage(f"align {kwargs.get('method', 'weight')}: {'base' if bases else 'expert'} {i} sweep"):
            results[id(m)] = align(anchor, m, spec, **kwargs, _scorers=sc, return_result=True)
    out = [identity if results[id(m)] is None else results[id(m)].perms for m in models]
    return (out, [results[id(m)] for m in models]) if return_results else out


def _shared_pass(anchor, others, spec, kwargs) -> list:
    """Activation matching: the anchor runs once per batch for every other model (not once per
    pair); weight matching needs no pass."""
    if kwargs.get("method", "weight") != "activation" or kwargs.get("data") is None or not others:
        return [None] * len(others)
    with stage("align activation: data pass"):
        return _activation_scorers(anchor, others, spec, kwargs["data"], kwargs.get("max_batches"),
                                   kwargs.get("probes_per_group", 4))


# ---------------------------------------------------------------------------------------------


def _shared_states(reference, other, spec, exclude):
    for name, m in (("reference", reference), ("other", other)):
        if not isinstance(m, nn.Module):
            raise TorchMergeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    exclude = set(spec.heads if exclude is None else exclude)
    ref = dict(reference.named_parameters()) | dict(reference.named_buffers())
    oth = dict(other.named_parameters()) | dict(other.named_buffers())
    for p, _ in spec.axes:
        if p in exclude:
            continue
        if p not in ref or p not in oth:
            raise TorchMergeError(f"parameter {p!r} of the spec is missing from the "
                                  f"{'reference' if p not in ref else 'other'} model")
        if ref[p].shape != oth[p].shape:
            raise TorchMergeError(f"{p} has shape {tuple(ref[p].shape)} in the reference and "
                                  f"{tuple(oth[p].shape)} in the other model: the models must share one "
                                  "architecture (the same layer widths); only task heads, which "
                                  "tm.merge finds itself (heads='auto'), may differ. Merge experts with "
                                  "the same widths; with tm.align, exclude=[parameter names] leaves "
                                  "task-specific parameters out of matching")
    keep = {p for p, _ in spec.axes if p not in exclude}
    return ({p: ref[p].detach() for p in keep}, {p: oth[p].detach() for p in keep})


class _Matcher:
    """Coordinate ascent over groups; ``scorers`` override the weight score for some groups."""

    def __init__(self, spec: PermutationSpec, ref: dict, oth: dict, scorers: dict):
        self.spec, self.ref, self.oth, self.scorers = spec, ref, oth, scorers
        self.axes_of: dict = {}
        for (p, a), e in spec.axes.items():
            if p in ref:
                self.axes_of.setdefault(p, []).append((a, e))
        self.members = {g: [] for g in spec.groups}
        for p, axes in self.axes_of.items():
            for a, e in axes:
                for g in set(_names(e)):
                    self.members[g].append((p, a, e))
        self.neighbors = {g: {h for p, _, _ in m for _, e in self.axes_of[p] for h in _names(e)}
                          for g, m in self.members.items()}
        # expensive score terms kept between visits (see _kept_term)
        self._kept: dict = {}
        # a group on two axes of one tensor makes its objective quadratic: check true gains
        self.quadratic = {g for g, m in self.members.items()
                          if any(sum(_names(e).count(g) for _, e in self.axes_of[p]) > 1 for p, _, _ in m)}
        # groups sharing one axis as factors of a product (attention heads x head dim, conv groups
        # x channels per group) can lock each other in a local optimum: see escape()
        self.partners: dict = {}
        for g, m in self.members.items():
            for _, _, e in m:
                for names in _factor_sets(e):
                    if g in names and len(names) > 1:
                        self.partners.setdefault(g, set()).update(names - {g})

    def run(self, max_iter: int, seed: int) -> AlignResult:
        perms = self.spec.identity_perms()
        order = [g for g in self.spec.groups if self.members[g] or g in self.scorers]
        dirty, rng = set(order), random.Random(seed)
        self._terms: dict = {}  # param -> its objective term at the current perms
        result = AlignResult(perms, [self.tracked(perms, None)],
                             sources={g: "activation" if g in self.scorers else "weight" for g in order})
        sweeps = bar(range(max_iter), "align: sweep")
        threads = max(1, torch.get_num_threads())
        optima = set()  # the local optima escaped from: an escape can lead back to one (a cycle)
        with ThreadPoolExecutor(threads) as pool:
            for sweep in sweeps:
                rng.shuffle(order)
                moved = self.sweep(order, dirty, perms, pool, threads)
                changed = bool(moved)
                if not changed:  # a local optimum of single-group moves
                    key = tuple(perms[g].cpu().numpy().tobytes() for g in sorted(perms))
                    if key not in optima and self.escape(perms):
                        optima.add(key)
                        changed, dirty, moved = True, set(order), set(order)
                result.sweeps = sweep + 1
                result.objective.append(self.tracked(perms, moved))
                if not changed:
                    break
        sweeps.close()
        result.converged = not order or (result.sweeps > 0 and not changed)
        return result

    def sweep(self, order: list, dirty: set, perms: dict, pool, threads: int) -> set:
        """One pass over ``order``, re-solving the dirty groups; returns the groups that moved.
        Consecutive dirty groups that share no parameter (e.g. the MLPs of different layers) are
        solved together, their assignments in parallel threads (scipy releases the GIL) while the
        next score is computed: none sees another's permutation, so this is exactly the one-by-one
        ascent, only faster."""
        moved, i = set(), 0
        while i < len(order):
            wave, i = self._wave(order, i, dirty, threads)
            dirty.difference_update(wave)
            solving = []
            for g in wave:
                scores = self.score(g, perms)
                solving.append((g, scores, pool.submit(_lap, scores)))
            for g, scores, new in solving:
                if self.update(g, perms, scores, new.result()):
                    moved.add(g)
                    dirty |= self.neighbors.get(g, set()) | ({g} if g in self.quadratic else set())
        return moved

    def _wave(self, order: list, i: int, dirty: set, threads: int) -> tuple:
        """The dirty groups from ``order[i]`` on that can be solved together, and where to go on:
        it stops before a group that neighbours one taken (its score would change) and after
        ``threads`` large groups (their score matrices are held at once), and takes a quadratic or
        activation-scored group only alone."""
        wave, near, large = [], set(), 0
        while i < len(order) and large < threads:
            g = order[i]
            if g in near:
                break
            if g in dirty:
                alone = g in self.quadratic or g in self.scorers
                if alone and wave:
                    break
                wave.append(g)
                near |= self.neighbors.get(g, set()) | {g}
                large += self.spec.groups[g].size >= _LARGE_GROUP
                if alone:
                    return wave, i + 1
            i += 1
        return wave, i

    def update(self, g: str, perms: dict, scores: torch.Tensor, new: torch.Tensor) -> bool:
        """Seat group g at ``new``, the best assignment for its ``scores``, if that gains; True if it moved."""
        old = perms[g]
        rows = torch.arange(len(old))
        gain = (scores[rows, new.to(scores.device)].sum() - scores[rows, old.to(scores.device)].sum()).item()
        if gain <= 1e-12 or torch.equal(new, old):
            return False
        if g in self.quadratic and g not in self.scorers:
            before = self.objective(perms, {p for p, _, _ in self.members[g]})
            perms[g] = new
            if self.objective(perms, {p for p, _, _ in self.members[g]}) <= before + 1e-12:
                perms[g] = old
                return False
            return True
        perms[g] = new
        return True

    def escape(self, perms: dict) -> bool:
        """Leave a local optimum of product factors: re-seat a factored group from a score that
        ignores its partners' order, re-solve the partners, keep the move only if it gains."""
        for g in sorted(self.partners):
            new = _lap(self.score(g, perms, invariant=True))
            if torch.equal(new, perms[g]):
                continue
            together = [g, *sorted(self.partners[g])]
            trial = {**perms, g: new}
            for h in together[1:] + [g]:
                trial[h] = _lap(self.score(h, trial))
            before, after = self.local(together, perms), self.local(together, trial)
            if after > before + 1e-9 * abs(before) + 1e-12:
                perms.update(trial)
                return True
        return False

    def local(self, groups: list, perms: dict) -> float:
        """The objective restricted to what ``groups`` touch (activation score for scored groups)."""
        total, params = 0.0, set()
        for g in groups:
            if g in self.scorers:
                scores = self.scorers[g](perms)
                total += float(scores[torch.arange(len(perms[g])), perms[g].to(scores.device)].sum())
            else:
                params |= {p for p, _, _ in self.members[g]}
        return total + (self.objective(perms, params) if params else 0.0)

    def score(self, g: str, perms: dict, invariant: bool = False) -> torch.Tensor:
        """A[i, j]: gain of matching reference element i with other element j. ``invariant``:
        Σ‖R_i O_jᵀ‖² over the slices each element owns, blind to the order of product partners."""
        if g in self.scorers:
            return self.scorers[g](perms, invariant)
        n = self.spec.groups[g].size
        free = {**perms, g: torch.arange(n)}
        total = None
        for p, a, e in self.members[g]:
            if not invariant:
                part = self._kept_term(g, p, a, e, perms, free)
                if part is not None:
                    total = part.clone() if total is None else total.add_(part)
                    continue
            r, o = self.ref[p], self._permuted_other_axes(p, a, perms)
            rg = _rows(r, a, self.spec.positions(e, g, {}))
            og = _rows(o, a, self.spec.positions(e, g, free))
            if invariant:
                k = og.shape[1] // max(1, o.movedim(a, 0)[0].numel())
                cross = rg.reshape(n * k, -1).float() @ og.reshape(n * k, -1).float().T
                part = cross.double().reshape(n, k, n, k).pow(2).sum((1, 3))
                total = part if total is None else total + part
            else:  # float32 products, accumulated in place over members; one conversion per group
                rg, og = rg.float(), og.float()
                total = rg @ og.T if total is None else total.addmm_(rg, og.T)
        return total.double()

    def _kept_term(self, g, p, a, e, perms, free):
        """Member p's score term for group g, kept between visits when it is expensive (a Linear
        after flatten: 4096 × 25088 in VGG-16) and no larger than its operands; None for cheap
        members. The term is Rg · Ogᵀ with Og's columns gathered by the other axes'
        permutations: when some of those moved, only the changed columns C are redone,
        T += Rg[:, C] · (Og_new[:, C] − Og_old[:, C])ᵀ — the same matrix as recomputing it."""
        n, t = self.spec.groups[g].size, self.oth[p]
        own = self.spec.positions(e, g, free)  # the other model's rows, in g's free order
        width = own.shape[1] * (t.numel() // t.shape[a])
        if width < n or n * n * width < _KEEP_MIN_FLOPS:
            return None
        rows_by = tuple(perms[h] for h in sorted(set(_names(e)) - {g}))  # who orders those rows
        index = self._column_index(p, a, perms, width)
        kept = self._kept.get((g, p, a))
        if kept is not None and all(x is y for x, y in zip(kept.rows_by, rows_by)):
            changed = (index != kept.index).nonzero().squeeze(1)
            if changed.numel() <= width // 2:
                if changed.numel():
                    delta = _columns(t, a, own, index[changed]) - _columns(t, a, own, kept.index[changed])
                    ref = _columns(self.ref[p], a, self.spec.positions(e, g, {}), changed)
                    kept.term.addmm_(ref.float(), delta.float().T)
                self._kept[(g, p, a)] = _Kept(rows_by, index, kept.term)
                return kept.term
        rg = _rows(self.ref[p], a, self.spec.positions(e, g, {})).float()
        og = _rows(self._permuted_other_axes(p, a, perms), a, own).float()
        term = rg @ og.T
        self._kept[(g, p, a)] = _Kept(rows_by, index, term)
        return term

    def _column_index(self, p: str, axis: int, perms: dict, width: int) -> torch.Tensor:
        """Flat index of ``_rows(permuted other, axis, ...)``'s columns into the unpermuted
        tensor's: the other axes' index vectors combined, repeated for each block of the axis."""
        t = self.oth[p]
        exprs = dict(self.axes_of[p])
        index = torch.zeros(1, dtype=torch.long)
        for b in range(t.dim()):
            if b != axis:
                ib = self.spec.index(exprs[b], perms) if b in exprs else torch.arange(t.shape[b])
                index = (index[:, None] * t.shape[b] + ib[None, :]).reshape(-1)
        rest = index.numel()
        return (torch.arange(width // rest)[:, None] * rest + index[None, :]).reshape(-1)

    def _permuted_other_axes(self, p: str, axis: int, perms: dict) -> torch.Tensor:
        t = self.oth[p]
        for a, e in self.axes_of[p]:
            if a != axis:
                t = _take(t, a, self.spec.index(e, perms))
        return t

    def tracked(self, perms: dict, moved) -> float:
        """The objective, recomputing only the terms of parameters that ``moved`` groups touch."""
        params = self.axes_of if moved is None else {p for g in moved for p, _, _ in self.members[g]}
        for p in params:
            self._terms[p] = self.objective(perms, (p,))
        return sum(self._terms[p] for p in self.axes_of)

    def objective(self, perms: dict, params=None) -> float:
        """Σ ⟨W_ref, π(W_other)⟩ over the matched parameters (weight matching's objective).

        Row sums in float32, summed over rows in float64: no float64 copies of the models."""
        total = 0.0
        for p in (params if params is not None else self.axes_of):
            t = self.oth[p]
            for a, e in self.axes_of[p]:
                t = _take(t, a, self.spec.index(e, perms))
            r = self.ref[p].float()
            rows = r.reshape(r.shape[0], -1) if r.dim() else r.reshape(1, 1)
            total += float((rows * t.float().reshape(rows.shape)).sum(1).double().sum())
        return total


def _rows(t: torch.Tensor, axis: int, positions: torch.Tensor) -> torch.Tensor:
    """[group size, everything else]: the slices of ``t`` each group element owns."""
    n = positions.shape[0]
    return _take(t.movedim(axis, 0), 0, positions.reshape(-1)).reshape(n, -1)


def _columns(t: torch.Tensor, axis: int, positions: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``_rows(t, axis, positions)[:, cols]``, gathered without building the whole matrix."""
    moved = t.movedim(axis, 0)
    rest = moved.shape[1:]
    size = math.prod(rest)  # 1 for a 1-D tensor
    block, within = cols // size, cols % size
    rows = positions.to(t.device)[:, block.to(t.device)]
    inner = torch.unravel_index(within.to(t.device), rest) if rest else ()
    return moved[(rows,) + tuple(i[None, :] for i in inner)]


def _take(t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(axis, index)``, without the copy when ``index`` is the identity."""
    if index.shape[0] == t.shape[axis] and torch.equal(index, torch.arange(index.shape[0])):
        return t
    return t.index_select(axis, index.to(t.device))


def _activation_scorers(reference, other, spec, data, max_batches, probes_per_group):
    """Score functions from the Pearson correlation of the two models' activations at probes;
    ``other`` may be a list of models (one pass over the data, the reference run once per batch),
    then a list of scorer dicts is returned."""
    from .stats import collect_paired

    # an output with groups on two axes (token mixers) is skipped: its "sample" axis is permuted
    # too, so the two models' rows would be paired wrongly
    seen: dict = {}
    for probes in spec.probes.values():
        for p in probes:
            seen.setdefault(p.module_path, set()).add(p.axis)
    chosen = {g: [p for p in probes if len(seen[p.module_path]) == 1][:probes_per_group]
              for g, probes in spec.probes.items()}
    axes = {p.module_path: p.axis for probes in chosen.values() for p in probes}
    many = isinstance(other, list)
    if not axes:
        return [{} for _ in other] if many else {}
    stats = collect_paired(reference, other if many else [other], list(axes), list(axes), data,
                           channel_axis=axes, max_batches=max_batches)
    found = [_scorers(spec, chosen, {path: st[path].correlation() for path in axes}) for st in stats]
    return found if many else found[0]


def _scorers(spec, chosen: dict, corr: dict) -> dict:
    """Score functions per group from the correlations at its probes."""

    def scorer(g, probes):
        def score(perms, invariant=False):
            n = spec.groups[g].size
            free = {**perms, g: torch.arange(n)}
            total = 0
            for probe in probes:
                c = corr[probe.module_path]
                pr = spec.positions(probe.expr, g, {}).to(c.device)
                po = spec.positions(probe.expr, g, free).to(c.device)
                k = pr.shape[1]
                block = c[pr.reshape(-1)][:, po.reshape(-1)].reshape(n, k, n, k)
                total = total + (block.pow(2).sum((1, 3)) if invariant
                                 else block.diagonal(dim1=1, dim2=3).sum(-1))
            return total.double()
        return score

    return {g: scorer(g, probes) for g, probes in chosen.items() if probes}


def _lap(scores: torch.Tensor) -> torch.Tensor:
    """The permutation maximising Σ_i scores[i, perm[i]] (linear assignment)."""
    return torch.from_numpy(linear_sum_assignment(scores.cpu().numpy(), maximize=True)[1]).long()


def _factor_sets(e) -> list:
    """The group names of every product inside an axis expression."""
    if e[0] in ("g", "fixed"):
        return []
    found = [set(_names(e))] if e[0] == "prod" else []
    return found + [s for part in e[1] for s in _factor_sets(part)]
