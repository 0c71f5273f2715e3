"""TALL masks and Consensus merging (Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard 2024,
"Localizing Task Information for Improved Model Merging and Compression"):

    τ_MTL = Σ_t τ_t                      (mtl="sum", Task Arithmetic without scaling)
          = λ_ties · TIES(τ_1..τ_T)      (mtl="ties", with ties_k, ties_lam)
    m_t   = 1{ |τ_t| ≥ λ_t · |τ_MTL − τ_t| }          λ scalar or one per task; default 0.4
    task t uses θ₀ + m_t ∘ τ_MTL

m_t keeps the entries where the multi-task vector is closer to expert t than the base is. The
paper picks λ_t per task from {0.2, …, 0.6} on validation data (0.4 is the middle of that grid).
The paper writes "≥"; the official code uses ">" (they differ only on exact ties, e.g. λ = 0).

:func:`tall` returns ``state = θ₀ + τ_MTL``, ``base = θ₀`` and bit-packed masks
(``T`` bits per parameter, ``uint8 [T, ceil(n/8)]`` per key, 1/32 of a float32 copy per task),
so ``result.task_state(t)`` rebuilds task t's weights on demand.

:func:`consensus` keeps only the entries of τ_MTL where at least ``k`` task masks are on
(k=2 removes "selfish" and "catastrophic" weights; k=0 is plain Task Arithmetic/TIES) and returns
one model θ₀ + scale · (c ∘ τ_MTL); ``scale`` (default 1.0) is the Task Arithmetic / TIES coefficient
the paper tunes on validation data.

>>> import torch
>>> from torchmerge.methods import tall
>>> base = {"w": torch.zeros(3)}
>>> experts = [{"w": torch.tensor([1.0, 0.0, 0.25])}, {"w": torch.tensor([0.0, 2.0, 0.25])}]
>>> r = tall(experts, base, lam=0.5)
>>> r.state["w"].tolist(), r.task_state(0)["w"].tolist(), r.task_state(1)["w"].tolist()
([1.0, 2.0, 0.5], [1.0, 0.0, 0.5], [0.0, 2.0, 0.5])
>>> r.mask(0, "w").tolist()
[True, False, True]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import TorchMergeError
from .base import (Aligned, MergeResult, check_choice, check_degenerate, check_fraction, check_nonneg,
                   pack_masks)
from .ties import ties_key, topk_thresholds


def _lambdas(lam, T: int) -> list[float]:
    if isinstance(lam, torch.Tensor):
        lam = lam.tolist()
    if isinstance(lam, Sequence) and not isinstance(lam, str):
        if len(lam) != T:
            raise TorchMergeError(f"lam has {len(lam)} values but there are {T} tasks; give one "
                                  "number or one per task")
        return [check_nonneg(f"lam[{t}]", v) for t, v in enumerate(lam)]
    return [check_nonneg("lam", lam)] * T


class _MTL:
    """Serves θ₀, τ_t and τ_MTL per key for TALL and Consensus."""

    def __init__(self, experts, base, mtl, ties_k, ties_lam):
        self.al = Aligned(experts, base)
        self.mtl = check_choice("mtl", mtl, {"sum", "ties"})
        self.ties_k, self.ties_lam = check_fraction("ties_k", ties_k), check_nonneg("ties_lam", ties_lam)
        self.thresholds = topk_thresholds(self.al, self.ties_k) if self.mtl == "ties" else None

    def key(self, key):
        al = self.al
        theta0 = al.base(key)
        if self.mtl == "sum":
            tau_mtl = sum(al.tau(i, key, theta0) for i in range(al.num_tasks))
        else:
            tau_mtl = self.ties_lam * ties_key(al, key, theta0, self.thresholds)
        return theta0, tau_mtl

    def masks(self, key, theta0, tau_mtl, lams):
        """Boolean [T, numel] TALL masks for one key."""
        rows = []
        for t, lam_t in enumerate(lams):
            tau = self.al.tau(t, key, theta0)
            rows.append((tau.abs() >= lam_t * (tau_mtl - tau).abs()).reshape(-1))
        return torch.stack(rows)


def tall(experts, base=None, lam=0.4, mtl: str = "sum", ties_k: float = 0.2,
         ties_lam: float = 1.0) -> MergeResult:
    """TALL masks: ``result.task_state(t)`` = θ₀ + m_t ∘ τ_MTL (see the module docstring)."""
    src = _MTL(experts, base, mtl, ties_k, ties_lam)
    al = src.al
    lams = _lambdas(lam, al.num_tasks)
    state, base_out, masks = {}, {}, {}
    for key in al.keys:
        if key not in al.float_keys:
            state[key] = al.passthrough(key)
            continue
        theta0, tau_mtl = src.key(key)
        masks[key] = pack_masks(src.masks(key, theta0, tau_mtl, lams))
        state[key] = al.out(key, theta0 + tau_mtl)
        given = al.bases is not None and len(al.bases) == 1
        base_out[key] = al.bases[0][key] if given else al.out(key, theta0)
    info = {"method": "tall", "lam": lams, "mtl": mtl}
    if mtl == "ties":
        info.update(ties_k=src.ties_k, ties_lam=src.ties_lam)
    _check_degenerate(src, info, lams)
    return MergeResult(state=state, masks=masks, base=base_out, info=info)


def _check_degenerate(src: _MTL, info: dict, lams, zero: str | None = None) -> None:
    """Warnings for base=None, ties_lam=0 (τ_MTL = 0) and lam=0 (all masks on)."""
    if src.mtl == "ties" and src.ties_lam == 0:
        zero = "mtl='ties', ties_lam=0: τ_MTL = 0 and the result is the base θ₀; pass ties_lam > 0"
    elif zero is None and all(v == 0 for v in lams):
        zero = ("lam=0: every task mask is all ones, so nothing is localised (task arithmetic on "
                "τ_MTL); pass lam > 0 (the paper picks 0.2-0.6)")
    check_degenerate(src.al, info, around_mean="τ_MTL is 0 (mtl='sum'; sign noise with mtl='ties' "
                     "and 2 experts), so every task's model is the plain average", zero=zero)


def consensus(experts, base=None, k: int = 2, lam=0.4, mtl: str = "sum", scale: float = 1.0,
              ties_k: float = 0.2, ties_lam: float = 1.0) -> MergeResult:
    """Consensus merging: θ₀ + scale · (1{Σ_t m_t ≥ k} ∘ τ_MTL), one shared model."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise TorchMergeError(f"k={k!r} must be a non-negative integer (the number of task masks "
                              "that must agree; 2 in the paper)")
    scale = check_nonneg("scale", scale)
    src = _MTL(experts, base, mtl, ties_k, ties_lam)
    al = src.al
    lams = _lambdas(lam, al.num_tasks)
    state = {}
    for key in al.keys:
        if key not in al.float_keys:
            state[key] = al.passthrough(key)
            continue
        theta0, tau_mtl = src.key(key)
        votes = src.masks(key, theta0, tau_mtl, lams).sum(0).view(tau_mtl.shape)
        state[key] = al.out(key, theta0 + scale * torch.where(votes >= k, tau_mtl, 0.0))
    info = {"method": "consensus", "k": k, "lam": lams, "mtl": mtl, "scale": scale}
    ignored = (f"k={k} > {al.num_tasks} experts: no entry has k masks on" if k > al.num_tasks else
               "scale=0" if scale == 0 else None)
    _check_degenerate(src, info, lams, ignored and f"{ignored}, so the result is the base θ₀; pass "
                      "0 < k <= the number of experts and scale > 0")
    return MergeResult(state=state, info=info)
