"""Task Arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"):

    θ* = θ₀ + λ Σ_i τ_i,   τ_i = θ_i − θ₀,   default λ = 0.4 (the value the papers in
    ALGORITHMS.md use; Ilharco et al. pick λ on validation data from {0, 0.05, …, 1}).

With ``base=None`` θ₀ is the mean of the experts, so Σ τ_i = 0 and the result is the average
(for every λ): that call warns, as does λ = 0 (the result is θ₀).

>>> import torch
>>> from torchmerge.methods import task_arithmetic
>>> base = {"w": torch.tensor([0.0, 0.0])}
>>> experts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}]
>>> task_arithmetic(experts, base, lam=0.5).state["w"].tolist()
[0.5, 1.0]
"""
from __future__ import annotations

from .base import (Aligned, MergeResult, add_to_base, check_degenerate, check_nonneg, summed_taus,
                   zero_lam)


def task_arithmetic(experts, base=None, lam: float = 0.4) -> MergeResult:
    """θ₀ + λ Σ_i τ_i, key by key (see the module docstring)."""
    lam = check_nonneg("lam", lam)
    al = Aligned(experts, base)
    info = {"method": "task_arithmetic", "lam": lam}
    check_degenerate(al, info, around_mean="the result is the plain average for every lam",
                     zero=zero_lam(lam))
    return MergeResult(state=add_to_base(al, lam, summed_taus(al)), info=info)
