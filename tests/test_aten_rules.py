"""A tiny hand model for each torch.export (ATen) coupling rule: every discovered spec must keep
the function under random permutations (in eval and train mode), with the hand-counted groups.

Each row: (name, model factory, input factory, sorted group sizes). All are captured with
``capture_method="export"`` so the ATen vocabulary is what is tested, whatever fx could do.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchmerge as tm


class SliceCat(nn.Module):
    """GhostNet's ``cat([x1, x2])[:, :oup]``: the dropped tail is frozen, the rest permutes."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x1 = self.a(x)
        y = torch.cat([x1, self.b(x1)], dim=1)[:, :6]
        return self.out(F.relu(y))


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle: view (g, c/g) -> transpose -> flatten."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Conv2d(3, 8, 1, groups=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.out(y)


class RoPEAttention(nn.Module):
    """Rotary embeddings (rotate_half on q/k) with grouped-query attention (enable_gqa)."""

    def __init__(self, d=16, heads=4, kv=2):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv, d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, kv * self.hd), nn.Linear(d, kv * self.hd)
        self.o, self.inp, self.head = nn.Linear(d, d), nn.Linear(5, d), nn.Linear(d, 3)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    @staticmethod
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, x):
        h = self.inp(x)
        b, t, _ = h.shape
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = self.q(h).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = q * cos + self.rotate_half(q) * sin, k * cos + self.rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.head(h + self.o(a.transpose(1, 2).reshape(b, t, -1)))


class InForward(nn.Module):
    """A module created inside forward, a defaulted argument and shape-dependent Python."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x, scale=None):
        h = nn.ReLU()(self.a(x))
        if h.shape[0] > 1:  # Python control flow on a shape: fine for torch.export
            h = h * 2
        return self.b(h) if scale is None else self.b(h) * scale


class SwiGLUFused(nn.Module):
    """A fused gate/up projection split with chunk (split_with_sizes in ATen)."""

    def __init__(self):
        super().__init__()
        self.inp, self.gate_up, self.down, self.head = nn.Linear(4, 8), nn.Linear(8, 24), nn.Linear(12, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        g, u = self.gate_up(h).chunk(2, dim=-1)
        return self.head(h + self.down(F.silu(g) * u))


class DropPath(nn.Module):
    """Stochastic depth (a per-sample mask in training, the identity in eval) on a residual branch."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.a(x)
        branch = self.b(h)
        if self.training:
            keep = torch.ones(branch.shape[0], 1, 1, 1).bernoulli_(0.9) / 0.9
            branch = branch * keep
        return self.head(h + branch)


class Select(nn.Module):
    """BERT's pooler: take token 0 (select on the sequence axis), then a dense layer."""

    def __init__(self):
        super().__init__()
        self.a, self.pool, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.head(torch.tanh(self.pool(h[:, 0])))


def _images(*shape):
    return lambda batch=4, seed=0: torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


CASES = [
    # a out 4 (whole, kept), b out 4 -> first 2 kept (a group), last 2 dropped (frozen).
    ("slice_cat", SliceCat, _images(3, 5, 5), [2, 4]),
    # a out 8 = (2 groups x 4) after the shuffle's view.
    ("channel_shuffle", Shuffle, _images(3, 4, 4), [2, 4]),
    # stream 16; kv heads 2 x query-group 2; rotary pairs 2 (shared by q/k and inv_freq); v/o dims 4.
    ("rope_gqa", RoPEAttention, _images(6, 5), [2, 2, 2, 4, 16]),
    ("module_in_forward", InForward, _images(4), [8]),
    # inp 8 (stream); gate/up 12 each, the SwiGLU pairs them: one group of 12.
    ("swiglu_fused", SwiGLUFused, _images(5, 4), [8, 12]),
    ("drop_path", DropPath, _images(3, 4, 4), [8]),
    ("select_token", Select, _images(6, 4), [8, 8]),
]


@pytest.mark.parametrize("name,cls,make_input,sizes", CASES, ids=[c[0] for c in CASES])
def test_aten_rule_keeps_function(name, cls, make_input, sizes):
    torch.manual_seed(0)
    model = cls().eval()
    spec = tm.discover(model, make_input(), capture_method="export")
    assert sorted(g.size for g in spec.groups.values()) == sorted(sizes), spec
    for seed in (0, 1, 2):
        twin = tm.permute(model, spec, spec.random_perms(seed=seed))
        x = make_input(batch=3, seed=seed + 10)
        for train in (False, True):  # train mode: random masks drawn from one seed for both
            model.train(train), twin.train(train)
            with torch.no_grad():
                torch.manual_seed(seed)
                want = model(x)
                torch.manual_seed(seed)
                torch.testing.assert_close(twin(x), want, rtol=1e-4, atol=1e-5)
        model.eval()


def test_dropped_slice_tail_is_frozen_and_reported():
    model = SliceCat().eval()
    spec = tm.discover(model, _images(3, 5, 5)(), capture_method="export")
    dropped = [f for f in spec.frozen if f.reason.startswith("dropped by a slice")]
    assert [f.size for f in dropped] == [2] and ("b.weight", 0) in dropped[0].members, spec


def test_rotary_pairs_move_with_inv_freq():
    model = RoPEAttention().eval()
    spec = tm.discover(model, _images(6, 5)(), capture_method="export")
    pairs = [g for g in spec.groups.values() if ("inv_freq", 0) in g.members]
    assert len(pairs) == 1 and pairs[0].size == 2 and ("q.weight", 0) in pairs[0].members, spec


def test_integer_buffers_are_never_permuted():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.fc = nn.Embedding(10, 4), nn.Linear(4, 2)
            self.register_buffer("ids", torch.arange(10)[None])

        def forward(self, x):
            return self.fc(x + self.pos(self.ids[:, : x.shape[1]]))

    spec = tm.discover(Positions().eval(), torch.randn(2, 6, 4), capture_method="export")
    assert not [m for g in spec.groups.values() for m in g.members if m[0] == "ids"], spec


# ----------------------------------------------------------------- verification is not vacuous

def test_verify_spec_raises_on_a_planted_wrong_group():
    """A spec whose group misses a consumer must fail verification, naming the group."""
    import dataclasses

    from torchmerge.spec import Group

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    spec = tm.discover(model, x)
    name = next(n for n, g in spec.groups.items() if ("2.weight", 1) in g.members)
    g = spec.groups[name]
    broken_group = Group(g.name, g.size, tuple(m for m in g.members if m != ("2.weight", 1)))
    broken = dataclasses.replace(spec, groups={**spec.groups, name: broken_group},
                                 axes={k: v for k, v in spec.axes.items() if k != ("2.weight", 1)})
    with pytest.raises(tm.VerificationError, match=name.replace(".", r"\.")):
        tm.verify_spec(model, broken, x)
    tm.verify_spec(model, spec, x)  # the discovered spec passes


def test_verify_compares_every_output():
    """An extra output the permuted model gets wrong is not ignored (no zip truncation)."""
    from torchmerge.discover import _close

    a = [torch.ones(2), torch.zeros(2)]
    assert _close(a, [torch.ones(2), torch.zeros(2)])
    assert not _close(a, [torch.ones(2)])
    assert not _close(a, [torch.ones(2), torch.ones(2)])
    assert not _close(a, [torch.ones(2), torch.zeros(3)])
