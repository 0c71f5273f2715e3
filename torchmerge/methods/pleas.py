"""PLeaS — Permutations and Least Squares (Nasery, Hayase, Koh, Oh 2024, "PLeaS: Merging Models
with Permutations and Least Squares", CVPR 2025; code: SewoongLab/PLeaS-Merging).

Step 1 — partial matching. Every expert t ≥ 1 is matched to expert 0 by activation matching
(Pearson correlation of the units at the spec's probes over all tasks' data; groups visible at no
probe use weight matching, quality = cosine similarity). For a group of n units with width budget
``w`` ∈ [1, T] the merged group has at most ``round(w·n)`` units: the ``m`` best-matched tuples
(quality = mean over t of the matched score, top-m) become one merged unit each and the other
``n − m`` units of **every** expert are kept as separate units, so

    size = m + T·(n − m) ≤ round(w·n),   m = ceil((T·n − round(w·n)) / (T − 1))

(exact for T = 2; ``w = 1`` is a full permutation merge, ``w = T`` keeps every unit of every
expert). Merged order: matched tuples (in expert 0's order), then expert 0's kept units, expert 1's
kept units, ... ``sources[g][t, j]`` is expert t's unit feeding merged unit j, or −1.
Only groups whose members are Linear/Conv (groups=1) weights and biases or BatchNorm parameters
and running statistics (on a plain or flatten axis) may widen; any other group (LayerNorm,
attention heads, embeddings, concatenations, ...) keeps width 1.0 — listed in ``info["fixed_width"]``.

Step 2 — layer-wise least squares, in execution order and *progressively* (layer l sees the merged
model's own inputs, produced by the already-fitted layers 1..l−1). For each Linear/Conv layer
(and Hugging Face ``Conv1D``, GPT-2's Linear with a transposed weight):

    W* = argmin_W  Σ_t (1/N_t) ‖X_t Wᵀ − Y_t‖² + λ‖W‖²
    λ  = ridge · mean_k Σ_t (1/N_t) ‖X_t[:, k]‖²

(the bias column is not penalised; λ is relative to the inputs' mean power, so ``ridge`` does not
depend on the activations' scale).

X_t: the merged model's input to the layer on task t's data (unfolded for convs; a ones column
when the layer has a bias). Y_t[:, j], target of merged output unit j on task t's data:
expert t's unit ``sources[t, j]`` when t owns j (all matched units are owned by every expert);
otherwise the output of the owning expert s on the same data — the paper's "permuted ensemble"
target: a kept unit stays a copy of its expert's feature on every task. As in the paper's gradient
mask, a unit kept only from expert s reads only input units that s owns (matched or s-only; the
cross blocks stay 0), so ``width=T`` represents the experts' ensemble exactly.
Solved per layer from float64 normal equations accumulated over batches: Cholesky when the
system has ≤ ``max_direct`` (4096) unknowns per row, Jacobi-preconditioned conjugate gradient
(``cg_iters``) otherwise. Each task weighs equally (losses are per-task means).

BatchNorm directly after a fitted layer (its only user): the layer is fitted to the expert's
*BatchNorm output* (eval mode; the conv+BN composite) and the merged BN is set so that in eval mode
it is the identity: running mean/var = the mean/variance of the fitted layer's output over all
tasks (from the accumulated Grams), weight = sqrt(var + eps), bias = mean (+ the fitted offset
when the layer has no bias). Other norms keep the average of the owning experts' values.

Task heads (``heads``, default ``spec.heads``): fitted per task on task t's data against expert t's
output only; ``result.heads[t]`` holds them, ``result.model`` carries task 0's head. A head tied to
a body tensor (GPT-2's LM head is its input embedding) is untied in the merged model: the
embedding is merged as body, the head fitted per task.
The paper trains the merged layers with Adam (lr 5e-4, cosine) on [(x_A + x_B)/2, x_A-only,
x_B-only] inputs from the original models; this is the exact least-squares version of that step.

Defaults: width=1.0, ridge=1e-5 (relative), every batch (max_batches=None), seed=0. All inputs are held in
memory; cost is about L·T·(T+1) partial forward passes over the data (L fitted layers).

>>> import torch, torchmerge as tm
>>> from torchmerge.methods.pleas import pleas
>>> _ = torch.manual_seed(0)
>>> nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
...         for _ in range(2)]
>>> spec = tm.discover(nets[0], torch.randn(2, 4))
>>> data = [[torch.randn(32, 4)] for _ in range(2)]
>>> res = pleas(nets, spec, data, width=1.5)
>>> res.widths, tuple(res.sources["0.weight:0"].shape), res.model[2].in_features
({'0.weight:0': 12}, (2, 12), 12)
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..align import _activation_scorers, _Matcher, _shared_states
from ..errors import TorchMergeError
from ..progress import bar
from ..spec import PermutationSpec
from ..batches import iter_calls
from ..trace import eval_mode, trace
from ..tree import fit_sizes, is_hf_conv1d
from .base import flag
from .mats import conjugate_gradient

__all__ = ["pleas", "PleasResult"]

_DT = torch.float64
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class PleasResult:
    """``model``: merged module (task 0's head); ``heads[t]``: {head param: tensor} for task t;
    ``widths``: {group: merged size}; ``sources``: {group: LongTensor [T, size]}, expert t's unit
    feeding each merged unit or −1; ``info``: matching, fitting and solver details."""

    model: nn.Module
    heads: list
    widths: dict
    sources: dict
    info: dict = field(default_factory=dict)


def pleas(experts, spec, data, *, width=1.0, heads=None, ridge: float = 1e-5, max_batches=None,
          seed: int = 0, max_direct: int = 4096, cg_iters: int = 200) -> PleasResult:
    """Merge T ≥ 2 experts with PLeaS (see the module docstring for the exact algorithm).

    ``data``: one iterable of batches per expert/task (Tensors, (x, y) tuples or dicts).
    ``width``: a number in [1, T] or {group name: number} (unlisted groups: 1.0).
    ``heads``: parameter names of the task heads (default ``spec.heads``).
    """
    experts, inputs, widths_req, head_params = _check(experts, spec, data, width, heads, ridge,
                                                      max_batches, seed, max_direct, cg_iters)
    T = len(experts)
    info = {"method": "pleas", "width": width, "ridge": float(ridge), "num_tasks": T,
            "target": "own unit on own task; owning expert's unit for units kept from another expert"}
    with contextlib.ExitStack() as stack:
        for e in experts:
            stack.enter_context(eval_mode(e))
        perms, quality, how, match_converged = _match(experts, spec, inputs, head_params, seed)
        blocked = {g: r for g in spec.groups if (r := _widen_block(spec, experts[0], g, how)) is not None}
        sources, matched = _partial(spec, perms, quality, widths_req, blocked, T)
        merged = _assemble(experts, spec, sources, head_params)
        stack.enter_context(eval_mode(merged))
        _check_forward(merged, experts[0], inputs[0][0], sources, spec)
        layers, skipped, order_note = _layers(experts[0], inputs[0][0], head_params)
        fit = _Fitter(experts, merged, spec, sources, inputs, head_params, ridge, max_direct, cg_iters)
        for path, bn_path, is_head in bar(layers, "pleas: layers"):
            fit.layer(path, bn_path, is_head)
        head_states = fit.finish_heads()
    info.update(matched=matched, match_source=how, fixed_width=blocked, fitted=fit.fitted,
                not_fitted=skipped, bn_identity=fit.bn_identity, solver=fit.solver,
                residual=fit.residual, layer_order=order_note, match_converged=match_converged)
    _flag_fallbacks(info, order_note, match_converged)
    widths = {g: int(s.shape[1]) for g, s in sources.items()}
    asked = [g for g, w in widths_req.items() if round(w * spec.groups[g].size) > spec.groups[g].size]
    if asked and all(widths[g] == spec.groups[g].size for g in asked):
        flag(info, f"pleas: width {width!r} asked, but no group could widen (reasons in "
                   f"info['fixed_width'], e.g. {asked[0]}: {blocked.get(asked[0], 'unknown')}): "
                   "merged at the experts' width")
    return PleasResult(merged, head_states, widths, sources, info)


# ------------------------------------------------------------------------------------ validation
def _check(experts, spec, data, width, heads, ridge, max_batches, seed, max_direct, cg_iters):
    if isinstance(experts, nn.Module) or not isinstance(experts, Sequence) or len(experts) < 2:
        raise TorchMergeError("pleas: experts must be a list of at least 2 nn.Modules of one "
                              f"architecture, got {type(experts).__name__}")
    experts = list(experts)
    for i, e in enumerate(experts):
        if not isinstance(e, nn.Module):
            raise TorchMergeError(f"pleas: experts[{i}] is a {type(e).__name__}, not an nn.Module")
    if not isinstance(spec, PermutationSpec):
        raise TorchMergeError(f"pleas: spec must be a PermutationSpec from tm.discover(experts[0], "
                              f"example), got {type(spec).__name__}")
    T = len(experts)
    head_names = set(spec.heads if heads is None or isinstance(heads, str) else heads)
    body = lambda m: {k: tuple(v.shape) for k, v in _tensors(m).items() if k not in head_names}  # noqa: E731
    ref = body(experts[0])
    for i, e in enumerate(experts[1:], 1):
        mine = body(e)  # task heads may differ in size (number of classes)
        if mine != ref:
            diff = sorted(set(ref.items()) ^ set(mine.items()))[:4]
            raise TorchMergeError(f"pleas: experts[{i}] does not share experts[0]'s parameter names "
                                  f"and shapes (e.g. {diff}); all experts need one architecture")
    def number(v, lo, kind):
        return not isinstance(v, bool) and isinstance(v, kind) and math.isfinite(v) and v >= lo

    checks = (("ridge", ridge, number(ridge, 0, (int, float)), "a finite number >= 0"),
              ("seed", seed, number(seed, -math.inf, int), "an int"),
              ("max_direct", max_direct, number(max_direct, 1, int), "an int >= 1"),
              ("cg_iters", cg_iters, number(cg_iters, 1, int), "an int >= 1"),
              ("max_batches", max_batches, max_batches is None or number(max_batches, 1, int),
               "None or an int >= 1"))
    for name, v, ok, valid in checks:
        if not ok:
            raise TorchMergeError(f"pleas: {name}={v!r} is invalid; valid: {valid}")
    widths = _check_width(width, spec, T)
    if data is None or isinstance(data, (torch.Tensor, Mapping)) or not isinstance(data, Sequence) \
            or len(data) != T:
        got = type(data).__name__ + (f" of length {len(data)}" if isinstance(data, Sequence) else "")
        raise TorchMergeError(f"pleas needs data: a list of {T} iterables of batches (one per "
                              f"expert/task; Tensors, (x, y) tuples or dicts), got {got}")
    inputs = []
    for t, d in enumerate(data):
        try:
            xs = list(iter_calls(d, max_batches))
        except TorchMergeError as err:
            raise TorchMergeError(f"pleas: data[{t}]: {err}") from err
        if not xs:
            raise TorchMergeError(f"pleas: data[{t}] yielded no batches; give at least one batch per task")
        inputs.append(xs)
    names = set(_tensors(experts[0]))
    head_params = tuple(spec.heads if heads is None else heads)
    unknown = [h for h in head_params if h not in names]
    if isinstance(heads, str) or unknown:
        raise TorchMergeError(f"pleas: heads must be a list of parameter names of the experts; unknown: "
                              f"{unknown or heads!r}; default (spec.heads): {list(spec.heads)}")
    return experts, inputs, widths, head_params


def _check_width(width, spec, T):
    def ok(v):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and 1 <= v <= T

    if isinstance(width, Mapping):
        unknown = sorted(set(width) - set(spec.groups))
        if unknown:
            raise TorchMergeError(f"pleas: width has unknown groups {unknown}; valid groups: "
                                  f"{sorted(spec.groups)}")
        bad = {g: v for g, v in width.items() if not ok(v)}
        if bad:
            raise TorchMergeError(f"pleas: width values {bad} out of range; valid: numbers in [1, {T}] "
                                  "(1 = full matching, T = keep every unit of every expert)")
        return {g: float(width.get(g, 1.0)) for g in spec.groups}
    if not ok(width):
        raise TorchMergeError(f"pleas: width={width!r} is invalid; valid: a number in [1, {T}] (1 = "
                              "full matching, T = keep every unit) or a {group: number} dict")
    return {g: float(width) for g in spec.groups}


def _tensors(model):
    """Every parameter and buffer under each of its names: a tied tensor (GPT-2's ``lm_head.weight``
    is ``transformer.wte.weight``) appears under both."""
    return dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))


# ------------------------------------------------------------------------------------ matching
def _match(experts, spec, inputs, exclude, seed):
    """Permutations of every expert onto expert 0 and a match quality per expert-0 unit."""
    pooled = [x for xs in inputs for x in xs]
    perms, scores, how, converged = [spec.identity_perms()], {g: [] for g in spec.groups}, {}, [True]
    for t in bar(range(1, len(experts)), "pleas: match experts"):
        ref, oth = _shared_states(experts[0], experts[t], spec, exclude)
        scorers = _activation_scorers(experts[0], experts[t], spec, pooled, None, 4)
        matcher = _Matcher(spec, ref, oth, scorers)
        run = matcher.run(100, seed)
        p = run.perms
        perms.append(p)
        converged.append(run.converged)
        self_ref, self_oth = _Matcher(spec, ref, ref, {}), _Matcher(spec, oth, oth, {})
        ident = spec.identity_perms()
        for g in spec.groups:
            if g in scorers:
                how[g] = "activation"
                s = matcher.score(g, p)
                scores[g].append(s[torch.arange(len(p[g])), p[g].to(s.device)].cpu())
            elif matcher.members[g]:
                how[g] = "weight"
                s = matcher.score(g, p)
                q = s[torch.arange(len(p[g])), p[g].to(s.device)].cpu()
                nr = self_ref.score(g, ident).diagonal().cpu()
                no = self_oth.score(g, ident).diagonal().cpu()[p[g]]
                scores[g].append(q / (nr * no).sqrt().clamp_min(1e-12))
            else:
                how[g] = "none"
    quality = {g: torch.stack(v).double().mean(0) for g, v in scores.items() if v}
    return perms, quality, how, converged


def _flag_fallbacks(info, order_note, match_converged):
    """``info["fallbacks"]``, each also a warning: lost BatchNorm pairing, unconverged solvers."""
    fallbacks = []
    if "fx trace failed" in order_note:
        fallbacks.append(f"{order_note.partition('; ')[2]}: each layer is fitted to its own output "
                         "and BatchNorms keep the owning experts' average (pass a model torch.fx "
                         "can trace to fit conv+BatchNorm composites)")
    if not all(match_converged):
        bad = [t for t, ok in enumerate(match_converged) if not ok]
        fallbacks.append(f"unit matching of expert(s) {bad} stopped at 100 sweeps without converging")
    bad = sorted(p for p, kind in info["solver"].items() if "unconverged" in kind)
    if bad:
        fallbacks.append(f"conjugate gradient stopped at cg_iters before tol=1e-8 on {bad}: raise "
                         "cg_iters (or max_direct, to solve them by Cholesky)")
    info["fallbacks"] = fallbacks
    for message in fallbacks:
        flag(info, f"pleas: {message}")


def _widen_block(spec, model, g, how):
    """Why group ``g`` cannot change width (None if it can)."""
    if how.get(g) == "none":
        return "no statistics to rank its units (only task-head members)"
    for p, a, e in spec.members_of(g):
        path, _, leaf = p.rpartition(".")
        mod = model.get_submodule(path)
        if _is_linear(mod) or (isinstance(mod, _CONVS) and mod.groups == 1):
            ok = leaf in ("weight", "bias")
        elif isinstance(mod, _BN):
            ok = leaf in ("weight", "bias", "running_mean", "running_var")
        else:
            return f"{p} belongs to a {type(mod).__name__}"
        if not ok:
            return f"{p} is not a weight/bias/running statistic"
        if e[0] == "prod" and [x for x in e[1] if x[0] != "fixed"] == [("g", g, spec.groups[g].size)]:
            continue
        if e[0] != "g":
            return f"{p} axis {a} is a {e[0]} of spaces (concatenation / heads / reshape)"
    return None


def _partial(spec, perms, quality, widths_req, blocked, T):
    sources, matched = {}, {}
    for g, grp in spec.groups.items():
        n = grp.size
        w = 1.0 if g in blocked else widths_req[g]
        m = min(n, max(0, math.ceil((T * n - round(w * n)) / (T - 1) - 1e-9)))
        q = quality.get(g, torch.zeros(n, dtype=_DT))
        best = torch.sort(q, descending=True, stable=True).indices
        merged_ref, kept_ref = best[:m].sort().values, best[m:].sort().values
        rows = []
        for t in range(T):
            p = perms[t][g]
            kept = [torch.full((n - m,), -1, dtype=torch.long)] * T
            kept[t] = p[kept_ref]
            rows.append(torch.cat([p[merged_ref]] + kept))
        sources[g], matched[g] = torch.stack(rows), m
    return sources, matched


# ------------------------------------------------------------------------------------ assembly
def _index_map(expr, t, sources):
    """Merged positions of an axis -> expert t's positions (−1: expert t has no such unit)."""
    kind = expr[0]
    if kind == "g":
        return sources[expr[1]][t] if expr[1] in sources else torch.arange(expr[2])
    if kind == "fixed":
        return torch.arange(expr[1])
    parts = [_index_map(e, t, sources) for e in expr[1]]
    if kind == "cat":
        offsets = [0] + [e[-1] for e in expr[1]]
        out, off = [], 0
        for p, o in zip(parts, offsets):
            off += o
            out.append(torch.where(p >= 0, p + off, p))
        return torch.cat(out)
    idx = parts[0] if parts else torch.zeros(1, dtype=torch.long)
    for e, p in zip(expr[1][1:], parts[1:]):
        ok = (idx[:, None] >= 0) & (p[None, :] >= 0)
        idx = torch.where(ok, idx[:, None] * e[-1] + p[None, :], -1).reshape(-1)
    return idx


def _gather(tensor, axes, t, sources):
    """Expert t's tensor in the merged layout, and where it has values (a broadcastable mask)."""
    out, mask = tensor.detach(), torch.ones((), dtype=torch.bool)
    for a, e in axes:
        idx = _index_map(e, t, sources).to(tensor.device)
        out = out.index_select(a, idx.clamp_min(0))
        shape = [1] * tensor.dim()
        shape[a] = -1
        mask = mask & (idx >= 0).view(shape)
    return out, mask.to(tensor.device)


def _averaged(experts, p, axes, sources):
    vals = [_gather(_tensors(e)[p], axes, t, sources) for t, e in enumerate(experts)]
    if not vals[0][0].is_floating_point():
        return vals[0][0].clone()
    total = sum(torch.where(m, v, torch.zeros_like(v)) for v, m in vals)
    count = sum(m.to(total.dtype) for _, m in vals)
    return total / count.clamp_min(1)


def _assemble(experts, spec, sources, head_params=()):
    axes_of = {}
    for (p, a), e in spec.axes.items():
        axes_of.setdefault(p, []).append((a, e))
    tensors = _tensors(experts[0])
    memo = {}
    # body names first: a tensor tied to a head takes the body's merge (the head is untied below)
    for p, orig in sorted(tensors.items(), key=lambda kv: kv[0] in head_params):
        if id(orig) in memo:
            continue
        # heads may differ in size across tasks: task 0's is the placeholder until refit
        new = _averaged(experts[:1] if p in head_params else experts, p, axes_of.get(p, []), sources)
        memo[id(orig)] = nn.Parameter(new, orig.requires_grad) if isinstance(orig, nn.Parameter) else new
    merged = copy.deepcopy(experts[0], memo)
    body_ids = {id(t) for p, t in tensors.items() if p not in head_params}
    for p in head_params:  # fitting a head tied to a body tensor would overwrite the body (the embedding)
        if id(tensors[p]) in body_ids:
            path, _, leaf = p.rpartition(".")
            value = _averaged(experts[:1], p, axes_of.get(p, []), sources)
            setattr(merged.get_submodule(path), leaf, nn.Parameter(value, tensors[p].requires_grad))
    for mod in merged.modules():
        fit_sizes(mod)  # widened layers: in/out features, channels, BatchNorm features, Conv1D's nf
    return merged


def _check_forward(merged, expert, x, sources, spec):
    try:
        with torch.no_grad():
            y, y0 = x.to(_device(merged))(merged), x.to(_device(expert))(expert)
    except Exception as err:
        wide = [g for g, s in sources.items() if s.shape[1] != spec.groups[g].size]
        raise TorchMergeError(f"pleas: the widened model's forward failed ({type(err).__name__}: {err}); "
                              f"widened groups: {wide}. The forward probably hard-codes a size: pass "
                              "width=1.0 (or width={group: 1.0, ...}) for those groups") from err
    if isinstance(y, torch.Tensor) and isinstance(y0, torch.Tensor) and y.shape != y0.shape:
        raise TorchMergeError(f"pleas: merged output shape {tuple(y.shape)} differs from the expert's "
                              f"{tuple(y0.shape)}; pass width=1.0")


def _device(model):
    for t in _tensors(model).values():
        return t.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ layers
def _conv_padding(mod):
    if not isinstance(mod.padding, str):
        return tuple(mod.padding)
    if mod.padding == "valid":
        return (0,) * len(mod.kernel_size)
    total = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]
    return None if any(v % 2 for v in total) else tuple(v // 2 for v in total)


def _why_not(mod, calls):
    if calls > 1:
        return f"called {calls} times per forward (shared weights)"
    if _is_linear(mod):
        return None
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return f"{type(mod).__name__} has no least-squares fit (averaged)"
    if mod.groups != 1:
        return f"grouped convolution (groups={mod.groups}) (averaged)"
    if mod.padding_mode != "zeros" or _conv_padding(mod) is None:
        return "padding mode / asymmetric 'same' padding (averaged)"
    return None


def _layers(model, x, head_params):
    """(path, paired BatchNorm path or None, is_head) in execution order; skipped layers + reasons."""
    order, calls = [], Counter()
    hooks = []
    for name, mod in model.named_modules():
        if _is_linear(mod) or isinstance(mod, _CONVS + (_BN,)):
            def hook(_m, _a, _o, name=name):
                calls[name] += 1
                if calls[name] == 1:
                    order.append(name)
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            x.to(_device(model))(model)
    finally:
        for h in hooks:
            h.remove()
    pairs, note = {}, "execution order"
    try:
        gm = trace(model, x.to(_device(model)).clone().args)  # tracing runs the model: on a copy
        for n in gm.graph.nodes:
            users = list(n.users)
            if n.op == "call_module" and len(users) == 1 and users[0].op == "call_module":
                bn = model.get_submodule(users[0].target)
                once = calls[users[0].target] == 1
                if isinstance(bn, _BN) and bn.affine and bn.track_running_stats and once:
                    pairs[n.target] = users[0].target
    except TorchMergeError as err:
        if any(isinstance(m, _BN) for m in model.modules()):  # only BatchNorms lose by it
            note += f"; no conv+BatchNorm pairing (fx trace failed: {str(err).splitlines()[0]})"
    head_mods = {p.rpartition(".")[0] for p in head_params}
    layers, skipped = [], {}
    for name in order:
        mod = model.get_submodule(name)
        if isinstance(mod, _BN):
            continue
        why = _why_not(mod, calls[name])
        if why:
            skipped[name] = why
            continue
        is_head = name in head_mods
        layers.append((name, None if is_head else pairs.get(name), is_head))
    return layers, skipped, note


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted activation is in hand."""


def _grab(model, path, x, where):
    """The input or output of ``model.<path>`` on batch ``x`` (the forward stops right there)."""
    box = []

    def keep(v):
        box.append((v[0] if isinstance(v, (tuple, list)) else v).detach())
        raise _Stop

    mod = model.get_submodule(path)
    h = (mod.register_forward_pre_hook(lambda _m, a: keep(a)) if where == "input"
         else mod.register_forward_hook(lambda _m, _a, o: keep(o)))
    try:
        with torch.no_grad(), contextlib.suppress(_Stop):  # the hook ends the pass early
            x.to(_device(model))(model)
    finally:
        h.remove()
    if not box:
        raise TorchMergeError(f"pleas: module {path!r} did not run on a batch ({x.describe()})")
    return box[0]


def _is_linear(mod) -> bool:
    """nn.Linear, or Hugging Face's Conv1D (GPT-2: the same map with an ``[in, out]`` weight)."""
    return isinstance(mod, nn.Linear) or is_hf_conv1d(mod)


def _weight_rows(mod) -> torch.Tensor:
    """The layer's weight as ``[out, in·kernel]`` (a view; Conv1D's is stored transposed)."""
    w = mod.weight.detach()
    return w.T if is_hf_conv1d(mod) else w.reshape(w.shape[0], -1)


def _as_weight(mod, rows: torch.Tensor, like: tuple) -> torch.Tensor:
    """Rows ``[out, in·kernel]`` back in the weight's layout (``like``: its shape past axis 0;
    a task head may have its own number of outputs)."""
    return rows.T if is_hf_conv1d(mod) else rows.reshape((rows.shape[0],) + tuple(like[1:]))


def _axes(mod) -> tuple:
    """(output axis, input axis) of the layer's weight."""
    return (1, 0) if is_hf_conv1d(mod) else (0, 1)


def _rows_in(mod, x):
    if _is_linear(mod):
        return x.reshape(-1, x.shape[-1])
    pad, k, d, s = _conv_padding(mod), mod.kernel_size, mod.dilation, mod.stride
    if isinstance(mod, nn.Conv1d):
        x, pad, k, d, s = x.unsqueeze(2), (0,) + pad, (1,) + k, (1,) + d, (1,) + s
    cols = F.unfold(x, k, dilation=d, padding=pad, stride=s)  # [B, C·kh·kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _rows_out(mod, y):
    if _is_linear(mod):
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


class _Fitter:
    """Accumulates per-task normal equations for one layer at a time and solves them."""

    def __init__(self, experts, merged, spec, sources, inputs, head_params, ridge, max_direct, cg_iters):
        self.experts, self.merged, self.spec, self.sources = experts, merged, spec, sources
        self.inputs, self.head_params, self.ridge = inputs, head_params, float(ridge)
        self.max_direct, self.cg_iters = max_direct, cg_iters
        self.T = len(experts)
        self.fitted, self.bn_identity, self.solver, self.residual = [], [], {}, {}
        self.head_fits = [dict() for _ in range(self.T)]

    def _map(self, p, axis, t, size):
        e = self.spec.axes.get((p, axis))
        return torch.arange(size) if e is None else _index_map(e, t, self.sources)

    def layer(self, path, bn_path, is_head):
        mod = self.merged.get_submodule(path)
        w, (out_axis, in_axis) = mod.weight, _axes(mod)
        out_m, d = _weight_rows(mod).shape
        k = d // w.shape[in_axis]
        omap = [self._map(f"{path}.weight", out_axis, t, out_m) for t in range(self.T)]
        own = torch.stack([o >= 0 for o in omap])                       # [T, out_m]
        cols = torch.stack([(self._map(f"{path}.weight", in_axis, t, w.shape[in_axis]) >= 0).repeat_interleave(k)
                            for t in range(self.T)])                    # [T, d]
        use_bias = mod.bias is not None or bn_path is not None
        if is_head:
            self._heads(mod, path, d, use_bias)
        else:
            systems = [self._accumulate(mod, path, bn_path or path, t, omap, own, is_head)
                       for t in range(self.T)]
            allowed = (own.T.to(torch.float) @ cols.to(torch.float)) > 0     # [out_m, d]
            wa = self._solve(systems, allowed, use_bias, mod, path)
            self.residual[path] = _residual(wa, systems)
            if bn_path is None:
                self._set(mod, wa, use_bias)
            else:
                self._set_bn(mod, self.merged.get_submodule(bn_path), wa, systems)
                self.bn_identity.append(bn_path)
        self.fitted.append(path)

    def _heads(self, mod, path, d, use_bias):
        """Each task's head on its own data; its number of outputs is expert t's own."""
        for t in range(self.T):
            out_t = _weight_rows(self.experts[t].get_submodule(path)).shape[0]
            omap = [torch.arange(out_t)] * self.T
            sys_t = self._accumulate(mod, path, path, t, omap, torch.ones(self.T, out_t, dtype=torch.bool), True)
            wt = self._solve([sys_t], torch.ones(out_t, d, dtype=torch.bool), use_bias, mod, path)
            self.head_fits[t][path] = wt
            self.residual[f"{path}[task {t}]"] = _residual(wt, [sys_t])
        self._set(mod, self.head_fits[0][path], use_bias)

    def _accumulate(self, mod, path, target_path, t, omap, own, is_head):
        """(E[xxᵀ], E[x yᵀ], E[y²]) on task t, x with a trailing ones column, float64."""
        choose = torch.where(own[t], t, own.to(torch.int8).argmax(0)) if not is_head else \
            torch.full((own.shape[1],), t)
        needed = sorted(set(choose.tolist()))
        G = B = yy = None
        n = 0
        for x in self.inputs[t]:
            X = _rows_in(mod, _grab(self.merged, path, x, "input")).to(_DT)
            X = torch.cat([X, torch.ones_like(X[:, :1])], 1)
            Y = X.new_zeros(X.shape[0], own.shape[1])
            for s in needed:
                ys = _rows_out(mod, _grab(self.experts[s], target_path, x, "output")).to(X.device, _DT)
                js = (choose == s).nonzero().squeeze(1)
                Y[:, js.to(X.device)] = ys[:, omap[s][js].to(X.device)]
            g, b, q = X.T @ X, X.T @ Y, Y.square().sum(0)
            G, B, yy = (g, b, q) if G is None else (G + g, B + b, yy + q)
            n += X.shape[0]
        return G / n, B / n, yy / n

    def _solve(self, systems, allowed, use_bias, mod, path):
        """Fitted [out, d+1] (last column: bias; zero when unused) for every row pattern."""
        A = sum(s[0] for s in systems)
        Bm = sum(s[1] for s in systems)
        d = A.shape[0] - 1
        init = _weight_rows(mod).to(A.device, _DT)
        if init.shape[0] != Bm.shape[1]:  # a task head with another number of outputs
            init = init.new_zeros(Bm.shape[1], d)
        W = torch.zeros(Bm.shape[1], d + 1, dtype=_DT, device=A.device)
        patterns, which = torch.unique(allowed, dim=0, return_inverse=True)
        kinds = set()
        for i, pat in enumerate(patterns):
            rows = (which == i).nonzero().squeeze(1).to(A.device)
            S = pat.nonzero().squeeze(1).to(A.device)
            if use_bias:
                S = torch.cat([S, torch.tensor([d], device=A.device)])
            As = A[S][:, S].clone()
            nw = int(pat.sum())
            As.diagonal()[:nw] += self.ridge * float(A.diagonal()[:d].mean())  # scale-free ridge
            bs = Bm[S][:, rows]
            x0 = torch.zeros_like(bs)
            x0[:nw] = init[rows][:, S[:nw]].T
            sol, kind = _solve_spd(As, bs, x0, self.max_direct, self.cg_iters)
            W[rows[:, None], S[None, :]] = sol.T
            kinds.add(kind)
        self.solver[path] = "+".join(sorted(kinds))
        return W

    def _set(self, mod, wa, use_bias):
        with torch.no_grad():
            mod.weight.copy_(_as_weight(mod, wa[:, :-1], mod.weight.shape))
            if mod.bias is not None:
                mod.bias.copy_(wa[:, -1] if use_bias else torch.zeros_like(mod.bias))

    def _set_bn(self, mod, bn, wa, systems):
        """Fitted affine map y = W x + c; BN set to the identity (eval) with y's statistics."""
        W, c = wa[:, :-1], wa[:, -1]
        mean = sum(s[0][-1, :-1] @ W.T for s in systems) / len(systems)          # E[W x]
        sq = sum(((W @ s[0][:-1, :-1]) * W).sum(1) for s in systems) / len(systems)
        var = (sq - mean.square()).clamp_min(0)
        has_bias = mod.bias is not None
        self._set(mod, wa, has_bias)
        with torch.no_grad():
            bn.running_mean.copy_(mean + c if has_bias else mean)
            bn.running_var.copy_(var)
            bn.weight.copy_((var + bn.eps).sqrt())
            bn.bias.copy_(mean + c)

    def finish_heads(self):
        """Per task: the fitted head layers, other head parameters from expert t (merged layout)."""
        axes_of = {}
        for (p, a), e in self.spec.axes.items():
            axes_of.setdefault(p, []).append((a, e))
        out = []
        for t in range(self.T):
            state = {}
            for p in self.head_params:
                path, _, leaf = p.rpartition(".")
                wa = self.head_fits[t].get(path)
                if wa is not None:
                    like = _tensors(self.merged)[p]
                    v = wa[:, -1] if leaf != "weight" else \
                        _as_weight(self.merged.get_submodule(path), wa[:, :-1], like.shape)
                    state[p] = v.to(like.dtype).clone()
                else:
                    v, m = _gather(_tensors(self.experts[t])[p], axes_of.get(p, []), t, self.sources)
                    state[p] = torch.where(m, v, torch.zeros_like(v)) if v.is_floating_point() else v.clone()
            out.append(state)
        return out


def _solve_spd(A, b, x0, max_direct, cg_iters):
    if A.shape[0] <= max_direct:
        L, bad = torch.linalg.cholesky_ex(A)
        if int(bad) == 0:
            return torch.cholesky_solve(b, L), "cholesky"
        sol = torch.linalg.lstsq(A.cpu(), b.cpu(), driver="gelsd").solution
        return sol.to(A.device), "lstsq"
    diag = A.diagonal()
    inv = torch.where(diag > 0, 1.0 / diag, torch.ones_like(diag))[:, None]
    x, _, res = conjugate_gradient(lambda v: A @ v, b, x0, cg_iters, 1e-8, lambda r: r * inv)
    return x, "cg" if res <= 1e-8 else "cg-unconverged"


def _residual(wa, systems):
    """Σ_t mean ‖X W − Y‖² / Σ_t mean ‖Y‖² (from the accumulated moments)."""
    err = tot = 0.0
    for G, B, yy in systems:
        err += float(((wa @ G) * wa).sum() - 2 * (wa * B.T).sum() + yy.sum())
        tot += float(yy.sum())
    return max(err, 0.0) / max(tot, 1e-30)
