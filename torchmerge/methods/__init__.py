"""Merge methods: pure tensor functions on aligned state dicts, one family per file.

Every method returns a :class:`MergeResult`; :func:`merge_states` is the validated entry point
used by the pipeline.

==================  =====================================  ==============================
name                function                               statistics (``stats=``)
==================  =====================================  ==============================
average             :func:`average`                        —
task_arithmetic     :func:`task_arithmetic` (lam=0.4)      —
ties                :func:`ties` (k=0.2, lam=1.0)          —
dare                :func:`dare` (p=0.9, lam=0.4)          —
tall                :func:`tall` (lam=0.4, mtl="sum")      —
consensus           :func:`consensus` (k=2)                —
regmean             :func:`regmean` (alpha=0.9)            per-expert input Grams
fisher              :func:`fisher_merge` (eps=1e-8)        per-expert diagonal Fishers
mats                :func:`mats` (lam=0.3, max_iter=100)   per-expert Grams or Fishers
==================  =====================================  ==============================

>>> import torch
>>> from torchmerge.methods import merge_states
>>> base = {"w": torch.zeros(2)}
>>> experts = [{"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([1.0, 1.0])}]
>>> merge_states("ties", experts, base, k=1.0).state["w"].tolist()
[1.0, 0.0]
"""
from __future__ import annotations

import inspect

from ..errors import TorchMergeError
from .average import average
from .base import MergeResult, pack_masks, task_vectors, unpack_mask
from .dare import dare
from .fisher import diagonal_fisher, fisher_merge
from .mats import conjugate_gradient, mats
from .pleas import PleasResult, pleas
from .regmean import regmean
from .tall import consensus, tall
from .task_arithmetic import task_arithmetic
from .ties import ties

METHODS = {
    "average": average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "tall": tall,
    "consensus": consensus,
    "regmean": regmean,
    "fisher": fisher_merge,
    "mats": mats,
}

# which argument carries the statistics, and what a user must supply
_STATS_ARG = {"regmean": "grams", "fisher": "fishers", "mats": "stats"}
_STATS_NEED = {
    "regmean": "input Gram matrices X_iᵀX_i per expert: a list of {weight name: [d, d] tensor}, "
               "d = in_features (in_channels·kh·kw for convs)",
    "fisher": "diagonal Fishers per expert: a list of {param name: tensor shaped like the param} "
              "(see torchmerge.methods.diagonal_fisher)",
    "mats": "Gram matrices (statistic='gram') or diagonal Fishers (statistic='fisher') per "
            "expert: a list of dicts keyed by parameter name",
}
_DATA_ARGS = {"experts", "base", "grams", "fishers", "stats"}


def hyperparameters(method: str) -> dict:
    """``{name: default}`` of the hyper-parameters ``method`` accepts."""
    fn = _lookup(method)
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()
            if n not in _DATA_ARGS}


def _lookup(method: str):
    if method not in METHODS:
        raise TorchMergeError(f"unknown merge method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method]


def merge_states(method: str, experts, base=None, stats=None, **hyper) -> MergeResult:
    """Merge aligned expert state dicts with ``method`` (a key of :data:`METHODS`).

    ``base``: None (mean of the experts), one state dict, or one per expert; ignored by methods
    that use no base (average, regmean, fisher). ``stats``: per-expert statistics for the
    data-driven methods (regmean, fisher, mats). ``hyper``: the method's keyword arguments;
    unknown names and out-of-range values raise :class:`TorchMergeError`.
    """
    fn = _lookup(method)
    params = inspect.signature(fn).parameters
    valid = [n for n in params if n not in _DATA_ARGS]
    unknown = sorted(set(hyper) - set(valid))
    if unknown:
        raise TorchMergeError(f"unknown hyper-parameter(s) {unknown} for method {method!r}; "
                              f"valid: {', '.join(valid) or '(none)'}")
    kwargs = dict(hyper)
    if "base" in params:
        kwargs["base"] = base
    if method in _STATS_ARG:
        if stats is None:
            raise TorchMergeError(f"method {method!r} is data-driven and needs stats=: "
                                  f"{_STATS_NEED[method]}")
        kwargs[_STATS_ARG[method]] = stats
    elif stats is not None:
        raise TorchMergeError(f"method {method!r} uses no statistics, but stats= was given; "
                              f"data-driven methods: {', '.join(_STATS_ARG)}")
    return fn(experts, **kwargs)


__all__ = [
    "METHODS", "merge_states", "hyperparameters", "MergeResult", "task_vectors", "pack_masks",
    "unpack_mask", "average", "task_arithmetic", "ties", "dare", "tall", "consensus", "regmean",
    "fisher_merge", "diagonal_fisher", "mats", "conjugate_gradient",
    "pleas", "PleasResult",
]
