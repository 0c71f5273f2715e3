"""``tm.merge`` end to end: every method by name, bases, sites and heads options, bad input."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torchmerge as tm
from architectures import BY_NAME, randomize_
from zoo_ops import MLP

ALL_METHODS = ["average", "task_arithmetic", "ties", "dare", "tall", "consensus", "regmean", "fisher",
               "mats", "pleas"]


def _labelled(n_tasks=2, batches=3, batch=16, dim=8, classes=3):
    gen = torch.Generator().manual_seed(0)
    return [[(torch.randn(batch, dim, generator=gen) + t, torch.randint(0, classes, (batch,), generator=gen))
             for _ in range(batches)] for t in range(n_tasks)]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_copies_of_one_model_merge_to_that_model(method):
    expert = randomize_(MLP(), seed=3).eval()
    data = _labelled(3)
    correction = None if method == "pleas" else "affine"
    copies = [copy.deepcopy(expert) for _ in range(3)]
    if method == "pleas":  # PLeaS fits layers itself; the other methods see identical experts
        merged = tm.merge(copies, method=method, base=expert, data=data, correction=correction)
    else:
        with pytest.warns(UserWarning, match="all 3 experts are identical"):
            merged = tm.merge(copies, method=method, base=expert, data=data, correction=correction)
    with torch.no_grad():
        for t in range(3):  # PLeaS fits each task by ridge least squares on its own data
            x = data[t][0][0]
            assert torch.allclose(merged(x, task=t), expert(x), atol=2e-3 if method == "pleas" else 1e-5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_by_name_on_a_conv_net(method):
    case = BY_NAME["resnet_basic"]
    experts = [randomize_(case.model_cls(), seed=s).eval() for s in range(2)]
    base = randomize_(case.model_cls(), seed=5)  # task-vector methods need one (else they warn)
    data = [[(case.make_input(8, 10 * t + b), torch.randint(0, 5, (8,))) for b in range(2)] for t in range(2)]
    merged = tm.merge(experts, method=method, base=base, data=data,
                      correction=None if method == "pleas" else "affine")
    out = merged(data[0][0][0], task=torch.tensor([0, 1] * 4))
    assert out.shape == (8, 5) and torch.isfinite(out).all()
    assert merged.info["method"] == method


def test_per_expert_bases_share_their_base_permutation():
    torch.manual_seed(0)
    bases = [randomize_(MLP(), seed=s) for s in (1, 2)]
    experts = []
    for b in (bases[0], bases[0], bases[1], bases[1]):
        e = copy.deepcopy(b)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.01 * torch.randn_like(p))
        experts.append(e)
    merged = tm.merge(experts, method="task_arithmetic", base=[bases[0], bases[0], bases[1], bases[1]],
                      data=_labelled(4), correction="affine")
    perms = merged.info["merge_info"]["perms"]
    for g in perms[0]:
        assert torch.equal(perms[0][g], perms[1][g]) and torch.equal(perms[2][g], perms[3][g])
        assert torch.equal(perms[0][g], torch.arange(len(perms[0][g])))


def test_activation_alignment_and_block_sites():
    case = BY_NAME["resnet_basic"]
    experts = [randomize_(case.model_cls(), seed=s).eval() for s in range(2)]
    data = [[case.make_input(8, 10 * t + b) for b in range(2)] for t in range(2)]
    merged = tm.merge(experts, method="average", data=data, align="activation", sites="block",
                      correction="affine")
    assert len(merged.sites()) == 4  # one per residual add
    assert all("add" in name for name in merged.sites())


def test_callable_heads_and_sites():
    experts = [randomize_(MLP(), seed=s) for s in range(2)]
    merged = tm.merge(experts, method="average", data=_labelled(), correction="affine",
                      heads=lambda path, module: path == "head",
                      sites=lambda node, module: isinstance(module, nn.Linear))
    assert list(merged.heads()) == ["head"]
    assert len(merged.sites()) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "nope"}, "unknown merge method 'nope'; valid: 'average'"),
    ({"correction": "bn"}, "unknown correction 'bn'"),
    ({"method": "ties", "k": 1.5}, "k"),
    ({"method": "ties", "lam": -1.0}, "lam"),
    ({"method": "ties", "kappa": 1}, "unknown hyper-parameter"),
    ({"data": None}, "correction='affine' needs data="),
    ({"data": None, "correction": None, "method": "regmean"}, "method='regmean' needs data="),
    ({"data": None, "correction": None, "align": "activation"}, "align='activation'"),
    ({"data": _labelled(3)}, "data has 3 entries for 2 experts"),
    ({"base": [MLP()]}, "base must be None, one module, or 2 modules"),
    ({"task_names": ["a"]}, "1 task names for 2 experts"),
    ({"method": "pleas", "correction": "affine"}, "pass correction=None"),
    ({"align": "telepathy"}, "unknown alignment method"),
])
def test_bad_input(kwargs, match):
    experts = [randomize_(MLP(), seed=s) for s in range(2)]
    kwargs = {"data": _labelled(), **kwargs}
    with pytest.raises(tm.TorchMergeError, match=match):
        tm.merge(experts, **kwargs)


def test_experts_must_be_modules_of_one_class():
    with pytest.raises(tm.TorchMergeError, match="non-empty list"):
        tm.merge([], data=None, correction=None)
    with pytest.raises(tm.TorchMergeError, match="share one architecture"):
        tm.merge([MLP(), nn.Linear(8, 3)], correction=None, example_inputs=torch.randn(2, 8))
    with pytest.raises(tm.TorchMergeError, match="example_inputs"):
        tm.merge([MLP(), MLP()], correction=None)


def test_ddp_wrapping_trains_task_parameters(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        experts = [randomize_(MLP(), seed=s) for s in range(2)]
        merged = tm.merge(experts, method="average", data=_labelled(), correction="affine")
        for p in merged.parameters():
            p.requires_grad_(False)
        trainable = list(merged.task_parameters())
        for p in trainable:
            p.requires_grad_(True)
        model = nn.parallel.DistributedDataParallel(merged, find_unused_parameters=True)
        before = [p.detach().clone() for p in trainable]
        opt = torch.optim.SGD(trainable, lr=0.1)
        x, y = _labelled()[0][0]
        nn.functional.cross_entropy(model(x, task=torch.tensor([0, 1] * 8)), y).backward()
        opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, trainable))
    finally:
        dist.destroy_process_group()


def test_align_auto_is_activation_matching_for_transformers_with_data_else_weight_matching():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, num_labels=2)
    berts = [transformers.BertForSequenceClassification(config).eval() for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    text = [[{"input_ids": torch.randint(0, 30, (4, 6), generator=gen)}] for _ in range(2)]
    mlps = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2)]
    vectors = [[torch.randn(8, 4)] for _ in range(2)]
    chosen = {
        "bert, data": tm.merge(berts, data=text, correction="affine").info["align"],
        "bert, no data": tm.merge(berts, method="average", example_inputs=text[0][0], correction=None).info["align"],
        "mlp, data": tm.merge(mlps, data=vectors, correction="affine").info["align"],
    }
    assert chosen == {"bert, data": "activation", "bert, no data": "weight", "mlp, data": "weight"}
