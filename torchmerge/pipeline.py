"""``tm.merge``: discovery → alignment → merging → rewriting → calibration, in one call."""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from . import methods as merge_methods
from .align import align_many
from .discover import discover
from .correct import MODES, calibrate
from .errors import TorchMergeError
from .merged import MergedModel
from .rewrite import build_graph, head_modules
from .spec import permute
from .stats import iter_inputs, layer_input_grams
from .task_weights import TaskWeights

CORRECTIONS = (None, *MODES)


def merge(experts, method: str = "task_arithmetic", base=None, data=None, *, align="weight",
          correction="affine", heads="auto", sites="layer", example_inputs=None, task_names=None,
          leaf_modules=(), concrete_args=None, max_batches=None, allow_uncorrected=False,
          calibration=None, seed: int = 0, **method_kwargs) -> MergedModel:
    """Merge ``experts`` into one task-conditioned :class:`MergedModel`.

    ``experts``: modules of one architecture (task heads may differ in size). ``base``: None, one
    module, or one module per expert (non-local: the init each expert descends from; the bases are
    aligned and the experts follow their base's permutation). ``data``: one iterable of batches
    per task (tensors, ``(x, y)`` tuples or dicts), used by activation alignment, data-driven
    methods and the correction. ``align``: "weight", "activation" or None. ``correction``:
    "affine" (task-wise, Sharma et al. 2024), "repair" (one shared affine), "affine+tune", or None.
    ``method``: a key of ``tm.methods.METHODS`` or ``"pleas"`` (which matches units itself, so
    ``align`` is not used, and needs ``correction=None``); ``method_kwargs`` go to the method
    (e.g. ``lam=0.4``, ``k=0.2``, ``width=1.5``). ``calibration``: keyword options of
    :func:`torchmerge.calibrate` (``passes``, ``tune_steps``...). ``heads``: "auto" (the modules
    feeding the output), a list of module paths, or a predicate ``(path, module) -> bool``.
    ``sites``: "layer", "block" or a predicate ``(fx node, module or None) -> bool``.

    >>> import torch, torchmerge as tm
    >>> experts = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ...            for _ in range(2)]
    >>> data = [[(torch.randn(16, 4), torch.randint(0, 3, (16,)))] for _ in experts]
    >>> merged = tm.merge(experts, method="ties", data=data, correction="affine")
    >>> merged(torch.randn(5, 4), task=torch.tensor([0, 1, 1, 0, 1])).shape
    torch.Size([5, 3])
    """
    experts = _check_experts(experts)
    data = _check_data(data, len(experts), method, align, correction, allow_uncorrected)
    if correction not in CORRECTIONS:
        raise TorchMergeError(f"unknown correction {correction!r}; valid: {CORRECTIONS}")
    if method == "pleas" and correction is not None:
        raise TorchMergeError("method='pleas' may widen layers, so merged channels no longer match "
                              "the experts' one to one and the affine correction does not apply; its "
                              "least squares already fit each expert's outputs: pass correction=None")
    if method != "pleas":
        merge_methods.hyperparameters(method)  # unknown method names fail before any work
    if task_names is not None and len(task_names) != len(experts):
        raise TorchMergeError(f"{len(task_names)} task names for {len(experts)} experts")
    if example_inputs is None:
        if data is None or data[0] is None:
            raise TorchMergeError("pass example_inputs=<one batch> or data=[batches per task] so the "
                                  "experts can be traced")
        example_inputs = next(iter(iter_inputs(data[0], max_batches=1)))
    reference = experts[0]
    spec = discover(reference, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    head_paths = head_modules(reference, spec, heads)

    if method == "pleas":
        body, result_info, weights, aligned = _pleas(experts, spec, data, head_paths, example_inputs,
                                                     sites, leaf_modules, concrete_args, max_batches,
                                                     seed, method_kwargs)
    else:
        body, result_info, weights, aligned = _aligned_merge(
            experts, spec, base, data, align, method, head_paths, example_inputs, sites, leaf_modules,
            concrete_args, max_batches, seed, method_kwargs)
    names = task_names or [f"task{i}" for i in range(len(experts))]
    merged = MergedModel(body, names, weights).to(_device(reference))
    merged.trace_options = {"leaf_modules": leaf_modules, "concrete_args": concrete_args}
    merged.info = {"method": method, "align": align, "correction": correction, "spec": spec,
                   "merge_info": result_info}
    if correction is not None:
        calibrate(merged, aligned, data, mode=correction, max_batches=max_batches,
                  allow_uncorrected=allow_uncorrected, **(calibration or {}))
    return merged


def _aligned_merge(experts, spec, base, data, align, method, head_paths, example_inputs, sites,
                   leaf_modules, concrete_args, max_batches, seed, method_kwargs):
    """Align (permutations), merge the shared weights, rewrite: the path of every method but PLeaS."""
    bases = _bases(base, len(experts))
    perms = [spec.identity_perms()] * len(experts)
    if align is not None:
        align_data = None if align == "weight" else _union(data, max_batches)
        perms = align_many(experts, spec, bases=bases, method=align, data=align_data, seed=seed)
    aligned = [permute(e, spec, p) for e, p in zip(experts, perms)]
    aligned_bases = None if bases is None else [permute(b, spec, p) for b, p in zip(bases, perms)]
    shared = [_weights(e, head_paths) for e in aligned]
    base_states = _base_states(aligned_bases, bases, head_paths)
    stats = _method_stats(method, aligned, data, max_batches, head_paths)
    result = merge_methods.merge_states(method, shared, base_states, stats, **method_kwargs)
    result.state.update(_averaged_buffers(aligned, head_paths))
    heads_per_task = [{p: e.get_submodule(p) for p in head_paths} for e in aligned]
    body = build_graph(aligned[0], example_inputs, result.state, heads_per_task, head_paths, sites,
                       leaf_modules, concrete_args)
    weights = TaskWeights.from_result(result) if result.masks else None
    return body, {**result.info, "perms": perms}, weights, aligned


def _pleas(experts, spec, data, head_paths, example_inputs, sites, leaf_modules, concrete_args,
           max_batches, seed, method_kwargs):
    """PLeaS matches units itself (partial, possibly wider) and fits layers by least squares."""
    head_params = [n for n, _ in experts[0].named_parameters() if _under(n, head_paths)]
    result = merge_methods.pleas(experts, spec, data, heads=head_params, max_batches=max_batches,
                                 seed=seed, **method_kwargs)
    heads_per_task = [{p: _with_tensors(result.model.get_submodule(p), p, state) for p in head_paths}
                      for state in result.heads]
    body = build_graph(result.model, example_inputs, _shared_state(result.model, head_paths),
                       heads_per_task, head_paths, sites, leaf_modules, concrete_args)
    return body, {**result.info, "widths": result.widths, "sources": result.sources}, None, None


def _with_tensors(module: nn.Module, path: str, state: dict) -> nn.Module:
    """A copy of ``module`` holding ``state``'s tensors under ``path`` (shapes may differ)."""
    out = copy.deepcopy(module)
    for name, value in state.items():
        if _under(name, [path]):
            leaf = name[len(path) + 1:]
            owner = out.get_submodule(leaf.rpartition(".")[0]) if "." in leaf else out
            setattr(owner, leaf.rpartition(".")[2], nn.Parameter(value.detach().clone()))
    if isinstance(out, nn.Linear):
        out.out_features, out.in_features = out.weight.shape
    return out


def _check_experts(experts) -> list:
    experts = list(experts) if not isinstance(experts, nn.Module) else None
    if not experts or not all(isinstance(e, nn.Module) for e in experts):
        raise TorchMergeError("experts must be a non-empty list of torch.nn.Module")
    kinds = {type(e).__name__ for e in experts}
    if len(kinds) > 1:
        raise TorchMergeError(f"experts must share one architecture, got classes {sorted(kinds)}")
    return experts


def _check_data(data, n, method, align, correction, allow_uncorrected):
    data_driven = method in ("regmean", "fisher", "mats", "pleas")
    needs = align == "activation" or data_driven or (correction is not None and not allow_uncorrected)
    if data is None:
        if needs:
            why = [w for w, c in (("align='activation'", align == "activation"),
                                  (f"method={method!r}", data_driven),
                                  (f"correction={correction!r}", correction is not None)) if c]
            raise TorchMergeError(f"{' and '.join(why)} need data=[one iterable of batches per task]; "
                                  "or pass correction=None (and a data-free method) to merge without data")
        return None
    data = list(data)
    if len(data) != n:
        raise TorchMergeError(f"data has {len(data)} entries for {n} experts: give one iterable of "
                              "batches per task (None for a task without data)")
    return data


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


def _under(key, paths) -> bool:
    return any(key == p or key.startswith(p + ".") for p in paths)


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
    if method == "fisher":
        stats = [merge_methods.diagonal_fisher(e, d, max_batches=max_batches) for e, d in zip(aligned, data)]
    elif method in ("regmean", "mats"):
        stats = [layer_input_grams(e, d, max_batches=max_batches) for e, d in zip(aligned, data)]
    else:
        return None
    return [{k: v for k, v in s.items() if not _under(k, head_paths)} for s in stats]


def _device(model: nn.Module):
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")
