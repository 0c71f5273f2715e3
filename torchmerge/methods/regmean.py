"""RegMean — Regression Mean (Jin, Ren, Preotiuc-Pietro, Cheng 2023, "Dataless Knowledge Fusion by
Merging Weights of Language Models"):

For every weight W (shape ``[out, d]``; conv weights ``[out, c, kh, kw]`` are flattened to
``[out, c·kh·kw]``, the unfolded input) with input Gram matrices G_i = X_iᵀ X_i (``[d, d]``):

    G_i ← α G_i + (1 − α) diag(G_i)        (off-diagonals scaled by α, diagonal kept)
    W*  = (Σ_i W_i G_i) (Σ_i G_i)⁻¹         (solved with torch.linalg.solve, float64)

Default α = 0.9. (The official code, bloomberg/dataless-model-merging, leaves the reduction off
by default — α = 1 — and the paper tunes α; 0.9 is the value common re-implementations use.)
Grams are the *sums* X_iᵀX_i, so experts with more examples weigh more; normalise them first
if you want equal weight. Parameters without a Gram (biases, norms) are averaged.
Input features whose Gram diagonal is zero for every expert (dead units) make Σ G_i singular;
those columns of W* are set to the average of the experts' columns.

>>> import torch
>>> from torchmerge.methods import regmean
>>> experts = [{"w": torch.tensor([[1.0, 0.0]])}, {"w": torch.tensor([[0.0, 1.0]])}]
>>> grams = [{"w": torch.diag(torch.tensor([3.0, 1.0]))}, {"w": torch.diag(torch.tensor([1.0, 3.0]))}]
>>> regmean(experts, grams).state["w"].tolist()
[[0.75, 0.75]]
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import ShapeError, TorchMergeError
from .base import Aligned, MergeResult, check_fraction

_SOLVE_DTYPE = torch.float64


def check_stats(al: Aligned, stats, what: str, shape_of) -> list[dict]:
    """``stats``: one dict per expert, same keys, each a key of the experts with the right shape."""
    if isinstance(stats, Mapping) or not isinstance(stats, Sequence) or len(stats) != al.num_tasks:
        raise TorchMergeError(f"{what} must be a list of {al.num_tasks} dicts (one per expert, "
                              f"{{param name: tensor}}); got {type(stats).__name__}")
    keys = set(stats[0])
    for i, s in enumerate(stats):
        if set(s) != keys:
            diff = sorted(keys ^ set(s))[:5]
            raise TorchMergeError(f"{what}[{i}] has different keys than {what}[0]: {diff}")
        for k, v in s.items():
            if k not in al.float_keys:
                raise TorchMergeError(f"{what}[{i}] has key {k!r}, which is not a floating-point "
                                      "parameter of the experts")
            want = shape_of(al.experts[0][k])
            if want is None:
                raise ShapeError(f"{what}[{i}][{k!r}]: parameter of shape "
                                 f"{tuple(al.experts[0][k].shape)} cannot take a Gram (needs a "
                                 "weight matrix or conv kernel, >= 2 dims)")
            if tuple(v.shape) != want:
                raise ShapeError(f"{what}[{i}][{k!r}] has shape {tuple(v.shape)}, expected {want} "
                                 f"for weight shape {tuple(al.experts[0][k].shape)}")
    return list(stats)


def gram_shape(w: torch.Tensor) -> tuple:
    if w.dim() < 2:
        return None
    d = w[0].numel()
    return (d, d)


def reduce_off_diagonal(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G) (a new tensor; ``g`` is not modified)."""
    diag = g.diagonal().clone()
    out = g * alpha
    out.diagonal().copy_(diag)
    return out


def regmean_system(al: Aligned, grams: list[dict], key: str, alpha: float):
    """(Σ G_i, Σ W_i G_i) in float64 for one weight, W_i flattened to [out, d]; accumulated one
    expert at a time so only a few d×d matrices are alive."""
    w0 = al.experts[0][key]
    a = b = None
    for e, g in zip(al.experts, grams):
        gi = g[key].to(device=w0.device, dtype=_SOLVE_DTYPE, copy=True)
        diag = gi.diagonal().clone()
        gi.mul_(alpha).diagonal().copy_(diag)  # α G + (1 − α) diag G, in place on the copy
        wg = e[key].reshape(w0.shape[0], -1).to(_SOLVE_DTYPE) @ gi
        if a is None:
            a, b = gi, wg
        else:
            a.add_(gi)
            b.add_(wg)
        del gi, wg
    return a, b


def regmean_key(al: Aligned, grams: list[dict], key: str, alpha: float) -> torch.Tensor:
    a, b = regmean_system(al, grams, key, alpha)
    dead = a.diagonal() == 0
    if bool(dead.any()):
        a.diagonal().add_(dead.to(a.dtype))
        mean = sum(e[key].reshape(b.shape[0], -1).to(_SOLVE_DTYPE) for e in al.experts) / al.num_tasks
        b[:, dead] = mean[:, dead]
    try:
        w = torch.linalg.solve(a, b.T).T  # Σ G is symmetric: (B A⁻¹)ᵀ = A⁻¹ Bᵀ
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise TorchMergeError(f"RegMean: Σ Gram for {key!r} (shape {tuple(a.shape)}) is singular; "
                              "use alpha < 1 or more data") from err
    return al.out(key, w.reshape(al.experts[0][key].shape))


def regmean(experts, grams, alpha: float = 0.9) -> MergeResult:
    """RegMean closed form per weight with a Gram; average elsewhere (see module docstring)."""
    alpha = check_fraction("alpha", alpha, closed_low=True)
    al = Aligned(experts, None)
    grams = check_stats(al, grams, "grams", gram_shape)
    state = {}
    for key in al.keys:
        if key not in al.float_keys:
            state[key] = al.passthrough(key)
        elif key in grams[0]:
            state[key] = regmean_key(al, grams, key, alpha)
        else:
            state[key] = al.out(key, al.base(key))  # base() is the mean when base=None
    return MergeResult(state=state, info={"method": "regmean", "alpha": alpha,
                                          "solved": sorted(grams[0])})
