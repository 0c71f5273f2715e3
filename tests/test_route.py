"""method="route": routers over the experts' frozen blocks (torchmerge/route.py)."""
import copy

import pytest
import torch
from torch import nn

import torchmerge as tm
from torchmerge.errors import TorchMergeError


def net(seed, depth=3, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), *[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(depth)],
                         nn.Linear(8, out))


def data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(16, 4, generator=g) for _ in range(2)] for _ in range(n)]


def route(experts, **kw):
    kw.setdefault("align", None)
    kw.setdefault("route_steps", 0)
    return tm.merge(experts, method="route", data=data(len(experts)), **kw)


def test_copies_of_one_model_reproduce_it():
    model = net(0)
    merged = route([copy.deepcopy(model) for _ in range(3)], route_steps=5)  # window=0: same depth
    x = torch.randn(7, 4)
    torch.testing.assert_close(merged(x, task=1), model(x))


def test_forced_top1_equals_expert_block():
    experts = [net(0), net(1)]
    merged = route(experts, top_k=1)
    block = merged.router_blocks()["2"]
    x = torch.randn(5, 8)
    for j, (e, q) in enumerate([(0, "2"), (1, "2")]):
        block.forced = j
        torch.testing.assert_close(block(x), experts[e].get_submodule(q)(x))


def test_training_lowers_distillation_loss_and_keeps_experts():
    experts = [net(0), net(1)]
    before = [copy.deepcopy(e.state_dict()) for e in experts]
    merged = route(experts, window=1, top_k=2, route_steps=60)
    tr = merged.info["training"]
    assert all(a < b for a, b in zip(tr["loss_after"], tr["loss_before"]))
    for e, s in zip(experts, before):
        for k, v in e.state_dict().items():
            assert torch.equal(v, s[k])
    assert all(not p.requires_grad for n, p in merged.named_parameters() if ".routers." not in n)
    assert merged.info["active_params_ratio"] > 0 and merged.info["flops_ratio"] > 0


def test_set_task_and_per_sample_ids():
    experts = [net(0, out=3), net(1, out=5)]
    merged = route(experts, route_steps=3)
    x = torch.randn(4, 4)
    merged.set_task(1)
    assert merged(x).shape == (4, 5)
    ids = torch.tensor([0, 0, 0, 0])
    torch.testing.assert_close(merged(x, task=ids), merged(x, task=0))
    with pytest.raises(TorchMergeError, match="export"):
        merged.export(task=0)


def test_aligned_route_reports_cka():
    merged = route([net(0), net(1)], align="weight", route_steps=2)
    cka = merged.info["cka"]
    assert len(cka["before"]) == len(cka["after"]) == 1


@pytest.mark.parametrize("kw, match", [
    ({"window": 3}, "valid windows are 0..2"),
    ({"top_k": 3}, "valid values are 1..2"),
    ({"blocks": ["nope"]}, "valid paths"),
    ({"blocks": lambda p, m: False}, "matched no module"),
])
def test_bad_options(kw, match):
    with pytest.raises(TorchMergeError, match=match):
        route([net(0), net(1)], **kw)


def test_single_candidate_warns():
    with pytest.warns(UserWarning, match="one candidate"):
        merged = route([net(0)])
    assert merged.info["warnings"]


def test_data_given_as_a_generator_of_tasks():
    """A one-shot generator of per-task batches is read once, not consumed by the option checks."""
    experts = [net(0), net(1)]
    merged = tm.merge(experts, method="route", data=(d for d in data(2)), align=None, route_steps=3)
    assert merged(torch.randn(5, 4), task=1).shape == (5, 3)
    assert len(merged.info["training"]["loss_after"]) == 2
