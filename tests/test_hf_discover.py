"""Permutation discovery on tiny Hugging Face transformers models (tests/hf_zoo.py).

transformers models cannot be traced by torch.fx; ``tm.discover`` captures them with
``torch.export`` (non-strict) and takes the example inputs as a keyword dict. Every zoo model goes
through the same checks: discovery leaves the expert untouched and returns a well-formed spec;
random permutations (several seeds, hypothesis-drawn seeds, a cyclic shift of every group) give a
new module whose every output tensor matches the expert's, whose weights are re-orderings of the
originals and differ from them; the spec stays a symmetry at other batch sizes and sequence
lengths; index buffers (position_ids) and tensors the forward never uses are not permuted; and at
least ``case.min_coverage`` of the Linear/Conv/Embedding output channels are permuted (see
``hf_zoo.coverage``). Both attention implementations (sdpa, eager) are checked, and
``output_hidden_states=True`` (every residual stream an output) must freeze the stream.
"""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import torchmerge as tm  # noqa: E402
from hf_zoo import HF_BY_NAME, HF_CASES, HF_IDS, call, coverage, flat_outputs  # noqa: E402
from invariants import (assert_state_equal, check_perms, check_spec, check_weights_permuted,  # noqa: E402
                        shift_perms, snapshot)

RTOL, ATOL = 1e-4, 1e-5
_SPECS: dict = {}


def discovered(name: str, attn: str | None = None):
    """(model, spec) per zoo case and attention implementation, discovered once per session."""
    case = HF_BY_NAME[name]
    key = (name, attn or case.attn)
    if key not in _SPECS:
        model = case.make_model(attn)
        _SPECS[key] = (model, tm.discover(model, case.make_inputs()))
    return _SPECS[key]


def assert_same_outputs(model, twin, inputs, what: str):
    """Every output tensor (logits, hidden states, pooled outputs) agrees to ~1e-4 relative."""
    ref, got = flat_outputs(call(model, inputs)), flat_outputs(call(twin, inputs))
    assert ref.keys() == got.keys(), f"{what}: output keys {sorted(ref)} != {sorted(got)}"
    assert ref, f"{what}: the model returned no tensors"
    for k, a in ref.items():
        b = got[k]
        assert a.shape == b.shape, f"{what}: {k} shape {tuple(a.shape)} != {tuple(b.shape)}"
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{what}: {k} differs"
            continue
        atol = ATOL * max(1.0, a.abs().max().item())
        err = (a - b).abs().max().item() if a.numel() else 0.0
        assert torch.allclose(a, b, rtol=RTOL, atol=atol), (
            f"{what}: {k} differs, max abs err {err:.3g} (|{k}| max {a.abs().max().item():.3g})")


def check_permutation(name: str, perms: dict, seed: int, attn: str | None = None, **shape):
    model, spec = discovered(name, attn)
    before = snapshot(model)
    twin = tm.permute(model, spec, perms)
    assert twin is not model and type(twin) is type(model)
    assert_state_equal(before, snapshot(model), f"{name}: permute modified the expert")
    check_weights_permuted(model, twin, spec, perms)
    inputs = HF_BY_NAME[name].make_inputs(batch=shape.pop("batch", 3), seed=seed, **shape)
    assert_same_outputs(model, twin, inputs, f"{name} ({attn or HF_BY_NAME[name].attn}, {shape or 'same shape'})")
    return model, twin


@pytest.fixture(params=HF_CASES, ids=HF_IDS)
def case(request):
    return request.param


# --------------------------------------------------------------------------- the table

def test_discover_leaves_expert_untouched(case):
    model = case.make_model()
    before = snapshot(model)
    spec = tm.discover(model, case.make_inputs())
    assert_state_equal(before, snapshot(model), f"{case.name}: discover modified the expert")
    assert not model.training, f"{case.name}: discover changed model.training"
    check_spec(spec, model)
    assert spec.groups, f"{case.name}: no groups\n{spec}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_perms_preserve_outputs(case, seed):
    _, spec = discovered(case.name)
    perms = spec.random_perms(seed=seed)
    check_perms(spec, perms)
    check_permutation(case.name, perms, seed=100 + seed)


def test_shift_perms_preserve_outputs(case):
    """Every index of every group moves at once (cyclic shift by one)."""
    _, spec = discovered(case.name)
    check_permutation(case.name, shift_perms(spec), seed=7)


@pytest.mark.parametrize("batch,seq", [(1, 12), (4, 3), (2, 24)])
def test_spec_holds_for_other_input_shapes(case, batch, seq):
    """A spec discovered on (batch 2, 7 tokens) is a symmetry of the model, not of that shape:
    other batch sizes and sequence lengths (up to max_position_embeddings) keep their outputs.
    (Position tables sliced to the example's length must not be permuted beyond it.)"""
    _, spec = discovered(case.name)
    check_permutation(case.name, spec.random_perms(seed=1), seed=11, batch=batch, seq=seq)


def test_no_group_of_index_or_idle_buffers(case):
    """Integer buffers (position_ids, token_type_ids) hold indices, not channels: never permuted.
    A group whose members are all buffers touches no weight: such tensors are unused by the
    forward (e.g. RoPE's original_inv_freq) and belong in ``spec.unused``, not in a group."""
    model, spec = discovered(case.name)
    params = {n for n, _ in model.named_parameters()}
    buffers = dict(model.named_buffers())
    ints = sorted({k for k in spec.axes if k[0] in buffers and not buffers[k[0]].is_floating_point()})
    assert not ints, f"{case.name}: integer buffers permuted: {[(k, spec.axes[k]) for k in ints]}"
    idle = [n for n, g in spec.groups.items() if not any(m[0] in params for m in g.members)]
    assert not idle, f"{case.name}: groups with no parameter member: {[spec.groups[n] for n in idle]}"


def test_permuting_changes_the_weights(case):
    """Non-trivial: most 2-D weights move (a spec that permutes nothing would pass the rest)."""
    model, spec = discovered(case.name)
    twin = tm.permute(model, spec, spec.random_perms(seed=0))
    a, b = snapshot(model), snapshot(twin)
    weights = [k for k, v in a.items() if v.dim() == 2 and v.is_floating_point()]
    moved = [k for k in weights if not torch.equal(a[k], b[k])]
    assert len(moved) >= len(weights) // 2, (
        f"{case.name}: only {len(moved)} of {len(weights)} weight matrices moved; unmoved: "
        f"{sorted(set(weights) - set(moved))[:8]}\n{spec}")


def test_coverage(case):
    model, spec = discovered(case.name)
    cov = coverage(model, spec)
    assert cov["share"] >= case.min_coverage, (
        f"{case.name}: {cov['share']:.1%} of {cov['channels']} output channels permuted, expected "
        f">= {case.min_coverage:.0%}; unpermuted channels by reason: {cov['lost']}\n{spec}")


@pytest.mark.parametrize("name", HF_IDS)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_hypothesis_seeds(name, seed):
    _, spec = discovered(name)
    check_permutation(name, spec.random_perms(seed=seed), seed=seed % 1000)


# --------------------------------------------------------------------------- variants

@pytest.mark.parametrize("name", HF_IDS)
def test_eager_attention(name):
    """The hand-written (eager) attention path is discovered and permuted as safely as sdpa."""
    other = "eager" if HF_BY_NAME[name].attn == "sdpa" else "sdpa"
    model, spec = discovered(name, other)
    check_spec(spec, model)
    check_permutation(name, spec.random_perms(seed=3), seed=3, attn=other)


@pytest.mark.parametrize("name", ["bert_cls", "gpt2_lm", "llama_gqa"])
def test_hidden_states_outputs_freeze_the_stream(name):
    """With output_hidden_states=True every layer's residual stream is a model output: it must be
    fixed, and every returned hidden state must still match after permuting."""
    case = HF_BY_NAME[name]
    model = case.make_model()

    def inputs(batch=2, seed=0):
        return {**case.make_inputs(batch, seed), "output_hidden_states": True}

    spec = tm.discover(model, inputs())
    assert len(flat_outputs(call(model, inputs()))) > 2
    for seed in (0, 1):
        twin = tm.permute(model, spec, spec.random_perms(seed=seed))
        assert_same_outputs(model, twin, inputs(3, 50 + seed), f"{name} with hidden states")
    plain = coverage(*discovered(name))
    assert coverage(model, spec)["excluded"] > plain["excluded"], "the stream should be excluded"


def test_discover_is_deterministic():
    model, spec = discovered("llama_gqa")
    again = tm.discover(HF_BY_NAME["llama_gqa"].make_model(), HF_BY_NAME["llama_gqa"].make_inputs(batch=3, seed=4))
    assert list(spec.groups) == list(again.groups)
    assert {n: g.size for n, g in spec.groups.items()} == {n: g.size for n, g in again.groups.items()}
    assert spec.axes == again.axes
