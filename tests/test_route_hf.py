"""Routing on Hugging Face transformers as their library builds them (tiny random configs)."""
import copy

import pytest
import torch

import torchmerge as tm
from architectures import randomize_
from hf_zoo import HF_BY_NAME

pytest.importorskip("transformers")


def expert(name: str, seed: int):
    case = HF_BY_NAME[name]
    torch.manual_seed(seed)
    return randomize_(case.build(case.attn), seed=seed + 1).eval()


def blocks_redrawn(model, prefixes, seed: int):
    """A copy of ``model`` whose parameters under ``prefixes`` (the routed blocks and the head) are
    redrawn: outside them it is ``model``, as the routed model is outside its blocks."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n.startswith(prefixes):
                p.copy_(torch.randn(p.shape, generator=g) * p.std().clamp_min(0.1) + p.mean())
    return other


def batches(name: str, n: int = 2):
    return [HF_BY_NAME[name].make_inputs(4, s) for s in range(n)]


@pytest.mark.parametrize("name, blocks, unit", [
    ("bert_cls", ["bert.encoder.layer.0", "bert.encoder.layer.1"], "sample"),  # whole layers, with masks
    ("gpt2_lm", ["transformer.h.0.mlp", "transformer.h.1.mlp"], "token"),
])
def test_forced_picks_are_the_experts(name, blocks, unit):
    a = expert(name, 0)
    head = "classifier" if name == "bert_cls" else "lm_head"
    b = blocks_redrawn(a, tuple(blocks) + (head,), seed=3)
    merged = tm.merge([a, b], method="route", data=[batches(name), batches(name)], align=None,
                      top_k=1, route_steps=0, correction=None)
    assert merged.info["blocks"] == blocks and set(merged.info["units"].values()) == {unit}
    x = HF_BY_NAME[name].make_inputs(3, 9)
    for j, e in enumerate([a, b]):
        for block in merged.router_blocks().values():
            block.forced = j
        out = merged(**x, task=j)
        assert type(out) is type(e(**x))
        torch.testing.assert_close(out.logits, e(**x).logits)


@pytest.mark.parametrize("name", ["bert_cls", "gpt2_lm", "vit_cls"])
def test_copies_reproduce_the_model_and_training_lowers_the_loss(name):
    a, b = expert(name, 0), expert(name, 4)
    copies = tm.merge([a, copy.deepcopy(a)], method="route", data=[batches(name)] * 2, align=None,
                      route_steps=3, correction=None)
    x = HF_BY_NAME[name].make_inputs(3, 9)
    torch.testing.assert_close(copies(**x, task=1).logits, a(**x).logits)
    assert copies.config.to_dict() == a.config.to_dict()  # the model's attributes reach through
    merged = tm.merge([a, b], method="route", data=[batches(name), batches(name)], route_steps=15)
    training = merged.info["training"]
    assert all(after < before for after, before in zip(training["loss_after"], training["loss_before"]))
    ids = torch.tensor([1, 0, 1])
    mixed = merged(**x, task=ids).logits
    for t in (0, 1):
        torch.testing.assert_close(mixed[ids == t], merged(**x, task=t).logits[ids == t])


def test_generate_per_task():
    """A routed merge of an LM with its copy generates the LM's greedy continuation; forced to expert
    1's blocks, task 1 generates expert 1's."""
    a = expert("gpt2_lm", 0)
    blocks = ("transformer.h.0.mlp", "transformer.h.1.mlp", "lm_head")
    b = blocks_redrawn(a, blocks, seed=5)
    prompt = HF_BY_NAME["gpt2_lm"].make_inputs(1, 7)["input_ids"]
    greedy = dict(max_new_tokens=5, do_sample=False)
    copies = tm.merge([a, copy.deepcopy(a)], method="route", data=[batches("gpt2_lm")] * 2, align=None,
                      route_steps=0, correction=None)
    copies.set_task(1)
    assert torch.equal(copies.generate(prompt, **greedy), a.generate(prompt, **greedy))
    merged = tm.merge([a, b], method="route", data=[batches("gpt2_lm")] * 2, align=None, top_k=1,
                      route_steps=0, correction=None)
    for block in merged.router_blocks().values():
        block.forced = 1
    merged.set_task(1)
    assert torch.equal(merged.generate(prompt, **greedy), b.generate(prompt, **greedy))
