"""Property tests: random MLP and conv stacks with residual connections.

Each generated network is a stem, a random sequence of layers and a head:

* ``plain``: ``act(norm(layer(x)))`` with a new width          -> starts a new group;
* ``res1``:  ``x + act(norm(layer(x)))`` (square layer)         -> joins the current stream;
* ``res2``:  ``x + layer2(act(norm(layer1(x))))`` (hidden h)    -> one new group (h), output joins.

So the expected number of groups is ``1 (stem) + #plain + #res2`` (all widths >= 2), and permuting
with any spec must keep the outputs (eval and train mode) and never touch the input model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchmerge as tm
from architectures import randomize_
from invariants import check_case, notable_frozen

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ACTS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "relu6": nn.ReLU6,
    "leaky": lambda: nn.LeakyReLU(0.1), "sigmoid": nn.Sigmoid, "elu": nn.ELU,
    "softplus": nn.Softplus, "identity": nn.Identity,
}

layer_st = st.fixed_dictionaries({
    "kind": st.sampled_from(["plain", "res1", "res2"]),
    "width": st.integers(2, 12),          # plain: new width; res2: hidden width
    "norm": st.booleans(),
    "act": st.sampled_from(sorted(ACTS)),
    "pool": st.booleans(),                # conv stacks only: max-pool after the layer
})

net_st = st.fixed_dictionaries({
    "in_dim": st.integers(1, 5),
    "stem": st.integers(2, 12),
    "stem_act": st.sampled_from(sorted(ACTS)),
    "layers": st.lists(layer_st, min_size=0, max_size=5),
    "out_dim": st.integers(1, 4),
    "flatten_head": st.booleans(),        # conv stacks only: flatten (C,H,W) into the head
    "seed": st.integers(0, 2**16),
})


class Stack(nn.Module):
    """Generic residual stack; ``conv`` selects Conv2d(3x3)/BatchNorm2d instead of Linear/BatchNorm1d."""

    def __init__(self, cfg: dict, conv: bool, size: int = 8):
        super().__init__()
        self.kinds = [layer["kind"] for layer in cfg["layers"]]
        self.pools = []
        lin = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if conv else nn.Linear
        norm = nn.BatchNorm2d if conv else nn.BatchNorm1d
        self.stem = nn.Sequential(lin(cfg["in_dim"], cfg["stem"]), ACTS[cfg["stem_act"]]())
        self.first, self.second = nn.ModuleList(), nn.ModuleList()
        w = cfg["stem"]
        for layer in cfg["layers"]:
            h = layer["width"]
            out = {"plain": h, "res1": w, "res2": h}[layer["kind"]]
            self.first.append(nn.Sequential(lin(w, out), norm(out) if layer["norm"] else nn.Identity(),
                                            ACTS[layer["act"]]()))
            self.second.append(lin(h, w) if layer["kind"] == "res2" else nn.Identity())
            if layer["kind"] == "plain":
                w = h
            pool = conv and layer["pool"] and size >= 2
            self.pools.append(pool)
            size = size // 2 if pool else size
        self.conv = conv
        self.flatten_head = conv and cfg["flatten_head"]
        feat = w * size * size if self.flatten_head else w
        self.head = nn.Linear(feat, cfg["out_dim"])

    def forward(self, x):
        x = self.stem(x)
        for kind, first, second, pool in zip(self.kinds, self.first, self.second, self.pools):
            y = second(first(x))
            x = y if kind == "plain" else x + y
            if pool:
                x = nn.functional.max_pool2d(x, 2)
        if self.conv:
            x = x.flatten(1) if self.flatten_head else x.mean(dim=(2, 3))
        return self.head(x)


def expected_sizes(cfg: dict) -> list:
    sizes = [cfg["stem"]]
    for layer in cfg["layers"]:
        if layer["kind"] in ("plain", "res2"):
            sizes.append(layer["width"])
    return sorted(sizes)


def _input(shape):
    def make(batch=4, seed=0):
        return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    return make


def _check(cfg: dict, conv: bool):
    torch.manual_seed(cfg["seed"])
    model = randomize_(Stack(cfg, conv), seed=cfg["seed"])
    make = _input((cfg["in_dim"], 8, 8) if conv else (cfg["in_dim"],))
    spec = check_case(model, make, seeds=(cfg["seed"] % 7,))
    sizes = sorted(g.size for g in spec.groups.values())
    assert sizes == expected_sizes(cfg), f"group sizes {sizes} != {expected_sizes(cfg)}\n{spec}"
    assert not notable_frozen(spec), f"nothing should be frozen in a plain stack:\n{spec}"


@SETTINGS
@given(net_st)
def test_random_mlp_stack(cfg):
    _check(cfg, conv=False)


@SETTINGS
@given(net_st)
def test_random_conv_stack(cfg):
    _check(cfg, conv=True)


@SETTINGS
@given(net_st, st.integers(0, 1000))
def test_any_seed_is_a_symmetry(cfg, seed):
    """Independent of the spec's own seeds: any random_perms seed keeps the function."""
    torch.manual_seed(cfg["seed"])
    model = randomize_(Stack(cfg, conv=False), seed=cfg["seed"]).eval()
    x = torch.randn(3, cfg["in_dim"], generator=torch.Generator().manual_seed(seed))
    spec = tm.discover(model, x)
    twin = tm.permute(model, spec, spec.random_perms(seed=seed)).eval()
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), rtol=1e-4, atol=1e-5)
