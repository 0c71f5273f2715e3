"""Shared helpers of the merged-model tests (test_merged, test_inject, test_io): the table of
architectures with automatic heads, inputs as tuples, perturbed experts, random affines."""
from __future__ import annotations

import copy

import torch

from architectures import CASES, SAFETY_ONLY

# heads="auto" does not apply: parameters used functionally / a model returning its stream
NO_AUTO_HEADS = {"functional_params", "stream_output"}
TABLE = [c for c in CASES + SAFETY_ONLY if c.name not in NO_AUTO_HEADS]


def inputs_of(case, batch=4, seed=0) -> tuple:
    x = case.make_input(batch, seed)
    return x if isinstance(x, tuple) else (x,)


def perturbed_experts(case, n=2) -> list:
    """n experts of one architecture: the case's model and perturbed copies (parameters only)."""
    base = case.make_model().eval()
    out = [base]
    for i in range(1, n):
        other = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        out.append(other)
    return out


def randomize_sites(model, seed=0, rank=0) -> None:
    """Non-identity affines at every site (scales in [0.5, 1.5), shifts ~ N(0, 1)); ``rank``:
    low-rank maps too (``up`` ~ N(0, 0.3²), so they change the outputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in model.sites().values():
            site.scale.copy_(0.5 + torch.rand(site.scale.shape, generator=gen))
            site.shift.copy_(torch.randn(site.shift.shape, generator=gen))
            if rank:
                site.add_low_rank(min(rank, site.scale.shape[1]), gen)
                site.up.copy_(0.3 * torch.randn(site.up.shape, generator=gen))


def tiny_bert(num_labels, seed):
    """A tiny random-init transformers BertForSequenceClassification (skips without transformers)."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config).eval()


def bert_batches(num_labels, seed, batches=2, batch=4) -> list:
    """Dict batches (input_ids, attention_mask, labels) for :func:`tiny_bert`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(1, 99, (batch, 7), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, num_labels, (batch,), generator=gen)})
    return out


def close(a, b, atol=1e-5) -> bool:
    """Outputs (a tensor, or a tuple/list of them) equal within tolerance; every one compared."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(close(x, y, atol) for x, y in zip(a, b))
    return torch.allclose(a, b, atol=atol, rtol=1e-4)


def check_mixed_batch(merged, case, close_fn=close) -> None:
    """A mixed-task batch (per-sample ids) equals each task's own run on its rows."""
    x6, ids = inputs_of(case, batch=6), torch.tensor([1, 0, 0, 1, 1, 0])
    mixed = merged(*x6, task=ids)
    for t in range(2):
        rows = (ids == t).nonzero().squeeze(1)
        single = merged(*[v[rows] for v in x6], task=t)
        got = [m[rows] for m in mixed] if isinstance(mixed, tuple) else mixed[rows]
        assert close_fn(got, single), f"task {t}: mixed-batch rows differ from the task's own run"


def plain_average(merged, experts, task):
    """The average of the experts, written into a copy of expert ``task`` (its own head kept):
    what a merge with identity affines must compute (graph build heads sit under ``body.``)."""
    heads = [h.removeprefix("body.") for h in merged.heads()]
    own = experts[task].state_dict()
    state = {k: own[k] if any(k.startswith(h + ".") for h in heads) or not v.is_floating_point()
             else sum(e.state_dict()[k] for e in experts) / len(experts)
             for k, v in own.items()}
    plain = copy.deepcopy(experts[task]).eval()
    plain.load_state_dict(state)
    return plain


def task_vector_experts(base, n=3):
    """n experts θ₀ + τ_t around ``base``, each τ_t a different seeded random vector (so TALL
    masks differ between tasks); ``base`` is left as it is."""
    experts = []
    for t in range(n):
        expert = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        experts.append(expert)
    return experts
