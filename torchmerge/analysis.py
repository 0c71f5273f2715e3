"""Diagnostics: interpolation barriers, CKA between models, variance ratios, and plots of them.

- :func:`interpolate`, :func:`evaluate`, :func:`interpolation_barrier` — the loss/accuracy barrier
  on the straight line between two models;
- :func:`cka` (and :func:`linear_cka`, :func:`hsic_biased`, :func:`hsic_unbiased`) — linear CKA
  between corresponding layers, exact or minibatch-unbiased (invariant to permuting units);
- :func:`unit_correlation` — how well unit j of one model matches unit j of another (what
  permutation alignment raises);
- :func:`variance_ratios` — per-site variance collapse of a merged model against its experts;
- :func:`plot_cka`, :func:`plot_variance_ratios`, :func:`plot_barrier` — PNG figures (matplotlib).

>>> import torch, torchmerge as tm
>>> a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
>>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
>>> curve = tm.analysis.interpolation_barrier(a, b, data, steps=3)
>>> len(curve["loss"]), curve["alphas"]
(3, [0.0, 0.5, 1.0])
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TorchMergeError
from .trace import eval_mode


def interpolate(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    """A new module with floating-point tensors ``(1 − α)·a + α·b`` (integer buffers from ``a``)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        raise TorchMergeError(f"models differ in their tensors: {sorted(set(sa) ^ set(sb))[:6]}")
    mixed = {}
    for k, x in sa.items():
        if x.shape != sb[k].shape:
            raise TorchMergeError(f"{k}: shape {tuple(x.shape)} vs {tuple(sb[k].shape)}; interpolate "
                                  "models of the same architecture (exclude task heads first)")
        mixed[k] = torch.lerp(x, sb[k].to(x.dtype), alpha) if x.is_floating_point() else x
    out = copy.deepcopy(a)
    out.load_state_dict(mixed)
    return out


def evaluate(model: nn.Module, data, loss_fn=F.cross_entropy, max_batches=None) -> tuple:
    """Mean loss and accuracy of ``model`` over ``(x, y)`` batches (eval mode, no grad)."""
    total_loss, correct, count = 0.0, 0, 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model):
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TorchMergeError("evaluate needs (input, target) batches, got "
                                      f"{type(batch).__name__}")
            x, y = batch[0].to(device), batch[1].to(device)
            out = model(x)
            total_loss += float(loss_fn(out, y, reduction="sum"))
            correct += int((out.argmax(-1) == y).sum())
            count += len(y)
    if count == 0:
        raise TorchMergeError("evaluate got no batches")
    return total_loss / count, correct / count


def interpolation_barrier(a: nn.Module, b: nn.Module, data, steps: int = 11, loss_fn=F.cross_entropy,
                          max_batches=None) -> dict:
    """Loss and accuracy along the straight line from ``a`` to ``b``, and the barriers.

    Barrier (Frankle et al. 2020; Ainsworth et al. 2022): the largest gap between the path and the
    straight line joining its ends, ``max_α L(α) − ((1 − α)L(0) + αL(1))`` (and the same for
    accuracy, with the sign flipped). Align ``b`` to ``a`` first to see the barrier drop.
    """
    if steps < 2:
        raise TorchMergeError(f"steps must be >= 2, got {steps}")
    data = list(data) if not isinstance(data, (list, tuple)) else data
    alphas = [i / (steps - 1) for i in range(steps)]
    losses, accs = [], []
    for alpha in alphas:
        loss, acc = evaluate(interpolate(a, b, alpha), data, loss_fn, max_batches)
        losses.append(loss)
        accs.append(acc)
    line = lambda v, t: (1 - t) * v[0] + t * v[-1]  # noqa: E731
    return {
        "alphas": alphas, "loss": losses, "accuracy": accs,
        "loss_barrier": max(l - line(losses, t) for l, t in zip(losses, alphas)),
        "accuracy_barrier": max(line(accs, t) - acc for acc, t in zip(accs, alphas)),
    }


# --------------------------------------------------------------------------------------------------
# CKA (Kornblith et al. 2019; minibatch/unbiased: Nguyen, Raghu, Kornblith 2021; Pari et al. 2024)
# --------------------------------------------------------------------------------------------------

def _centre_gram(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``H = I − 11ᵀ/n`` (double centring), without forming ``H``."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Biased HSIC of two ``[n, n]`` Gram matrices: ``tr(K H L H) / (n − 1)²`` (Gretton et al. 2005).

    >>> x = torch.randn(6, 3, dtype=torch.float64)
    >>> bool(hsic_biased(x @ x.T, x @ x.T) > 0)
    True
    """
    n = k.shape[0]
    return (_centre_gram(k) * _centre_gram(l)).sum() / (n - 1) ** 2


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of ``[n, n]`` Gram matrices (Song et al. 2012), ``n ≥ 4``.

    ``[tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3))`` with ``K̃``, ``L̃``
    the Gram matrices with their diagonals set to zero.
    """
    n = k.shape[0]
    if n < 4:
        raise TorchMergeError(f"unbiased HSIC needs at least 4 samples per batch, got {n}")
    k = k - torch.diag_embed(torch.diagonal(k))
    l = l - torch.diag_embed(torch.diagonal(l))
    trace = (k * l).sum()  # tr(K̃ L̃) for symmetric matrices
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2.0 * (k.sum(0) @ l.sum(1)) / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA of two feature matrices ``[n, d_x]`` and ``[n, d_y]`` (rows: the same samples).

    ``HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))`` with ``K = XXᵀ``, ``L = YYᵀ``; ``debiased`` uses
    the unbiased HSIC estimator. Invariant to orthogonal transforms and isotropic scaling of either
    side; 1 for identical representations.

    >>> x = torch.randn(50, 8, dtype=torch.float64)
    >>> round(linear_cka(x, 3 * x @ torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]), 6)
    1.0
    """
    x, y = _rows(x), _rows(y)
    if not debiased and x.shape[1] + y.shape[1] < x.shape[0]:
        # same value from feature space, tr(HKHL) = ‖Y_cᵀX_c‖²: O(n·d²) instead of O(n²·d)
        x, y = x - x.mean(0), y - y.mean(0)
        cross = torch.linalg.matrix_norm(y.T @ x) ** 2
        norms = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
        return float(cross / norms.clamp_min(1e-30))
    k, l = x @ x.T, y @ y.T
    hsic = hsic_unbiased if debiased else hsic_biased
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)).clamp_min(1e-30))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Per-sample flattened features ``[B, ∏ rest]`` in float64."""
    return x.detach().reshape(x.shape[0], -1).double()


def _default_layers(a: nn.Module, b: nn.Module) -> list:
    """Leaf modules with parameters present (by name) in both models, in ``a``'s order."""
    in_b = dict(b.named_modules())
    return [n for n, m in a.named_modules()
            if n and n in in_b and not list(m.children()) and any(True for _ in m.parameters(recurse=False))]


def _layer_pairs(a: nn.Module, b: nn.Module, layers) -> dict:
    if layers is None:
        layers = _default_layers(a, b)
    pairs = dict(layers) if isinstance(layers, dict) else {n: n for n in ([layers] if isinstance(layers, str) else layers)}
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    for na, nb in pairs.items():
        for name, mods, which in ((na, mods_a, "model_a"), (nb, mods_b, "model_b")):
            if name not in mods:
                raise TorchMergeError(f"cka: {which} has no module {name!r}; valid names include "
                                      f"{[n for n in mods if n][:8]}")
    if not pairs:
        raise TorchMergeError("cka: no layers to compare; pass layers=[module names] "
                              "(or {name in model_a: name in model_b})")
    return {na: (mods_a[na], mods_b[nb]) for na, nb in pairs.items()}


def cka(model_a: nn.Module, model_b: nn.Module, data, layers=None, *, debiased: bool = False,
        max_batches=None) -> dict:
    """Linear CKA between corresponding layers' outputs of two models on the same inputs.

    Features: each sample's output flattened (``[B, C·H·W]`` for a conv layer, ``[B, C]`` for a
    dense one; token layouts ``[B, T, C]`` become ``[B, T·C]``) — the convention of Kornblith et al.
    2019; the two layers may differ in width. ``layers``: None (every leaf module with parameters
    present by name in both models), a list of names, or ``{name in model_a: name in model_b}``.

    ``debiased=False``: the exact (biased-HSIC) linear CKA over every sample seen; it keeps each
    layer's features, so bound the data with ``max_batches``. ``debiased=True``: the minibatch
    estimator of Nguyen et al. 2021 (used by Pari et al. 2024 on large data) — the *unbiased* HSIC
    of each batch is averaged over batches, ``CKA = mean HSIC₁(K,L) / sqrt(mean HSIC₁(K,K) ·
    mean HSIC₁(L,L))``; memory is one batch (batches need ≥ 4 samples; use a fixed batch size).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> data = [torch.randn(32, 4) for _ in range(3)]
    >>> {k: round(v, 6) for k, v in cka(net, net, data).items()}
    {'0': 1.0, '2': 1.0}
    """
    pairs = _layer_pairs(model_a, model_b, layers)
    sums = {n: torch.zeros(3, dtype=torch.float64) for n in pairs}
    feats = {n: ([], []) for n in pairs}
    for name, out_a, out_b in _paired_outputs(model_a, model_b, data, pairs, max_batches, "cka"):
        if debiased:
            fa, fb = _rows(out_a), _rows(out_b)
            k, l = fa @ fa.T, fb @ fb.T
            sums[name] += torch.stack([hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l)]).cpu()
        else:  # kept in the activations' dtype; float64 only for the final products
            feats[name][0].append(out_a.detach().reshape(out_a.shape[0], -1))
            feats[name][1].append(out_b.detach().reshape(out_b.shape[0], -1))
    if debiased:
        return {n: float(s[0] / torch.sqrt(s[1] * s[2]).clamp_min(1e-30)) for n, s in sums.items()}
    return {n: linear_cka(torch.cat(fa), torch.cat(fb)) for n, (fa, fb) in feats.items()}


def unit_correlation(model_a: nn.Module, model_b: nn.Module, data, layers=None, *, max_batches=None) -> dict:
    """Mean over units of the Pearson correlation between unit j of ``model_a`` and unit j of
    ``model_b`` at corresponding layers' outputs, on the same inputs.

    Unlike CKA, which is invariant to permuting (indeed rotating) either model's units, this
    measures whether the units *correspond*: permutation alignment exists to raise it, and it is 1
    for a model against itself. Units: the channel axis (1 for ``[B, C, ...]``, the last for token
    layouts ``[B, N, C]``); each position (pixel, token) and sample is an observation. A unit
    constant in one model only counts as correlation 0; one constant in both (e.g. a dead ReLU) is
    left out of the mean (NaN when every unit is). ``layers`` as for :func:`cka` (the layers
    of one pair must have the same width).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> shuffled = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> _ = shuffled.load_state_dict(net.state_dict())
    >>> perm = torch.randperm(8)
    >>> with torch.no_grad():
    ...     _ = shuffled[0].weight.copy_(net[0].weight[perm]), shuffled[0].bias.copy_(net[0].bias[perm])
    ...     _ = shuffled[2].weight.copy_(net[2].weight[:, perm])
    >>> data = [torch.randn(64, 4) for _ in range(2)]
    >>> round(unit_correlation(net, net, data, layers=["0"])["0"], 6)
    1.0
    >>> unit_correlation(net, shuffled, data, layers=["0"])["0"] < 0.9  # same function, units shuffled
    True
    >>> round(cka(net, shuffled, data, layers=["0"])["0"], 6)  # CKA cannot see the shuffle
    1.0
    """
    pairs = _layer_pairs(model_a, model_b, layers)
    moments = {}
    for name, out_a, out_b in _paired_outputs(model_a, model_b, data, pairs, max_batches, "unit_correlation"):
        a, b = _units(out_a), _units(out_b)
        if a.shape[1] != b.shape[1]:
            raise TorchMergeError(f"unit_correlation: layer {name!r} has {a.shape[1]} units in model_a and "
                                  f"{b.shape[1]} in model_b; compare layers of one width")
        m = torch.stack([torch.full_like(a[0], a.shape[0]), a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0),
                         (a * b).sum(0)]).cpu()
        moments[name] = m if name not in moments else moments[name] + m
    out = {}
    for name, (n, sa, sb, qa, qb, ab) in moments.items():
        cov = ab / n - sa * sb / n ** 2
        var = (qa / n - (sa / n) ** 2).clamp_min(0) * (qb / n - (sb / n) ** 2).clamp_min(0)
        live_a, live_b = (qa / n - (sa / n) ** 2) > 1e-12, (qb / n - (sb / n) ** 2) > 1e-12
        corr = torch.where(var > 1e-24, cov / var.sqrt().clamp_min(1e-30), torch.zeros_like(cov))
        counted = live_a | live_b  # a unit constant in both models (a dead ReLU) says nothing
        out[name] = float(corr[counted].mean()) if counted.any() else float("nan")
    return out


def _units(x: torch.Tensor) -> torch.Tensor:
    """``[observations, units]`` in float64: the channel axis last (see :func:`unit_correlation`)."""
    x = x.detach()
    axis = x.dim() - 1 if x.dim() == 3 else min(1, x.dim() - 1)
    return x.movedim(axis, -1).reshape(-1, x.shape[axis]).double()


def _paired_outputs(model_a, model_b, data, pairs: dict, max_batches, what: str):
    """Per batch and layer, ``(name, output of model_a, output of model_b)`` (on model_a's device)."""
    from .batches import iter_calls

    seen, batches = {}, 0
    device = next((p.device for p in model_a.parameters()), None)
    with torch.no_grad(), eval_mode(model_a), eval_mode(model_b), _capture(pairs, seen):
        for x in iter_calls(data, max_batches=max_batches, device=device):
            seen.clear()
            x(model_a)
            x.to(next((p.device for p in model_b.parameters()), None))(model_b)
            for name in pairs:
                if (name, 0) not in seen or (name, 1) not in seen:
                    raise TorchMergeError(f"{what}: layer {name!r} was not called in both models' forward")
                yield name, seen[name, 0], seen[name, 1].to(seen[name, 0].device)
            batches += 1
    if batches == 0:
        raise TorchMergeError(f"{what} got no batches")


@contextlib.contextmanager
def _capture(pairs: dict, seen: dict):
    """Forward hooks storing each paired module's (first) output in ``seen[name, side]``."""
    handles = []
    try:
        for name, mods in pairs.items():
            for side, mod in enumerate(mods):
                def hook(_m, _args, out, key=(name, side)):
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    if not isinstance(out, torch.Tensor):
                        raise TorchMergeError(f"cka: layer {key[0]!r} returns a {type(out).__name__}, "
                                              "not a Tensor; choose another layer")
                    seen[key] = out
                handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------
# Variance ratios (variance collapse, Jordan et al. 2023; Sharma et al. 2024)
# --------------------------------------------------------------------------------------------------

def variance_ratios(merged, experts, data, max_batches=None, eps: float = 1e-8, *,
                    align_experts: bool = True) -> dict:
    """``{task name: {site: mean over channels of var_merged / var_expert}}`` at each correction site.

    Per task t, the merged model (task t active, current corrections applied) and expert t run on
    task t's data (``data[t]``; ``None`` skips the task); statistics come from
    :func:`torchmerge.correct.site_moments`. A ratio well below 1 is variance collapse; after the
    affine correction it is ≈ 1. Channels whose expert variance is below ``eps`` (dead units) are
    left out of the mean. ``experts``: as given to ``tm.merge``; the permutations it found (kept
    in ``merged.info``) are applied so channels correspond — pass ``align_experts=False`` for
    experts that are already in the merged model's unit order.

    Example (``merged = tm.merge(experts, ..., data=loaders)``)::

        ratios = tm.analysis.variance_ratios(merged, experts, loaders, max_batches=10)
        ratios["task0"]   # {'site0_features_1': 0.41, ...}
    """
    from .correct import site_moments

    data = list(data)
    if len(data) != len(experts) or len(experts) != merged.num_tasks:
        raise TorchMergeError(f"variance_ratios: {len(experts)} experts and {len(data)} data entries "
                              f"for a merged model with {merged.num_tasks} tasks; give one of each per task")
    if align_experts:
        experts = _aligned_like(merged, experts)
    out = {}
    for t, name in enumerate(merged.task_names):
        if data[t] is None:
            continue
        moments = site_moments(merged, experts, data, t, max_batches=max_batches)
        out[name] = {site: _mean_ratio(m.var, e.var, eps) for site, (m, e) in moments.items()}
    return out


def _aligned_like(merged, experts) -> list:
    from .spec import permute

    info = getattr(merged, "info", {}) or {}
    perms = (info.get("merge_info") or {}).get("perms")
    if perms is None:
        if (info.get("merge_info") or {}).get("widths") is not None:
            raise TorchMergeError("variance_ratios: this merged model was widened (PLeaS), so its "
                                  "channels do not match the experts' one to one")
        return list(experts)
    return [permute(e, info["spec"], p) for e, p in zip(experts, perms)]


def _mean_ratio(var_m: torch.Tensor, var_e: torch.Tensor, eps: float) -> float:
    live = var_e > eps
    if not bool(live.any()):
        return float("nan")
    return float((var_m[live].double() / var_e[live].double()).mean())


# --------------------------------------------------------------------------------------------------
# Plots (matplotlib, imported lazily; figures are built without pyplot, so no display is needed)
# --------------------------------------------------------------------------------------------------

def _figure(ncols: int = 1, width: float = 6.0, height: float = 3.6, sharey: bool = False):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TorchMergeError("plotting needs matplotlib: pip install matplotlib "
                              "(or pip install 'torchmerge-nonlocal[examples]')") from None
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False, sharey=sharey)[0]


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _series(values: dict, depth: int) -> dict:
    """``{label: values}``: wrap a single result (nesting ``depth``) under the label ``""``."""
    probe, d = values, 0
    while isinstance(probe, dict) and probe:
        probe, d = next(iter(probe.values())), d + 1
    return {"": values} if d == depth else values


def plot_cka(result: dict, path=None, title: str = "linear CKA per layer"):
    """Bar chart of :func:`cka` results: one ``{layer: value}`` or ``{label: {layer: value}}``.

    Saves a PNG at ``path`` (if given) and returns the matplotlib ``Figure``.

    >>> fig = plot_cka({"A vs B": {"conv1": 0.9, "fc": 0.4}, "A vs B aligned": {"conv1": 0.95, "fc": 0.8}})
    >>> fig.axes[0].get_ylabel()
    'CKA'
    """
    series = _series(result, 1)
    fig, (ax,) = _figure()
    layers = list(dict.fromkeys(k for s in series.values() for k in s))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(layers))], [values.get(l, float("nan")) for l in layers],
               width=width, label=label or None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("CKA")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def plot_variance_ratios(ratios: dict, path=None, title: str = "variance ratio (merged / expert)"):
    """Line plot of :func:`variance_ratios` per site, one line per task; ``ratios`` may also be
    ``{label: ratios}`` (e.g. ``{"no correction": r0, "affine": r1}``): one panel per label.

    >>> fig = plot_variance_ratios({"before": {"t0": {"s0": 0.3, "s1": 0.2}}, "after": {"t0": {"s0": 1.0, "s1": 1.0}}})
    >>> len(fig.axes)
    2
    """
    panels = _series(ratios, 2)
    fig, axes = _figure(len(panels), width=5.0, sharey=True)
    for ax, (label, per_task) in zip(axes, panels.items()):
        for task, sites in per_task.items():
            ax.plot(range(len(sites)), list(sites.values()), marker="o", label=task)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        names = list(next(iter(per_task.values()), {}))
        ax.set_xticks(range(len(names)), [n.rsplit(".", 1)[-1] for n in names], rotation=30, ha="right",
                      fontsize=8)
        ax.set_xlabel("site (input → output)")
        ax.set_title(f"{title}: {label}" if label else title, fontsize=10)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean var ratio")
    return _save(fig, path)


def plot_barrier(curves: dict, path=None, title: str = "linear interpolation"):
    """Loss and accuracy along the path from :func:`interpolation_barrier` (one curve, or
    ``{label: curve}``).

    >>> curve = {"alphas": [0.0, 0.5, 1.0], "loss": [0.1, 2.0, 0.1], "accuracy": [0.9, 0.3, 0.9]}
    >>> [ax.get_ylabel() for ax in plot_barrier(curve).axes]
    ['loss', 'accuracy']
    """
    series = {"": curves} if "alphas" in curves else curves
    fig, axes = _figure(2, width=4.5)
    for label, c in series.items():
        for ax, key in zip(axes, ("loss", "accuracy")):
            ax.plot(c["alphas"], c[key], marker="o", label=label or None)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("α")
        ax.set_ylabel(key)
        ax.set_title(f"{title}: {key}", fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=8)
    return _save(fig, path)
