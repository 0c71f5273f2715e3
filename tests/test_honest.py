"""Honest results: degenerate settings warn, approximations are recorded and warned about, and the
default ``tm.merge`` call is not a plain average in disguise.

* default method: RegMean without a base (task vectors around the experts' mean sum to zero);
* explicit degenerate calls (base=None for task-vector methods, lam=0, identical experts, k > T,
  dead Gram inputs) warn with what happened and what to pass;
* MaTS records CG iterations and residuals; alignment records sweeps and convergence; PLeaS records
  the fallbacks it took; verify_spec compares every output.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import torchmerge as tm
from architectures import randomize_
from torchmerge import methods
from torchmerge.discover import _close
from zoo_ops import MLP

AROUND_MEAN = "with base=None: task vectors are taken around the experts' mean"
TASK_VECTOR_METHODS = ["task_arithmetic", "ties", "dare", "tall", "consensus"]


def _experts(n=2):
    return [randomize_(MLP(), seed=s).eval() for s in range(n)]


def _data(n=2, batches=2, batch=16):
    gen = torch.Generator().manual_seed(0)
    return [[(torch.randn(batch, 8, generator=gen) + t, torch.randint(0, 3, (batch,), generator=gen))
             for _ in range(batches)] for t in range(n)]


def _states(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 5, generator=gen)} for _ in range(n)]


def _quiet(fn, *args, **kwargs):
    """Run ``fn``; return (result, torchmerge's warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _weights(model):
    return torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if "head" not in n])


# ----------------------------------------------------------------------------- the default call

def test_default_merge_without_base_is_not_the_plain_average():
    experts, data = _experts(), _data()
    kw = dict(data=data, align=None, correction=None)
    merged, caught = _quiet(tm.merge, experts, **kw)
    average = tm.merge(experts, method="average", **kw)
    assert merged.info["method"] == "regmean"
    assert not torch.allclose(_weights(merged), _weights(average), atol=1e-4)
    assert merged.info["warnings"] == [] and not [m for m in caught if "base=None" in m]


def test_default_merge_with_a_base_is_task_arithmetic():
    experts = _experts()
    merged = tm.merge(experts, base=randomize_(MLP(), seed=9), data=_data(), align=None, correction=None)
    assert merged.info["method"] == "task_arithmetic" and merged.info["warnings"] == []


# ----------------------------------------------------------------------------- degenerate calls

@pytest.mark.parametrize("method", TASK_VECTOR_METHODS)
def test_task_vector_methods_without_base_warn(method):
    with pytest.warns(UserWarning, match=AROUND_MEAN + ".*pass base="):
        result = methods.merge_states(method, _states(), None)
    assert any(AROUND_MEAN in m for m in result.info["warnings"])
    base = {"w": torch.zeros(4, 5)}
    _, caught = _quiet(methods.merge_states, method, _states(), base)
    assert not caught, caught


def test_merge_without_base_warns_and_records():
    with pytest.warns(UserWarning, match=r"method='ties' with base=None"):
        merged = tm.merge(_experts(), method="ties", data=_data(), align=None, correction=None)
    assert any("method='ties' with base=None" in m for m in merged.info["warnings"])


@pytest.mark.parametrize("method, hyper, phrase", [
    ("task_arithmetic", {"lam": 0.0}, "lam=0: the result is the base"),
    ("ties", {"lam": 0.0}, "lam=0: the result is the base"),
    ("dare", {"lam": 0.0}, "lam=0: the result is the base"),
    ("tall", {"lam": 0.0}, "lam=0: every task mask is all ones"),
    ("tall", {"mtl": "ties", "ties_lam": 0.0}, "ties_lam=0: τ_MTL = 0"),
    ("consensus", {"k": 4}, "k=4 > 3 experts"),
    ("consensus", {"scale": 0.0}, "scale=0, so the result is the base"),
])
def test_settings_that_ignore_the_experts_warn(method, hyper, phrase):
    with pytest.warns(UserWarning, match=phrase):
        methods.merge_states(method, _states(), {"w": torch.zeros(4, 5)}, **hyper)


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "regmean"])
def test_identical_experts_warn(method):
    same = _states(1) * 3
    stats = [{"w": torch.eye(5)}] * 3 if method == "regmean" else None
    with pytest.warns(UserWarning, match="all 3 experts are identical"):
        methods.merge_states(method, same, {"w": torch.zeros(4, 5)} if method != "average" else None, stats)


def test_regmean_dead_inputs_are_recorded_not_warned():
    """A dead ReLU unit is common and harmless: recorded in info["fallbacks"], no warning."""
    gram = torch.eye(5)
    gram[2, 2] = 0.0  # input feature 2 is never active for any expert
    result, caught = _quiet(methods.regmean, _states(), [{"w": gram}] * 3)
    assert not caught
    assert len(result.info["fallbacks"]) == 1 and "1 of 5 input features" in result.info["fallbacks"][0]
    _, caught = _quiet(methods.regmean, _states(), [{"w": torch.eye(5)}] * 3)
    assert not caught


# ----------------------------------------------------------------------------- MaTS residuals

def _spd_grams(n=3, d=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(40, d, generator=gen) * torch.logspace(0, 2, d)  # ill-conditioned: CG needs many steps
        out.append({"w": x.T @ x})
    return out


def test_mats_records_an_unconverged_residual_and_warns():
    states = [{"w": torch.randn(4, 12, generator=torch.Generator().manual_seed(s))} for s in range(3)]
    grams = _spd_grams()
    with pytest.warns(UserWarning, match=r"did not reach tol=1e-06 .*raise max_iter"):
        short = methods.mats(states, grams, max_iter=1)
    assert short.info["cg_iterations"] == {"w": 1}
    assert short.info["relative_residual"]["w"] > 1e-6 and short.info["converged"] is False
    assert short.info["max_relative_residual"] == short.info["relative_residual"]["w"]
    full, caught = _quiet(methods.mats, states, grams, max_iter=200)
    assert not caught and full.info["converged"] is True
    assert 1 < full.info["cg_iterations"]["w"] <= 200 and full.info["relative_residual"]["w"] <= 1e-6
    closed = methods.regmean(states, grams).state["w"]  # converged MaTS(gram) = RegMean's closed form
    assert torch.allclose(full.state["w"], closed, atol=1e-4)
    assert not torch.allclose(short.state["w"], closed, atol=1e-4)


def test_mats_in_merge_records_cg():
    merged = tm.merge(_experts(), method="mats", data=_data(), align=None, correction=None)
    info = merged.info["merge_info"]
    assert info["converged"] and set(info["cg_iterations"]) == set(info["relative_residual"])
    assert all(it >= 1 for it in info["cg_iterations"].values())  # CG really ran


# ----------------------------------------------------------------------------- alignment

def _permuted_pair():
    """A model and a permuted, slightly perturbed copy (so aligned they are close, not equal)."""
    model = randomize_(MLP(), seed=1).eval()
    spec = tm.discover(model, torch.randn(2, 8))
    other = tm.permute(model, spec, spec.random_perms(seed=4))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, other, spec


def test_alignment_stopped_at_max_iter_is_flagged():
    model, other, spec = _permuted_pair()
    with pytest.warns(UserWarning, match=r"stopped at max_iter=1 .*raise max_iter"):
        short = tm.align(model, other, spec, max_iter=1, return_result=True)
    assert short.converged is False and short.sweeps == 1
    full, caught = _quiet(tm.align, model, other, spec, return_result=True)
    assert full.converged is True and not caught


def test_merge_records_alignment_convergence():
    model, other, _ = _permuted_pair()
    merged = tm.merge([model, other], method="average", data=_data(), correction=None)
    alignment = merged.info["alignment"]
    assert alignment["method"] == "weight" and alignment["converged"] == [True, True]
    assert alignment["iterations"][0] == 0 and alignment["iterations"][1] >= 1
    unaligned = tm.merge([model, other], method="average", data=_data(), align=None, correction=None)
    assert unaligned.info["alignment"] is None


def test_merge_passes_alignment_options_and_reports_a_short_run():
    """alignment={'max_iter': 1} reaches tm.align: the run stops after one sweep, is recorded as
    unconverged in merged.info and warned about, with the option that lifts it."""
    model, other, _ = _permuted_pair()
    full = tm.merge([model, other], method="average", data=_data(), correction=None)
    assert full.info["alignment"]["iterations"][1] > 1, "one sweep suffices: the test exercises nothing"
    with pytest.warns(UserWarning, match=r"alignment=\{'max_iter': \.\.\.\}"):
        short = tm.merge([model, other], method="average", data=_data(), correction=None,
                         alignment={"max_iter": 1})
    assert short.info["alignment"]["iterations"] == [0, 1]
    assert short.info["alignment"]["converged"] == [True, False]
    assert any("did not converge" in w for w in short.info["warnings"])


# ----------------------------------------------------------------------------- PLeaS fallbacks

class _ShapeBranch(nn.Module):
    """conv → BatchNorm → ReLU → linear, with shape-dependent Python that torch.fx cannot trace
    (torch.export can, so discovery works but PLeaS's conv+BatchNorm pairing cannot use fx)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if h.shape[0] > 0:
            h = h.mean((2, 3))
        return self.fc(h)


def test_pleas_reports_lost_batchnorm_pairing():
    experts = [randomize_(_ShapeBranch(), seed=s).eval() for s in range(2)]
    x = torch.randn(4, 3, 5, 5)
    spec = tm.discover(experts[0], x)
    data = [[torch.randn(8, 3, 5, 5)] for _ in range(2)]
    with pytest.warns(UserWarning, match="pleas: no conv\\+BatchNorm pairing"):
        result = methods.pleas(experts, spec, data)
    assert result.info["fallbacks"] and result.info["bn_identity"] == []


# ----------------------------------------------------------------------------- verification

def test_verify_spec_rejects_a_group_with_an_extra_wrong_member():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 8)
    spec = tm.discover(model, x)
    name = next(n for n, g in spec.groups.items() if ("0.weight", 0) in g.members)
    g = spec.groups[name]
    # the model's input axis (also size 8) planted into the hidden group: permuting it is wrong
    wrong = dataclasses.replace(g, members=g.members + (("0.weight", 1),))
    broken = dataclasses.replace(spec, groups={**spec.groups, name: wrong},
                                 axes={**spec.axes, ("0.weight", 1): spec.axes[("0.weight", 0)]})
    with pytest.raises(tm.VerificationError, match=name.replace(".", r"\.")):
        tm.verify_spec(model, broken, x)


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 5)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_verify_spec_compares_every_output():
    """A wrong group that changes only the second output is caught; outputs of another count or
    shape never compare equal."""
    model, x = _TwoOutputs().eval(), torch.randn(2, 4)
    expr = ("g", "planted", 5)
    spec = tm.PermutationSpec(groups={"planted": tm.Group("planted", 5, (("b.weight", 0), ("b.bias", 0)))},
                              axes={("b.weight", 0): expr, ("b.bias", 0): expr})
    with pytest.raises(tm.VerificationError, match="planted"):
        tm.verify_spec(model, spec, x)
    y = [torch.ones(2, 3), torch.ones(2, 5)]
    assert _close(y, [t.clone() for t in y])
    assert not _close(y, y[:1]) and not _close(y[:1], y) and not _close(y, [y[0], torch.ones(2, 4)])


def test_copies_with_a_base_merge_quietly():
    """The honest path stays quiet: distinct experts, a real base, converged solvers."""
    experts = _experts()
    base = randomize_(MLP(), seed=7)
    for method in ("task_arithmetic", "ties", "tall", "mats"):
        merged, caught = _quiet(tm.merge, copy.deepcopy(experts), method=method, base=base, data=_data(),
                                correction=None)
        assert merged.info["warnings"] == [] and not [m for m in caught if "torchmerge" in m or "base" in m]


# ----------------------------------------------------------------------------- explicit heads
class _TwoHeads(torch.nn.Module):
    """A task-specific input embedding (vocabulary differs by task), a trunk, an output layer."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 6)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
        self.out = torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(self.trunk(self.embed(ids)))


def test_explicit_heads_are_left_out_of_alignment():
    """heads=[...] names per-task modules: they may differ in shape, also when aligning."""
    torch.manual_seed(0)
    experts = [_TwoHeads(5), _TwoHeads(7)]
    ids = torch.tensor([[0, 1, 4], [2, 3, 1]])
    merged, _ = _quiet(tm.merge, experts, method="average", align="weight", correction=None,
                       heads=["embed", "out"], example_inputs=ids)
    for t, expert in enumerate(experts):
        assert merged(ids, task=t).shape == expert(ids).shape
