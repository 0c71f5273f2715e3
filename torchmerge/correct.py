"""Calibration: fit the merged model's TaskAffine sites to repair variance collapse.

After merging, per-channel activation statistics shrink and drift ("variance collapse", the main
reason non-local merges fail). For task t, at every site s (a TaskAffine after a layer), the
affine is set so the merged model's channel statistics on task t's data equal expert t's at the
same place of the aligned expert (Sharma, Roy, Dziugaite 2024; REPAIR, Jordan et al. 2023)::

    y = sqrt(σ_e² + ε) / sqrt(σ_m² + ε) · (x − μ_m) + μ_e        (ε on both sides: equal stats → identity)

Modes
  ``"affine"``       one affine per task (the paper's method).
  ``"repair"``       one affine shared by all tasks; targets are the experts' statistics averaged
                     over tasks, the merged statistics are taken on the union of the tasks' data.
  ``"affine+tune"``  ``"affine"``, then Adam steps on the affine rows of each task (and its
                     head, ``tune_heads=True``) that distil expert t's outputs on task t's data
                     (``tune_steps="auto"``: 600 for transformers, 100 for other models;
                     the rate falls linearly to zero over the last fifth of the steps);
                     ``tune_rank=r`` gives each site a per-task rank-r channel map to tune too
                     (:meth:`TaskAffine.add_low_rank`: a low-rank adapter per task and site);
                     ``"auto"`` (default): rank 8 for transformers, none for other models.

Progressive, in two merged passes and one expert pass per task: downstream sites see upstream
corrections. Pass 1 runs the expert and the merged model on each batch in turn and refits every
site *on that batch* (merged batch statistics → the expert's on the same batch) before its output
flows on, like a BatchNorm in train mode; the cumulative statistics then give each site's affine.
Pass 2 re-measures the merged statistics with those affines in place and refits
(``passes=3`` or more repeats it). Equal models give exactly the identity.

>>> import torch, torchmerge as tm
>>> experts = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
...            for _ in range(2)]
>>> data = [[torch.randn(16, 4) for _ in range(3)] for _ in experts]
>>> merged = tm.merge(experts, method="average", data=data, align=None, correction=None)
>>> report = calibrate(merged, experts, data, mode="affine")
>>> report["mode"], report["tasks"]["task0"]["sites"]
('affine', 1)
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from torch.utils import _pytree as pytree

from . import validate
from .batches import Inputs, first_call, iter_calls
from .errors import TorchMergeError
from .module_sites import first_tensor
from .modules import TaskAffine
from .progress import bar, stage, using
from .stats import Moments, _dist_ready, _mode, _progress, shared_moments
from .trace import trace
from .tree import device_of as _device, has_attention

MODES = ("affine", "repair", "affine+tune")
#: the rank ``tune_rank="auto"`` gives transformers (low-rank maps per task at every site): on the
#: non-local HF ViT and GPT-2 experts of docs/results.md rank 8 lifted affine+tune from 0.971 to
#: 0.993 and from 0.573 to 0.796 of the experts at the same 100 steps; on the demo CNN it did not
#: help (0.994 → 0.992), so CNNs keep the affines alone.
AUTO_TUNE_RANK = 8

#: the steps ``tune_steps="auto"`` gives per task: transformers need more than CNNs (GPT-2 experts
#: of docs/results.md, rank 8: 0.799 of the experts at 100 steps, 0.881 at 300, 0.912 at 600; the
#: ViT's 0.993 → 0.996), CNNs keep 100 (the demo's 0.995)
AUTO_TUNE_STEPS = {"transformer": 600, "other": 100}

#: the last fraction of ``tune``'s steps, over which the learning rate falls linearly to zero
#: (constant before: a warmup-stable-decay schedule). On the GPT-2 experts at 600 steps: 0.912 vs
#: 0.894 with a constant rate; a cosine schedule over all steps lost (0.743 vs 0.796 at 100)
TUNE_DECAY_FRACTION = 0.2


def calibrate(merged, experts, data, mode: str = "affine", *, max_batches=None,
              allow_uncorrected: bool = False, passes: int = 2, eps: float = 1e-5,
              tune_steps="auto", tune_lr: float = 1e-2, tune_loss: str = "kl",
              tune_heads: bool = False, tune_rank="auto", tune_holdout: int = 0,
              progress: bool | None = None) -> dict:
    """Fit ``merged``'s TaskAffine sites in place; return a report (also in ``merged.info``).

    ``experts``: one per task — the experts given to ``tm.merge`` (permuted here into the merged
    model's unit order with ``merged.info``'s spec and perms, when the merge aligned them) or
    their aligned copies. ``data``: one iterable of batches per task (``None``: no data for that
    task — an error unless ``allow_uncorrected=True``, which leaves that task's affines at the
    identity). Arguments are checked before any work (:mod:`torchmerge.validate`); if fitting
    fails partway, the merged model is left as it was. ``progress``: tqdm bars per pass (None:
    when stderr is a terminal; see :mod:`torchmerge.progress`). ``tune_rank`` (``"affine+tune"``):
    per-task low-rank maps of that rank at every site, tuned with the affines; ``"auto"``:
    :data:`AUTO_TUNE_RANK` when the experts are transformers, else none (the report's
    ``"low_rank"`` gives the rank and the parameters per task). ``tune_steps``: Adam steps per
    task; ``"auto"``: :data:`AUTO_TUNE_STEPS` (600 for transformers, 100 otherwise; the report's
    ``"tune_steps"`` gives the number used). ``tune_holdout=k``: the last ``k`` batches of each
    task are not tuned on but watched — after every pass over the others the task keeps the
    parameters with the lowest loss on them (early stopping, against overfitting few batches).
    """
    options = dict(passes=passes, eps=eps, tune_steps=tune_steps, tune_lr=tune_lr, tune_loss=tune_loss,
                   tune_heads=tune_heads, tune_rank=tune_rank, tune_holdout=tune_holdout, progress=progress)
    experts, data, permuted = validate.calibrate_arguments(merged, experts, data, mode, max_batches,
                                                           allow_uncorrected, options)
    defaults = {k: p.default for k, p in inspect.signature(calibrate).parameters.items()}
    validate.warn_unused_tune_options(mode, {k: v for k, v in options.items() if v != defaults[k]})
    report = fit_affines(merged, experts, data, mode, max_batches=max_batches,
                         allow_uncorrected=allow_uncorrected, **options)
    if permuted:
        report["permuted_experts"] = permuted
    return report


def fit_affines(merged, experts, data, mode: str = "affine", *, max_batches=None,
                allow_uncorrected: bool = False, passes: int = 2, eps: float = 1e-5,
                tune_steps="auto", tune_lr: float = 1e-2, tune_loss: str = "kl",
                tune_heads: bool = False, tune_rank="auto", tune_holdout: int = 0,
                progress: bool | None = None) -> dict:
    """:func:`calibrate` on checked arguments and aligned experts (what ``tm.merge`` calls)."""
    with using(progress):
        return _fit_affines(merged, experts, data, mode, max_batches=max_batches,
                            allow_uncorrected=allow_uncorrected, passes=passes, eps=eps,
                            tune_steps=tune_steps, tune_lr=tune_lr, tune_loss=tune_loss,
                            tune_heads=tune_heads, tune_rank=tune_rank, tune_holdout=tune_holdout)


def _fit_affines(merged, experts, data, mode, *, max_batches, allow_uncorrected, passes, eps,
                 tune_steps, tune_lr, tune_loss, tune_heads, tune_rank, tune_holdout) -> dict:
    experts, data = list(experts), list(data) if data is not None else [None] * merged.num_tasks
    missing = [merged.task_names[t] for t, d in enumerate(data) if d is None]
    if missing and not allow_uncorrected:
        raise TorchMergeError(f"no calibration data for tasks {missing}: give data for every task, or "
                              "pass allow_uncorrected=True to leave those tasks uncorrected")
    if not merged.sites():
        raise TorchMergeError("the merged model has no TaskAffine sites to calibrate; build it with "
                              "sites='layer' or 'block'")
    opts = dict(max_batches=max_batches, passes=passes, eps=eps, progress=None)
    report = {"mode": mode, "passes": passes, "uncorrected": missing, "tasks": {}}
    with _restored_on_error(merged):
        if mode == "repair":
            report["tasks"] = _fit_shared(merged, experts, data, **opts)
        else:
            for t, (expert, batches) in enumerate(zip(experts, data)):
                if batches is not None:
                    name = merged.task_names[t]
                    report["tasks"][name] = _fit_task(merged, expert, batches, t, **opts,
                                                      what=f"calibrate {mode}: {name}")
        if mode == "affine+tune":
            rank = _resolved_rank(tune_rank, experts)
            if rank:
                report["low_rank"] = _add_low_rank(merged, rank)
            report["tune_steps"] = tune_steps = _resolved_steps(tune_steps, experts)
            for t, (expert, batches) in enumerate(zip(experts, data)):
                if batches is not None:
                    with stage(f"calibrate {mode}: {merged.task_names[t]} tune"):
                        losses = tune(merged, expert, batches, t, steps=tune_steps, lr=tune_lr,
                                      loss=tune_loss, heads=tune_heads, max_batches=max_batches,
                                      holdout=tune_holdout)
                    report["tasks"][merged.task_names[t]].update(
                        tune_loss_before=losses["before"], tune_loss=losses["after"],
                        tune_restored=losses["restored"], tune_best_step=losses["best_step"])
    merged.info = {**getattr(merged, "info", {}), "calibration": report}
    return report


def _resolved_rank(tune_rank, experts) -> int:
    """``"auto"``: :data:`AUTO_TUNE_RANK` for transformers (an expert with attention modules), else 0."""
    if tune_rank != "auto":
        return tune_rank
    return AUTO_TUNE_RANK if _transformers(experts) else 0


def _resolved_steps(tune_steps, experts) -> int:
    """``"auto"``: :data:`AUTO_TUNE_STEPS` of the experts' kind (transformer or not)."""
    if tune_steps != "auto":
        return tune_steps
    return AUTO_TUNE_STEPS["transformer" if _transformers(experts) else "other"]


def _transformers(experts) -> bool:
    return bool(experts) and has_attention(experts[0])


def _add_low_rank(merged, rank: int) -> dict:
    """Give every site without one a rank-``min(rank, channels)`` map per task (seeded: the same
    model each run); return the rank and the tuned parameters per task it makes."""
    generator = torch.Generator().manual_seed(0)
    for name, site in merged.sites().items():
        want = min(rank, site.scale.shape[1])
        if site.rank == 0:
            site.add_low_rank(want, generator)
        elif site.rank != want:
            raise TorchMergeError(f"site {name!r} has rank-{site.rank} maps already (from an earlier tune); "
                                  f"tune it with tune_rank={site.rank}, or build the merged model anew")
    per_task = sum(p[0].numel() for site in merged.sites().values() for p in site.parameters())  # all [T, ...]
    return {"rank": rank, "tuned_parameters_per_task": per_task}


@contextlib.contextmanager
def _restored_on_error(merged):
    """Snapshot the task parameters (affine sites and heads: all that fitting writes); put them
    back, and drop low-rank maps added meanwhile, if anything raises: a failed calibration leaves
    no half-fitted model."""
    params = list(merged.task_parameters())
    saved = [p.detach().clone() for p in params]
    plain = [site for site in merged.sites().values() if site.rank == 0]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
        for site in plain:
            site.down = site.up = None
        raise


# ---------------------------------------------------------------------------------------------
# statistics at the sites


@contextlib.contextmanager
def observing(merged, expert: nn.Module, example: Inputs, on_site):
    """Yield a module that runs ``expert`` and calls ``on_site(site_name, activation)`` where each
    site of ``merged`` sits: a forward hook on the expert's module at ``site.site_module``
    (injected build), or an observer after the fx node ``site.site_node`` of the traced expert
    (graph build). Hooks are removed on exit; the expert's weights are never changed."""
    sites = merged.sites()
    by_module = {name: s for name, s in sites.items() if s.site_module is not None}
    if not by_module:
        yield observed_expert(merged, expert, example, on_site)
        return
    if len(by_module) != len(sites):
        raise TorchMergeError("the merged model mixes sites at fx nodes and at modules; build it with "
                              "one tm.merge call")
    handles = []
    try:
        for name, site in by_module.items():
            module = _expert_module(expert, site.site_module, name)
            handles.append(module.register_forward_hook(_ModuleObserver(name, site.site_module, on_site)))
        yield expert
    finally:
        for h in handles:
            h.remove()


def _expert_module(expert: nn.Module, path: str, site: str) -> nn.Module:
    try:
        return expert.get_submodule(path)
    except AttributeError:
        raise TorchMergeError(f"site {site} follows module '{path}', which the expert "
                              f"({type(expert).__name__}) lacks: experts must share the merged model's "
                              "architecture") from None


class _ModuleObserver:
    """Forward hook passing a module's output tensor (element 0 of a tuple output) to ``on_site``."""

    def __init__(self, name: str, path: str, on_site):
        self.name, self.path, self.on_site = name, path, on_site

    def __call__(self, module, args, output):
        x = first_tensor(output)
        if x is None:
            raise TorchMergeError(f"the expert's module '{self.path}' (site {self.name}) returned a "
                                  f"{type(output).__name__}, not a tensor or a tuple starting with one")
        self.on_site(self.name, x.detach())


def observed_expert(merged, expert: nn.Module, example: Inputs, on_site) -> fx.GraphModule:
    """``expert`` traced, with ``on_site(site_name, activation)`` called at the fx node each site
    of ``merged`` follows. The graph shares the expert's modules (no copy); the expert is unchanged."""
    if example.kwargs:
        raise TorchMergeError(f"the graph build traces experts with positional inputs, but the data's "
                              f"batches are keyword arguments {sorted(example.kwargs)}; merge with "
                              "build='inject'")
    gm = _trace_small(expert, example, getattr(merged, "trace_options", {}))
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, (name, site) in enumerate(merged.sites().items()):
        if site.site_node not in nodes:
            raise TorchMergeError(f"site {name} follows fx node '{site.site_node}', which the expert's "
                                  f"graph ({type(expert).__name__}) lacks: experts must share the merged "
                                  "model's architecture")
        gm.add_submodule(f"_observe_{i}", _Observer(name, on_site))
        node = nodes[site.site_node]
        with gm.graph.inserting_after(node):
            obs = gm.graph.call_module(f"_observe_{i}", (node,))
        node.replace_all_uses_with(obs, delete_user_cb=lambda user, obs=obs: user is not obs)
    gm.recompile()
    return gm


def _trace_small(expert, example: Inputs, options) -> fx.GraphModule:
    """``trace`` on the batch's first two samples: tracing runs its input once (to record shapes),
    and a whole batch would cost one more forward per task. The whole batch if that fails."""
    return example.on_first(lambda x: trace(expert, x.args, **options))


class _Observer(nn.Module):
    def __init__(self, name: str, on_site):
        super().__init__()
        self.name, self.on_site = name, on_site

    def forward(self, x):
        self.on_site(self.name, x.detach())
        return x


def _first_input(batches, device) -> Inputs:
    return first_call(batches, device, what="a task's calibration data")


def _call(model, inputs: Inputs, **extra):
    """``model(*args, **kwargs, **extra)`` for one batch's :class:`Inputs` (on copies: see
    :meth:`Inputs.__call__`)."""
    return inputs(model, **extra)


def expert_moments(merged, expert: nn.Module, batches, max_batches=None, progress=None) -> dict:
    """``{site: Moments}`` of ``expert`` where each site of ``merged`` sits (fx node or module)."""
    sites = merged.sites()
    stats = shared_moments(sites)
    device = _device(expert)
    on_site = lambda name, x: stats[name].update(x, sites[name].channel_axis)  # noqa: E731
    with observing(merged, expert, _first_input(batches, device), on_site) as model, _mode([model], False):
        for x in _progress(iter_calls(batches, max_batches, device), progress, batches, max_batches):
            x(model)
    return _reduced(stats)


def merged_moments(merged, task, batches, *, where: str = "input", on_batch=None,
                   max_batches=None, progress=None) -> dict:
    """``{site: Moments}`` of ``merged`` for ``task`` at each site's input (or output).

    ``on_batch(site_name, site, moments)``, if given, runs after each update, before the site's
    forward: progressive fitting uses it to refresh the site's affine from the running estimate.
    """
    sites = merged.sites()
    stats = shared_moments(sites)
    maps = {}  # sites that ran fused with their norm: stats are of the norm's input, and its map

    def hook(name, site, x, norm_map=None):
        stats[name].update(x.detach(), site.channel_axis)
        if norm_map is not None:
            maps[name] = norm_map
        if on_batch is not None:
            on_batch(name, site, _mapped(stats[name], norm_map))

    handles = []
    try:
        for name, site in sites.items():
            if where == "input":
                handles += _on_affine_input(site, lambda s, x, ab, name=name: hook(name, s, x, ab))
            else:
                handles.append(site.register_forward_hook(
                    lambda m, args, out, name=name: hook(name, m, out)))
        with _mode([merged], False):
            for x in _progress(iter_calls(batches, max_batches, _device(merged)), progress, batches,
                               max_batches):
                _call(merged, x, task=task)
    finally:
        for h in handles:
            h.remove()
    reduced = _reduced(stats)
    return {name: _mapped(m, maps.get(name)) for name, m in reduced.items()}


def _on_affine_input(site, fn) -> list:
    """Hooks calling ``fn(site, x, norm_map)`` before the site's affine runs; returns the handles.

    ``x`` is the tensor the affine acts on (``norm_map`` None: the ``observe`` identity's output),
    or — where the site runs an absorbed eval BatchNorm fused with its affine (one pass, as at
    inference; calibrating through the two-step path would cost an extra pass over every
    activation) — the norm's input, with ``norm_map = (a, b)``: the affine acts on ``a·x + b``."""
    def fused(module, args):
        norm = site._norm
        if norm is not None and site.fuse and not norm.training:
            fn(site, args[0], _norm_map(norm))

    return [site.observe.register_forward_hook(lambda m, args, out: fn(site, out, None)),
            site.register_forward_pre_hook(fused)]


def _norm_map(norm) -> tuple:
    """Per-channel (a, b), float64: an eval BatchNorm computes ``a·x + b``."""
    a = (norm.running_var.double() + norm.eps).rsqrt()
    a = a if norm.weight is None else a * norm.weight.double()
    b = -norm.running_mean.double() * a
    return a, b if norm.bias is None else b + norm.bias.double()


def _mapped(moments: Moments, norm_map) -> Moments:
    """The moments of the affine's input: ``moments`` itself, or mapped through the norm."""
    return moments if norm_map is None else moments.mapped(*norm_map)


def site_moments(merged, experts, data, task, max_batches=None) -> dict:
    """``{site: (merged Moments after the site's affine, expert Moments)}`` on task's data.

    The variance ratio ``merged.var / expert.var`` near 0 is the collapse the correction fixes.
    """
    t = merged.task_index(task)
    expert = expert_moments(merged, experts[t], data[t], max_batches)
    mine = merged_moments(merged, t, data[t], where="output", max_batches=max_batches)
    return {name: (mine[name], expert[name]) for name in mine}


def _reduced(stats: dict) -> dict:
    if _dist_ready():
        for s in stats.values():
            s.all_reduce()
    return stats


# ---------------------------------------------------------------------------------------------
# fitting


def affine_fit(merged: Moments, target_mean, target_var, eps: float) -> tuple:
    """(scale, shift) mapping the merged moments onto the target mean and variance (float64)."""
    scale = (target_var + eps).sqrt() / (merged.var + eps).sqrt()
    return scale, target_mean - scale * merged.mean


def _set_rows(site: TaskAffine, rows, scale, shift) -> None:
    """Set the affine of ``rows``; their low-rank maps restart at zero (the fit is of the affine alone)."""
    with torch.no_grad():
        site.scale[rows] = scale.to(site.scale)
        site.shift[rows] = shift.to(site.shift)
        if site.up is not None:
            site.up[rows] = 0


def _fit_task(merged, expert, batches, t, *, max_batches, passes, eps, progress, what="") -> dict:
    """Progressive closed-form fit of task t's rows: one paired pass, then ``passes − 1`` refits."""
    sites = merged.sites()
    for site in sites.values():  # start from the identity: the fit is relative to the raw input
        _set_rows(site, t, torch.ones(1), torch.zeros(1))
    with stage(f"{what} pass 1 (expert + merged)"):
        target, stats, count = _paired_pass(merged, expert, batches, t, max_batches, eps, progress)
    for p in range(passes):
        if p > 0:
            with stage(f"{what} pass {p + 1}"):
                stats = merged_moments(merged, t, batches, max_batches=max_batches, progress=progress)
        before = {n: site.scale[t].detach().clone() for n, site in sites.items()}
        for name, site in sites.items():
            _set_rows(site, t, *affine_fit(stats[name], target[name].mean, target[name].var, eps))
    return {"sites": len(sites), "batches": count, "change": _change(sites, before, t)}


def _paired_pass(merged, expert, batches, t, max_batches, eps, progress):
    """Expert and merged model on each batch in turn; each site's affine is refit *on that batch*
    so the merged batch statistics equal the expert's before the activations flow downstream.
    Returns cumulative (expert, merged pre-affine) moments. Equal models give the identity.
    A module called several times per forward (injected build) pairs its calls in order."""
    sites = merged.sites()
    target, mine = shared_moments(sites), shared_moments(sites)
    maps = {}  # sites run fused with their norm: ``mine`` holds the norm's input (see _on_affine_input)
    batch_target = {name: [] for name in sites}  # this batch's expert moments, one per call

    def on_expert(name, x):
        batch_target[name].append(target[name].update(x, sites[name].channel_axis).last_batch())

    def pre_hook(site, x, name, norm_map):
        mean_m, var_m = mine[name].update(x.detach(), site.channel_axis).last_batch()
        if norm_map is not None:
            maps[name] = a, b = norm_map
            mean_m, var_m = a * mean_m + b, a.square() * var_m
        calls = batch_target[name]
        mean_e, var_e = calls.pop(0) if len(calls) > 1 else calls[0]
        scale = (var_e + eps).sqrt() / (var_m + eps).sqrt()
        _set_rows(site, t, scale, mean_e - scale * mean_m)

    handles = [h for name, site in sites.items()
               for h in _on_affine_input(site, lambda s, x, ab, name=name: pre_hook(s, x, name, ab))]
    device_e, device_m, count = _device(expert), _device(merged), 0
    try:
        with observing(merged, expert, _first_input(batches, device_e), on_expert) as gm, \
                _mode([gm, merged], False):
            for x in _progress(iter_calls(batches, max_batches), progress, batches, max_batches):
                count += 1
                for calls in batch_target.values():
                    calls.clear()
                x.to(device_e)(gm)
                _call(merged, x.to(device_m), task=t)
    finally:
        for h in handles:
            h.remove()
    mine = _reduced(mine)
    return _reduced(target), {name: _mapped(m, maps.get(name)) for name, m in mine.items()}, count


def _change(sites, before, t) -> float:
    """Largest relative change of a scale in the last pass: how far from converged the fit is."""
    return max(float(((site.scale[t].detach() - before[n]).abs() / before[n].abs().clamp_min(1e-6)).max())
               for n, site in sites.items())


def _fit_shared(merged, experts, data, *, max_batches, passes, eps, progress) -> dict:
    """REPAIR: one affine for all tasks, targets = experts' statistics averaged over tasks."""
    present = [t for t, d in enumerate(data) if d is not None]
    targets = []
    for t in present:
        with stage(f"calibrate repair: {merged.task_names[t]} expert stats"):
            targets.append(expert_moments(merged, experts[t], data[t], max_batches, progress))
    sites = merged.sites()
    mean = {n: torch.stack([tg[n].mean for tg in targets]).mean(0) for n in sites}
    var = {n: torch.stack([tg[n].var.sqrt() for tg in targets]).mean(0).square() for n in sites}
    union = _Interleaved([data[t] for t in present], max_batches)
    for site in sites.values():
        _set_rows(site, slice(None), torch.ones(1), torch.zeros(1))

    def refit(name, site, moments):
        _set_rows(site, slice(None), *affine_fit(moments, mean[name], var[name], eps))

    for p in range(passes):
        online = p == 0 and passes > 1
        with stage(f"calibrate repair: pass {p + 1}"):
            stats = merged_moments(merged, present[0], union, on_batch=refit if online else None,
                                   progress=progress)
        for name, site in sites.items():
            refit(name, site, stats[name])
    return {merged.task_names[t]: {"sites": len(sites), "shared": True} for t in present}


class _Interleaved:
    """Batches of several tasks, round-robin (re-iterable: one pass per ``iter``)."""

    def __init__(self, sources, max_batches):
        self.sources, self.max_batches = sources, max_batches

    def __iter__(self):
        streams = [iter_calls(s, self.max_batches) for s in self.sources]
        for group in itertools.zip_longest(*streams):
            yield from (b for b in group if b is not None)


# ---------------------------------------------------------------------------------------------
# affine+tune: distil the expert into the task's affine rows


def tune(merged, expert, batches, task, *, steps=100, lr=1e-2, loss="kl", heads=False,
         max_batches=None, holdout: int = 0) -> dict:
    """Adam steps on task ``task``'s affine rows (and low-rank maps, and head) distilling
    ``expert``'s outputs.

    The learning rate is ``lr``, falling linearly to zero over the last
    :data:`TUNE_DECAY_FRACTION` of the steps (:func:`tune_lr_factor`). No labels are used.
    ``loss="kl"``: KL(softmax(expert) ‖ softmax(merged)) on logits [B, K]; ``"mse"``: mean
    squared error for any output. Returns ``{"before", "after", "restored", "best_step"}``: the
    mean loss over the batches before the steps and for the parameters kept. Those are the last
    step's, unless the steps did not lower the loss (a rate too high for these parameters
    diverges): then they are put back as they were, with a warning, and ``"restored"`` is True.
    ``holdout=k``: the last ``k`` batches are not tuned on; the loss on them is measured before,
    after each pass over the others and at the end, and the parameters with the lowest are kept
    (``"best_step"``; ``"before"``/``"after"`` are held-out losses then).
    """
    t = merged.task_index(task)
    params = [p for site in merged.sites().values() for p in (site.scale, site.shift, site.down, site.up)
              if p is not None]
    if heads:
        params += [p for h in merged.heads().values() for p in h.heads[t].parameters()]
    device = _device(merged)
    batches_list = list(iter_calls(batches, max_batches, device))
    if not batches_list or steps <= 0:
        return {"before": float("nan"), "after": float("nan"), "restored": False, "best_step": 0}
    if not validate._count(holdout):
        raise TorchMergeError(f"holdout must be an int >= 0 (batches held out of the tuning), got {holdout!r}")
    if holdout >= len(batches_list):
        raise TorchMergeError(f"tune_holdout={holdout} holds out every batch of task "
                              f"{merged.task_names[t]!r} ({len(batches_list)} batches): hold out fewer, "
                              "or give more batches (max_batches=)")
    trained = range(len(batches_list) - holdout)
    watched = range(len(batches_list) - holdout, len(batches_list)) if holdout else trained
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: tune_lr_factor(step, steps))
    targets = _Targets(expert, len(batches_list))

    def watched_loss():
        return _mean_loss(merged, t, batches_list, targets, loss, watched)

    with _only_trainable(merged, params), _mode([merged, expert], False):
        before = watched_loss()
        best = (before, 0, [p.detach().clone() for p in params])  # (loss, step, parameters)
        with torch.enable_grad():
            for step in bar(range(steps), "tune steps"):
                i = trained[step % len(trained)]
                x = batches_list[i]
                out = logits_of(_call(merged, x, task=t))
                value = _distill(out, targets(i, x).to(out), loss)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                schedule.step()
                if holdout and (step + 1) % len(trained) == 0 and step + 1 < steps:
                    best = _better_of(best, watched_loss(), step + 1, params)
        last = watched_loss()  # the parameters as they are: kept without a copy when best
        best = (last, steps, None) if _lower(last, best[0]) else best
    after, best_step, kept = best
    if best_step != steps:
        with torch.no_grad():
            for p, value in zip(params, kept):
                p.copy_(value)
    if best_step == 0:
        warnings.warn(f"tuning task {merged.task_names[t]!r} did not lower its distillation loss "
                      f"({'held-out ' if holdout else ''}{before:.4g} before {steps} steps at tune_lr={lr:g}), "
                      "so its parameters are put back as they were before tuning: there was little left "
                      "to gain, or the rate is too high for them (try a lower tune_lr)", stacklevel=2)
    return {"before": before, "after": after, "restored": best_step != steps, "best_step": best_step}


def _better_of(best, loss: float, step: int, params) -> tuple:
    """``best`` or, when ``loss`` is lower, ``(loss, step, a copy of params)``."""
    return (loss, step, [p.detach().clone() for p in params]) if _lower(loss, best[0]) else best


def _lower(loss: float, than: float) -> bool:
    """``loss < than``, where NaN is never lower and anything finite is lower than NaN."""
    return not math.isnan(loss) and (loss < than or math.isnan(than))


@torch.no_grad()
def _mean_loss(merged, t, batches_list, targets, loss, indices) -> float:
    """The distillation loss of task ``t``, mean over the batches at ``indices``."""
    total = 0.0
    for i in indices:
        out = logits_of(_call(merged, batches_list[i], task=t))
        total += float(_distill(out, targets(i, batches_list[i]).to(out), loss))
    return total / len(indices)


def tune_lr_factor(step: int, steps: int) -> float:
    """The factor on ``tune``'s learning rate at ``step`` (0-based) of ``steps``: 1, then a linear
    fall over the last :data:`TUNE_DECAY_FRACTION` of the steps, reaching ``1 / decay steps`` at
    the last one (never 0: every step moves).

    >>> [round(tune_lr_factor(s, 10), 2) for s in range(10)]
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]
    """
    decay = max(1, round(steps * TUNE_DECAY_FRACTION))
    start = steps - decay
    return 1.0 if step < start else (steps - step) / decay


#: expert outputs ``tune`` keeps between its passes over the batches (bytes, all batches together)
TARGET_CACHE_BYTES = 256 * 2 ** 20


class _Targets:
    """The expert's logits per batch: each batch's computed once and kept while they all fit in
    :data:`TARGET_CACHE_BYTES` (the expert is in eval mode, so they are the same on every pass;
    600 steps over 16 batches, and the loss checks before and after, run the expert 16 times
    instead of 632), recomputed otherwise. Every batch is used at least twice (a step and a
    check), so keeping always pays."""

    def __init__(self, expert, batches: int):
        self.expert, self.batches = expert, batches
        self.kept = {}

    def __call__(self, i: int, x: Inputs) -> torch.Tensor:
        if i in self.kept:
            return self.kept[i]
        with torch.no_grad():
            target = logits_of(x.to(_device(self.expert))(self.expert))
        if target.numel() * target.element_size() * self.batches <= TARGET_CACHE_BYTES:
            self.kept[i] = target
        return target


def logits_of(output) -> torch.Tensor:
    """The tensor distillation compares: ``output.logits`` (Hugging Face output objects), the
    output itself, or its first floating tensor (tuples, dicts).

    >>> logits_of((torch.zeros(2, 3), torch.ones(1))).shape
    torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    leaves = [v for v in pytree.tree_leaves(output) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not leaves:
        raise TorchMergeError(f"the model returned a {type(output).__name__} without a floating tensor; "
                              "tune needs logits (a tensor, .logits, or a tuple starting with one)")
    return leaves[0]


def _distill(out, target, loss):
    if loss == "mse":
        return F.mse_loss(out.float(), target.float())
    if out.dim() < 2:
        raise TorchMergeError(f"tune_loss='kl' needs logits [..., K], got output shape {tuple(out.shape)}; "
                              "use tune_loss='mse'")
    out, target = out.flatten(0, -2), target.flatten(0, -2)  # [B, T, K] (language models) -> [B·T, K]
    return F.kl_div(out.float().log_softmax(-1), target.float().log_softmax(-1), log_target=True,
                    reduction="batchmean")


@contextlib.contextmanager
def _only_trainable(model, params):
    """Freeze every parameter but ``params`` (flags restored on exit)."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


__all__ = ["calibrate", "MODES", "AUTO_TUNE_RANK", "AUTO_TUNE_STEPS", "TUNE_DECAY_FRACTION", "expert_moments",
           "merged_moments", "site_moments", "affine_fit", "tune", "tune_lr_factor", "logits_of", "observing"]
