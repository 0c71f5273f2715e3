"""PLeaS: partial matching + layer-wise least squares, against a slow reference written from the
formula (torch.linalg.lstsq on explicitly stacked rows), identical-copy and keep-everything
invariants, the width budget, non-widenable groups, and a table of bad inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import torchmerge as tm
from torchmerge.errors import TorchMergeError
from torchmerge.methods.pleas import PleasResult, pleas


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matrices: thread start-up dominates, and an oversubscribed CI box makes it seconds
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- models and data
def mlp(seed, d_in=6, h=12, d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                         nn.Linear(h, d_out)).eval()


def convnet(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 4))
    bn = net[1]
    with torch.no_grad():  # non-trivial BatchNorm so that folding it matters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return net.eval()


def task_data(T, shape, batches=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*shape, generator=g) * (1 + 0.3 * t) + 0.5 * t for _ in range(batches)]
            for t in range(T)]


def with_head(result: PleasResult, t: int) -> nn.Module:
    model = result.model
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in result.heads[t].items():
            params[name].copy_(value)
    return model.eval()


def task_errors(result, experts, data):
    """Relative mean squared error of the merged model (task t's head) to expert t on task t."""
    errs = []
    for t, e in enumerate(experts):
        x = torch.cat(data[t])
        with torch.no_grad():
            y, ref = with_head(result, t)(x), e(x)
        errs.append(float((y - ref).square().mean() / ref.square().mean()))
    return errs


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("T,width", [(2, 1.0), (2, 1.5), (2, 2.0), (3, 1.0), (3, 2.0), (3, 3.0)])
def test_identical_copies_return_the_model(T, width):
    net = mlp(0)
    spec = tm.discover(net, torch.randn(2, 6))
    data = task_data(T, (64, 6))
    res = pleas([net] * T, spec, data, width=width)
    for t in range(T):
        x = torch.cat(data[t])
        with torch.no_grad():
            assert torch.allclose(with_head(res, t)(x), net(x), atol=1e-3, rtol=1e-3)
    exact = pleas([net] * T, spec, data, width=width, ridge=0.0)  # min-norm solve: exact
    with torch.no_grad():
        x = torch.cat(data[0])
        assert torch.allclose(with_head(exact, 0)(x), net(x), atol=1e-5)


def test_identical_convnets_return_the_model():
    net = convnet(0)
    spec = tm.discover(net, torch.randn(2, 3, 8, 8))
    data = task_data(2, (32, 3, 8, 8))
    for width in (1.0, 2.0):
        res = pleas([net, net], spec, data, width=width, ridge=0.0)
        x = torch.cat(data[1])
        with torch.no_grad():
            assert torch.allclose(with_head(res, 1)(x), net(x), atol=1e-4)


@pytest.mark.parametrize("T", [2, 3])
def test_widths_respect_the_budget_and_sources_are_partial_permutations(T):
    experts = [mlp(s) for s in range(T)]
    spec = tm.discover(experts[0], torch.randn(2, 6))
    data = task_data(T, (32, 6), batches=2)
    for width in (1.0, 1.3, 1.5, 2.0, float(T)):
        res = pleas(experts, spec, data, width=width)
        for g, grp in spec.groups.items():
            n, size = grp.size, res.widths[g]
            assert n <= size <= round(width * n)
            if T == 2:
                assert size == round(width * n)
            src = res.sources[g]
            assert src.shape == (T, size) and src.dtype == torch.long
            for t in range(T):  # every unit of every expert feeds exactly one merged unit
                assert torch.equal(src[t][src[t] >= 0].sort().values, torch.arange(n))
            both = (src >= 0).all(0)
            assert int(both.sum()) == res.info["matched"][g]
            assert ((src >= 0).sum(0)[~both] == 1).all()  # kept units come from one expert
        assert res.model[2].in_features == res.widths["0.weight:0"]
        assert res.model[4].in_features == res.widths["2.weight:0"]


def test_per_group_width_dict():
    experts = [mlp(1), mlp(2)]
    spec = tm.discover(experts[0], torch.randn(2, 6))
    res = pleas(experts, spec, task_data(2, (32, 6)), width={"2.weight:0": 2.0})
    assert res.widths == {"0.weight:0": 12, "2.weight:0": 24}


# ----------------------------------------------------------------------------- accuracy vs width
def test_mlp_error_decreases_with_width_and_keep_all_is_exact():
    experts = [mlp(1), mlp(2)]
    spec = tm.discover(experts[0], torch.randn(2, 6))
    data = task_data(2, (64, 6))
    errs = {w: task_errors(pleas(experts, spec, data, width=w), experts, data)
            for w in (1.0, 1.5, 2.0)}
    for t in range(2):
        assert errs[1.0][t] > errs[1.5][t] > errs[2.0][t]
        assert errs[2.0][t] < 1e-5


def test_three_mlps_keep_all_is_exact():
    experts = [mlp(s) for s in (3, 4, 5)]
    spec = tm.discover(experts[0], torch.randn(2, 6))
    data = task_data(3, (64, 6))
    full = task_errors(pleas(experts, spec, data, width=3.0), experts, data)
    some = task_errors(pleas(experts, spec, data, width=1.0), experts, data)
    assert max(full) < 1e-5 and all(f < s for f, s in zip(full, some))


def test_convnet_error_decreases_with_width_and_keep_all_is_exact():
    experts = [convnet(1), convnet(2)]
    spec = tm.discover(experts[0], torch.randn(2, 3, 8, 8))
    data = task_data(2, (64, 3, 8, 8))
    results = {w: pleas(experts, spec, data, width=w) for w in (1.0, 1.5, 2.0)}
    errs = {w: task_errors(r, experts, data) for w, r in results.items()}
    for t in range(2):
        assert errs[1.0][t] > errs[1.5][t] > errs[2.0][t]
        assert errs[2.0][t] < 1e-5
    r = results[1.5]
    assert r.info["bn_identity"] == ["1"] and r.widths == {"0.weight:0": 9}
    assert r.model[0].out_channels == r.model[1].num_features == 9
    assert r.model[5].in_features == 9 * 16
    x = torch.randn(5, 9, 4, 4)
    with torch.no_grad():  # eval-mode BatchNorm: identity plus the fitted offset (the conv has no bias)
        bn = r.model[1]
        assert torch.allclose(bn(x) - x, bn(torch.zeros_like(x)), atol=1e-5)


def test_experts_are_not_modified():
    experts = [convnet(1), convnet(2)]
    experts[1].train()
    before = [state(e) for e in experts]
    spec = tm.discover(experts[0], torch.randn(2, 3, 8, 8))
    pleas(experts, spec, task_data(2, (16, 3, 8, 8), batches=2), width=1.5)
    for e, b in zip(experts, before):
        assert all(torch.equal(v, b[k]) for k, v in e.state_dict().items())
    assert [e.training for e in experts] == [False, True]


def test_non_widenable_group_keeps_width_one_and_says_so():
    def net(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                             nn.Linear(8, 2)).eval()
    experts = [net(1), net(2)]
    spec = tm.discover(experts[0], torch.randn(2, 5))
    data = task_data(2, (64, 5))
    res = pleas(experts, spec, data, width=2.0)
    ln_group = next(g for g, grp in spec.groups.items() if ("1.weight", 0) in grp.members)
    assert res.widths[ln_group] == 8 and "LayerNorm" in res.info["fixed_width"][ln_group]
    assert res.widths["3.weight:0"] == 16
    with torch.no_grad():
        assert res.model(torch.randn(3, 5)).shape == (3, 2)


# ----------------------------------------------------------------------------- slow reference
def reference_layer(res, experts, data, ridge, in_group, out_group, layer, upto):
    """Σ_t (1/N_t)‖X_t Wᵀ − Y_t‖² + λ‖W‖² row by row, with lstsq on explicitly stacked rows."""
    merged, T = res.model, len(experts)
    src_in, src_out = res.sources[in_group], res.sources[out_group]
    Xs, Ys = [], []
    with torch.no_grad():
        for t in range(T):
            x = torch.cat(data[t])
            X = merged[:upto](x).double()                      # merged model's own input
            outs = [e[:upto + 1](x).double() for e in experts]  # experts' pre-activations
            Y = torch.zeros(X.shape[0], src_out.shape[1], dtype=torch.float64)
            for j in range(src_out.shape[1]):
                s = t if src_out[t, j] >= 0 else next(u for u in range(T) if src_out[u, j] >= 0)
                Y[:, j] = outs[s][:, src_out[s, j]]
            Xs.append(X)
            Ys.append(Y)
    d = Xs[0].shape[1]
    lam = ridge * sum((X.square().mean(0)) for X in Xs).mean()
    W = torch.zeros(src_out.shape[1], d + 1, dtype=torch.float64)
    for j in range(src_out.shape[1]):
        owners = [t for t in range(T) if src_out[t, j] >= 0]
        cols = [k for k in range(d) if any(src_in[t, k] >= 0 for t in owners)]
        A = [torch.cat([X[:, cols], torch.ones(len(X), 1, dtype=X.dtype)], 1) / math.sqrt(len(X))
             for X in Xs]
        b = [Y[:, j:j + 1] / math.sqrt(len(Y)) for Y in Ys]
        reg = torch.zeros(len(cols), len(cols) + 1, dtype=torch.float64)
        reg[:, :len(cols)] = torch.eye(len(cols)) * lam.sqrt()
        zeros = torch.zeros(len(cols), 1, dtype=torch.float64)
        sol = torch.linalg.lstsq(torch.cat(A + [reg]), torch.cat(b + [zeros])).solution
        W[j, cols] = sol[:-1, 0]
        W[j, d] = sol[-1, 0]
    got = torch.cat([layer.weight.detach().double(), layer.bias.detach().double()[:, None]], 1)
    return W, got


@pytest.mark.parametrize("T,width", [(2, 1.5), (3, 2.0)])
def test_least_squares_matches_slow_reference(T, width):
    experts = [mlp(s) for s in range(10, 10 + T)]
    spec = tm.discover(experts[0], torch.randn(2, 6))
    data = task_data(T, (48, 6), batches=3)
    ridge = 1e-3
    res = pleas(experts, spec, data, width=width, ridge=ridge)
    # second hidden layer: partial input *and* output spaces, masks on both
    ref, got = reference_layer(res, experts, data, ridge, "0.weight:0", "2.weight:0", res.model[2], 2)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    src = res.sources["2.weight:0"]
    only0, only1 = (src[0] >= 0) & (src[1] < 0), (src[1] >= 0) & (src[0] < 0)
    cols0 = (res.sources["0.weight:0"][0] >= 0) & (res.sources["0.weight:0"][1] < 0)
    assert (got[only1][:, :-1][:, cols0] == 0).all()  # cross blocks stay zero
    assert only0.any() and only1.any()


def test_head_is_least_squares_per_task():
    experts = [mlp(1), mlp(2)]
    spec = tm.discover(experts[0], torch.randn(2, 6))
    data = task_data(2, (48, 6), batches=3)
    res = pleas(experts, spec, data, width=1.5, ridge=1e-3)
    for t in range(2):
        x = torch.cat(data[t])
        with torch.no_grad():
            X = res.model[:4](x).double()
            Y = experts[t](x).double()
        lam = 1e-3 * X.square().mean(0).mean()
        A = torch.cat([torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1),
                       torch.cat([torch.eye(X.shape[1]) * lam.sqrt() * math.sqrt(len(X)),
                                  torch.zeros(X.shape[1], 1)], 1).double()])
        b = torch.cat([Y, torch.zeros(X.shape[1], Y.shape[1], dtype=torch.float64)])
        sol = torch.linalg.lstsq(A, b).solution
        assert torch.allclose(res.heads[t]["4.weight"].double(), sol[:-1].T, atol=1e-4)
        assert torch.allclose(res.heads[t]["4.bias"].double(), sol[-1], atol=1e-4)
    assert set(res.heads[0]) == {"4.weight", "4.bias"}


def test_conjugate_gradient_path_matches_direct_solve():
    experts = [mlp(1), mlp(2)]
    spec = tm.discover(experts[0], torch.randn(2, 6))
    data = task_data(2, (64, 6))
    direct = pleas(experts, spec, data, width=1.5)
    cg = pleas(experts, spec, data, width=1.5, max_direct=4, cg_iters=500)
    assert set(cg.info["solver"].values()) == {"cg"}
    for a, b in zip(direct.model.parameters(), cg.model.parameters()):
        assert torch.allclose(a, b, atol=1e-4)


# ----------------------------------------------------------------------------- bad inputs
_NET = mlp(0)
_SPEC = tm.discover(_NET, torch.randn(2, 6))
_DATA = [[torch.randn(8, 6)], [torch.randn(8, 6)]]

BAD = [
    (dict(experts=_NET), "at least 2 nn.Modules"),
    (dict(experts=[_NET]), "at least 2 nn.Modules"),
    (dict(experts=[_NET, "net"]), r"experts\[1\] is a str"),
    (dict(experts=[_NET, mlp(1, h=10)]), "one architecture"),
    (dict(spec={"groups": {}}), "PermutationSpec"),
    (dict(data=None), "pleas needs data"),
    (dict(data=[[torch.randn(8, 6)]]), "list of 2 iterables"),
    (dict(data=torch.randn(8, 6)), "pleas needs data"),
    (dict(data=[[torch.randn(8, 6)], []]), r"data\[1\] yielded no batches"),
    (dict(data=[[torch.randn(8, 6)], [3]]), r"data\[1\]: batch 0"),
    (dict(width=0.5), r"valid: a number in \[1, 2\]"),
    (dict(width=2.5), r"valid: a number in \[1, 2\]"),
    (dict(width=True), r"valid: a number in \[1, 2\]"),
    (dict(width="wide"), r"valid: a number in \[1, 2\]"),
    (dict(width={"nope": 1.5}), r"unknown groups \['nope'\]; valid groups"),
    (dict(width={"0.weight:0": 3}), r"valid: numbers in \[1, 2\]"),
    (dict(ridge=-1.0), "ridge=-1.0 is invalid; valid: a finite number >= 0"),
    (dict(ridge=float("nan")), "ridge=nan is invalid"),
    (dict(max_batches=0), "max_batches=0 is invalid; valid: None or an int >= 1"),
    (dict(heads=["nope.weight"]), r"unknown: \['nope.weight'\]; default \(spec.heads\)"),
    (dict(heads="4.weight"), "heads must be a list of parameter names"),
    (dict(max_direct=0), "max_direct=0 is invalid"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=[m for _, m in BAD])
def test_bad_inputs(kwargs, match):
    args = dict(experts=[_NET, mlp(1)], spec=_SPEC, data=_DATA) | kwargs
    experts, spec, data = args.pop("experts"), args.pop("spec"), args.pop("data")
    with pytest.raises(TorchMergeError, match=match):
        pleas(experts, spec, data, **args)


# ----------------------------------------------------------------------------- Hugging Face layers
def _conv1d_twin(linear_net):
    """The MLP with every Linear replaced by Hugging Face's Conv1D (weight stored [in, out])."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layers = []
    for m in linear_net:
        if isinstance(m, nn.Linear):
            c = Conv1D(m.out_features, m.in_features)
            with torch.no_grad():
                c.weight.copy_(m.weight.T)
                c.bias.copy_(m.bias)
            m = c
        layers.append(m)
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("width", [1.0, 1.5])
def test_hf_conv1d_layers_are_fitted_like_the_same_linear_layers(width):
    linear = [mlp(1), mlp(2)]
    conv1d = [_conv1d_twin(e) for e in linear]
    data = task_data(2, (48, 6), batches=3)
    results = [pleas(experts, tm.discover(experts[0], torch.randn(2, 6)), data, width=width)
               for experts in (linear, conv1d)]
    assert results[1].info["fitted"] == ["0", "2", "4"] and results[1].info["not_fitted"] == {}
    assert sorted(results[1].widths.values()) == sorted(results[0].widths.values())  # groups: named by axis
    for lin, c1 in zip(results[0].model, results[1].model):
        if isinstance(lin, nn.Linear):
            assert c1.nf == lin.out_features  # widened: Conv1D's forward reshapes with nf
            assert torch.allclose(c1.weight.T, lin.weight, atol=1e-5)
            assert torch.allclose(c1.bias, lin.bias, atol=1e-5)
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.allclose(with_head(results[1], 1)(x), with_head(results[0], 1)(x), atol=1e-5)


class TiedLM(nn.Module):
    """Embedding → Linear → ReLU → output head tied to the embedding (as GPT-2's lm_head)."""

    def __init__(self, seed, vocab=11, width=8):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.body = nn.Embedding(vocab, width), nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.emb(ids))))


def test_a_head_tied_to_the_embedding_is_untied_and_the_embedding_merged_as_body():
    experts = [TiedLM(1).eval(), TiedLM(2).eval()]
    before = [state(e) for e in experts]
    g = torch.Generator().manual_seed(0)
    data = [[torch.randint(0, 11, (16, 5), generator=g) for _ in range(3)] for _ in range(2)]
    spec = tm.discover(experts[0], data[0][0])
    res = pleas(experts, spec, data, heads=["head.weight"])
    group = spec.axes[("emb.weight", 1)][1]
    src = res.sources[group]
    want = (experts[0].emb.weight[:, src[0]] + experts[1].emb.weight[:, src[1]]) / 2
    assert torch.allclose(res.model.emb.weight, want, atol=1e-6)  # not the fitted head
    assert res.model.head.weight is not res.model.emb.weight and "head" in res.info["fitted"]
    assert all(torch.equal(a, b) for e, s in zip(experts, before) for a, b in zip(e.state_dict().values(), s.values()))
    for t in range(2):  # each task's head: least squares on the merged features, against expert t
        x = torch.cat(data[t])
        with torch.no_grad():
            X = torch.relu(res.model.body(res.model.emb(x))).reshape(-1, 8).double()
            Y = experts[t](x).reshape(-1, 11).double()
        lam = 1e-5 * X.square().mean(0).mean()
        sol = torch.linalg.solve(X.T @ X / len(X) + lam * torch.eye(8, dtype=X.dtype), X.T @ Y / len(X))
        assert torch.allclose(res.heads[t]["head.weight"].double(), sol.T, atol=1e-4)


def test_a_width_no_group_can_take_warns_and_merges_at_the_experts_width():
    class Normed(nn.Module):  # a LayerNorm on the hidden units: they may not widen
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.a, self.norm, self.b = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(self.norm(self.a(x)))

    experts = [Normed(1).eval(), Normed(2).eval()]
    spec = tm.discover(experts[0], torch.randn(2, 4))
    with pytest.warns(UserWarning, match="no group could widen"):
        res = pleas(experts, spec, task_data(2, (16, 4)), width=2.0)
    assert set(res.widths.values()) == {6} and "LayerNorm" in next(iter(res.info["fixed_width"].values()))
    assert any("no group could widen" in w for w in res.info["warnings"])
