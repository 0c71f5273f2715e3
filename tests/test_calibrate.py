"""Calibration: after fitting, the merged model's site statistics match each expert's."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchmerge as tm
from architectures import BY_NAME, randomize_

CALIBRATED = ["mlp", "resnet_basic", "vit", "convnext", "densenet"]


def _experts(case, n=3, seed=0):
    """Independently initialised experts (non-local: different seeds), BN statistics randomised."""
    out = []
    for i in range(n):
        torch.manual_seed(100 * seed + i)
        out.append(randomize_(case.model_cls(), seed=100 * seed + i).eval())
    return out


def _data(case, n_tasks, batches=4, batch=16):
    """Task t's data: the case's inputs, shifted and scaled per task (distinct statistics)."""
    out = []
    for t in range(n_tasks):
        xs = []
        for b in range(batches):
            x = case.make_input(batch, 1000 * t + b)
            xs.append(x * (1 + 0.5 * t) + 0.2 * t if x.is_floating_point() else x)
        out.append(xs)
    return out


def _stat_errors(merged, experts, data, t):
    """Largest |μ_m − μ_e| / σ and |σ_m − σ_e| / σ over sites and channels (σ = sqrt(σ_e² + ε))."""
    worst_mean = worst_std = 0.0
    for merged_m, expert_m in tm.correct.site_moments(merged, experts, data, t).values():
        sigma = (expert_m.var + 1e-4).sqrt()
        worst_mean = max(worst_mean, float(((merged_m.mean - expert_m.mean).abs() / sigma).max()))
        worst_std = max(worst_std, float(((merged_m.std - expert_m.std).abs() / sigma).max()))
    return worst_mean, worst_std


@pytest.mark.parametrize("name", CALIBRATED)
def test_affine_matches_expert_statistics_at_every_site(name):
    case = BY_NAME[name]
    experts, data = _experts(case), _data(case, 3)
    merged = tm.merge(experts, method="average", data=data, align="weight", correction=None)
    aligned = merged_experts(merged, experts)
    before = _stat_errors(merged, aligned, data, 0)
    tm.calibrate(merged, aligned, data, mode="affine")
    for t in range(3):
        mean_err, std_err = _stat_errors(merged, aligned, data, t)
        assert mean_err < 0.1 and std_err < 0.1, (t, mean_err, std_err, before)
    assert before[0] > 0.5 or before[1] > 0.5  # there was a collapse to repair


def test_more_passes_converge():
    case = BY_NAME["vit"]
    experts, data = _experts(case), _data(case, 3)
    merged = tm.merge(experts, method="average", data=data, align="weight", correction=None)
    aligned = merged_experts(merged, experts)
    errors = []
    for passes in (1, 2, 6):
        tm.calibrate(merged, aligned, data[:1] + [None, None], passes=passes, allow_uncorrected=True)
        errors.append(max(_stat_errors(merged, aligned, data, 0)))
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.02, errors


def merged_experts(merged, experts):
    """The aligned experts (the merge's own permutations applied): what calibration compares to."""
    spec, perms = merged.info["spec"], merged.info["merge_info"]["perms"]
    return [tm.permute(e, spec, p) for e, p in zip(experts, perms)]


@pytest.mark.parametrize("name", ["mlp", "resnet_basic", "vit"])
def test_equal_models_give_identity_affines(name):
    case = BY_NAME[name]
    expert = _experts(case, 1)[0]
    data = _data(case, 2)
    merged = tm.merge([expert, copy.deepcopy(expert)], method="average", data=data, align=None,
                      correction="affine")
    for site in merged.sites().values():
        assert torch.allclose(site.scale, torch.ones_like(site.scale), atol=1e-4)
        assert torch.allclose(site.shift, torch.zeros_like(site.shift), atol=1e-4)


def test_hooks_removed_and_experts_untouched():
    case = BY_NAME["resnet_basic"]
    experts, data = _experts(case, 2), _data(case, 2)
    states = [copy.deepcopy(e.state_dict()) for e in experts]
    flags = [e.training for e in experts]
    merged = tm.merge(experts, method="ties", data=data, correction="affine+tune",
                      calibration={"tune_steps": 3})
    modules = list(merged.modules()) + [m for e in experts for m in e.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    for e, s, flag in zip(experts, states, flags):
        assert e.training == flag
        assert all(torch.equal(v, s[k]) for k, v in e.state_dict().items())


def test_repair_shares_one_affine_and_matches_interpolated_targets():
    case = BY_NAME["mlp"]
    experts, data = _experts(case, 2), _data(case, 2)
    merged = tm.merge(experts, method="average", data=data, align="weight", correction="repair")
    aligned = merged_experts(merged, experts)
    for site in merged.sites().values():
        assert torch.equal(site.scale[0], site.scale[1]) and torch.equal(site.shift[0], site.shift[1])
    # targets: the experts' means and stds averaged over tasks; merged stats on the union of data
    union = [x for pair in zip(*data) for x in pair]
    mine = tm.correct.merged_moments(merged, 0, union, where="output")
    for name in merged.sites():
        targets = [tm.correct.expert_moments(merged, e, d)[name] for e, d in zip(aligned, data)]
        mean = torch.stack([m.mean for m in targets]).mean(0)
        std = torch.stack([m.std for m in targets]).mean(0)
        assert torch.allclose(mine[name].mean, mean, atol=0.05 * float(std.mean()))
        assert torch.allclose(mine[name].std, std, rtol=0.05, atol=0.01)


def test_affine_tune_reduces_distillation_loss():
    case = BY_NAME["mlp"]
    experts, data = _experts(case, 2), _data(case, 2, batches=4, batch=64)
    merged = tm.merge(experts, method="average", data=data, correction="affine")
    aligned = merged_experts(merged, experts)
    loss_before = _distill_loss(merged, aligned, data)
    tm.correct.tune(merged, aligned[0], data[0], 0, steps=60, lr=1e-2)
    tm.correct.tune(merged, aligned[1], data[1], 1, steps=60, lr=1e-2)
    assert _distill_loss(merged, aligned, data) < loss_before


def _distill_loss(merged, experts, data):
    total = 0.0
    with torch.no_grad():
        for t, (e, d) in enumerate(zip(experts, data)):
            for x in d:
                total += float(tm.correct._distill(merged(x, task=t), e(x), "kl"))
    return total


def test_tune_trains_only_the_task_rows():
    case = BY_NAME["mlp"]
    experts, data = _experts(case, 2), _data(case, 2)
    merged = tm.merge(experts, method="average", data=data, correction="affine")
    before = copy.deepcopy(merged.state_dict())
    tm.correct.tune(merged, merged_experts(merged, experts)[1], data[1], 1, steps=5, lr=1e-2)
    after = merged.state_dict()
    for k, v in after.items():
        if ".sites." in k:
            assert torch.equal(v[0], before[k][0]) and not torch.equal(v[1], before[k][1])
        else:
            assert torch.equal(v, before[k]), k


def test_missing_task_data():
    case = BY_NAME["mlp"]
    experts, data = _experts(case, 2), _data(case, 2)
    with pytest.raises(tm.TorchMergeError, match="no calibration data for tasks \\['task1'\\]"):
        tm.merge(experts, method="average", data=[data[0], None], correction="affine")
    merged = tm.merge(experts, method="average", data=[data[0], None], correction="affine",
                      allow_uncorrected=True)
    for site in merged.sites().values():
        assert torch.equal(site.scale[1], torch.ones_like(site.scale[1]))
    assert merged.info["calibration"]["uncorrected"] == ["task1"]


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "nope"}, "unknown correction"), ({"passes": 0}, "passes must be"),
    ({"tune_loss": "l1"}, "tune_loss"),
])
def test_bad_options(kwargs, match):
    case = BY_NAME["mlp"]
    experts, data = _experts(case, 2), _data(case, 2)
    merged = tm.merge(experts, method="average", data=data, correction=None)
    with pytest.raises(tm.TorchMergeError, match=match):
        tm.calibrate(merged, experts, data, **kwargs)


def test_no_sites_is_an_error():
    experts = [nn.Sequential(nn.Linear(4, 3)) for _ in range(2)]
    data = [[torch.randn(8, 4)] for _ in experts]
    merged = tm.merge(experts, method="average", data=data, correction=None, heads=[],
                      sites=lambda node, module: False)
    with pytest.raises(tm.TorchMergeError, match="no TaskAffine sites"):
        tm.calibrate(merged, experts, data)


def test_calibration_in_bfloat16():
    """A bf16 merge agrees with the same merge in float32 (outputs and fitted scales) to bf16 precision."""
    case = BY_NAME["resnet_basic"]
    experts32, data32 = _experts(case, 2), _data(case, 2)
    experts = [copy.deepcopy(e).to(torch.bfloat16) for e in experts32]
    data = [[x.to(torch.bfloat16) for x in d] for d in data32]
    # align=None: bf16 rounding of the weights legitimately changes weight matching's choice of
    # permutations, which would compare two different merges rather than two precisions of one
    kw = dict(method="average", align=None, correction="affine")
    merged, ref = tm.merge(experts, data=data, **kw), tm.merge(experts32, data=data32, **kw)
    assert merged(data[0][0], task=1).dtype == torch.bfloat16
    assert all(s.scale.dtype == torch.bfloat16 for s in merged.sites().values())
    with torch.no_grad():
        for t in range(2):
            y, y_ref = merged(data[t][0], task=t).float(), ref(data32[t][0], task=t)
            assert (y - y_ref).norm() / y_ref.norm() < 3e-2, t
    for (name, s), s_ref in zip(merged.sites().items(), ref.sites().values()):
        rel = (s.scale.float() - s_ref.scale).norm() / s_ref.scale.norm()
        assert rel < 3e-2, (name, float(rel))
