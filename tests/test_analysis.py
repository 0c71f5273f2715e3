"""tm.analysis: CKA against slow explicit references, variance ratios, plots."""
import itertools
import math
import sys

import pytest
import torch
from torch import nn

import torchmerge as tm
from torchmerge.analysis import cka, hsic_biased, hsic_unbiased, linear_cka

DT = torch.float64


# ---- slow references ---------------------------------------------------------------------------

def ref_hsic(k, l):
    """tr(K H L H) / (n − 1)² with an explicit centring matrix H."""
    n = k.shape[0]
    h = torch.eye(n, dtype=DT) - torch.full((n, n), 1.0 / n, dtype=DT)
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def ref_cka(x, y):
    k, l = x @ x.T, y @ y.T
    return float(ref_hsic(k, l) / math.sqrt(ref_hsic(k, k) * ref_hsic(l, l)))


def ref_hsic_unbiased(k, l):
    """The U-statistic by brute force over distinct index tuples (Song et al. 2012, eq. 5)."""
    n = k.shape[0]
    idx = range(n)
    t2 = sum(k[i, j] * l[i, j] for i, j in itertools.permutations(idx, 2)) / math.perm(n, 2)
    t4 = sum(k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(idx, 4)) / math.perm(n, 4)
    t3 = sum(k[i, j] * l[i, q] for i, j, q in itertools.permutations(idx, 3)) / math.perm(n, 3)
    return float(t2 + t4 - 2 * t3)


def orthogonal(d, seed):
    return torch.linalg.qr(torch.randn(d, d, dtype=DT, generator=torch.Generator().manual_seed(seed)))[0]


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


# ---- HSIC and linear CKA on matrices ------------------------------------------------------------

def test_hsic_biased_matches_explicit_centring():
    x, y = randn(9, 4, seed=1), randn(9, 6, seed=2)
    k, l = x @ x.T, y @ y.T
    torch.testing.assert_close(hsic_biased(k, l), ref_hsic(k, l))


@pytest.mark.parametrize("n", [4, 5, 7])
def test_hsic_unbiased_matches_u_statistic(n):
    x, y = randn(n, 3, seed=n), randn(n, 5, seed=n + 10)
    k, l = x @ x.T, y @ y.T
    assert float(hsic_unbiased(k, l)) == pytest.approx(ref_hsic_unbiased(k, l), rel=1e-9, abs=1e-12)


def test_hsic_unbiased_needs_four_samples():
    with pytest.raises(tm.TorchMergeError, match="at least 4 samples"):
        hsic_unbiased(torch.eye(3, dtype=DT), torch.eye(3, dtype=DT))


@pytest.mark.parametrize("n,dx,dy", [(20, 5, 5), (20, 3, 8), (20, 12, 2), (9, 6, 7), (40, 30, 2)])
def test_linear_cka_matches_reference(n, dx, dy):  # feature-space and Gram-space paths
    x, y = randn(n, dx, seed=dx), randn(n, dy, seed=dy + 50)
    y = y + 0.5 * x[:, :1]  # some shared structure
    assert linear_cka(x, y) == pytest.approx(ref_cka(x, y), rel=1e-10)


def test_linear_cka_invariances():
    x = randn(40, 6, seed=3)
    y = torch.relu(x @ randn(6, 9, seed=4))
    base = linear_cka(x, y)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    for debiased in (False, True):
        b = linear_cka(x, y, debiased=debiased)
        assert linear_cka(x @ orthogonal(6, 5), y, debiased=debiased) == pytest.approx(b, rel=1e-9)
        assert linear_cka(x[:, torch.randperm(6)], y[:, torch.randperm(9)], debiased=debiased) \
            == pytest.approx(b, rel=1e-9)
        assert linear_cka(7.5 * x, 0.01 * y, debiased=debiased) == pytest.approx(b, rel=1e-9)
    # not invariant to anisotropic scaling (a sanity check that the test can fail)
    assert linear_cka(x * torch.arange(1, 7, dtype=DT), y) != pytest.approx(base, rel=1e-3)


def test_linear_cka_flattens_samples():
    x = randn(10, 2, 3, 3, seed=6)
    assert linear_cka(x, x.flip(1)) == pytest.approx(1.0, abs=1e-12)


# ---- cka between models ------------------------------------------------------------------------

def mlp(seed, width=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))


def cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 4)).eval()


def batches(shape, n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_model_with_itself_is_one(debiased):
    net = cnn(0)
    out = cka(net, net, batches((2, 6, 6)), debiased=debiased)
    assert list(out) == ["0", "1", "3", "7"]  # leaf modules with parameters, in order
    for v in out.values():
        assert v == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariant_to_unit_permutation(debiased):
    a = mlp(1)
    spec = tm.discover(a, torch.randn(2, 5))
    b = tm.permute(a, spec, spec.random_perms(seed=3))
    out = cka(a, b, batches((5,)), debiased=debiased)
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in out.values())


def test_cka_matches_explicit_features():
    a, b = mlp(1), mlp(2, width=24)
    data = batches((5,), n=3, size=16)
    x = torch.cat(data)
    with torch.no_grad():
        fa, fb = a[:3](x).double(), b[:3](x).double()
    out = cka(a, b, [(d, torch.zeros(len(d))) for d in data], layers={"2": "2"})
    assert out == {"2": pytest.approx(ref_cka(fa, fb), rel=1e-6)}


def test_cka_minibatch_averages_per_batch_unbiased_hsic():
    a, b = mlp(1), mlp(2)
    data = batches((5,), n=3, size=10)
    sums = torch.zeros(3, dtype=DT)
    with torch.no_grad():
        for x in data:
            fa, fb = a[:1](x).double(), b[:1](x).double()
            k, l = fa @ fa.T, fb @ fb.T
            sums += torch.tensor([ref_hsic_unbiased(k, l), ref_hsic_unbiased(k, k), ref_hsic_unbiased(l, l)],
                                 dtype=DT)
    expected = float(sums[0] / torch.sqrt(sums[1] * sums[2]))
    assert cka(a, b, data, layers=["0"], debiased=True)["0"] == pytest.approx(expected, rel=1e-6)


def test_debiased_close_to_biased_on_large_n():
    a, b = mlp(1), mlp(2)
    data = batches((5,), n=16, size=256, seed=7)
    full = cka(a, b, data)
    mini = cka(a, b, data, debiased=True)
    for name in full:
        assert mini[name] == pytest.approx(full[name], abs=0.03), name
    assert full["0"] < 0.99  # different inits: not trivially equal


def test_cka_max_batches_and_errors():
    a, b = mlp(1), mlp(2)
    data = batches((5,), n=5)
    assert cka(a, b, data, layers=["0"], max_batches=2) == cka(a, b, data[:2], layers=["0"])
    with pytest.raises(tm.TorchMergeError, match="no module 'nope'"):
        cka(a, b, data, layers=["nope"])
    with pytest.raises(tm.TorchMergeError, match="no batches"):
        cka(a, b, [], layers=["0"])
    with pytest.raises(tm.TorchMergeError, match="at least 4 samples"):
        cka(a, b, [torch.randn(3, 5)], layers=["0"], debiased=True)


def test_cka_leaves_models_untouched():
    net = cnn(0).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cka(net, cnn(1), batches((2, 6, 6), n=2))
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not net[0]._forward_hooks


# ---- variance ratios ---------------------------------------------------------------------------

def experts_and_data():
    experts = [mlp(s) for s in (1, 2)]
    for e, k in zip(experts, (3, 4)):
        e[4] = nn.Linear(16, k)
    data = [[(torch.randn(32, 5, generator=torch.Generator().manual_seed(10 * t + i)), torch.zeros(32))
             for i in range(4)] for t in range(2)]
    return experts, data


def test_variance_ratios_collapse_and_correction():
    experts, data = experts_and_data()
    kwargs = dict(method="average", data=data, align="weight", task_names=["a", "b"])
    raw = tm.merge(experts, correction=None, **kwargs)
    fixed = tm.merge(experts, correction="affine", **kwargs)
    before = tm.analysis.variance_ratios(raw, experts, data)
    after = tm.analysis.variance_ratios(fixed, experts, data)
    assert tm.analysis.variance_ratios(fixed, _aligned(raw, experts), data, align_experts=False) == after
    assert set(before) == {"a", "b"} and list(before["a"]) == list(fixed.sites())
    mean_before = sum(v for r in before.values() for v in r.values()) / 4
    assert mean_before < 0.9  # averaging two random nets shrinks the variance
    for task in after.values():
        for v in task.values():
            assert v == pytest.approx(1.0, abs=0.05)


def test_variance_ratios_of_identical_experts_are_one():
    experts, data = experts_and_data()
    twin = [experts[0], experts[0]]
    merged = tm.merge(twin, method="average", data=data, align=None, correction=None)
    for task in tm.analysis.variance_ratios(merged, twin, data).values():
        assert all(v == pytest.approx(1.0, abs=1e-5) for v in task.values())


def test_variance_ratios_checks_lengths():
    experts, data = experts_and_data()
    merged = tm.merge(experts, method="average", data=data, align=None, correction=None)
    with pytest.raises(tm.TorchMergeError, match="one of each per task"):
        tm.analysis.variance_ratios(merged, experts, data[:1])


def _aligned(merged, experts):
    perms = tm.align_many(experts, merged.info["spec"], method="weight", seed=0)
    return [tm.permute(e, merged.info["spec"], p) for e, p in zip(experts, perms)]


# ---- plots -------------------------------------------------------------------------------------

def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    fig = tm.analysis.plot_cka({"0": 0.9, "2": 0.5}, tmp_path / "cka.png")
    assert (tmp_path / "cka.png").stat().st_size > 1000 and fig.axes
    ratios = {"t0": {"s0": 0.5, "s1": 0.2}, "t1": {"s0": 0.7, "s1": 0.4}}
    fig = tm.analysis.plot_variance_ratios({"none": ratios, "affine": ratios}, tmp_path / "var.png")
    assert len(fig.axes) == 2 and (tmp_path / "var.png").exists()
    curve = tm.analysis.interpolation_barrier(mlp(1), mlp(2), [(torch.randn(8, 5), torch.randint(0, 3, (8,)))],
                                              steps=3)
    tm.analysis.plot_barrier({"raw": curve, "again": curve}, tmp_path / "barrier.png")
    assert (tmp_path / "barrier.png").exists()


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(tm.TorchMergeError, match="pip install matplotlib"):
        tm.analysis.plot_cka({"0": 1.0})
