"""``tm.merge``: discovery → alignment → merging → rewriting → calibration, in one call."""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from . import methods as merge_methods
from . import guards, validate
from .align import align_many
from .correct import fit_affines
from .discover import discover
from .errors import ShapeError, TorchMergeError, TraceError
from .inject import SiteHook, build_injected
from .merged import GraphMergedModel, MergedModel
from .progress import scoped, stage
from .rewrite import build_graph, head_modules
from .spec import PermutationSpec, permute
from .stats import layer_input_grams
from .task_weights import TaskWeights
from .tree import device_of, fit_sizes, has_attention, under as _under

CORRECTIONS = validate.CORRECTIONS
BUILDS = validate.BUILDS


@scoped
def merge(experts, method: str | None = None, base=None, data=None, *, align="auto",
          correction="affine", heads="auto", sites="layer", example_inputs=None, task_names=None,
          leaf_modules=(), concrete_args=None, max_batches=None, allow_uncorrected=False,
          calibration=None, alignment=None, build: str = "auto", seed: int = 0,
          progress: bool | None = None, **method_kwargs) -> MergedModel:
    """Merge ``experts`` into one task-conditioned :class:`MergedModel`.

    ``experts``: modules of one architecture (task heads may differ in size). ``base``: None, one
    module, or one module per expert (non-local: the init each expert descends from; the bases are
    aligned and the experts follow their base's permutation). ``data``: one iterable of batches
    per task (tensors, ``(x, y)`` tuples or dicts), used by activation alignment, data-driven
    methods and the correction. ``align``: "weight", "activation", None, or "auto" (default:
    activation matching for transformers — experts with attention modules — when there is data,
    weight matching otherwise; see docs/results.md for why). ``correction``:
    "affine" (task-wise, Sharma et al. 2024), "repair" (one shared affine), "affine+tune", or None.
    ``method``: a key of ``tm.methods.METHODS`` or ``"pleas"`` (which matches units itself, so
    ``align`` is not used, and needs ``correction=None``); None (default): ``"task_arithmetic"``
    with a base, else ``"regmean"`` with data, else ``"average"`` (task vectors need a base; see
    docs/guide.md, "Degenerate settings"). ``method_kwargs`` go to the method (e.g. ``lam=0.4``,
    ``k=0.2``, ``width=1.5``). ``merged.info`` records what was done: ``method``, ``merge_info``
    (the method's own record), ``alignment`` (sweeps and convergence per expert) and ``warnings``
    (every degenerate setting, fallback or unconverged solver, also raised as ``UserWarning``).
    ``calibration``: keyword options of :func:`torchmerge.calibrate` (``passes``, ``tune_steps``...).
    ``alignment``: options of :func:`torchmerge.align` (``max_iter``, ``probes_per_group``).
    ``heads``: "auto" (the modules feeding the output), a list of module paths, or a predicate ``(path, module) -> bool``.
    ``sites``: "layer", "block", a list of module paths, or a predicate ``(where, module) -> bool``
    (``where``: the fx node in the graph build, the module path in the injected build).
    ``build``: "graph" (the fx-rewritten reference expert), "inject" (a copy of the reference
    expert, of its own class, with task modules injected: for models torch.fx cannot trace, e.g.
    Hugging Face transformers), or "auto" (graph when torch.fx traces the reference, else inject).
    ``progress``: tqdm bars naming each long stage (discovery, alignment sweeps, statistics, each
    calibration pass); None (default): when tqdm is installed and stderr is a terminal.

    >>> import torch, torchmerge as tm
    >>> experts = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ...            for _ in range(2)]
    >>> data = [[(torch.randn(16, 4), torch.randint(0, 3, (16,)))] for _ in experts]
    >>> merged = tm.merge(experts, data=data, correction="affine")   # no base: RegMean
    >>> merged(torch.randn(5, 4), task=torch.tensor([0, 1, 1, 0, 1])).shape
    torch.Size([5, 3])
    >>> merged.info["method"], merged.info["alignment"]["converged"], merged.info["warnings"]
    ('regmean', [True, True], [])
    """
    align_options = validate.alignment_options(alignment)
    align = _resolved_align(align, experts, data)
    if method == "route":  # routers over the experts' frozen blocks: its own build (torchmerge/route.py)
        from .route import merge_route

        if base is not None:
            raise TorchMergeError("method='route' routes between the experts themselves: pass base=None")
        return merge_route(experts, data, align=align, heads=heads, task_names=task_names,
                           correction=correction, alignment_options=align_options,
                           max_batches=max_batches, seed=seed, example_inputs=example_inputs,
                           **method_kwargs)
    method = _default_method(method, base, data)
    experts, data, example = validate.merge_arguments(
        experts, method, base, data, align=align, correction=correction, heads=heads, sites=sites,
        example_inputs=example_inputs, task_names=task_names, leaf_modules=leaf_modules,
        concrete_args=concrete_args, max_batches=max_batches, allow_uncorrected=allow_uncorrected,
        calibration=calibration, build=build, seed=seed, method_kwargs=method_kwargs)
    reference = experts[0]
    spec = PermutationSpec(groups={}, axes={})  # nothing to align: discovery only when needed
    if align is not None or heads == "auto" or method == "pleas":
        spec = _discover(reference, example, leaf_modules, concrete_args)
    head_paths = head_modules(reference, spec, heads)
    names = task_names or [f"task{i}" for i in range(len(experts))]
    build = _Build(build, example, sites, head_paths, names, leaf_modules, concrete_args)

    if method == "pleas":
        merged, result_info, aligned = _pleas(experts, spec, data, build, max_batches, seed, method_kwargs)
    else:
        merged, result_info, aligned = _aligned_merge(experts, spec, base, data, align, method, build,
                                                      max_batches, seed, method_kwargs, align_options)
    merged = guards.strip_hooks(merged.to(_device_or_cpu(reference)), keep=(SiteHook,))  # not the user's hooks
    alignment = result_info.pop("alignment", None)
    merged.info = {"method": method, "align": align, "correction": correction, "spec": spec,
                   "build": build.used, "merge_info": result_info, "alignment": alignment,
                   "warnings": list(result_info.get("warnings", [])) + _unconverged(alignment)}
    if aligned is not None and "perms" in result_info:
        merged.info["aligned_fingerprints"] = guards.fingerprints(experts, spec, result_info["perms"])
    if correction is not None:
        fit_affines(merged, aligned, data, mode=correction, max_batches=max_batches,
                    allow_uncorrected=allow_uncorrected, **(calibration or {}))
    return merged


def _discover(reference, example, leaf_modules, concrete_args):
    """``discover`` on the example's first two samples (capture and verification run their input
    several times: a whole batch costs that many whole forwards), the whole example if that fails."""
    return example.on_first(lambda x: discover(reference, x, leaf_modules=leaf_modules,
                                               concrete_args=concrete_args))


class _Build:
    """Builds the merged model from merged weights, by fx rewriting or by injection."""

    def __init__(self, mode, example, sites, head_paths, task_names, leaf_modules, concrete_args):
        self.mode, self.example, self.sites, self.head_paths = mode, example, sites, head_paths
        self.task_names, self.leaf_modules, self.concrete_args = task_names, leaf_modules, concrete_args
        self.used = None

    def __call__(self, template, state, heads_per_task, weights=None, experts=None,
                 attributes_of=None) -> MergedModel:
        body = self._graph(template, state, heads_per_task)
        if body is not None:
            merged = GraphMergedModel(body, self.task_names, weights)
            merged.trace_options = {"leaf_modules": self.leaf_modules, "concrete_args": self.concrete_args}
            self.used = "graph"
            return merged
        self.used = "inject"
        return build_injected(template, state, heads_per_task, self.head_paths, self.sites, self.example,
                              self.task_names, weights, experts, attributes_of)

    def _graph(self, template, state, heads_per_task):
        """The fx body, or None where the injected build is to be used."""
        if self.mode == "inject":
            return None
        if self.example.kwargs:
            if self.mode == "graph":
                raise TorchMergeError(f"build='graph' traces positional tensors, but the example call has "
                                      f"keyword arguments {sorted(self.example.kwargs)}; pass build='inject' "
                                      "(or 'auto')")
            return None
        try:
            return build_graph(template, self.example.args, state, heads_per_task, self.head_paths,
                               self.sites, self.leaf_modules, self.concrete_args)
        except (TraceError, ShapeError):
            if self.mode == "graph":
                raise
            return None


def _aligned_merge(experts, spec, base, data, align, method, build, max_batches, seed, method_kwargs,
                   align_options):
    """Align (permutations), merge the shared weights, build: the path of every method but PLeaS."""
    head_paths = build.head_paths
    bases = _bases(base, len(experts))
    perms, alignment = [spec.identity_perms()] * len(experts), None
    if align is not None:
        align_data = None if align == "weight" else _union(data, max_batches)
        # the heads chosen here (heads= may name more than the spec's output heads) are per task:
        # left out of matching, so they may differ in shape
        heads = set(spec.heads) | {p for p, _ in spec.axes if _under(p, head_paths)}
        perms, runs = align_many(experts, spec, bases=bases, method=align, data=align_data, seed=seed,
                                 exclude=heads, return_results=True, **align_options)
        alignment = {"method": align, "iterations": [r.sweeps if r else 0 for r in runs],
                     "converged": [r.converged if r else True for r in runs]}
    aligned = [_permuted(e, spec, p) for e, p in zip(experts, perms)]
    aligned_bases = None if bases is None else [_permuted(b, spec, p) for b, p in zip(bases, perms)]
    shared = [_weights(e, head_paths) for e in aligned]
    base_states = _base_states(aligned_bases, bases, head_paths)
    stats = _method_stats(method, aligned, data, max_batches, head_paths)
    result = merge_methods.merge_states(method, shared, base_states, stats, **method_kwargs)
    result.state.update(_averaged_buffers(aligned, head_paths))
    heads_per_task = [{p: e.get_submodule(p) for p in head_paths} for e in aligned]
    weights = TaskWeights.from_result(result) if result.masks else None
    merged = build(aligned[0], result.state, heads_per_task, weights, aligned)
    return merged, {**result.info, "perms": perms, "alignment": alignment}, aligned


def _resolved_align(align, experts, data):
    """``align="auto"``: activation matching for transformers when there is data — it beat weight
    matching on every transformer measured (HF ViT and GPT-2 experts from two pretrainings, with
    and without the correction: docs/results.md) —, weight matching otherwise (CNNs: the demo)."""
    if align != "auto":
        return align
    models = experts if isinstance(experts, (list, tuple)) else []
    transformer = bool(models) and isinstance(models[0], nn.Module) and has_attention(models[0])
    return "activation" if transformer and data is not None else "weight"


def _default_method(method, base, data):
    """``method=None``: task arithmetic around a base; without a base (task vectors would sum to
    zero, making every task-vector method an average) RegMean when there is data, else the average."""
    if method is not None:
        return method
    return "task_arithmetic" if base is not None else "regmean" if data is not None else "average"


def _unconverged(alignment) -> list:
    if not alignment:
        return []
    bad = [i for i, ok in enumerate(alignment["converged"]) if not ok]
    return [f"alignment of expert(s) {bad} did not converge within the sweep limit"] if bad else []


def _permuted(model: nn.Module, spec, perms) -> nn.Module:
    """``permute`` — or the model itself under identity permutations (read, never written: one
    model copy fewer, which matters for large experts)."""
    if all(torch.equal(p, torch.arange(len(p))) for p in perms.values()):
        return model
    return permute(model, spec, perms)


def _pleas(experts, spec, data, build, max_batches, seed, method_kwargs):
    """PLeaS matches units itself (partial, possibly wider) and fits layers by least squares."""
    head_paths = build.head_paths
    head_params = [n for n, _ in experts[0].named_parameters(remove_duplicate=False)  # tied heads too
                   if _under(n, head_paths)]
    result = merge_methods.pleas(experts, spec, data, heads=head_params, max_batches=max_batches,
                                 seed=seed, **method_kwargs)
    heads_per_task = [{p: _with_tensors(result.model.get_submodule(p), p, state) for p in head_paths}
                      for state in result.heads]
    merged = build(result.model, _shared_state(result.model, head_paths), heads_per_task, None, experts,
                   attributes_of=experts[0])
    return merged, {**result.info, "widths": result.widths, "sources": result.sources}, None


def _with_tensors(module: nn.Module, path: str, state: dict) -> nn.Module:
    """A copy of ``module`` holding ``state``'s tensors under ``path`` (shapes may differ)."""
    out = copy.deepcopy(module)
    for name, value in state.items():
        if _under(name, [path]):
            leaf = name[len(path) + 1:]
            owner = out.get_submodule(leaf.rpartition(".")[0]) if "." in leaf else out
            setattr(owner, leaf.rpartition(".")[2], nn.Parameter(value.detach().clone()))
    fit_sizes(out)  # nn.Linear's out_features, Conv1D's nf, ... follow the task's shapes
    return out


def _bases(base, n):
    if base is None:
        return None
    if isinstance(base, nn.Module):
        return [base] * n
    base = list(base)
    if len(base) != n or not all(isinstance(b, nn.Module) for b in base):
        raise TorchMergeError(f"base must be None, one module, or {n} modules (one per expert)")
    return base


def _union(data, max_batches):
    """Batches of every task, interleaved (activation alignment sees all tasks)."""
    streams = [list(itertools.islice(iter(d), max_batches)) for d in data if d is not None]
    return [b for group in itertools.zip_longest(*streams) for b in group if b is not None]


def _weights(model: nn.Module, head_paths) -> dict:
    """The shared *parameters* (what merge methods act on): buffers such as BatchNorm running
    statistics are not task vectors — sparsifying or rescaling them could make a variance negative."""
    params = {n for n, _ in model.named_parameters()}
    return {k: v for k, v in _shared_state(model, head_paths).items() if k in params}


def _averaged_buffers(models, head_paths) -> dict:
    """Floating buffers averaged over the experts (the correction refits the statistics anyway);
    integer buffers (e.g. num_batches_tracked) from the first expert."""
    params = {n for n, _ in models[0].named_parameters()}
    states = [_shared_state(m, head_paths) for m in models]
    return {k: (sum(s[k] for s in states) / len(states) if v.is_floating_point() else v)
            for k, v in states[0].items() if k not in params}


def _shared_state(model: nn.Module, head_paths) -> dict:
    return {k: v for k, v in model.state_dict().items() if not _under(k, head_paths)}


def _base_states(aligned_bases, bases, head_paths):
    if bases is None:
        return None
    if all(b is bases[0] for b in bases):  # one shared base: one state, not T copies
        return _weights(aligned_bases[0], head_paths)
    return [_weights(b, head_paths) for b in aligned_bases]


def _method_stats(method, aligned, data, max_batches, head_paths):
    """Per-expert statistics of the data-driven methods, heads left out (they are not merged)."""
    if method not in ("fisher", "regmean", "mats"):
        return None
    stats = []
    for i, (e, d) in enumerate(zip(aligned, data)):
        with stage(f"{method}: expert {i} {'Fisher' if method == 'fisher' else 'Grams'}"):
            stats.append(merge_methods.diagonal_fisher(e, d, max_batches=max_batches) if method == "fisher"
                         else layer_input_grams(e, d, max_batches=max_batches))
    return [{k: v for k, v in s.items() if not _under(k, head_paths)} for s in stats]


def _device_or_cpu(model):
    return device_of(model, torch.device("cpu"))
