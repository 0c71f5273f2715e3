"""DARE — Drop And REscale (Yu, Yu, Yu, Huang, Li 2024, "Language Models are Super Mario"):

    τ̃_i = m_i ∘ τ_i / (1 − p),   m_i ~ Bernoulli(1 − p) element-wise   (rescale=True)
    θ* = θ₀ + λ Σ_i τ̃_i                                              (combine="sum")
    θ* = TIES(τ̃_1, …, τ̃_T; k, λ)                                     (combine="ties")

Defaults: p = 0.9 (the drop rate the paper shows is harmless for fine-tuned LMs; lower it for
small or long-fine-tuned models), λ = 0.4 (as Task Arithmetic, so p = 0 reproduces it exactly),
rescale = True, seed = 0, k = 0.2 (only for combine="ties").

Randomness: one ``torch.Generator`` on the tensors' device, reseeded per (key, expert) from
``seed``, so results are reproducible and the same drop mask is seen in every pass. CPU and CUDA
generators produce different streams: the same seed gives different masks on different devices.

>>> import torch
>>> from torchmerge.methods import dare
>>> base = {"w": torch.zeros(1000)}
>>> experts = [{"w": torch.ones(1000)}]
>>> w = dare(experts, base, p=0.5, lam=1.0).state["w"]
>>> sorted(set(w.tolist())), 400 < int((w > 0).sum()) < 600
([0.0, 2.0], True)
"""
from __future__ import annotations

import torch

from .base import (Aligned, MergeResult, add_to_base, check_choice, check_degenerate, check_fraction,
                   check_nonneg, summed_taus, zero_lam)
from .ties import ties_merge_source


class Dropped:
    """Wraps :class:`Aligned` so that ``tau(i, key)`` returns the dropped-and-rescaled τ̃_i."""

    def __init__(self, aligned: Aligned, p: float, rescale: bool, seed: int):
        self.al, self.p, self.rescale, self.seed = aligned, p, rescale, seed
        self._gens: dict = {}
        self._key_index = {k: j for j, k in enumerate(aligned.keys)}

    def __getattr__(self, name):  # keys, float_keys, experts, num_tasks, base, out, passthrough
        return getattr(self.al, name)

    def tau(self, i: int, key: str, theta0=None) -> torch.Tensor:
        tau = self.al.tau(i, key, theta0)
        if self.p == 0.0:
            return tau
        dev = tau.device
        gen = self._gens.get(dev)
        if gen is None:
            gen = self._gens[dev] = torch.Generator(device=dev)
        gen.manual_seed(self.seed * 1_000_003 + self._key_index[key] * self.al.num_tasks + i)
        keep = torch.rand(tau.shape, generator=gen, device=dev) >= self.p
        tau = tau * keep
        return tau / (1.0 - self.p) if self.rescale else tau


def dare(experts, base=None, p: float = 0.9, lam: float = 0.4, rescale: bool = True,
         seed: int = 0, combine: str = "sum", k: float = 0.2) -> MergeResult:
    """DARE on each task vector, then Task Arithmetic (``combine="sum"``) or TIES."""
    p = check_fraction("p", p, closed_low=True, closed_high=False)
    lam = check_nonneg("lam", lam)
    combine = check_choice("combine", combine, {"sum", "ties"})
    k = check_fraction("k", k)
    al = Aligned(experts, base)
    src = Dropped(al, p, bool(rescale), int(seed))
    info = {"method": "dare", "p": p, "lam": lam, "rescale": bool(rescale), "seed": int(seed),
            "combine": combine}
    check_degenerate(al, info, around_mean="the result is the average plus randomly dropped "
                     "deviations from it (noise)", zero=zero_lam(lam))
    if combine == "ties":
        info["k"] = k
        return ties_merge_source(src, k, lam, info)
    return MergeResult(state=add_to_base(src, lam, summed_taus(src)), info=info)
