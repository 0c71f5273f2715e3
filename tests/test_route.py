"""method="route": routers over the experts' frozen blocks (torchmerge/route.py)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import torchmerge as tm
from torchmerge.errors import TorchMergeError
from torchmerge.route import fit_route_affines, keep_helpful_affines


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
    trainable = {id(p) for p in merged.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in merged.task_parameters()}  # routers and per-task affines only
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


def permuted_copy(model, seed=5):
    """``model`` with the hidden units of every Linear(8, 8) block shuffled: the same function."""
    g = torch.Generator().manual_seed(seed)
    out, prev = copy.deepcopy(model), None
    layers = [m for m in out.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for layer in layers[:-1]:
            perm = torch.randperm(layer.out_features, generator=g)
            if prev is not None:
                layer.weight.copy_(layer.weight[:, prev])
            layer.weight.copy_(layer.weight[perm])
            layer.bias.copy_(layer.bias[perm])
            prev = perm
        layers[-1].weight.copy_(layers[-1].weight[:, prev])
    return out


def test_compatibility_report_sees_alignment():
    """A permuted copy: CKA is 1 either way (it cannot see permutations); the per-unit correlation
    is low before alignment and 1 after it."""
    model = net(0)
    shuffled = permuted_copy(model)
    x = torch.randn(6, 4)
    torch.testing.assert_close(shuffled(x), model(x))
    merged = route([model, shuffled], align="activation", route_steps=0)
    comp = merged.info["compatibility"]
    assert comp["cka"][0] == pytest.approx(1.0, abs=1e-6)
    assert comp["unit_correlation"][0] < 0.8
    assert comp["unit_correlation_aligned"][0] == pytest.approx(1.0, abs=1e-6)


def test_alignment_options_reach_the_routed_experts_alignment():
    """alignment={'max_iter': 1} stops weight matching of two independent nets after one sweep:
    recorded as unconverged (the full run converges)."""
    experts = [net(0), net(1)]
    full = route(experts, align="weight", route_steps=0)
    with pytest.warns(UserWarning, match="max_iter=1"):
        short = route(experts, align="weight", route_steps=0, alignment={"max_iter": 1})
    assert full.info["alignment"]["converged"] == [True, True]
    assert short.info["alignment"]["converged"] == [True, False]


def test_unit_correlation_against_plain_formula():
    a, b = net(0), net(1)
    batches = [torch.randn(32, 4) for _ in range(2)]
    got = tm.analysis.unit_correlation(a, b, batches, layers=["1"])["1"]
    with torch.no_grad():
        x = torch.cat(batches)
        ha, hb = a[:2](x).double(), b[:2](x).double()
    ref = torch.stack([torch.corrcoef(torch.stack([ha[:, j], hb[:, j]]))[0, 1] for j in range(8)])
    live = (ha.var(0) > 1e-12) | (hb.var(0) > 1e-12)
    ref = torch.nan_to_num(ref, nan=0.0)[live].mean().item()
    assert got == pytest.approx(ref, abs=1e-9)


def test_top1_routers_learn():
    """Top-1 gates are 1 in value but carry the softmax gradient: the routers move, and the
    forward still equals the picked block (forced or not)."""
    experts = [net(0), net(1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = route(experts, top_k=1, route_steps=30, correction=None)
    # task 0's routers start on expert 0 (ties pick candidate 0): zero loss, nothing to learn;
    # task 1's start on the wrong expert and must move
    moved = [b.routers[1].weight.detach().abs().sum().item() for b in merged.router_blocks().values()]
    assert all(m > 0 for m in moved)
    block = merged.router_blocks()["2"]
    x = torch.randn(5, 8)
    picks = block.gates(x)[0].squeeze(1)
    want = torch.stack([experts[int(j)][2](x[i:i + 1])[0] for i, j in enumerate(picks)])
    torch.testing.assert_close(block(x), want)


def test_shared_router_is_one_per_block_and_trains():
    experts = [net(0), net(1), net(2)]
    merged = route(experts, router="shared", top_k=2, window=1, route_steps=40, correction=None)
    assert all(len(b.routers) == 1 for b in merged.router_blocks().values())
    tr = merged.info["training"]
    assert sum(tr["loss_after"]) < sum(tr["loss_before"])
    assert {id(p) for p in merged.router_parameters(0)} == {id(p) for p in merged.router_parameters(2)}


def _block_moments(model, path, batches, **kw):
    """Per-channel mean and variance of a module's output, with a plain hook (test's own)."""
    outs = []
    h = model.get_submodule(path).register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    with torch.no_grad():
        for x in batches:
            model(x, **kw)
    h.remove()
    y = torch.cat(outs).double()
    return y.mean(0), y.var(0, unbiased=False)


def test_affine_correction_matches_expert_block_statistics():
    """Uniform routing (no training) collapses variance; the correction restores, per task, each
    routed block's per-channel mean and variance to expert t's block (exact at every block: fitted
    in forward order), checked with the test's own hooks."""
    experts = [net(s) for s in range(3)]
    with torch.no_grad():  # unit-scale activations (default init shrinks them through the depth)
        for p in (p for e in experts for p in e.parameters()):
            p.mul_(2.5)
    batches = data(3)
    plain = tm.merge(experts, method="route", data=batches, align=None, route_steps=0, correction=None)
    fixed = tm.merge(experts, method="route", data=batches, align=None, route_steps=0, correction=None)
    fit_route_affines(fixed, experts, batches)  # the fit itself (tm.merge then keeps it where it helps)
    for t in range(3):
        for path in ("1", "2", "3"):
            mean_e, var_e = _block_moments(experts[t], path, batches[t])
            mean_m, var_m = _block_moments(fixed, f"body.{path}", batches[t], task=t)
            torch.testing.assert_close(mean_m, mean_e, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(var_m, var_e, atol=1e-4, rtol=1e-3)
        _, var_p = _block_moments(plain, "body.3", batches[t], task=t)
        _, var_f = _block_moments(fixed, "body.3", batches[t], task=t)
        _, var_e = _block_moments(experts[t], "3", batches[t])
        live = var_e > 1e-3
        assert (var_f / var_e - 1)[live].abs().mean() < (var_p / var_e - 1)[live].abs().mean()


class TokenMix(nn.Module):
    """Mixes tokens (not token-wise): must be routed per sample."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.lin(x.mean(1, keepdim=True))


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        return x + self.mlp(x)


def seq_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), TokenMLP(), TokenMix(), TokenMLP(), TokenMix(), nn.Linear(8, 3))


def test_routing_unit_is_tested_per_block():
    experts = [seq_net(0), seq_net(1)]
    experts[1][0].load_state_dict(experts[0][0].state_dict())  # outside the blocks, the reference's layers
    batches = [[torch.randn(3, 5, 4)] for _ in experts]
    merged = tm.merge(experts, method="route", data=batches, align=None, top_k=1, route_steps=0,
                      blocks=["1", "2", "3", "4"], correction=None)
    assert merged.info["units"] == {"1.mlp": "token", "3.mlp": "token", "2": "sample", "4": "sample"} or \
        merged.info["units"] == {"1": "token", "3": "token", "2": "sample", "4": "sample"}
    x = torch.randn(2, 5, 4)
    for j in range(2):  # forcing one expert everywhere gives that expert
        for b in merged.router_blocks().values():
            b.forced = j
        torch.testing.assert_close(merged(x, task=j), experts[j](x))


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


def test_correction_is_kept_only_where_it_lowers_the_loss():
    """A task whose affines raise its distillation loss gets the identity back (the mix as trained)."""
    experts, batches = [net(0), net(1)], data(2)
    plain = tm.merge(experts, method="route", data=batches, align=None, route_steps=0, correction=None)
    fixed = tm.merge(experts, method="route", data=batches, align=None, route_steps=0, correction="affine")
    x = torch.randn(6, 4)
    corrected = [fixed(x, task=t) for t in range(2)]
    kept = keep_helpful_affines(fixed, [1.0, 1.0], [0.5, 2.0])
    assert kept == {"task0": True, "task1": False}
    torch.testing.assert_close(fixed(x, task=0), corrected[0])
    torch.testing.assert_close(fixed(x, task=1), plain(x, task=1))
    info = fixed.info["training"]
    for t, name in enumerate(["task0", "task1"]):
        assert info["loss_corrected"][t] <= info["loss_after"][t] or not info["correction_kept"][name]
