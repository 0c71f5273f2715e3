"""MaTS — Merging as Linear System (Tam, Bansal, Raffel 2024, "Merging by Matching Models in Task
Parameter Subspaces"):

    solve  (Σ_i C_i) θ = Σ_i C_i θ_i   per parameter, with conjugate gradient

- ``statistic="gram"``: C_i is the RegMean Gram of the weight's input (θ = W ``[out, d]``,
  C_i θ := W G_i, G_i ← α G_i + (1−α) diag G_i, α = 0.9 as in :mod:`.regmean`); the solution is
  RegMean's closed form.
- ``statistic="fisher"``: C_i = diag(F_i) (floored at eps); the solution is Fisher merging.

CG starts from Task Arithmetic θ₀ + λ Σ τ_i (λ = 0.3, the paper's setting) when a base is given,
else from the average; max_iter = 100, tol = 1e-6 (relative residual ‖b − Aθ‖/‖b‖). Parameters
without statistics are averaged. CG runs on the weights' device in float64 with a Jacobi (diagonal)
preconditioner — our addition, which changes the speed, not the solution — and, for Grams, on
blocks of 64 rows of W at a time (independent systems sharing Σ G̃; each block meets the
tolerance, so the whole does), so its vectors stay small next to the d×d system. In a singular system
(dead inputs), CG leaves the initialisation's component in the null space untouched.

``info``: ``cg_iterations`` and ``relative_residual`` ‖b − Aθ‖/‖b‖ per solved parameter (for
Grams: the most iterations a row block took, the residual of the whole weight),
``max_relative_residual`` and ``converged`` (every residual ≤ tol). A residual above ``tol``
warns: the result is then an approximation — raise ``max_iter``. Converged, the Gram solution is
RegMean's closed form up to ``tol`` (so on real models the two agree to many digits).

>>> import torch
>>> from torchmerge.methods import mats
>>> experts = [{"w": torch.tensor([[1.0, 0.0]])}, {"w": torch.tensor([[0.0, 1.0]])}]
>>> grams = [{"w": torch.tensor([[3.0, 1.0], [1.0, 1.0]])}, {"w": torch.eye(2)}]
>>> [round(v, 4) for v in mats(experts, grams).state["w"][0].tolist()]
[0.5967, 0.6815]
"""
from __future__ import annotations

import torch

from ..errors import TorchMergeError
from .base import (Aligned, MergeResult, check_choice, check_degenerate, check_fraction, check_nonneg,
                   flag)
from .regmean import check_stats, gram_shape, regmean_system

_DT = torch.float64


def conjugate_gradient(apply_A, b: torch.Tensor, x0: torch.Tensor, max_iter: int = 100,
                       tol: float = 1e-6, precond=None):
    """Solve A x = b for symmetric positive (semi-)definite A given as ``apply_A(x)``.

    Tensors of any shape; inner products are ``(u * v).sum()``. ``precond(r)`` applies M⁻¹
    (identity if None). Stops when ‖b − A x‖ ≤ tol ‖b‖ or after ``max_iter`` iterations.
    Returns ``(x, iterations, relative residual)``.

    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> x, it, res = conjugate_gradient(lambda v: A @ v, b, torch.zeros(2, dtype=torch.float64))
    >>> [round(v, 6) for v in x.tolist()], it
    ([0.090909, 0.636364], 2)
    """
    precond = precond or (lambda r: r)
    dot = lambda u, v: float(torch.dot(u.reshape(-1), v.reshape(-1)))  # noqa: E731
    x = x0.clone()
    r = b - apply_A(x)
    b_norm = float(b.norm()) or 1.0
    res = float(r.norm()) / b_norm
    if res <= tol:
        return x, 0, res
    z = precond(r)
    p = z.clone()
    rz = dot(r, z)
    # updates in place: x, r, p and the two fresh vectors A p and M⁻¹ r are all that is alive
    for it in range(1, max_iter + 1):
        ap = apply_A(p)
        pap = dot(p, ap)
        if pap <= 0:  # direction in the null space: nothing more to solve
            return x, it - 1, res
        step = rz / pap
        x.add_(p, alpha=step)
        r.add_(ap, alpha=-step)
        del ap
        res = float(r.norm()) / b_norm
        if res <= tol:
            return x, it, res
        z = precond(r)
        rz_new = dot(r, z)
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
        del z
    return x, max_iter, res


_CG_ROWS = 64  # rows of W solved together: CG's vectors stay small next to the d×d system


def _cg_row_blocks(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, max_iter: int, tol: float):
    """X A = B by CG on blocks of rows of X (independent systems that share A), starting from and
    written into ``x`` (any float dtype; each block is solved in float64); returns (x, the most
    iterations a block took, the relative residual ‖B − XA‖/‖B‖ of the whole). Each block reaching
    ‖r‖ ≤ tol‖b‖ on its rows makes the whole residual ≤ tol‖B‖ too."""
    precond, most, err2 = _jacobi(a.diagonal()), 0, 0.0
    for start in range(0, x.shape[0], _CG_ROWS):
        rows = slice(start, start + _CG_ROWS)
        x[rows], it, res = conjugate_gradient(lambda w: w @ a, b[rows], x[rows].to(_DT), max_iter,
                                              tol, precond)
        most, err2 = max(most, it), err2 + (res * (float(b[rows].norm()) or 1.0)) ** 2
    return x, most, err2 ** 0.5 / (float(b.norm()) or 1.0)


def _jacobi(diag: torch.Tensor):
    inv = torch.where(diag > 0, 1.0 / diag, torch.ones_like(diag))
    return lambda r: r * inv


def mats(experts, stats, base=None, statistic: str = "gram", alpha: float = 0.9,
         lam: float = 0.3, max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-8) -> MergeResult:
    """MaTS: per-parameter CG solve of (Σ C_i) θ = Σ C_i θ_i (see the module docstring)."""
    statistic = check_choice("statistic", statistic, {"gram", "fisher"})
    alpha = check_fraction("alpha", alpha, closed_low=True)
    lam, eps = check_nonneg("lam", lam), check_nonneg("eps", eps)
    tol = check_nonneg("tol", tol)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise TorchMergeError(f"max_iter={max_iter!r} must be a positive integer")
    al = Aligned(experts, base)
    shape_of = gram_shape if statistic == "gram" else (lambda w: tuple(w.shape))
    stats = check_stats(al, stats, "stats", shape_of)
    state, iters, residuals = {}, {}, {}
    for key in al.keys:
        if key not in al.float_keys:
            state[key] = al.passthrough(key)
            continue
        theta0 = al.base(key)
        if key not in stats[0]:
            state[key] = al.out(key, sum(al.expert(i, key) for i in range(al.num_tasks)) / al.num_tasks)
            continue
        init = theta0 if base is None else theta0 + lam * sum(al.tau(i, key, theta0)
                                                              for i in range(al.num_tasks))
        shape = al.experts[0][key].shape
        if statistic == "gram":
            a, b = regmean_system(al, stats, key, alpha)
            # init is a fresh tensor (a mean, or θ₀ + λΣτ): the solution is written into it
            x, it, res = _cg_row_blocks(a, b, init.reshape(shape[0], -1), max_iter, tol)
        else:
            a = b = 0
            for i, s in enumerate(stats):
                f = s[key].to(device=theta0.device, dtype=_DT).clamp_min(eps)
                a, b = a + f, b + f * al.expert(i, key).to(_DT)
            x, it, res = conjugate_gradient(lambda v: a * v, b, init.to(_DT), max_iter, tol,
                                            _jacobi(a))
        state[key] = al.out(key, x.reshape(shape))
        iters[key], residuals[key] = it, res
    worst = max(residuals, key=residuals.get, default=None)
    info = {"method": "mats", "statistic": statistic, "alpha": alpha, "lam": lam,
            "max_iter": max_iter, "tol": tol, "cg_iterations": iters, "relative_residual": residuals,
            "max_relative_residual": residuals.get(worst, 0.0),
            "converged": all(r <= tol for r in residuals.values())}
    check_degenerate(al, info)
    if not info["converged"]:
        unmet = sum(r > tol for r in residuals.values())
        flag(info, f"mats: conjugate gradient did not reach tol={tol:g} on {unmet} parameter(s) within "
                   f"max_iter={max_iter} (worst {worst!r}: relative residual {residuals[worst]:.2e}); "
                   "the result approximates the MaTS solution: raise max_iter")
    return MergeResult(state=state, info=info)
