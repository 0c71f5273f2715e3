"""RegMean — Regression Mean (Jin, Ren, Preotiuc-Pietro, Cheng 2023, "Dataless Knowledge Fusion by
Merging Weights of Language Models"):

For every weight W (shape ``[out, d]``; conv weights ``[out, c, kh, kw]`` are flattened to
``[out, c·kh·kw]``, the unfolded input) with input Gram matrices G_i = X_iᵀ X_i (``[d, d]``):

    G_i ← α G_i + (1 − α) diag(G_i)        (off-diagonals scaled by α, diagonal kept)
    W*  = (Σ_i W_i G_i) (Σ_i G_i)⁻¹         (float64 Cholesky in place; LU if not positive definite)

Default α = 0.9. (The official code, bloomberg/dataless-model-merging, leaves the reduction off
by default — α = 1 — and the paper tunes α; 0.9 is the value common re-implementations use.)
Grams are the *sums* X_iᵀX_i, so experts with more examples weigh more; normalise them first
if you want equal weight. Parameters without a Gram (biases, norms) are averaged.
Input features whose Gram diagonal is zero for every expert (dead units) make Σ G_i singular;
those columns of W* are set to the average of the experts' columns. That fallback, and LU where
Σ G_i is not positive definite, are listed in ``info["fallbacks"]``; LU is also warned about.

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
from ..progress import bar
from .base import Aligned, MergeResult, check_degenerate, check_fraction, flag

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


_ROW_BLOCK = 256  # Gram rows converted to float64 at a time
_PIVOT_RTOL = 1e-7  # Cholesky pivot ratio below which Σ G counts as singular (condition ~1e14)


def regmean_system(al: Aligned, grams: list[dict], key: str, alpha: float):
    """(Σ G̃_i, Σ W_i G̃_i) in float64 for one weight, W_i flattened to ``[out, d]``,
    G̃ = α G + (1 − α) diag G. Grams are read in row blocks (W G = Σ_blocks W[:, s] G[s, :]), so
    the sum is the only d×d matrix alive, whatever the Grams' dtype."""
    w0 = al.experts[0][key]
    d, dev = w0[0].numel(), w0.device
    a = torch.zeros(d, d, dtype=_SOLVE_DTYPE, device=dev)
    b = torch.zeros(w0.shape[0], d, dtype=_SOLVE_DTYPE, device=dev)
    for e, g in zip(al.experts, grams):
        w, g = e[key].reshape(w0.shape[0], d), g[key]
        diag = g.diagonal().to(device=dev, dtype=_SOLVE_DTYPE) * (1 - alpha)
        for s in range(0, d, _ROW_BLOCK):
            block = slice(s, s + _ROW_BLOCK)
            rows, cols = g[block].to(device=dev, dtype=_SOLVE_DTYPE), w[:, block].to(_SOLVE_DTYPE)
            a[block].add_(rows, alpha=alpha)
            b.addmm_(cols, rows, alpha=alpha)
            b[:, block].addcmul_(cols, diag[block])
        a.diagonal().add_(diag)
    return a, b


def cholesky_in_place(a: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of symmetric ``a``, written into ``a``'s own storage (no second
    d×d matrix); None when ``a`` is not positive definite (``a`` is then overwritten garbage)."""
    at = a.mT  # the column-major view LAPACK factorises in place
    info = torch.empty((), dtype=torch.int32, device=a.device)
    try:
        low, info = torch.linalg.cholesky_ex(at, out=(at, info))
    except RuntimeError:  # a backend that refuses the aliased output: the caller falls back to LU
        return None
    return None if int(info) else low


def solve_right_cholesky(low: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X with X (L Lᵀ) = B: Y Lᵀ = B, then X L = Y, both solved into ``b``'s storage."""
    torch.linalg.solve_triangular(low.mT, b, upper=True, left=False, out=b)
    return torch.linalg.solve_triangular(low, b, upper=False, left=False, out=b)


def _fill_dead(al: Aligned, key: str, a: torch.Tensor, b: torch.Tensor, notes=None) -> None:
    """Inputs no expert ever saw (zero Gram diagonal): W*'s column is the experts' mean column
    (noted in ``notes``)."""
    dead = a.diagonal() == 0
    if bool(dead.any()):
        if notes is not None:
            notes.append(f"{key}: {int(dead.sum())} of {dead.numel()} input features have a zero Gram "
                         "for every expert (dead inputs); their columns are the experts' average")
        a.diagonal().add_(dead.to(a.dtype))
        mean = sum(e[key].reshape(b.shape[0], -1).to(_SOLVE_DTYPE) for e in al.experts) / al.num_tasks
        b[:, dead] = mean[:, dead]


def regmean_key(al: Aligned, grams: list[dict], key: str, alpha: float, notes=None) -> torch.Tensor:
    """W* for one weight; ``notes`` (a list) collects the fallbacks taken."""
    a, b = regmean_system(al, grams, key, alpha)
    _fill_dead(al, key, a, b, notes)
    shape = tuple(a.shape)
    low = cholesky_in_place(a)
    if low is None:  # symmetric but not positive definite (Grams that are not X^T X): LU
        if notes is not None:
            notes.append(f"{key}: Σ Gram is not positive definite (Cholesky failed); solved by LU")
        a, b = regmean_system(al, grams, key, alpha)
        _fill_dead(al, key, a, b)
        try:
            w = torch.linalg.solve(a, b.T).T  # Σ G is symmetric: (B A⁻¹)ᵀ = A⁻¹ Bᵀ
        except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
            raise _singular(key, shape) from err
    else:
        pivots = low.diagonal()
        # a pivot this small means Σ G is singular up to rounding (α = 1 with rank-deficient data)
        if float(pivots.min()) <= _PIVOT_RTOL * float(pivots.max()):
            raise _singular(key, shape)
        w = solve_right_cholesky(low, b)
    return al.out(key, w.reshape(al.experts[0][key].shape))


def _singular(key: str, shape: tuple) -> TorchMergeError:
    return TorchMergeError(f"RegMean: Σ Gram for {key!r} (shape {shape}) is singular; use alpha < 1 "
                           "or more data")


def regmean(experts, grams, alpha: float = 0.9) -> MergeResult:
    """RegMean closed form per weight with a Gram; average elsewhere (see module docstring)."""
    alpha = check_fraction("alpha", alpha, closed_low=True)
    al = Aligned(experts, None)
    grams = check_stats(al, grams, "grams", gram_shape)
    info = {"method": "regmean", "alpha": alpha, "solved": sorted(grams[0]), "fallbacks": []}
    check_degenerate(al, info)
    state = {}
    for key in bar(al.keys, "regmean: solve"):
        if key not in al.float_keys:
            state[key] = al.passthrough(key)
        elif key in grams[0]:
            state[key] = regmean_key(al, grams, key, alpha, info["fallbacks"])
        else:
            state[key] = al.out(key, al.base(key))  # base() is the mean when base=None
    # dead inputs (a ReLU unit no example activates) are common and harmless: recorded, not warned
    solver = [n for n in info["fallbacks"] if "dead inputs" not in n]
    if solver:
        flag(info, f"regmean fell back to LU on {len(solver)} weight(s) (all in info['fallbacks']; "
                   f"first: {solver[0]})")
    return MergeResult(state=state, info=info)
