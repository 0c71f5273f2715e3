"""Permutation discovery on a table of small architectures (tests/architectures.py).

Every case runs through the same invariant checks (tests/invariants.py): the discovered spec is
well formed and has exactly the hand-counted groups; random (and cyclic-shift) permutations give a
new module with the same outputs in eval and train mode, whose weights are re-orderings of the
originals; the original is never touched.
"""
from __future__ import annotations

import copy

import pytest
import torch

import torchmerge as tm
from architectures import BY_NAME, CASE_IDS, CASES, MLP, SAFETY_ONLY, Case, ResNet, ViT, randomize_
from invariants import (assert_state_equal, check_case, check_equivalent, check_perms,
                        check_spec, check_weights_permuted, inverse, notable_frozen, shift_perms, snapshot, tensors)

_SPECS: dict = {}


def discovered(case: Case):
    """(model, spec) per case, discovered once per session (models are deterministic)."""
    if case.name not in _SPECS:
        model = case.make_model()
        _SPECS[case.name] = (model, tm.discover(model, case.make_input()))
    model, spec = _SPECS[case.name]
    return model, spec


@pytest.fixture(params=CASES + SAFETY_ONLY, ids=CASE_IDS + [c.name for c in SAFETY_ONLY])
def case(request) -> Case:
    return request.param


def _sizes(spec):
    return tuple(sorted(g.size for g in spec.groups.values()))


# --------------------------------------------------------------------------- the table


def test_all_invariants(case):
    """discover -> random perms (3 seeds) -> permute: all invariants of the contract."""
    check_case(case.make_model(), case.make_input, seeds=(0, 1, 2))


def test_group_count_matches_hand_count(case):
    if case.sizes is None:
        pytest.skip("group count is implementation-defined for this model")
    model, spec = discovered(case)
    assert len(spec.groups) == case.n_groups, (
        f"{case.name}: expected {case.n_groups} groups of sizes {case.sizes}, got "
        f"{len(spec.groups)} of sizes {_sizes(spec)}\n{spec}")
    assert _sizes(spec) == case.sizes, f"{case.name}: group sizes {_sizes(spec)} != {case.sizes}\n{spec}"


def test_frozen_report(case):
    model, spec = discovered(case)
    notable = notable_frozen(spec)
    if case.frozen is True:
        assert notable, f"{case.name}: expected a frozen space to be reported\n{spec}"
    elif case.frozen is False:
        assert not notable, f"{case.name}: unexpected frozen spaces {notable}\n{spec}"
    elif isinstance(case.frozen, tuple):
        sizes = tuple(sorted(f.size for f in notable))
        assert sizes == tuple(sorted(case.frozen)), f"{case.name}: frozen sizes {sizes} != {case.frozen}\n{spec}"
    text = str(spec)
    for f in spec.frozen:
        assert f.reason in text, f"str(spec) does not mention frozen reason {f.reason!r}:\n{text}"


def test_shift_perms_move_every_group(case):
    """Every group permuted non-trivially at once (cyclic shift): same function, every member moved."""
    model, spec = discovered(case)
    perms = shift_perms(spec)
    check_perms(spec, perms)
    twin = tm.permute(model, spec, perms)
    check_weights_permuted(model, twin, spec, perms)
    check_equivalent(model, twin, case.make_input, spec, perms, seed=7)


@pytest.mark.parametrize("group_index", range(3))
def test_single_group_permutation(case, group_index):
    """Permuting one group alone (others identity) is also a symmetry: groups are independent."""
    model, spec = discovered(case)
    names = sorted(spec.groups)
    if group_index >= len(names):
        pytest.skip("fewer groups")
    perms = {n: torch.arange(g.size) for n, g in spec.groups.items()}
    target = names[group_index]
    perms[target] = torch.roll(perms[target], 1)
    twin = tm.permute(model, spec, perms)
    check_weights_permuted(model, twin, spec, perms)
    check_equivalent(model, twin, case.make_input, seed=3)


def test_identity_perms_change_nothing(case):
    model, spec = discovered(case)
    perms = {n: torch.arange(g.size) for n, g in spec.groups.items()}
    twin = tm.permute(model, spec, perms)
    assert_state_equal(snapshot(model), snapshot(twin), "identity permutation")


def test_inverse_round_trip(case):
    """permute(permute(m, p), p^-1) gives back the original tensors exactly."""
    model, spec = discovered(case)
    perms = spec.random_perms(seed=5)
    back = tm.permute(tm.permute(model, spec, perms), spec, {n: inverse(p) for n, p in perms.items()})
    assert_state_equal(snapshot(model), snapshot(back), "round trip")


def test_twin_shares_no_storage(case):
    """Mutating the twin in place must not reach the original (experts are never modified)."""
    model, spec = discovered(case)
    before = snapshot(model)
    twin = tm.permute(model, spec, spec.random_perms(seed=0))
    with torch.no_grad():
        for t in tensors(twin).values():
            if t.is_floating_point():
                t.add_(1.0)
    assert_state_equal(before, snapshot(model), "mutating the twin changed the original")


def test_random_perms_deterministic(case):
    model, spec = discovered(case)
    a, b = spec.random_perms(seed=11), spec.random_perms(seed=11)
    check_perms(spec, a)
    assert all(torch.equal(a[n], b[n]) for n in a), "random_perms(seed) is not deterministic"


def test_discover_deterministic(case):
    model, spec = discovered(case)
    spec2 = tm.discover(case.make_model(), case.make_input(batch=2, seed=9))
    assert list(spec.groups) == list(spec2.groups), "group names depend on the run / batch size"
    for n, g in spec.groups.items():
        assert g.size == spec2.groups[n].size
        assert tuple(g.members) == tuple(spec2.groups[n].members)


def test_eval_mode_model_untouched(case):
    model = case.make_model().eval()
    before = snapshot(model)
    spec = tm.discover(model, case.make_input())
    tm.permute(model, spec, spec.random_perms(seed=0))
    assert_state_equal(before, snapshot(model), "eval-mode model")
    assert not model.training


# --------------------------------------------------------------------------- cross-model properties


@pytest.mark.parametrize("cls,a,b", [(MLP, 3, 4), (ResNet, 5, 10), (ViT, 5, 7)],
                         ids=["mlp", "resnet", "vit"])
def test_head_size_does_not_change_groups(cls, a, b):
    """Two experts differing only in their number of classes get the same group names and sizes
    (so they can be aligned with one spec)."""
    case = next(c for c in CASES if c.model_cls is cls)
    torch.manual_seed(0)
    sa = tm.discover(cls(num_classes=a), case.make_input())
    sb = tm.discover(cls(num_classes=b), case.make_input())
    assert {n: g.size for n, g in sa.groups.items()} == {n: g.size for n, g in sb.groups.items()}
    for n, g in sa.groups.items():
        names_a = {m[0] for m in g.members}
        names_b = {m[0] for m in sb.groups[n].members}
        assert names_a == names_b, f"group {n}: members differ: {names_a ^ names_b}"


def test_spec_applies_to_independent_expert():
    """A spec discovered on one expert permutes another expert of the same architecture
    (different weights) without changing its function."""
    case = BY_NAME["resnet_basic"]
    _, spec = discovered(case)
    torch.manual_seed(123)
    other = randomize_(case.model_cls(), seed=123)
    twin = tm.permute(other, spec, spec.random_perms(seed=4))
    check_weights_permuted(other, twin, spec, spec.random_perms(seed=4))
    check_equivalent(other, twin, case.make_input)


def test_str_mentions_frozen_reason_and_location():
    _, spec = discovered(BY_NAME["frozen_cumsum"])
    text = str(spec)
    notable = notable_frozen(spec)
    assert notable
    assert any("cumsum" in (f.op + f.reason + f.node) for f in notable), notable
    for f in spec.frozen:
        assert f.reason in text
    assert "cumsum" in text, text
    assert f"{notable[0].size}" in text


def test_str_lists_groups():
    _, spec = discovered(BY_NAME["mlp"])
    text = str(spec)
    for n, g in spec.groups.items():
        assert n in text, f"group {n} not in str(spec):\n{text}"


def test_tuple_example_inputs():
    """example_inputs may be a tuple of tensors."""

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(6, 8)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x, y):
            return self.head(torch.relu(self.a(x) + self.b(y)))

    torch.manual_seed(0)
    model = TwoInputs()

    def make(batch=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 4, generator=g), torch.randn(batch, 6, generator=g)

    spec = check_case(model, make)
    assert [g.size for g in spec.groups.values()] == [8]   # a and b outputs merge by the add


def test_leaf_module_is_opaque_but_safe():
    """A module declared a leaf is not traced into; its inner tensors are never permuted."""
    case = BY_NAME["resnet_basic"]
    from architectures import BasicBlock
    model = case.make_model()
    spec = tm.discover(model, case.make_input(), leaf_modules=(BasicBlock,))
    check_spec(spec, model)
    inner = {m[0] for g in spec.groups.values() for m in g.members}
    assert not any(n.startswith(("layer1.", "layer2.")) for n in inner), sorted(inner)
    perms = spec.random_perms(seed=0)
    twin = tm.permute(model, spec, perms)
    check_equivalent(model, twin, case.make_input)


def test_model_copy_is_equivalent_to_original():
    """Sanity check of the harness itself: deep copies are bitwise equal."""
    case = BY_NAME["vit"]
    model = case.make_model()
    assert_state_equal(snapshot(model), snapshot(copy.deepcopy(model)), "deepcopy")


def test_mha_internals_discovered():
    """nn.MultiheadAttention is captured by symbolic tracing with its own rule: heads and within-head
    dims permute (q/k share dims, v has its own), nothing inside it is frozen; its embedding axis
    and out_proj output join the residual stream."""
    from torchmerge.trace import capture
    model, spec = discovered(BY_NAME["mha_block"])
    assert capture(model, BY_NAME["mha_block"].make_input()).meta["capture"] == "fx"
    assert not [f for f in notable_frozen(spec) if f.module_path == "mha"], spec
    heads = [g for g in spec.groups.values() if ("mha.out_proj.weight", 1) in g.members]
    assert sorted(g.size for g in heads) == [2, 8], spec   # heads, v dims
    qk = [g for g in spec.groups.values() if ("mha.in_proj_weight", 0) in g.members
          and ("mha.out_proj.weight", 1) not in g.members]
    assert [g.size for g in qk] == [8], spec                # q/k dims
    stream = next(g for g in spec.groups.values() if g.size == 16)
    names = {m for m in stream.members}
    assert ("mha.in_proj_weight", 1) in names and ("mha.out_proj.weight", 0) in names, stream.members


@pytest.mark.parametrize("name,drop", [
    ("mlp", ("fc2.weight", 1)),                   # consumer of a space left out
    ("resnet_basic", ("layer1.0.bn2.weight", 0)), # one BN vector of the stream left out
    ("vit", ("blocks.0.attn.proj.weight", 1)),    # out projection's input left out
])
def test_harness_detects_broken_spec(name, drop):
    """Self-test of the harness: a spec missing one member must fail the equivalence check
    (so the table tests above are not vacuous)."""
    import dataclasses
    model, spec = discovered(BY_NAME[name])
    assert drop in spec.axes, sorted(spec.axes)
    broken = dataclasses.replace(spec, axes={k: v for k, v in spec.axes.items() if k != drop})
    perms = shift_perms(spec)
    twin = tm.permute(model, broken, perms)
    with pytest.raises(AssertionError, match="outputs differ"):
        check_equivalent(model, twin, BY_NAME[name].make_input)


def test_tied_weights_stay_tied():
    """lm_head.weight IS emb.weight: the twin keeps one shared tensor, permuted once."""
    case = BY_NAME["tied_head_lm"]
    model, spec = discovered(case)
    twin = tm.permute(model, spec, spec.random_perms(seed=0))
    assert twin.lm_head.weight is twin.emb.weight
    assert not torch.equal(twin.emb.weight, model.emb.weight)
