"""Merge methods against slow references written from the papers' formulas (python loops,
float64), hand-computed examples, invariants (identical copies, λ / p edge cases) and a table of
bad inputs."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from torchmerge.errors import TorchMergeError
from torchmerge.methods import (METHODS, MergeResult, average, conjugate_gradient, consensus, dare,
                                diagonal_fisher, fisher_merge, mats, merge_states, pack_masks,
                                regmean, tall, task_arithmetic, task_vectors, ties, unpack_mask)

HYP = settings(max_examples=25, deadline=None, derandomize=True)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------- helpers
def make_states(seed, shapes, T, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda s: torch.randn(s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    base = {f"p{j}": rnd(s) for j, s in enumerate(shapes)}
    experts = [{k: v + rnd(v.shape) for k, v in base.items()} for _ in range(T)]
    return experts, base


def flat(sd, keys):
    return torch.cat([sd[k].reshape(-1) for k in keys])


def unflat(vec, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].view(v.shape)
        i += v.numel()
    return out


def ref_taus(experts, base):
    keys = list(base)
    # float32 differences (what the implementation computes), then float64 for the rest
    return [flat({k: e[k] - base[k] for k in keys}, keys).double() for e in experts]


def ref_ties_vector(taus, k, sums=None):
    """Paper: trim to top-k over the whole vector, elect sign of the sum, disjoint mean.
    ``sums``: a list that receives the trimmed sums (the sign election's input)."""
    N = taus[0].numel()
    K = max(1, round(k * N))
    trimmed = []
    for t in taus:
        vals = t.tolist()
        thr = sorted((abs(v) for v in vals), reverse=True)[K - 1]
        trimmed.append([v if abs(v) >= thr else 0.0 for v in vals])
    merged = []
    for j in range(N):
        s = sum(tr[j] for tr in trimmed)
        if sums is not None:
            sums.append(s)
        sign = (s > 0) - (s < 0)
        agree = [tr[j] for tr in trimmed if tr[j] != 0 and ((tr[j] > 0) - (tr[j] < 0)) == sign]
        merged.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(merged, dtype=torch.float64)


def ref_tall_masks(taus, tau_mtl, lams):
    return [[abs(t[j].item()) >= lam * abs(tau_mtl[j].item() - t[j].item())
             for j in range(t.numel())] for t, lam in zip(taus, lams)]


def assert_state_close(a, b, atol=1e-5, rtol=1e-5):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].double().cpu(), b[k].double().cpu(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{k}: {m}")


def random_gram(g, d, n=None):
    x = torch.randn(n or 2 * d + 3, d, generator=g, dtype=torch.float64)
    return (x.T @ x).float()


shapes_st = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
                     min_size=1, max_size=3)


# ----------------------------------------------------------------------------- base / task vectors
def test_task_vectors_three_base_forms():
    e = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 5.0])}]
    theta0, taus = task_vectors(e, None)
    assert theta0["w"].tolist() == [2.0, 4.0] and taus[0]["w"].tolist() == [-1.0, -1.0]
    theta0, taus = task_vectors(e, {"w": torch.zeros(2)})
    assert theta0["w"].tolist() == [0.0, 0.0] and taus[1]["w"].tolist() == [3.0, 5.0]
    bases = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, 2.0])}]
    theta0, taus = task_vectors(e, bases)
    assert theta0["w"].tolist() == [1.5, 1.5]
    assert [t["w"].tolist() for t in taus] == [[0.0, 2.0], [1.0, 3.0]]
    # Task Arithmetic with per-expert bases: mean(bases) + λ Σ (θ_i − base_i)
    r = task_arithmetic(e, bases, lam=0.5)
    assert r.state["w"].tolist() == [1.5 + 0.5 * 1.0, 1.5 + 0.5 * 5.0]


def test_integer_buffers_from_first_expert_and_dtype_kept():
    e = [{"w": torch.ones(3, dtype=torch.float16), "n": torch.tensor(5)},
         {"w": torch.zeros(3, dtype=torch.float16), "n": torch.tensor(9)}]
    for name in ["average", "task_arithmetic", "ties", "dare", "tall", "consensus"]:
        with warns_if(name != "average", "with base=None"):
            r = merge_states(name, e)
        assert r.state["n"].item() == 5 and r.state["w"].dtype == torch.float16, name


def test_average_matches_mean():
    experts, _ = make_states(0, [(3, 4), (5,)], 3)
    r = average(experts)
    for k in experts[0]:
        torch.testing.assert_close(r.state[k], torch.stack([e[k] for e in experts]).mean(0))


@HYP
@given(seed=st.integers(0, 10_000), shapes=shapes_st, T=st.integers(1, 4),
       lam=st.floats(0, 2))
def test_task_arithmetic_reference(seed, shapes, T, lam):
    experts, base = make_states(seed, shapes, T)
    with warns_if(lam == 0, "lam=0: the result is the base"):
        r = task_arithmetic(experts, base, lam=lam)
    ref = flat(base, list(base)).double() + lam * sum(ref_taus(experts, base))
    assert_state_close(r.state, unflat(ref, base))


# ----------------------------------------------------------------------------- TIES
def test_ties_hand_example_trims_over_whole_vector():
    base = {"a": torch.zeros(3), "b": torch.zeros(3)}
    experts = [
        {"a": torch.tensor([4.0, -1.0, 0.5]), "b": torch.tensor([0.2, 3.0, -2.0])},
        {"a": torch.tensor([-3.0, 2.0, 1.0]), "b": torch.tensor([1.0, -0.1, -4.0])},
        {"a": torch.tensor([1.0, 0.3, -5.0]), "b": torch.tensor([-2.0, 2.5, 0.4])},
    ]
    # K = 3 of 6 entries per task vector: trimmed τ1 = a[4,0,0] b[0,3,-2], τ2 = a[-3,2,0] b[0,0,-4],
    # τ3 = a[0,0,-5] b[-2,2.5,0]; signs a[+,+,-] b[-,+,-]; disjoint means below.
    r = ties(experts, base, k=0.5, lam=1.0)
    assert r.state["a"].tolist() == [4.0, 2.0, -5.0]
    assert r.state["b"].tolist() == [-2.0, 2.75, -3.0]
    r2 = ties(experts, base, k=0.5, lam=2.0)
    assert r2.state["b"].tolist() == [-4.0, 5.5, -6.0]


@HYP
@given(seed=st.integers(0, 10_000), shapes=shapes_st, T=st.integers(1, 4),
       k=st.sampled_from([0.05, 0.2, 0.5, 0.8, 1.0]), lam=st.sampled_from([0.5, 1.0, 1.5]),
       with_base=st.booleans())
def test_ties_reference(seed, shapes, T, k, lam, with_base):
    experts, base = make_states(seed, shapes, T)
    n = sum(math.prod(s) for s in shapes)
    if not with_base:
        # mean base: Σ τ_i = 0, so with T = 2 (τ_1 = −τ_2) or nothing trimmed every elected sign is
        # rounding noise; the method is only meaningful for T ≥ 3 with trimming
        assume(T >= 3 and round(k * n) < n)
        base_used = {key: sum(e[key] for e in experts) / T for key in base}
        with pytest.warns(UserWarning, match="method='ties' with base=None"):
            r = ties(experts, None, k=k, lam=lam)
    else:
        base_used = base
        r = ties(experts, base, k=k, lam=lam)
    sums = []
    merged = ref_ties_vector(ref_taus(experts, base_used), k, sums)
    # a trimmed sum within rounding of 0 elects a sign at random (float32 vs float64): skip those
    assume(min(abs(v) for v in sums if v != 0) > 1e-5 if any(sums) else True)
    ref = flat(base_used, list(base)).double() + lam * merged
    assert_state_close(r.state, unflat(ref, base), atol=1e-5)


def test_ties_threshold_exact_on_large_vector():
    g = torch.Generator().manual_seed(3)
    base = {"a": torch.zeros(20_000), "b": torch.zeros(300, 70)}
    e = [{"a": torch.randn(20_000, generator=g), "b": torch.randn(300, 70, generator=g)}]
    r = ties(e, base, k=0.2, lam=1.0)
    kept = sum(int((v != 0).sum()) for v in r.state.values())
    assert kept == round(0.2 * (20_000 + 21_000))
    allv = torch.cat([e[0]["a"], e[0]["b"].flatten()]).abs()
    assert float(torch.cat([v.flatten() for v in r.state.values()]).abs().max()) == float(allv.max())


# ----------------------------------------------------------------------------- DARE
def test_dare_p0_equals_task_arithmetic():
    experts, base = make_states(1, [(4, 3), (7,)], 3)
    for b in (base, None):
        with warns_if(b is None, "with base=None"):
            assert_state_close(dare(experts, b, p=0.0, lam=0.4).state,
                               task_arithmetic(experts, b, lam=0.4).state, atol=0, rtol=0)
            assert_state_close(dare(experts, b, p=0.0, combine="ties", k=0.3, lam=1.0).state,
                               ties(experts, b, k=0.3, lam=1.0).state, atol=0, rtol=0)


def test_dare_drop_rescale_seeded():
    base = {"w": torch.zeros(20_000)}
    experts = [{"w": torch.full((20_000,), 2.0)}]
    a = dare(experts, base, p=0.75, lam=1.0, seed=3).state["w"]
    b = dare(experts, base, p=0.75, lam=1.0, seed=3).state["w"]
    c = dare(experts, base, p=0.75, lam=1.0, seed=4).state["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0.0, 8.0}           # survivors rescaled by 1/(1−p)
    assert abs(float((a != 0).float().mean()) - 0.25) < 0.02
    assert abs(float(a.mean()) - 2.0) < 0.1                 # unbiased in expectation
    nr = dare(experts, base, p=0.75, lam=1.0, seed=3, rescale=False).state["w"]
    assert set(nr.unique().tolist()) == {0.0, 2.0} and torch.equal(nr != 0, a != 0)


def test_dare_ties_matches_ties_on_dropped_vectors():
    from torchmerge.methods.base import Aligned
    from torchmerge.methods.dare import Dropped
    experts, base = make_states(5, [(6, 5)], 3)
    r = dare(experts, base, p=0.5, lam=1.0, combine="ties", k=0.3, seed=7)
    src = Dropped(Aligned(experts, base), 0.5, True, 7)
    dropped = [{"p0": base["p0"] + src.tau(i, "p0")} for i in range(3)]
    assert_state_close(r.state, ties(dropped, base, k=0.3, lam=1.0).state, atol=1e-5)


# ----------------------------------------------------------------------------- TALL / Consensus
def warns_if(condition, match):
    """``pytest.warns(UserWarning, match=...)`` where a setting is meant to be degenerate."""
    return pytest.warns(UserWarning, match=match) if condition else contextlib.nullcontext()


TALL_BASE = {"w": torch.zeros(4)}
TALL_EXPERTS = [{"w": torch.tensor([1.0, 0.0, 0.5, -1.0])}, {"w": torch.tensor([0.0, 2.0, 0.5, 1.0])}]


def test_tall_hand_example():
    # τ_MTL = [1, 2, 1, 0]; λ=0.4: m1 = [1,0,0.5,1] ≥ [0,.8,.2,.4] -> TFTT; m2 = [0,2,.5,1] ≥
    # [.4,0,.2,.4] -> FTTT
    r = tall(TALL_EXPERTS, TALL_BASE, lam=0.4)
    assert r.state["w"].tolist() == [1.0, 2.0, 1.0, 0.0]
    assert r.mask(0, "w").tolist() == [True, False, True, True]
    assert r.mask(1, "w").tolist() == [False, True, True, True]
    assert r.task_state(0)["w"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert r.task_state(1)["w"].tolist() == [0.0, 2.0, 1.0, 0.0]
    assert r.masks["w"].dtype == torch.uint8 and r.masks["w"].shape == (2, 1)
    # per-task λ: λ_2 = 3 switches task 2's third entry off (0.5 < 3·0.5)
    r2 = tall(TALL_EXPERTS, TALL_BASE, lam=[0.4, 3.0])
    assert r2.mask(1, "w").tolist() == [False, True, False, False]


def test_consensus_hand_example():
    # votes = [1, 1, 2, 2] -> k=2 keeps entries 2, 3 of τ_MTL = [1, 2, 1, 0]
    assert consensus(TALL_EXPERTS, TALL_BASE, k=2).state["w"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert consensus(TALL_EXPERTS, TALL_BASE, k=1).state["w"].tolist() == [1.0, 2.0, 1.0, 0.0]
    with pytest.warns(UserWarning, match="k=3 > 2 experts"):
        assert consensus(TALL_EXPERTS, TALL_BASE, k=3).state["w"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert consensus(TALL_EXPERTS, TALL_BASE, k=2, scale=0.5).state["w"].tolist() == [0, 0, 0.5, 0]


@HYP
@given(seed=st.integers(0, 10_000), shapes=shapes_st, T=st.integers(1, 4),
       lam=st.sampled_from([0.0, 0.2, 0.4, 1.0]), mtl=st.sampled_from(["sum", "ties"]))
def test_tall_reference(seed, shapes, T, lam, mtl):
    experts, base = make_states(seed, shapes, T)
    taus = ref_taus(experts, base)
    tau_mtl = sum(taus) if mtl == "sum" else ref_ties_vector(taus, 0.2)
    with warns_if(lam == 0, "lam=0: every task mask is all ones"):
        r = tall(experts, base, lam=lam, mtl=mtl)
    keys = list(base)
    ref_masks = ref_tall_masks(taus, tau_mtl, [lam] * T)
    theta0 = flat(base, keys).double()
    assert_state_close(r.state, unflat(theta0 + tau_mtl, base))
    mismatch = False
    for t in range(T):
        got = torch.cat([r.mask(t, k).reshape(-1) for k in keys]).tolist()
        diff = [j for j, (a, b) in enumerate(zip(got, ref_masks[t])) if a != b]
        mismatch |= bool(diff)
        # float32 vs float64 can only disagree where both sides are (numerically) equal
        for j in diff:
            lhs, rhs = abs(taus[t][j]), lam * abs(tau_mtl[j] - taus[t][j])
            assert abs(lhs - rhs) < 1e-5, (t, j, lhs, rhs)
        m = torch.tensor(got)
        torch.testing.assert_close(flat(r.task_state(t), keys).double(),
                                   torch.where(m, theta0 + tau_mtl, theta0), atol=1e-5, rtol=1e-5)
    if not mismatch:
        votes = torch.tensor(ref_masks, dtype=torch.int64).sum(0)
        with warns_if(lam == 0 or T < 2, "lam=0: every task mask|k=2 > 1 experts"):
            c = consensus(experts, base, k=2, lam=lam, mtl=mtl)
        want_c = theta0 + torch.where(votes >= 2, tau_mtl, torch.zeros_like(tau_mtl))
        assert_state_close(c.state, unflat(want_c, base))


def test_tall_recovers_experts_with_disjoint_task_vectors():
    """With disjoint supports τ_MTL − τ_t = 0 on τ_t's support, so any λ in (0, 1] gives m_t =
    supp(τ_t) and task_state(t) == expert t exactly. λ = 0 turns every mask on (θ₀ + τ_MTL)."""
    base = {"w": torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(4)}
    support = torch.arange(30).view(6, 5) % 3
    experts = []
    for t in range(3):
        tau = torch.randn(6, 5, generator=torch.Generator().manual_seed(t + 1)) * (support == t)
        experts.append({"w": base["w"] + tau, "b": torch.full((4,), float(t == 0))})
    for lam in (0.2, 0.4, 1.0):
        r = tall(experts, base, lam=lam)
        for t in range(3):
            bt = r.task_state(t)
            torch.testing.assert_close(bt["w"], experts[t]["w"], atol=1e-6, rtol=0)
            torch.testing.assert_close(bt["b"], experts[t]["b"])
    with pytest.warns(UserWarning, match="lam=0: every task mask is all ones"):
        r0 = tall(experts, base, lam=0.0)
    for t in range(3):
        assert r0.mask(t, "w").all()
        assert torch.equal(r0.task_state(t)["w"], r0.state["w"])
    # a single task is always recovered
    with pytest.warns(UserWarning, match="lam=0"):
        one = tall(experts[:1], base, lam=0.0)
    torch.testing.assert_close(one.task_state(0)["w"], experts[0]["w"])


@HYP
@given(T=st.integers(1, 5), n=st.integers(1, 70), seed=st.integers(0, 1000))
def test_mask_packing_roundtrip(T, n, seed):
    m = torch.rand(T, n, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_masks(m)
    assert packed.dtype == torch.uint8 and packed.shape == (T, math.ceil(n / 8))
    for t in range(T):
        assert torch.equal(unpack_mask(packed[t], n), m[t])
    import numpy as np
    assert np.array_equal(packed.numpy(), np.packbits(m.numpy(), axis=1))


# ----------------------------------------------------------------------------- RegMean / Fisher / MaTS
def ref_regmean(ws, gs, alpha):
    """Paper: W* = (Σ W_i G_i)(Σ G_i)^{-1}, G_i with off-diagonals scaled by α (float64, inv)."""
    out = ws[0].shape[0]
    adj = []
    for g in gs:
        g = g.double().clone()
        for a in range(g.shape[0]):
            for b in range(g.shape[1]):
                if a != b:
                    g[a, b] *= alpha
        adj.append(g)
    num = sum(w.double().reshape(out, -1) @ g for w, g in zip(ws, adj))
    return (num @ torch.linalg.inv(sum(adj))).reshape(ws[0].shape)


@HYP
@given(seed=st.integers(0, 10_000), T=st.integers(1, 4), out=st.integers(1, 5),
       d=st.integers(1, 6), alpha=st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_regmean_reference_and_mats_matches(seed, T, out, d, alpha):
    g = torch.Generator().manual_seed(seed)
    experts = [{"w": torch.randn(out, d, generator=g), "b": torch.randn(out, generator=g)}
               for _ in range(T)]
    grams = [{"w": random_gram(g, d)} for _ in range(T)]
    r = regmean(experts, grams, alpha=alpha)
    want = ref_regmean([e["w"] for e in experts], [s["w"] for s in grams], alpha)
    torch.testing.assert_close(r.state["w"].double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r.state["b"], torch.stack([e["b"] for e in experts]).mean(0))
    base = {k: torch.zeros_like(v) for k, v in experts[0].items()}
    for b in (None, base):
        m = mats(experts, grams, base=b, alpha=alpha, tol=1e-12)
        torch.testing.assert_close(m.state["w"], r.state["w"], atol=1e-5, rtol=1e-5)


def test_regmean_conv_is_least_squares_on_unfolded_inputs():
    """α=1 RegMean minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² with X_i the unfolded conv inputs."""
    g = torch.Generator().manual_seed(0)
    convs = [nn.Conv2d(3, 4, 3, padding=1) for _ in range(3)]
    xs, grams = [], []
    for c in convs:
        with torch.no_grad():
            c.weight.copy_(torch.randn(c.weight.shape, generator=g))
        u = F.unfold(torch.randn(5, 3, 6, 6, generator=g), 3, padding=1)  # [B, 27, L]
        x = u.transpose(1, 2).reshape(-1, 27)
        xs.append(x)
        grams.append({"weight": x.T @ x})
    experts = [dict(c.state_dict()) for c in convs]
    r = regmean(experts, grams, alpha=1.0)
    X = torch.cat(xs).double()
    Y = torch.cat([x.double() @ c.weight.reshape(4, -1).T.double() for x, c in zip(xs, convs)])
    W = torch.linalg.lstsq(X, Y).solution.T.reshape(4, 3, 3, 3)
    torch.testing.assert_close(r.state["weight"].double(), W, atol=1e-4, rtol=1e-4)


def test_regmean_dead_inputs_take_the_average():
    experts = [{"w": torch.tensor([[1.0, 5.0]])}, {"w": torch.tensor([[3.0, 7.0]])}]
    grams = [{"w": torch.tensor([[2.0, 0.0], [0.0, 0.0]])}, {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}]
    result = regmean(experts, grams)
    assert "dead inputs" in result.info["fallbacks"][0]
    w = result.state["w"]
    torch.testing.assert_close(w, torch.tensor([[(2 * 1 + 3) / 3, 6.0]]))


def test_mats_row_blocks_match_regmean_on_tall_weights():
    """Weights with more rows than one CG block: every block converges to RegMean's rows."""
    g = torch.Generator().manual_seed(3)
    experts = [{"w": torch.randn(150, 12, generator=g)} for _ in range(3)]
    grams = [{"w": random_gram(g, 12)} for _ in range(3)]
    m = mats(experts, grams, tol=1e-12)
    torch.testing.assert_close(m.state["w"], regmean(experts, grams).state["w"], atol=1e-5, rtol=1e-5)
    assert 1 <= m.info["cg_iterations"]["w"] <= 100


def test_regmean_not_positive_definite_falls_back_to_lu_or_says_singular():
    """Cholesky refuses a Σ G that is not positive definite: an invertible one is solved by LU
    (same formula), an exactly singular one (α = 1, rank-deficient data) is a clear error."""
    experts = [{"w": torch.tensor([[1.0, 2.0]])}, {"w": torch.tensor([[3.0, -1.0]])}]
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and −1
    grams = [{"w": indefinite}, {"w": indefinite}]
    want = ref_regmean([e["w"] for e in experts], [s["w"] for s in grams], 1.0)
    with pytest.warns(UserWarning, match="not positive definite .*solved by LU"):
        torch.testing.assert_close(regmean(experts, grams, alpha=1.0).state["w"].double(), want)
    rank_one = [{"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}]
    with pytest.raises(TorchMergeError, match=r"RegMean: Σ Gram for 'w' .* singular; use alpha < 1"):
        regmean(experts, rank_one, alpha=1.0)
    torch.testing.assert_close(regmean(experts, rank_one, alpha=0.5).state["w"].double(),
                               ref_regmean([e["w"] for e in experts], [s["w"] for s in rank_one], 0.5))


@HYP
@given(seed=st.integers(0, 10_000), shapes=shapes_st, T=st.integers(1, 4))
def test_fisher_reference_and_mats_fisher(seed, shapes, T):
    experts, base = make_states(seed, shapes, T)
    g = torch.Generator().manual_seed(seed + 1)
    fishers = [{k: torch.rand(v.shape, generator=g) ** 2 for k, v in base.items()} for _ in range(T)]
    fishers[0][next(iter(base))].view(-1)[0] = 0.0  # an entry relying on the eps floor
    r = fisher_merge(experts, fishers, eps=1e-8)
    for k in base:
        num = sum(f[k].double().clamp_min(1e-8) * e[k].double() for f, e in zip(fishers, experts))
        den = sum(f[k].double().clamp_min(1e-8) for f in fishers)
        torch.testing.assert_close(r.state[k].double(), num / den, atol=1e-5, rtol=1e-5)
    m = mats(experts, fishers, base=base, statistic="fisher", tol=1e-12)
    assert_state_close(m.state, r.state, atol=1e-5)


def test_conjugate_gradient_generic():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(20, 20, generator=g, dtype=torch.float64)
    A = q @ q.T + 20 * torch.eye(20, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    x, it, res = conjugate_gradient(lambda v: A @ v, b, torch.zeros_like(b), max_iter=100, tol=1e-10)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    assert it <= 20 and res <= 1e-10
    x1, it1, _ = conjugate_gradient(lambda v: A @ v, b, torch.zeros_like(b), max_iter=2, tol=1e-12)
    assert it1 == 2


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_diagonal_fisher_empirical_matches_loop():
    torch.manual_seed(0)
    net = TinyNet()
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    fisher = diagonal_fisher(net, iter(data), labels="empirical", max_batches=2)
    ref = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for x, y in data[:2]:
        for i in range(5):
            net.zero_grad()
            F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
            for n, p in net.named_parameters():
                ref[n] += p.grad ** 2 / 10
    for n in ref:
        torch.testing.assert_close(fisher[n], ref[n], atol=1e-6, rtol=1e-5)
    sampled = diagonal_fisher(net, iter(data), seed=1)
    again = diagonal_fisher(net, iter(data), seed=1)
    assert all(torch.equal(sampled[n], again[n]) and (sampled[n] >= 0).all() for n in ref)
    assert net.training  # mode restored


# ----------------------------------------------------------------------------- invariants
def sensible_stats(name, experts):
    g = torch.Generator().manual_seed(0)
    if name == "regmean" or name == "mats":
        return [{k: random_gram(g, v[0].numel()) for k, v in experts[0].items() if v.dim() >= 2}
                for _ in experts]
    if name == "fisher":
        return [{k: torch.rand(v.shape, generator=g) for k, v in experts[0].items()
                 if v.is_floating_point()} for _ in experts]
    return None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(METHODS))
def test_identical_copies_return_the_model(name, device):
    experts, _ = make_states(11, [(5, 4), (5,), (3, 2, 3, 3)], 1, device=device)
    model = dict(experts[0], n=torch.tensor(7, device=device))
    copies = [dict(model) for _ in range(4)]
    with pytest.warns(UserWarning, match="all 4 experts are identical"):
        r = merge_states(name, copies, stats=sensible_stats(name, copies))
    assert_state_close(r.state, model, atol=1e-5)
    assert all(v.device.type == device for v in r.state.values())
    for t in range(4):
        assert_state_close(r.task_state(t), model, atol=1e-5)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare", "tall", "consensus", "mats"])
def test_inputs_not_modified(name):
    experts, base = make_states(2, [(4, 4)], 3)
    snap = [{k: v.clone() for k, v in e.items()} for e in experts + [base]]
    merge_states(name, experts, base, stats=sensible_stats(name, experts))
    for a, b in zip(experts + [base], snap):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_result_is_a_merge_result():
    r = merge_states("tall", TALL_EXPERTS, TALL_BASE)
    assert isinstance(r, MergeResult) and r.num_tasks == 2 and r.mask_bytes() == 2


# ----------------------------------------------------------------------------- bad inputs
E2 = [{"w": torch.ones(2, 2)}, {"w": torch.zeros(2, 2)}]
BAD = [
    (lambda: merge_states("foo", E2), r"unknown merge method 'foo'.*valid methods: average"),
    (lambda: merge_states("ties", E2, k=0), r"k=0 must be a number in \(0, 1\]"),
    (lambda: merge_states("ties", E2, k=1.5), r"k=1.5 must be a number in \(0, 1\]"),
    (lambda: merge_states("dare", E2, p=1.0), r"p=1.0 must be a number in \[0, 1\)"),
    (lambda: merge_states("dare", E2, p=-0.1), r"p=-0.1 must be a number in \[0, 1\)"),
    (lambda: merge_states("task_arithmetic", E2, lam=-1), r"lam=-1 must be a non-negative"),
    (lambda: merge_states("tall", E2, lam=[0.1, -0.2]), r"lam\[1\]=-0.2 must be a non-negative"),
    (lambda: merge_states("tall", E2, lam=[0.1, 0.2, 0.3]), r"lam has 3 values but there are 2"),
    (lambda: merge_states("tall", E2, mtl="mean"), r"mtl='mean' is not one of \['sum', 'ties'\]"),
    (lambda: merge_states("consensus", E2, k=1.5), r"k=1.5 must be a non-negative integer"),
    (lambda: merge_states("task_arithmetic", E2, alpha=0.5),
     r"unknown hyper-parameter\(s\) \['alpha'\] for method 'task_arithmetic'; valid: lam"),
    (lambda: merge_states("regmean", E2), r"'regmean' is data-driven and needs stats=: input Gram"),
    (lambda: merge_states("fisher", E2), r"'fisher' is data-driven and needs stats=: diagonal Fisher"),
    (lambda: merge_states("mats", E2), r"'mats' is data-driven and needs stats=: Gram matrices"),
    (lambda: merge_states("ties", E2, stats=[{}, {}]), r"'ties' uses no statistics"),
    (lambda: merge_states("regmean", E2, stats=[{"w": torch.eye(3)}] * 2),
     r"grams\[0\]\['w'\] has shape \(3, 3\), expected \(2, 2\)"),
    (lambda: merge_states("regmean", E2, stats=[{"w": torch.eye(2)}]), r"grams must be a list of 2"),
    (lambda: merge_states("fisher", E2, stats=[{"v": torch.eye(2)}] * 2), r"key 'v', which is not"),
    (lambda: merge_states("average", [{"w": torch.ones(2), "b": torch.ones(1)}, {"w": torch.ones(2)}]),
     r"key 'b' is only in experts\[0\]|key 'b' is missing from experts\[1\]"),
    (lambda: merge_states("ties", [{"head.weight": torch.ones(5, 4)}, {"head.weight": torch.ones(3, 4)}]),
     r"key 'head.weight': shape \(3, 4\) in experts\[1\] but \(5, 4\) in experts\[0\]"),
    (lambda: merge_states("ties", E2, base=[E2[0]] * 3), r"one per expert\); got 3"),
    (lambda: merge_states("ties", E2, base={"v": torch.ones(2, 2)}), r"key 'w' is missing from base"),
    (lambda: merge_states("average", []), r"non-empty list of state dicts"),
    (lambda: merge_states("average", E2[0]), r"non-empty list of state dicts, got dict"),
    (lambda: merge_states("mats", E2, stats=[{"w": torch.eye(2)}] * 2, max_iter=0),
     r"max_iter=0 must be a positive integer"),
    (lambda: tall(E2, E2[0], lam=0.4).mask(5, "w"), r"task index 5 out of range for 2 tasks"),
]


@pytest.mark.parametrize("call, match", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_inputs(call, match):
    with pytest.raises(TorchMergeError, match=match):
        call()
