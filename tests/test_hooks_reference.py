"""Calibration judged by plain forward hooks written here, not by torchmerge's own observers."""
from __future__ import annotations

import pytest
import torch

import torchmerge as tm
from architectures import BY_NAME
from test_calibrate import _data, _experts, merged_experts


def _moments(model, module, batches, call):
    """Per-channel (mean, var) in float64 of ``module``'s output over ``batches`` (channel axis -1 or 1)."""
    seen = []

    def hook(mod, args, out):
        out = out[0] if isinstance(out, tuple) else out
        seen.append(out.detach().double())

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x in batches:
                call(model, x)
    finally:
        handle.remove()
    return seen


def _per_channel(acts, axis):
    flat = torch.cat([a.movedim(axis, -1).reshape(-1, a.shape[axis]) for a in acts])
    return flat.mean(0), flat.var(0, unbiased=False)


def _site_pairs(merged, expert):
    """(merged module whose output is corrected, expert module at the same place, channel axis)."""
    pairs = []
    for name, site in merged.sites().items():
        path = site.site_module if site.site_module is not None else getattr(site, "site_node", None)
        if site.norm_path is not None:
            path = site.norm_path  # the correction sits after the absorbed norm
        try:
            expert_mod = expert.get_submodule(str(path))
        except AttributeError:
            continue  # functional site (no module in the expert): not observable with a module hook
        pairs.append((name, site, expert_mod, site.channel_axis))
    return pairs


def _worst(merged, expert, batches, t):
    """Largest |Δmean|/σ_e and |Δvar|/σ_e² over checked sites and channels (task t active)."""
    pairs = _site_pairs(merged, expert)
    assert pairs, "no site could be observed with a plain module hook"
    worst_mean = worst_var = 0.0
    for name, merged_mod, expert_mod, axis in pairs:
        m_mean, m_var = _per_channel(_moments(merged, merged_mod, batches, lambda m, x: m(x, task=t)), axis)
        e_mean, e_var = _per_channel(_moments(expert, expert_mod, batches, lambda m, x: m(x)), axis)
        sigma2 = e_var + 1e-4
        worst_mean = max(worst_mean, float(((m_mean - e_mean).abs() / sigma2.sqrt()).max()))
        worst_var = max(worst_var, float(((m_var - e_var).abs() / sigma2).max()))
    return worst_mean, worst_var


CASES = [("mlp", "graph"), ("mlp", "inject"), ("resnet_basic", "graph"), ("vit", "inject")]


@pytest.mark.parametrize("name,build", CASES)
def test_affine_matches_expert_moments_seen_by_plain_hooks(name, build):
    """After correction="affine", per-channel mean/var at every site match expert t's (own hooks)."""
    case = BY_NAME[name]
    experts, data = _experts(case, 2), _data(case, 2)
    merged = tm.merge(experts, method="average", data=data, align="weight", correction="affine",
                      build=build)
    merged.eval()
    aligned = merged_experts(merged, experts)
    for t in range(2):
        mean_err, var_err = _worst(merged, aligned[t].eval(), data[t], t)
        assert mean_err < 0.1 and var_err < 0.2, (t, mean_err, var_err)


@pytest.mark.parametrize("name,build", [("mlp", "graph"), ("mlp", "inject")])
def test_uncorrected_merge_does_not_match_expert_variance(name, build):
    """With correction=None the same hooks see a variance mismatch (the check above can fail)."""
    case = BY_NAME[name]
    experts, data = _experts(case, 2), _data(case, 2)
    merged = tm.merge(experts, method="average", data=data, align="weight", correction=None,
                      build=build)
    merged.eval()
    aligned = merged_experts(merged, experts)
    if not merged.sites():
        pytest.fail("correction=None built no sites to observe")
    _, var_err = _worst(merged, aligned[0].eval(), data[0], 0)
    assert var_err > 0.3, var_err
