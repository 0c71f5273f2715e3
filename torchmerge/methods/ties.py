"""TIES-Merging (Yadav, Tam, Choshen, Raffel, Bansal 2023, "TIES-Merging: Resolving Interference
When Merging Models"):

1. **Trim**: keep each task vector's top-k entries by magnitude over the *whole* flattened vector
   (all merged keys together), zero the rest. Default k = 0.2 (fraction kept); exactly
   ``K = max(1, round(k·N))`` largest magnitudes are kept, plus any entries tied with the K-th.
2. **Elect**: γ = sign(Σ_i trimmed_i) per entry.
3. **Disjoint mean**: τ_m = mean of the trimmed entries whose sign equals γ (zeros don't count).
4. θ* = θ₀ + λ τ_m, default λ = 1.0 (the paper's example; it sweeps 0.8–2.5).

With ``base=None`` (θ₀ = mean of the experts) Σ_i τ_i = 0: for T = 2 (τ_1 = −τ_2) every elected
sign is rounding noise, and for more experts TIES trims deviations from the mean rather than from
a pretrained model: that call warns; give a real base. λ = 0 (the result is θ₀) warns too.

Where Σ_i trimmed_i is exactly 0 the entry stays θ₀ (the official code instead falls back to the
majority sign over the whole model; the two differ only on exact cancellations).

Memory: the top-k threshold is found *exactly* without concatenating the experts: a two-pass radix
select over the float32 bit patterns of |τ_i| (non-negative floats order like their bits), with
``bincount`` histograms of the high 16 bits, then of the low 16 bits inside the selected bucket.
Task vectors are recomputed per key, so peak memory stays near inputs + output.

>>> import torch
>>> from torchmerge.methods import ties
>>> base = {"w": torch.zeros(4)}
>>> experts = [{"w": torch.tensor([3.0, -1.0, 0.5, 0.0])}, {"w": torch.tensor([-2.0, 2.0, 0.0, 1.0])}]
>>> ties(experts, base, k=0.5, lam=1.0).state["w"].tolist()
[3.0, 2.0, 0.0, 0.0]
"""
from __future__ import annotations

import torch

from .base import (Aligned, MergeResult, add_to_base, check_degenerate, check_fraction, check_nonneg,
                   zero_lam)

_HI = 1 << 15  # high 16 bits of a non-negative float32 pattern: 0..32767
_LO = 1 << 16


def magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """|t| as float32 bit patterns (int32); their order is the order of the magnitudes."""
    return t.detach().abs().to(torch.float32).view(torch.int32)


def _top_index(counts: torch.Tensor, need: int) -> tuple[int, int]:
    """Largest bin b with #(entries in bins ≥ b) ≥ need, and #(entries in bins > b)."""
    at_least = counts.flip(0).cumsum(0).flip(0)
    b = int((at_least >= need).nonzero().max())
    above = int(at_least[b + 1]) if b + 1 < counts.numel() else 0
    return b, above


def topk_thresholds(src, k: float) -> list[int]:
    """Per task vector, the float32 bit pattern of its K-th largest magnitude (K = round(k·N))."""
    T, keys = src.num_tasks, src.float_keys
    n_total = sum(src.experts[0][key].numel() for key in keys)
    if n_total == 0:
        return [0] * T
    K = max(1, round(k * n_total))
    if K >= n_total:
        return [0] * T  # keep everything
    dev = src.experts[0][keys[0]].device
    hi = torch.zeros(T, _HI, dtype=torch.int64, device=dev)
    for key in keys:  # pass 1: histogram of the high bits
        theta0 = src.base(key)
        for i in range(T):
            bits = magnitude_bits(src.tau(i, key, theta0)).reshape(-1)
            hi[i] += torch.bincount((bits >> 16).long(), minlength=_HI).to(dev)
    picks = [_top_index(hi[i], K) for i in range(T)]
    lo = torch.zeros(T, _LO, dtype=torch.int64, device=dev)
    for key in keys:  # pass 2: low bits inside each expert's selected bucket
        theta0 = src.base(key)
        for i in range(T):
            bits = magnitude_bits(src.tau(i, key, theta0)).reshape(-1)
            sel = bits[(bits >> 16) == picks[i][0]] & 0xFFFF
            lo[i] += torch.bincount(sel.long(), minlength=_LO).to(dev)
    out = []
    for i, (b, above) in enumerate(picks):
        l, _ = _top_index(lo[i], K - above)
        out.append((b << 16) | l)
    return out


def trimmed(src, i: int, key: str, theta0, threshold_bits: int) -> torch.Tensor:
    tau = src.tau(i, key, theta0)
    return tau * (magnitude_bits(tau) >= threshold_bits)


def ties_key(src, key: str, theta0: torch.Tensor, thresholds: list[int]) -> torch.Tensor:
    """The disjoint-mean merged task vector τ_m for one key (before the λ scaling)."""
    T = src.num_tasks
    sign = torch.sign(sum(trimmed(src, i, key, theta0, thresholds[i]) for i in range(T)))
    num = torch.zeros_like(theta0)
    cnt = torch.zeros_like(theta0)
    for i in range(T):
        t = trimmed(src, i, key, theta0, thresholds[i])
        agree = (torch.sign(t) == sign) & (t != 0)
        num += torch.where(agree, t, 0.0)
        cnt += agree
    return num / cnt.clamp_min(1)


def ties_merge_source(src, k: float, lam: float, info: dict) -> MergeResult:
    thresholds = topk_thresholds(src, k)
    state = add_to_base(src, lam, lambda key, theta0: ties_key(src, key, theta0, thresholds))
    return MergeResult(state=state, info=info)


def ties(experts, base=None, k: float = 0.2, lam: float = 1.0) -> MergeResult:
    """TIES-Merging; see the module docstring for the formula and defaults."""
    k = check_fraction("k", k)
    lam = check_nonneg("lam", lam)
    src, info = Aligned(experts, base), {"method": "ties", "k": k, "lam": lam}
    check_degenerate(src, info, around_mean="the elected signs are rounding noise for 2 experts (for "
                     "more, TIES trims deviations from the mean, not from a pretrained model)",
                     zero=zero_lam(lam))
    return ties_merge_source(src, k, lam, info)
