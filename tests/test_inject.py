"""The injected build (``build="inject"``): a copy of the reference expert, of the user's own class.

Every architecture of the discovery table goes through the same checks as the graph build
(tests/test_merged.py): merging copies of one expert gives that expert for every task (also after
calibration), identity affines give the plain merge, ``export(t)`` equals task t, a mixed-task
batch equals the per-task runs, and the experts are left bit-identical. Then a hand-written model
with keyword arguments and an output object, and tiny Hugging Face models (skipped without
transformers).
"""
from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

import torchmerge as tm
from merge_helpers import TABLE, check_mixed_batch, plain_average as _plain_merge, inputs_of as _inputs, perturbed_experts as _experts
from merge_helpers import randomize_sites as _randomize_sites
from merge_helpers import bert_batches as _bert_batches, tiny_bert as _bert
from architectures import BY_NAME, randomize_
from torchmerge.inject import InjectedModel, build_injected, injected_class


def _injected(experts, x, **kw):
    kw = {"method": "average", "align": None, "correction": None, "build": "inject", **kw}
    return tm.merge(experts, example_inputs=x, **kw).eval()


def _close(a, b, atol=1e-5):
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y, atol) for x, y in zip(a, b))
    return torch.allclose(a, b, atol=atol, rtol=1e-4)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------
# the architecture table


@pytest.mark.parametrize("case", TABLE, ids=str)
def test_copies_of_one_expert_merge_to_that_expert(case):
    """N identical experts: every task is the expert, with identity or calibrated affines."""
    expert = case.make_model().eval()
    experts = [expert] + [copy.deepcopy(expert) for _ in range(2)]
    x = _inputs(case)
    data = [[_inputs(case, 8, 10 * t + b)[0] for b in range(2)] for t in range(3)]
    before = _state(expert)
    merged = _injected(experts, x, data=data, correction="affine")
    assert isinstance(merged, type(expert)) and isinstance(merged, InjectedModel)
    assert isinstance(merged, tm.MergedModel)
    assert merged.info["build"] == "inject" and merged.sites()
    with torch.no_grad():
        want = expert(*x)
        for t in range(3):
            assert _close(merged(*x, task=t), want, atol=1e-4), t
    assert _same_state(expert, before)


@pytest.mark.parametrize("case", TABLE, ids=str)
def test_injected_model_invariants(case):
    """Identity affines = the plain merge; export(t) = task t; mixed batch = per-task runs."""
    experts = _experts(case)
    before = [_state(e) for e in experts]
    x = _inputs(case)
    merged = _injected(experts, x)
    with torch.no_grad():
        assert _close(merged(*x, task=1), _plain_merge(merged, experts, task=1)(*x))
        _randomize_sites(merged)
        for t in range(merged.num_tasks):
            exported = merged.export(task=t).eval()
            assert type(exported) is type(experts[t]) and exported is not experts[t]
            assert not any(isinstance(m, (tm.TaskAffine, tm.TaskHeads)) for m in exported.modules())
            assert _close(exported(*x), merged(*x, task=t))
        check_mixed_batch(merged, case, _close)
    for e, b in zip(experts, before):
        assert _same_state(e, b)


@pytest.mark.parametrize("name", ["resnet_basic", "vit", "convnext"])
def test_block_sites_and_calibration_match_expert_statistics(name):
    """sites='block': one site per repeated block; the affine fit matches each expert's statistics."""
    case = BY_NAME[name]
    experts = []
    for s in range(2):
        torch.manual_seed(s)
        experts.append(randomize_(case.model_cls(), seed=s).eval())
    data = [[_inputs(case, 16, 100 * t + b)[0] * (1 + t) for b in range(3)] for t in range(2)]
    merged = _injected(experts, data[0][0], method="average", sites="block", data=data,
                       correction="affine", calibration={"passes": 3, "eps": 1e-8})
    assert merged.sites() and all(s.site_module for s in merged.sites().values())
    for t in range(2):
        for mine, theirs in tm.correct.site_moments(merged, experts, data, t).values():
            sigma = (theirs.var + 1e-4).sqrt()
            assert float(((mine.mean - theirs.mean).abs() / sigma).max()) < 0.1
            assert float(((mine.std - theirs.std).abs() / sigma).max()) < 0.1


def test_auto_build_keeps_graph_for_traceable_models():
    case = BY_NAME["mlp"]
    merged = tm.merge(_experts(case), method="average", align=None, correction=None,
                      example_inputs=_inputs(case))
    assert isinstance(merged, tm.merged.GraphMergedModel) and merged.info["build"] == "graph"


def test_tall_weights_switch_with_task_and_mixed_batches():
    """Injected TALL: each task equals θ₀ + m_t∘τ_MTL in a plain model and the graph build; tasks differ."""
    from test_merged import TALL_LAM, tall_reference, tall_setup
    case = BY_NAME["mlp"]
    base, experts = tall_setup(case)
    x = _inputs(case)
    kw = dict(method="tall", base=base, lam=TALL_LAM)
    graph = tm.merge(experts, example_inputs=x, align=None, correction=None, **kw)
    merged = _injected(experts, x, **kw)
    ids = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        per_task = [merged(*x, task=t) for t in range(3)]
        assert not torch.allclose(per_task[0], per_task[1], atol=1e-3)
        for t in range(3):
            assert torch.allclose(per_task[t], tall_reference(base, experts, t)(*x), atol=1e-5), t
            assert torch.allclose(per_task[t], graph(*x, task=t), atol=1e-6)
            assert torch.allclose(merged.export(t)(*x), per_task[t], atol=1e-6)
        mixed = merged(*x, task=ids)
    for i, t in enumerate(ids.tolist()):
        assert torch.allclose(mixed[i], per_task[t][i], atol=1e-6)


def test_state_dict_round_trip_deepcopy_pickle_and_dtype():
    case = BY_NAME["resnet_basic"]
    experts = _experts(case)
    x = _inputs(case)
    merged = _injected(experts, x)
    _randomize_sites(merged)
    fresh = _injected(experts, x)
    fresh.load_state_dict(merged.state_dict())
    twin = copy.deepcopy(merged)
    buffer = io.BytesIO()
    torch.save(merged, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded) is type(merged) is injected_class(type(experts[0]))
    with torch.no_grad():
        for t in range(2):
            want = merged(*x, task=t)
            for other in (fresh, twin, loaded):
                assert torch.equal(other(*x, task=t), want)
        twin.set_task(1)  # copies hold their own task context
        assert merged.active_task == 0 and torch.equal(twin(*x), merged(*x, task=1))
    double = copy.deepcopy(merged).to(torch.float64)
    assert double(x[0].double(), task=1).dtype == torch.float64


def test_training_step_changes_only_task_parameters():
    case = BY_NAME["resnet_basic"]
    merged = _injected(_experts(case), _inputs(case)).train()
    before = _state(merged)
    trainable = list(merged.task_parameters())
    keep = {id(p) for p in trainable}
    for p in merged.parameters():
        p.requires_grad_(id(p) in keep)
    opt = torch.optim.SGD(trainable, lr=0.1)
    merged(*_inputs(case), task=torch.tensor([0, 1, 0, 1])).square().mean().backward()
    opt.step()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    params = dict(merged.named_parameters())
    assert changed & set(params)
    assert all(k.startswith(("task_sites.", "fc.")) for k in changed if k in params)


def test_set_task_context_names_and_repr():
    case = BY_NAME["mlp"]
    merged = _injected(_experts(case), _inputs(case), task_names=["digits", "letters"])
    _randomize_sites(merged)
    x = _inputs(case)
    with torch.no_grad():
        merged.set_task("letters")
        assert torch.equal(merged(*x), merged(*x, task=1))
        with merged.task("digits"):
            assert torch.equal(merged(*x), merged(*x, task=0))
        assert merged.active_task == 1
    assert "letters" in repr(merged) and "task_sites" in repr(merged)


@pytest.mark.parametrize("task, match", [
    (5, "out of range"), ("nope", "unknown task"), (torch.tensor([0, 1, 0]), "entries but the batch"),
    (torch.tensor([[0, 1, 0, 1]]), "1-D LongTensor"), (torch.tensor([0.0, 1, 0, 1]), "1-D LongTensor"),
    (-1, "out of range"), (1.5, "int or a 1-D"), (torch.tensor([0, -1, 0, 1]), r"in \[0, 1\]"),
    (torch.tensor([0, 2, 0, 1]), r"in \[0, 1\]"),
])
def test_bad_task_ids(task, match):
    case = BY_NAME["mlp"]
    merged = _injected(_experts(case), _inputs(case))
    with pytest.raises(tm.TorchMergeError, match=match):
        merged(*_inputs(case), task=task)


def test_heads_of_different_sizes_and_mixed_batch_error():
    from zoo_ops import MLP
    experts = [randomize_(MLP(num_classes=k), seed=k).eval() for k in (3, 5)]
    merged = _injected(experts, torch.randn(2, 8))
    assert merged(torch.randn(2, 8), task=0).shape == (2, 3)
    assert merged(torch.randn(2, 8), task=1).shape == (2, 5)
    with pytest.raises(tm.TorchMergeError, match="equal output shapes"):
        merged(torch.randn(2, 8), task=torch.tensor([0, 1]))
    assert merged(torch.randn(2, 8), task=torch.tensor([1, 1])).shape == (2, 5)
    with pytest.raises(tm.TorchMergeError, match="no counterpart"):
        merged.export(1, like=experts[0])
    assert merged.export(1, like=experts[1])(torch.randn(2, 8)).shape == (2, 5)


def test_sites_as_paths_and_predicates():
    case = BY_NAME["resnet_basic"]
    experts, x = _experts(case), _inputs(case)
    by_path = _injected(experts, x, sites=["layer1.0", "bn1"])
    assert [s.site_module for s in by_path.sites().values()] == ["layer1.0", "bn1"]
    blocks = _injected(experts, x, sites=lambda path, module: type(module).__name__ == "BasicBlock")
    assert [s.site_module for s in blocks.sites().values()] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    _randomize_sites(blocks)
    with torch.no_grad():  # sites after blocks cannot fold: fixed affines on forward hooks
        exported = blocks.export(0).eval()
        assert type(exported) is type(experts[0])
        assert sum(isinstance(m, tm.ChannelAffine) for m in exported.modules()) == 4
        assert _close(exported(*x), blocks(*x, task=0))
    for sites, match in [(["nope"], "not modules"), (["fc"], "inside a head"), ("everywhere", "sites must be")]:
        with pytest.raises(tm.TorchMergeError, match=match):
            _injected(experts, x, sites=sites)


def test_sequential_root_keeps_its_layers():
    """An nn.Sequential iterates its children: the injected children stay out of its forward."""
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    merged = _injected(experts, torch.randn(2, 4), method="tall", lam=0.0)
    assert isinstance(merged, nn.Sequential) and len(merged) == 3 and isinstance(merged[2], tm.TaskHeads)
    assert merged(torch.randn(5, 4), task=torch.tensor([0, 1, 1, 0, 1])).shape == (5, 3)


def test_graph_build_with_defaulted_forward_arguments():
    """The graph build's task input has a default, so it may follow defaulted arguments."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x, scale=None):
            return self.head(self.fc(x).relu())

    experts = [Scaled(), Scaled()]
    merged = tm.merge(experts, method="average", example_inputs=torch.randn(2, 4), align=None,
                      correction=None, build="graph")
    assert merged(torch.randn(3, 4), task=1).shape == (3, 3)


def test_bad_build_options():
    case = BY_NAME["mlp"]
    experts, x = _experts(case), _inputs(case)
    with pytest.raises(tm.TorchMergeError, match="unknown build 'fx'"):
        tm.merge(experts, example_inputs=x, correction=None, align=None, build="fx")
    with pytest.raises(tm.TorchMergeError, match="keyword arguments"):
        tm.merge(experts, example_inputs={"x": x[0]}, correction=None, align=None, heads=["head"],
                 build="graph")


def test_api_name_clash_and_task_argument_are_refused():
    class HasHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.Linear(4, 3)

        def forward(self, x):
            return self.heads(x)

    class TakesTask(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, task=None):
            return self.fc(x)

    for cls, match in [(HasHeads, "task API needs"), (TakesTask, "argument named 'task'")]:
        net = cls()
        with pytest.raises(tm.TorchMergeError, match=match):
            build_injected(net, net.state_dict(), [{}], [], "layer", torch.randn(2, 4), ["a"])


# ---------------------------------------------------------------------------------------------
# a hand-written model with keyword arguments and an output object


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class KeywordNet(nn.Module):
    """forward(input_ids, attention_mask=None, *, temperature=1.0) -> Output (a dataclass)."""

    def __init__(self, classes=3, vocab=20, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
                                    for _ in range(2))
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask=None, *, temperature=1.0):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return Output(logits=self.head(pooled) / temperature, hidden=h)


def _keyword_data(tasks=2, batches=2, batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[{"input_ids": torch.randint(0, 20, (batch, 5), generator=gen),
              "attention_mask": torch.ones(batch, 5, dtype=torch.long),
              "labels": torch.randint(0, 3, (batch,), generator=gen)} for _ in range(batches)]
            for _ in range(tasks)]


def _keyword_experts():
    out = []
    for s in range(2):
        torch.manual_seed(s)
        out.append(randomize_(KeywordNet(), seed=s).eval())
    return out


@pytest.mark.parametrize("sites", ["layer", "block"])
@pytest.mark.parametrize("correction", ["affine", "affine+tune"])
def test_keyword_model_with_output_object(sites, correction):
    experts, data = _keyword_experts(), _keyword_data()
    merged = tm.merge(experts, method="ties", data=data, align=None, heads=["head"], sites=sites,
                      correction=correction, calibration={"tune_steps": 5} if correction == "affine+tune" else None)
    assert merged.info["build"] == "inject" and isinstance(merged, KeywordNet)
    batch = {k: v for k, v in data[1][0].items() if k != "labels"}
    with torch.no_grad():
        out = merged(**batch, task=1, temperature=2.0)
        assert isinstance(out, Output) and out.logits.shape == (6, 3)
        mixed = merged(**batch, task=torch.tensor([0, 1] * 3))
        assert torch.allclose(mixed.logits[1::2], merged(**{k: v[1::2] for k, v in batch.items()}, task=1).logits,
                              atol=1e-5)
        exported = merged.export(1)
        assert type(exported) is KeywordNet
        assert torch.allclose(exported(**batch).logits, merged(**batch, task=1).logits, atol=1e-5)


def test_keyword_model_copies_calibrate_to_identity():
    expert = _keyword_experts()[0]
    data = _keyword_data()
    merged = tm.merge([expert, copy.deepcopy(expert)], method="average", data=data, align=None,
                      heads=["head"], correction="affine")
    batch = {k: v for k, v in data[0][0].items() if k != "labels"}
    with torch.no_grad():
        for t in range(2):
            assert torch.allclose(merged(**batch, task=t).logits, expert(**batch).logits, atol=1e-4)


def test_mixed_batch_with_task_weights_needs_stitchable_outputs():
    """TALL runs each task on its own rows; a dataclass output cannot be put back together."""
    experts, data = _keyword_experts(), _keyword_data()
    merged = tm.merge(experts, method="tall", data=data, align=None, heads=["head"], correction=None)
    with pytest.raises(tm.TorchMergeError, match="cannot be put back in batch order"):
        merged(input_ids=data[0][0]["input_ids"], task=torch.tensor([0, 1] * 3))


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers


def _bert_experts(sizes=(2, 3)):
    """Fine-tuned from one base (shared body, perturbed), heads of different sizes."""
    base = _bert(sizes[0], 0)
    experts = []
    for i, k in enumerate(sizes):
        expert = _bert(k, 10 + i)
        expert.load_state_dict({n: v for n, v in base.state_dict().items() if not n.startswith("classifier")},
                               strict=False)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in expert.named_parameters():
                if not n.startswith("classifier"):
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
        experts.append(expert)
    return base, experts


@pytest.mark.parametrize("align", [None, "weight"])
def test_bert_sequence_classification(align):
    transformers = pytest.importorskip("transformers")
    base, experts = _bert_experts()
    data = [_bert_batches(k, t) for t, k in enumerate((2, 3))]
    before = [_state(e) for e in experts]
    merged = tm.merge(experts, method="ties", base=base, data=data, align=align, correction="affine")
    assert merged.info["build"] == "inject" and list(merged.heads()) == ["classifier"]
    assert isinstance(merged, transformers.BertForSequenceClassification)
    assert isinstance(merged.config, transformers.BertConfig) and merged.config.num_labels == 2
    for t, k in enumerate((2, 3)):
        out = merged(**data[t][0], task=t)
        assert isinstance(out, transformers.modeling_outputs.SequenceClassifierOutput)
        assert out.logits.shape == (4, k) and torch.isfinite(out.loss)  # the task's num_labels
        exported = merged.export(t)
        assert type(exported) is transformers.BertForSequenceClassification and exported.num_labels == k
        with torch.no_grad():
            assert torch.allclose(exported(**data[t][0]).logits, merged(**data[t][0], task=t).logits, atol=1e-5)
    assert merged.num_labels == 2 and merged.config.num_labels == 2  # restored after each call
    for e, b in zip(experts, before):
        assert _same_state(e, b)


def test_bert_permuted_copy_merges_back():
    """align='weight' on an exact permuted copy recovers the expert (needs HF discovery)."""
    expert = _bert(3, 0)
    ids = {"input_ids": torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(0))}
    spec = tm.discover(expert, ids)
    twin = tm.permute(expert, spec, spec.random_perms(seed=1))
    merged = tm.merge([expert, twin], method="average", align="weight", example_inputs=ids, correction=None)
    with torch.no_grad():
        want = expert(**ids).logits
        for t in range(2):
            assert torch.allclose(merged(**ids, task=t).logits, want, atol=1e-4)


def test_bert_block_sites_and_mixed_batches():
    transformers = pytest.importorskip("transformers")
    base, experts = _bert_experts(sizes=(3, 3))
    data = [_bert_batches(3, t) for t in range(2)]
    merged = tm.merge(experts, method="tall", base=base, data=data, align=None, heads=["classifier"],
                      sites="block", correction="affine")
    assert [s.site_module for s in merged.sites().values()] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    batch = {k: v for k, v in data[0][0].items() if k != "labels"}
    ids = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        mixed = merged(**batch, task=ids)
        assert isinstance(mixed, transformers.modeling_outputs.SequenceClassifierOutput)
        for t in range(2):
            rows = (ids == t).nonzero().squeeze(1)
            single = merged(**{k: v[rows] for k, v in batch.items()}, task=t).logits
            assert torch.allclose(mixed.logits[rows], single, atol=1e-5)
        with pytest.raises(tm.TorchMergeError, match="no batch axis first"):
            merged(**data[0][0], task=ids)  # the loss is one number for the whole batch


def _causal_lm(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_generates_like_the_expert(kind):
    expert = _causal_lm(kind)
    gen = torch.Generator().manual_seed(0)
    data = [[{"input_ids": torch.randint(0, 50, (4, 8), generator=gen)} for _ in range(2)] for _ in range(2)]
    merged = tm.merge([expert, copy.deepcopy(expert)], method="average", data=data, align=None,
                      heads=["lm_head"], correction="affine")
    assert merged.info["build"] == "inject" and isinstance(merged, type(expert))
    prompt = torch.randint(0, 50, (2, 5), generator=gen)
    opts = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    want = expert.generate(prompt, **opts)
    for t in range(2):
        with merged.task(t):
            assert torch.equal(merged.generate(prompt, **opts), want)
        assert torch.equal(merged.generate(prompt, task=t, **opts), want)
    assert torch.equal(merged.generate(prompt, task=torch.tensor([1, 0]), **opts), want)
    assert torch.equal(merged.export(1).generate(prompt, **opts), want)
    _randomize_sites(merged)  # folding into Linear (Llama: bias added) and GPT-2's Conv1D
    with torch.no_grad():
        exported = merged.export(0)
        assert type(exported) is type(expert)
        assert not any(isinstance(m, tm.ChannelAffine) for m in exported.modules())
        assert torch.allclose(exported(prompt).logits, merged(prompt, task=0).logits, atol=1e-4)


def test_pleas_on_gpt2_fits_its_conv1d_layers_widens_and_keeps_the_embedding_merged():
    transformers = pytest.importorskip("transformers")
    experts = []
    for seed in (0, 1):  # two independent inits: nothing matches exactly
        torch.manual_seed(seed)
        config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        experts.append(transformers.GPT2LMHeadModel(config).eval())
    gen = torch.Generator().manual_seed(0)
    data = [[{"input_ids": torch.randint(0, 50, (4, 8), generator=gen)} for _ in range(2)] for _ in range(2)]
    merged = tm.merge(experts, method="pleas", data=data, heads=["lm_head"], correction=None, width=1.5)
    info = merged.info["merge_info"]
    assert {"transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_attn", "lm_head"} <= set(info["fitted"])
    mlp = merged.transformer.h[0].mlp.c_fc
    assert mlp.nf == mlp.weight.shape[1] > 64  # the MLP widened (4·16 units per expert)
    group = next(g for g, s in info["sources"].items() if s.shape[1] == 16)  # the residual stream
    src = info["sources"][group]
    want = (experts[0].transformer.wte.weight[:, src[0]] + experts[1].transformer.wte.weight[:, src[1]]) / 2
    assert torch.allclose(merged.transformer.wte.weight, want, atol=1e-6)  # the body merge, not a head fit
    x = data[0][0]["input_ids"]
    with torch.no_grad():
        for t in range(2):
            logits = merged(x, task=t).logits
            assert logits.shape == (4, 8, 50) and torch.isfinite(logits).all()
