"""Channel layouts: discovery records which axis of each value carries channels
(``node.meta["layout"]``) and the builds place each site's TaskAffine on that axis, never on a
guess from the nearest layer (issue 13 point 2, issue 17)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchmerge as tm
from architectures import BY_NAME, randomize_
from torchmerge.coupling import Walker
from torchmerge.trace import capture

C = 4  # channels == height == width: an axis guessed from the shape alone goes unnoticed


class PermutedBlock(nn.Module):
    """``fc(x channels-last).permute(0, 3, 1, 2) + conv(x)``: the add's first input comes from a
    Linear (channels last), but its output is ``[B, C, H, W]``. The Linear is registered last."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.fc = nn.Linear(C, C)

    def forward(self, x):
        z = self.fc(x.permute(0, 2, 3, 1))
        return z.permute(0, 3, 1, 2) + self.conv(x)


class PermutedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 1)
        self.blocks = nn.Sequential(PermutedBlock(), PermutedBlock())
        self.post = nn.Conv2d(C, C, 1)
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        return self.head(self.post(self.blocks(self.stem(x))).mean((2, 3)))


def _permuted_experts():
    out = []
    for seed in range(2):
        torch.manual_seed(seed)
        out.append(randomize_(PermutedNet(), seed=seed).eval())
    return out


def _images(tasks=2, batches=3, batch=16, size=C):
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(batch, 3, size, size, generator=gen) * (1 + t) + t for _ in range(batches)]
            for t in range(tasks)]


def _inputs_of(model: nn.Module, paths, run) -> dict:
    """{path: every input tensor of that module during ``run()``}: plain forward pre-hooks."""
    seen = {p: [] for p in paths}
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, args, p=p: seen[p].append(args[0].detach())) for p in paths]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(xs) for p, xs in seen.items()}


def _channel_moments(x: torch.Tensor, axis: int):
    x = x.movedim(axis, 0).reshape(x.shape[axis], -1).double()
    return x.mean(1), x.var(1, unbiased=False)


def _assert_site_statistics(merged, experts, data, paths, axes, find=lambda m, p: m.get_submodule(p)):
    """The merged model's activations entering ``paths`` (after the sites' affines) have each
    expert's per-channel mean and variance on its own task's data, along ``axes``."""
    for t, expert in enumerate(experts):
        want = _inputs_of(expert, paths, lambda: [expert(x) for x in data[t]])
        owners = {p: find(merged, p) for p in paths}
        got = {p: [] for p in paths}
        handles = [m.register_forward_pre_hook(lambda m, args, p=p: got[p].append(args[0].detach()))
                   for p, m in owners.items()]
        try:
            with torch.no_grad():
                for x in data[t]:
                    merged(x, task=t)
        finally:
            for h in handles:
                h.remove()
        for p, axis in zip(paths, axes):
            mean_e, var_e = _channel_moments(want[p], axis)
            mean_m, var_m = _channel_moments(torch.cat(got[p]), axis)
            sigma = (var_e + 1e-6).sqrt()
            assert ((mean_m - mean_e).abs() / sigma).max() < 0.1, (t, p)
            assert ((var_m.sqrt() - var_e.sqrt()).abs() / sigma).max() < 0.1, (t, p)


def _graph_module(merged, path):
    """The merged fx body's module at ``path`` (the graph keeps the expert's module paths)."""
    return next(m for name, m in merged.named_modules() if name.endswith("." + path) or name == path)


# --------------------------------------------------------------------------- recorded layouts

def test_discovery_records_each_nodes_layout():
    model = PermutedNet().eval()
    gm = capture(model, torch.randn(2, 3, C, C))
    Walker(gm, model).run()
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in n.name]
    assert adds and all([a.kind for a in n.meta["layout"]] == ["data", "channel", "data", "data"]
                        for n in adds)
    fc = next(n for n in gm.graph.nodes if n.target == "blocks.0.fc")
    assert [a.kind for a in fc.meta["layout"]] == ["data", "data", "data", "channel"]


# --------------------------------------------------------------------------- z.permute(0, 3, 1, 2) + y

@pytest.mark.parametrize("build", ["graph", "inject"])
def test_site_after_permuted_add_is_on_the_channel_axis(build):
    experts, data = _permuted_experts(), _images()
    merged = tm.merge(experts, method="average", data=data, align=None, heads=["head"],
                      sites="block", build=build)
    sites = list(merged.sites().values())
    assert len(sites) == 2 and all(s.channel_axis in (1, -3) and s.scale.shape[1] == C for s in sites)
    find = _graph_module if build == "graph" else (lambda m, p: m.get_submodule(p))
    _assert_site_statistics(merged, experts, data, ["blocks.1.conv", "post"], [1, 1], find)


# --------------------------------------------------------------------------- attention, cat

def _vit_experts():
    case = BY_NAME["vit"]
    out = []
    for seed in range(2):
        torch.manual_seed(seed)
        out.append(randomize_(case.model_cls(), seed=seed).eval())
    return out


def _context(node, module) -> bool:
    """The merged-heads attention context: the reshape that feeds each attention's output projection."""
    return node.op == "call_method" and node.target == "reshape" \
        and any(str(u.target).endswith("attn.proj") for u in node.users)


@pytest.mark.parametrize("which", ["block", "functional"])
def test_transformer_sites_after_cat_and_attention_context(which):
    experts = _vit_experts()
    data = [[BY_NAME["vit"].make_input(16, 10 * t + b) * (1 + t) for b in range(3)] for t in range(2)]
    chosen = "block" if which == "block" else \
        (lambda node, m: _context(node, m) or (node.op == "call_function" and node.name == "cat"))
    merged = tm.merge(experts, method="average", data=data, align="weight", heads=["head"],
                      sites=chosen, build="graph")
    sites = merged.sites()
    names = [s.site_node for s in sites.values()]
    assert (names[0] == "add" and len(names) == 5) if which == "block" else \
        (names[0] == "cat" and sum(n.startswith("reshape") for n in names) == 2), names
    assert all(s.channel_axis == -1 and s.scale.shape[1] == 16 for s in sites.values())
    aligned = [tm.permute(e, merged.info["spec"], p)
               for e, p in zip(experts, merged.info["merge_info"]["perms"])]
    paths = ["blocks.1.norm1"] if which == "block" else ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    _assert_site_statistics(merged, aligned, data, paths, [-1] * len(paths), _graph_module)


def test_site_on_unmerged_heads_names_node_module_and_shape():
    experts = _vit_experts()
    heads = lambda node, m: node.op == "call_method" and node.target == "transpose" \
        and any(_context(u, None) for u in node.users)  # [B, T, heads, head_dim]: two channel axes
    with pytest.raises(tm.TorchMergeError) as e:
        tm.merge(experts, method="average", align=None, heads=["head"], sites=heads, build="graph",
                 correction=None, example_inputs=BY_NAME["vit"].make_input(2, 0))
    msg = str(e.value)
    assert "blocks.0.attn" in msg and "(2, 5, 2, 8)" in msg and "heads" in msg, msg


# --------------------------------------------------------------------------- Hugging Face

def test_hf_vit_block_and_embedding_sites_reproduce_the_expert():
    """ViTForImageClassification (injected build): sites after the patch embedding (a conv whose
    output is flattened into tokens), the embeddings (cat + position) and every layer sit on the
    hidden axis; merging two copies of one expert reproduces it."""
    pytest.importorskip("transformers")
    from hf_zoo import HF_BY_NAME, call
    case = HF_BY_NAME["vit_cls"]
    expert = case.make_model()
    data = [[case.make_inputs(4, s) for s in range(2)] for _ in range(2)]
    kinds = ("ViTPatchEmbeddings", "ViTEmbeddings", "ViTLayer")
    merged = tm.merge([expert, expert], method="average", data=data, align=None,
                      sites=lambda path, m: type(m).__name__ in kinds)
    sites = merged.sites()
    assert merged.info["build"] == "inject" and len(sites) == 4
    assert all(s.channel_axis == -1 and s.scale.shape[1] == 32 for s in sites.values())
    batch = case.make_inputs(3, 7)
    want = call(expert, batch).logits
    for t in range(2):
        with torch.no_grad():
            got = merged(**batch, task=t).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
