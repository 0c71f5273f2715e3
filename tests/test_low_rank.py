"""Low-rank maps at the sites (``calibration={"tune_rank": r}``): the formula, folding on export,
save/load, and what calibration does with them. The export / mixed-batch invariants over every
architecture of the table run in test_merged.py (``rank=2``)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchmerge as tm
from torchmerge.rewrite import fold_affine


def _reference(site, x, t):
    """scale·x + shift + (x·down)·up over the channel axis, written out with einsum."""
    xm = x.movedim(site.channel_axis, -1)
    y = xm * site.scale[t] + site.shift[t] + torch.einsum("...c,cr,rd->...d", xm, site.down[t], site.up[t])
    return y.movedim(-1, site.channel_axis)


@pytest.mark.parametrize("axis, shape", [(1, (4, 6, 3, 3)), (-1, (4, 5, 6))])
def test_task_affine_low_rank_matches_the_formula(axis, shape):
    site = tm.TaskAffine(3, 6, channel_axis=axis)
    x = torch.randn(shape)
    site.add_low_rank(2, torch.Generator().manual_seed(0))
    assert torch.equal(site(x, 1), x)  # up starts at zero
    with torch.no_grad():
        for p in (site.scale, site.shift, site.up):
            p.copy_(torch.randn(p.shape))
    for t in range(3):
        assert torch.allclose(site(x, t), _reference(site, x, t), atol=1e-5)
    ids = torch.tensor([2, 0, 1, 2])
    mixed = site(x, ids)
    for i, t in enumerate(ids.tolist()):
        assert torch.allclose(mixed[i], _reference(site, x[i:i + 1], t)[0], atol=1e-5)
    weights = torch.randn(x.shape)  # gradients too (the map is added in place)
    grads = [torch.autograd.grad((f(site, x, 1) * weights).sum(), list(site.parameters()))
             for f in (lambda s, v, t: s(v, t), _reference)]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*grads))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(tasks=st.integers(1, 3), channels=st.integers(1, 9), ndim=st.integers(2, 4), data=st.data())
def test_low_rank_formula_over_shapes(tasks, channels, ndim, data):
    """Any rank, channel axis and tensor rank: the site = the einsum reference, per task and per sample."""
    rank = data.draw(st.integers(1, channels))
    axis = data.draw(st.sampled_from([a for a in range(-ndim, ndim) if a % ndim != 0]))
    shape = [data.draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[0], shape[axis] = 3, channels
    site = tm.TaskAffine(tasks, channels, channel_axis=axis)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    site.add_low_rank(rank, gen)
    with torch.no_grad():
        for p in (site.scale, site.shift, site.up):
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(shape, generator=gen)
    ids = torch.randint(0, tasks, (3,), generator=gen)
    mixed = site(x, ids)
    for i, t in enumerate(ids.tolist()):
        assert torch.allclose(site(x, t), _reference(site, x, t), atol=1e-5)
        assert torch.allclose(mixed[i], _reference(site, x[i:i + 1], t)[0], atol=1e-5)


def test_add_low_rank_refuses_bad_ranks():
    site = tm.TaskAffine(2, 4)
    with pytest.raises(tm.TorchMergeError, match=r"0 < rank <= channels \(4\), got 5"):
        site.add_low_rank(5)
    site.add_low_rank(4)
    with pytest.raises(tm.TorchMergeError, match="rank-4 maps already"):
        site.add_low_rank(2)


def _hf_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    return Conv1D(4, 5)


@pytest.mark.parametrize("make, x, axis", [
    (lambda: nn.Linear(5, 4), torch.randn(3, 5), -1),
    (lambda: nn.Linear(5, 4, bias=False), torch.randn(2, 3, 5), -1),
    (lambda: nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6), 1),
    (_hf_conv1d, torch.randn(2, 3, 5), -1),
], ids=["linear", "linear_no_bias", "conv2d", "hf_conv1d"])
def test_fold_low_rank_keeps_function(make, x, axis):
    """Folding scale, shift and the low-rank map into the layer = the layer, then the map."""
    layer = make().eval()
    site = tm.TaskAffine(1, 4, channel_axis=axis)
    site.add_low_rank(2)
    with torch.no_grad():
        for p in (site.scale, site.shift, site.up):
            p.copy_(torch.randn(p.shape))
        want = _reference(site, layer(x), 0)
        folded = copy.deepcopy(layer)
        assert fold_affine(folded, site.scale[0], site.shift[0], site.low_rank_of(0))
        assert torch.allclose(folded(x), want, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, groups=2), nn.ConvTranspose2d(3, 4, 2)],
                         ids=["norm", "grouped_conv", "conv_transpose"])
def test_low_rank_does_not_fold_where_channels_cannot_mix(layer):
    before = copy.deepcopy(layer.state_dict())
    assert not fold_affine(layer, torch.ones(4), torch.zeros(4), (torch.randn(4, 2), torch.randn(2, 4)))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def _setting(seed=0):
    """Two experts that differ by a rotation of the hidden units' outputs (an affine cannot undo
    the merge of those), with task data."""
    torch.manual_seed(seed)
    def net():
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    experts = [net(), net()]
    data = [[torch.randn(32, 6) for _ in range(3)] for _ in experts]
    return experts, data


def _merge(experts, data, **calibration):
    return tm.merge(experts, method="average", data=data, align=None, correction="affine+tune",
                    calibration={"tune_steps": 30, **calibration}).eval()


def _kl(merged, experts, data):
    total = 0.0
    with torch.no_grad():
        for t, (e, batches) in enumerate(zip(experts, data)):
            for x in batches:
                total += float(torch.nn.functional.kl_div(merged(x, task=t).log_softmax(-1),
                                                          e(x).log_softmax(-1), log_target=True,
                                                          reduction="batchmean"))
    return total


def test_tune_rank_tunes_maps_and_reports_their_cost():
    experts, data = _setting()
    plain, low_rank = _merge(experts, data), _merge(experts, data, tune_rank=4)
    sites = low_rank.sites()
    assert [s.rank for s in sites.values()] == [4] * len(sites) and all(s.rank == 0 for s in plain.sites().values())
    assert all(float(s.up.detach().abs().max()) > 0 for s in sites.values())
    per_task = sum(2 * s.scale.shape[1] + 2 * 4 * s.scale.shape[1] for s in sites.values())
    assert low_rank.info["calibration"]["low_rank"] == {"rank": 4, "tuned_parameters_per_task": per_task}
    assert _kl(low_rank, experts, data) < _kl(plain, experts, data)  # more capacity, a closer fit


def test_tune_rank_is_capped_at_the_channels():
    experts, data = _setting()
    merged = _merge(experts, data, tune_rank=64)
    assert {s.rank for s in merged.sites().values()} == {s.scale.shape[1] for s in merged.sites().values()}


def test_affine_calibration_after_tuning_resets_the_maps():
    """An affine fit is of the affine alone: recalibrating a tuned model gives the plain affine merge."""
    experts, data = _setting()
    affine = tm.merge(experts, method="average", data=data, align=None, correction="affine").eval()
    tuned = _merge(experts, data, tune_rank=4)
    tm.calibrate(tuned, experts, data, mode="affine")
    assert all(float(s.up.detach().abs().max()) == 0 for s in tuned.sites().values())
    x = torch.randn(8, 6)
    with torch.no_grad():
        for t in range(2):
            assert torch.allclose(tuned(x, task=t), affine(x, task=t), atol=1e-5)


def test_tune_with_another_rank_is_refused_and_leaves_the_model_as_it_was():
    experts, data = _setting()
    tuned = _merge(experts, data, tune_rank=4)
    before = copy.deepcopy(tuned.state_dict())
    with pytest.raises(tm.TorchMergeError, match=r"rank-4 maps already .*tune_rank=4"):
        tm.calibrate(tuned, experts, data, mode="affine+tune", tune_rank=2)
    after = tuned.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def test_a_failed_tune_drops_the_maps_it_added(monkeypatch):
    experts, data = _setting()
    merged = tm.merge(experts, method="average", data=data, align=None, correction="affine").eval()
    before = copy.deepcopy(merged.state_dict())
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(tm.correct, "tune", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        tm.calibrate(merged, experts, data, mode="affine+tune", tune_rank=4)
    assert all(s.rank == 0 for s in merged.sites().values())
    after = merged.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("value", [-1, 1.5, True, "full"])
def test_tune_rank_values_are_checked(value):
    experts, data = _setting()
    with pytest.raises(tm.TorchMergeError, match='tune_rank must be "auto" or an int >= 0'):
        _merge(experts, data, tune_rank=value)


@pytest.mark.parametrize("build", ["graph", "inject"])
def test_save_load_round_trips_low_rank_maps(tmp_path, build):
    experts, data = _setting()
    merged = tm.merge(experts, method="average", data=data, align=None, correction="affine+tune",
                      calibration={"tune_steps": 10, "tune_rank": 3}, build=build).eval()
    merged.save(tmp_path)
    loaded = tm.load(tmp_path, copy.deepcopy(experts[0])).eval()
    assert [s.rank for s in loaded.sites().values()] == [3] * len(merged.sites())
    x = torch.randn(8, 6)
    with torch.no_grad():
        for t in range(2):
            assert torch.equal(loaded(x, task=t), merged(x, task=t))


def test_load_refuses_a_malformed_rank(tmp_path):
    experts, data = _setting()
    _merge(experts, data, tune_steps=5, tune_rank=2).save(tmp_path)
    path = tmp_path / "torchmerge.json"
    manifest = json.loads(path.read_text())
    manifest["sites"][0]["rank"] = "two"
    path.write_text(json.dumps(manifest))
    with pytest.raises(tm.TorchMergeError, match="sites"):
        tm.load(tmp_path, copy.deepcopy(experts[0]))


class _TinyEncoder(nn.Module):
    """A transformer layer of plain torch modules (an nn.MultiheadAttention: "auto" sees a transformer)."""

    def __init__(self):
        super().__init__()
        self.embed, self.attn = nn.Linear(6, 16), nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp, self.head = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h + self.mlp(h)).mean(1)


def test_auto_rank_tunes_low_rank_maps_on_transformers_only():
    torch.manual_seed(0)
    encoders = [_TinyEncoder().eval() for _ in range(2)]
    seqs = [[torch.randn(8, 5, 6) for _ in range(2)] for _ in encoders]
    merged = tm.merge(encoders, method="average", data=seqs, align=None, correction="affine+tune",
                      calibration={"tune_steps": 5})
    want = {min(tm.correct.AUTO_TUNE_RANK, s.scale.shape[1]) for s in merged.sites().values()}
    assert {s.rank for s in merged.sites().values()} == want and merged.info["calibration"]["low_rank"]["rank"] == 8
    experts, data = _setting()
    mlp = _merge(experts, data, tune_steps=5)
    assert all(s.rank == 0 for s in mlp.sites().values()) and "low_rank" not in mlp.info["calibration"]


def test_tune_options_without_tuning_warn():
    """tune_* options with a correction that fits but does not tune would do nothing: said, in
    tm.merge and in tm.calibrate (where only values other than the defaults count)."""
    experts, data = _setting()
    with pytest.warns(UserWarning, match=r"tune_rank, tune_steps only act with correction='affine\+tune'"):
        merged = tm.merge(experts, method="average", data=data, align=None, correction="affine",
                          calibration={"tune_steps": 5, "tune_rank": 2})
    with pytest.warns(UserWarning, match="tune_rank only act with"):
        tm.calibrate(merged, experts, data, mode="repair", tune_rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tm.calibrate(merged, experts, data, mode="affine")


def test_tune_runs_the_expert_once_per_batch_and_matches_recomputing(monkeypatch):
    """The expert's logits are kept between passes over the batches: the same tuned model as
    recomputing them every step, with the expert run once per batch."""
    experts, data = _setting()
    calls = []
    hook = experts[0].register_forward_hook(lambda *a: calls.append(1))
    kept = _merge(experts, data, tune_steps=12)
    n_kept = len(calls)
    monkeypatch.setattr(tm.correct, "TARGET_CACHE_BYTES", 0)
    calls.clear()
    recomputed = _merge(experts, data, tune_steps=12)
    hook.remove()
    # tuning task 0: 3 runs instead of 12 steps + 2 · 3 (the loss over the batches before and after)
    assert len(calls) - n_kept == 12 + 2 * len(data[0]) - len(data[0])
    a, b = kept.state_dict(), recomputed.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_auto_steps_follow_the_experts_kind(monkeypatch):
    """tune_steps="auto" (the default): AUTO_TUNE_STEPS' transformer entry for experts with
    attention, its other entry otherwise; the report gives the number used."""
    monkeypatch.setattr(tm.correct, "AUTO_TUNE_STEPS", {"transformer": 7, "other": 3})
    torch.manual_seed(0)
    encoders = [_TinyEncoder().eval() for _ in range(2)]
    seqs = [[torch.randn(8, 5, 6) for _ in range(2)] for _ in encoders]
    merged = tm.merge(encoders, method="average", data=seqs, align=None, correction="affine+tune")
    experts, data = _setting()
    mlp = tm.merge(experts, method="average", data=data, align=None, correction="affine+tune")
    fixed = _merge(experts, data, tune_steps=4)
    assert [m.info["calibration"]["tune_steps"] for m in (merged, mlp, fixed)] == [7, 3, 4]


def test_tune_learning_rate_is_constant_then_falls_over_the_last_fifth(monkeypatch):
    """Adam's rate at each of 10 steps: tune_lr for 8, then 2 steps of a linear fall (lr·2/2, lr·1/2)."""
    rates = []
    step = torch.optim.Adam.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    experts, data = _setting()
    _merge(experts[:1], data[:1], tune_steps=10, tune_lr=0.1)
    assert rates == pytest.approx([0.1] * 9 + [0.05])


def test_tuning_that_raises_the_loss_is_undone_with_a_warning():
    """A rate far too high diverges: the task's rows go back to the affine fit (= the plain
    affine merge, bit for bit), a warning says so, and the report records it; a sane rate lowers
    the loss over the batches, measured here by an independent KL."""
    experts, data = _setting()
    affine = tm.merge(experts, method="average", data=data, align=None, correction="affine").eval()
    with pytest.warns(UserWarning, match=r"tuning task 'task0' did not lower .* put back .*try a lower tune_lr"):
        diverged = _merge(experts, data, tune_lr=1e4, tune_rank=0)
    a, b = diverged.state_dict(), affine.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    report = diverged.info["calibration"]["tasks"]["task0"]
    assert report["tune_restored"] is True and not report["tune_loss"] < report["tune_loss_before"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuned = _merge(experts, data, tune_rank=0)
    report = tuned.info["calibration"]["tasks"]["task0"]
    assert report["tune_restored"] is False and report["tune_loss"] < report["tune_loss_before"]
    assert _kl(tuned, experts, data) < _kl(affine, experts, data)


def test_holdout_keeps_the_parameters_best_on_the_held_out_batches(monkeypatch):
    """tune_holdout=1: tuned on the first 2 of 3 batches, the third watched before and after every
    pass (every 2 steps); the task keeps the parameters of the lowest watched loss, and its KL on
    the held-out batch, computed here with plain torch, is that loss."""
    experts, data = _setting()
    seen = []
    mean_loss = tm.correct._mean_loss

    def recording(merged, t, batches, targets, loss, indices):
        value = mean_loss(merged, t, batches, targets, loss, indices)
        if t == 0:
            seen.append((list(indices), value))
        return value

    monkeypatch.setattr(tm.correct, "_mean_loss", recording)
    merged = _merge(experts, data, tune_steps=12, tune_lr=0.3, tune_holdout=1)
    assert len(seen) == 1 + 6 and all(indices == [2] for indices, _ in seen)
    losses = [value for _, value in seen]
    best = min(range(len(losses)), key=lambda k: (losses[k], k))
    report = merged.info["calibration"]["tasks"]["task0"]
    assert report["tune_best_step"] == 2 * best and report["tune_loss"] == losses[best]
    assert report["tune_loss_before"] == losses[0] and report["tune_restored"] == (best != 6)
    x = data[0][2]
    with torch.no_grad():
        held_out = torch.nn.functional.kl_div(merged(x, task=0).log_softmax(-1), experts[0](x).log_softmax(-1),
                                              log_target=True, reduction="batchmean")
    assert float(held_out) == pytest.approx(losses[best], rel=1e-5)


def test_holdout_needs_a_batch_left_to_tune_on():
    experts, data = _setting()
    with pytest.raises(tm.TorchMergeError, match=r"tune_holdout=3 holds out every batch of task 'task0' \(3 batches\)"):
        _merge(experts, data, tune_holdout=3)
    with pytest.raises(tm.TorchMergeError, match="tune_holdout must be an int >= 0"):
        _merge(experts, data, tune_holdout=-1)
