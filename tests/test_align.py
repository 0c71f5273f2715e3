"""Alignment (``tm.align`` / ``tm.align_many``) on a table of small architectures.

Properties checked (weight matching and activation matching alike unless said otherwise):

* a model aligned to a randomly permuted copy of itself is recovered exactly: permuting the copy
  back gives bit-identical tensors (every state_dict entry);
* the weight-matching objective never decreases from sweep to sweep; results are deterministic for
  a seed; applying the permutations never changes a model's function; inputs are never modified;
* ``align_many``: identity for the reference, experts sharing a base share its permutation;
* task heads never take part, so experts with different head sizes align;
* bad inputs raise ``TorchMergeError`` with a message that says what to do;
* on real data (scikit-learn digits), weight alignment lowers the interpolation loss barrier.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchmerge as tm
from architectures import BY_NAME, MLP, randomize_
from invariants import assert_close, assert_state_equal, run, snapshot
from test_discover_hypothesis import Stack, net_st

METHODS = ("weight", "activation")

# residual (resnet_*, preact, convnext), attention (vit: q/k/v by hand with heads x head-dim
# product groups; fused_qkv: nanoGPT-style; chunk_qkv; mha_block: nn.MultiheadAttention opaque),
# grouped conv (resnext), token mixing (mlp_mixer: a module output with groups on two axes),
# concatenation (densenet), flatten into a linear (vgg), tied embeddings (tied_lm).
ALIGN_CASES = ["mlp", "vgg", "resnet_basic", "resnet_bottleneck", "preact_resnet", "convnext", "vit",
               "fused_qkv", "chunk_qkv", "mha_block", "resnext", "mlp_mixer", "densenet", "groupnorm",
               "reshape_sum", "tied_lm"]

_CACHE: dict = {}


def setup(name: str):
    """(model in eval mode, spec, a few data batches) per case, built once per session."""
    if name not in _CACHE:
        case = BY_NAME[name]
        model = case.make_model().eval()
        spec = tm.discover(model, case.make_input())
        data = [case.make_input(batch=16, seed=s) for s in range(3)]
        _CACHE[name] = (model, spec, data)
    return _CACHE[name]


def reinit(model: nn.Module, seed: int) -> nn.Module:
    """A copy with every floating tensor redrawn (same mean/std per tensor): an independent init."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(out.named_parameters()) + list(out.named_buffers()):
            if not t.is_floating_point() or t.numel() < 2 or name.endswith("mask"):
                continue
            new = torch.randn(t.shape, generator=gen) * t.std() + t.mean()
            t.copy_(new.abs() + 0.5 if name.endswith("running_var") else new)
    return out


def states_equal(a: nn.Module, b: nn.Module) -> list:
    """Names of state_dict entries that differ (empty: bit-identical)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def perms_equal(p: dict, q: dict) -> bool:
    return p.keys() == q.keys() and all(torch.equal(p[g], q[g]) for g in p)


# --------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ALIGN_CASES)
def test_recovers_permuted_copy(name, method):
    model, spec, data = setup(name)
    for seed in (0, 1, 2):
        shuffled = tm.permute(model, spec, spec.random_perms(seed))
        perms = tm.align(model, shuffled, spec, method=method, data=data)
        back = tm.permute(shuffled, spec, perms)
        bad = states_equal(model, back)
        assert not bad, f"{name}/{method}/seed {seed}: not recovered exactly: {bad[:5]}"
        true = {g: torch.argsort(p) for g, p in spec.random_perms(seed).items()}
        assert perms_equal(perms, true)


SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(net_st, st.booleans(), st.integers(0, 2**16))
def test_random_stacks_recovered_exactly(cfg, conv, perm_seed):
    """Random residual MLP/conv stacks, random permutations: weight matching undoes them exactly;
    activation matching keeps the function (dead or constant units make its answer ambiguous)."""
    torch.manual_seed(cfg["seed"])
    model = randomize_(Stack(cfg, conv), seed=cfg["seed"]).eval()
    shape = (cfg["in_dim"], 8, 8) if conv else (cfg["in_dim"],)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(perm_seed))
    spec = tm.discover(model, x)
    shuffled = tm.permute(model, spec, spec.random_perms(perm_seed))
    perms = tm.align(model, shuffled, spec, seed=perm_seed)
    assert not states_equal(model, tm.permute(shuffled, spec, perms))
    perms = tm.align(model, shuffled, spec, method="activation", data=[x])
    assert_close(run(shuffled, x), run(tm.permute(shuffled, spec, perms).eval(), x), "activation")


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet_basic", "vit", "fused_qkv", "resnext"])
def test_objective_never_decreases(name):
    model, spec, _ = setup(name)
    for seed in (0, 1):
        other = reinit(model, seed=10 + seed)
        result = tm.align(model, other, spec, seed=seed, return_result=True)
        obj = result.objective
        assert len(obj) == result.sweeps + 1 and result.sweeps >= 1
        assert all(b >= a - 1e-9 * abs(a) for a, b in zip(obj, obj[1:])), obj
        assert set(result.sources.values()) == {"weight"}


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet_bottleneck", "vit", "resnext", "mlp_mixer",
                                  "tied_lm"])
def test_kept_score_terms_change_nothing(name, monkeypatch):
    """Keeping expensive score terms between visits (every term, with the threshold at 0) gives the
    same permutations and objective history as recomputing them all."""
    model, spec, _ = setup(name)
    other = reinit(model, seed=21)
    runs = []
    for threshold in (float("inf"), 0):
        monkeypatch.setattr(sys.modules["torchmerge.align"], "_KEEP_MIN_FLOPS", threshold)
        runs.append(tm.align(model, other, spec, seed=3, return_result=True))
    assert perms_equal(runs[0].perms, runs[1].perms)
    assert runs[0].objective == pytest.approx(runs[1].objective, rel=1e-6)
    assert runs[0].sweeps == runs[1].sweeps


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet_bottleneck", "vit", "mlp_mixer", "tied_lm"])
def test_parallel_waves_equal_the_one_by_one_ascent(name, method, monkeypatch):
    """Solving independent groups together (parallel assignments, four threads, every group
    counted as large) gives the permutations, objective history and sweeps of visiting the dirty
    groups strictly one at a time."""
    model, spec, data = setup(name)
    other = reinit(model, seed=17)
    align_module = sys.modules["torchmerge.align"]
    matcher = align_module._Matcher
    batched = matcher._wave
    sizes = []

    def one_at_a_time(self, order, i, dirty, threads):
        while i < len(order) and order[i] not in dirty:
            i += 1
        return order[i:i + 1], i + 1

    def recorded(self, order, i, dirty, threads):
        wave, i = batched(self, order, i, dirty, threads)
        sizes.append(len(wave))
        return wave, i

    runs, threads = [], torch.get_num_threads()
    try:
        for wave in (one_at_a_time, recorded):
            monkeypatch.setattr(matcher, "_wave", wave)
            monkeypatch.setattr(align_module, "_LARGE_GROUP", 1)
            torch.set_num_threads(4)
            runs.append(tm.align(model, other, spec, method, data=data if method == "activation" else None,
                                 seed=3, return_result=True))
    finally:
        torch.set_num_threads(threads)
    assert perms_equal(runs[0].perms, runs[1].perms)
    assert runs[0].objective == pytest.approx(runs[1].objective, rel=1e-9)
    assert runs[0].sweeps == runs[1].sweeps
    if method == "weight" and len(spec.groups) > 2:
        assert max(sizes) > 1, "no two groups were solved together: the test exercised nothing"


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet_bottleneck", "vit", "resnext", "densenet",
                                  "tied_lm", "mlp_mixer"])
def test_kept_terms_track_moving_permutations(name, monkeypatch):
    """Kept score terms, updated column by column as other groups move a few elements or all of
    them, equal the terms computed from scratch."""
    model, spec, _ = setup(name)
    align_module = sys.modules["torchmerge.align"]
    ref, oth = align_module._shared_states(model, reinit(model, seed=5), spec, None)
    matcher = align_module._Matcher(spec, ref, oth, {})
    groups = [g for g in spec.groups if matcher.members[g]]
    gen = torch.Generator().manual_seed(0)
    perms = spec.identity_perms()
    for step in range(40):
        moved = groups[int(torch.randint(len(groups), (1,), generator=gen))]
        size = len(perms[moved])
        count = size if step % 7 == 0 else min(size, 2 + step % 3)
        chosen = torch.randperm(size, generator=gen)[:count]
        new = perms[moved].clone()
        new[chosen] = new[chosen[torch.randperm(count, generator=gen)]]
        perms[moved] = new
        g = groups[int(torch.randint(len(groups), (1,), generator=gen))]
        monkeypatch.setattr(align_module, "_KEEP_MIN_FLOPS", float("inf"))
        fresh = matcher.score(g, perms)
        monkeypatch.setattr(align_module, "_KEEP_MIN_FLOPS", 0)
        kept = matcher.score(g, perms)
        assert torch.allclose(kept, fresh, rtol=1e-5, atol=1e-5 * float(fresh.abs().max())), (step, g)
    assert matcher._kept, "no term was kept: the test exercised nothing"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "resnet_bottleneck", "vit", "mlp_mixer"])
def test_deterministic_function_preserving_and_pure(name, method):
    """Same seed -> same perms; permuting never changes the function; inputs stay untouched."""
    model, spec, data = setup(name)
    other = reinit(model, seed=7)
    before_ref, before_other = snapshot(model), snapshot(other)
    first = tm.align(model, other, spec, method=method, data=data, seed=3)
    second = tm.align(model, other, spec, method=method, data=data, seed=3)
    assert perms_equal(first, second)
    assert_state_equal(before_ref, snapshot(model), "align modified the reference")
    assert_state_equal(before_other, snapshot(other), "align modified the other model")
    assert not model.training and not other.training
    aligned = tm.permute(other, spec, first).eval()
    for x in data:
        assert_close(run(other, x), run(aligned, x), f"{name}/{method}")


def test_activation_marks_its_groups():
    model, spec, data = setup("vgg")
    result = tm.align(model, reinit(model, 1), spec, method="activation", data=data, return_result=True)
    assert set(result.sources) == set(spec.groups)
    assert "activation" in result.sources.values()


# --------------------------------------------------------------------------- align_many


def test_align_many_without_bases():
    model, spec, _ = setup("resnet_basic")
    experts = [reinit(model, s) for s in range(3)]
    perms = tm.align_many(experts, spec, reference=1)
    assert perms_equal(perms[1], spec.identity_perms())
    for i in (0, 2):
        assert perms_equal(perms[i], tm.align(experts[1], experts[i], spec))


def test_align_many_with_shared_bases():
    model, spec, _ = setup("mlp")
    b0, b1 = reinit(model, 0), reinit(model, 1)
    experts = [reinit(model, s) for s in range(10, 14)]  # fine-tuned from b0, b0, b1, b1
    perms = tm.align_many(experts, spec, bases=[b0, b0, b1, b1])
    identity, b1_to_b0 = spec.identity_perms(), tm.align(b0, b1, spec)
    assert not perms_equal(b1_to_b0, identity)
    assert perms_equal(perms[0], identity) and perms_equal(perms[1], identity)
    assert perms_equal(perms[2], b1_to_b0) and perms_equal(perms[3], b1_to_b0)
    # reference 2: its base b1 is the anchor
    perms = tm.align_many(experts, spec, reference=2, bases=[b0, b0, b1, b1])
    assert perms_equal(perms[2], identity) and perms_equal(perms[3], identity)
    assert perms_equal(perms[0], tm.align(b1, b0, spec)) and perms_equal(perms[1], perms[0])


# --------------------------------------------------------------------------- task heads


def _mlp(num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_(MLP(num_classes), seed=seed).eval()


@pytest.mark.parametrize("method", METHODS)
def test_heads_never_matched(method):
    model = _mlp(3)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    spec = tm.discover(model, x)
    assert set(spec.heads) == {"head.weight", "head.bias"}
    other = reinit(model, seed=4)
    garbage = copy.deepcopy(other)
    with torch.no_grad():
        garbage.head.weight.normal_(0, 100.0)
        garbage.head.bias.normal_(0, 100.0)
    a = tm.align(model, other, spec, method="weight")
    b = tm.align(model, garbage, spec, method="weight")
    assert perms_equal(a, b), "the head's values changed the weight matching"
    result = tm.align(model, other, spec, method=method, data=[x], return_result=True)
    assert not any("head" in g for g in result.sources)


@pytest.mark.parametrize("method", METHODS)
def test_experts_with_different_head_sizes(method):
    """Same body (permuted), 3-class vs 5-class head: the body is recovered, the head ignored."""
    a = _mlp(3)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    spec = tm.discover(a, x)
    b5 = _mlp(5, seed=9)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(b5, name).load_state_dict(getattr(a, name).state_dict())
    shuffled = tm.permute(b5, spec, spec.random_perms(2))
    perms = tm.align(a, shuffled, spec, method=method, data=[x])
    back = tm.permute(shuffled, spec, perms)
    for k, v in a.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(back.state_dict()[k], v), k
    assert_close(run(shuffled, x), run(back, x), "5-class expert")


# --------------------------------------------------------------------------- bad input


def _bad_cases():
    model, spec, data = setup("mlp")
    other = reinit(model, 1)
    wide = MLP()
    wide.fc1 = nn.Linear(8, 20)
    return [
        ("unknown method", lambda: tm.align(model, other, spec, method="sinkhorn"),
         r"unknown alignment method 'sinkhorn'.*'weight', 'activation'"),
        ("activation without data", lambda: tm.align(model, other, spec, method="activation"),
         r"needs data=.*method='weight'"),
        ("reference out of range", lambda: tm.align_many([model, other], spec, reference=2),
         r"reference=2 is not an index into 2 experts"),
        ("negative reference", lambda: tm.align_many([model, other], spec, reference=-1),
         r"reference=-1 is not an index"),
        ("wrong number of bases", lambda: tm.align_many([model, other], spec, bases=[model]),
         r"bases has 1 entries for 2 experts"),
        ("not a module", lambda: tm.align(model, other.state_dict(), spec),
         r"other must be a torch.nn.Module"),
        ("shape mismatch", lambda: tm.align(model, wide, spec),
         r"fc1.weight has shape \(16, 8\) in the reference and \(20, 8\).*exclude="),
    ]


@pytest.mark.parametrize("i", range(7))
def test_bad_input(i):
    what, call, match = _bad_cases()[i]
    with pytest.raises(tm.TorchMergeError, match=match):
        call()


# --------------------------------------------------------------------------- real data


def _digits(batch_size=128):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def _train(batches, seed, epochs=20):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def test_weight_alignment_lowers_the_digits_barrier():
    pytest.importorskip("sklearn")
    batches = _digits()
    train, test = batches[:10], batches[10:]
    a, b = _train(train, seed=1), _train(train, seed=2)
    spec = tm.discover(a, train[0][0])
    aligned = tm.permute(b, spec, tm.align(a, b, spec))
    before = tm.analysis.interpolation_barrier(a, b, test, steps=5)
    after = tm.analysis.interpolation_barrier(a, aligned, test, steps=5)
    assert after["loss_barrier"] < before["loss_barrier"], (before["loss_barrier"], after["loss_barrier"])
    # the aligned model is the same function: the path's endpoints are unchanged
    assert abs(after["loss"][-1] - before["loss"][-1]) < 1e-4


def test_an_escape_back_to_a_local_optimum_already_left_ends_the_ascent(monkeypatch):
    """Activation matching of two GPT-2 pretrainings cycled: an escape from a local optimum led,
    after a sweep, back to one already escaped from, 100 sweeps long. A revisited optimum now ends
    the ascent (converged: no single-group move gains there)."""
    import importlib

    align_module = importlib.import_module("torchmerge.align")
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2))
    spec = tm.discover(a, torch.randn(2, 4))
    escapes = []

    def to_the_other_optimum_and_back(self, perms):  # stands in for a cycling escape
        g = next(iter(perms))
        perms[g] = perms[g].roll(1)  # the next sweep moves it back: the same optimum again
        escapes.append(g)
        return True

    monkeypatch.setattr(align_module._Matcher, "escape", to_the_other_optimum_and_back)
    result = tm.align(a, b, spec, max_iter=50, return_result=True)
    assert result.converged and result.sweeps < 10 and len(escapes) == 1
