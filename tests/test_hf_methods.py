"""Every merge method and alignment on a Hugging Face classifier with dict batches (the one batch
parser for every data path): a merge of an expert with an exactly permuted copy of itself is that
expert, whatever the method, and the output stays the model's own output object."""
from __future__ import annotations

import pytest
import torch

import torchmerge as tm

transformers = pytest.importorskip("transformers")

METHODS = ["average", "task_arithmetic", "ties", "tall", "regmean", "fisher", "mats"]
# where equal task vectors give the expert back: task arithmetic adds λ·Σ τ (λ = 1/2); TIES
# keeps every entry (k = 1); TALL's multi-task vector from TIES (the sum would double τ)
KWARGS = {"task_arithmetic": {"lam": 0.5}, "ties": {"k": 1.0},
          "tall": {"mtl": "ties", "ties_k": 1.0}}


def bert(labels=3, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37, num_labels=labels,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 99, (6, 7), generator=g) for _ in range(n)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.zeros(6, dtype=torch.long)}
            for x in ids]


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(scope="module")
def twins():
    """An expert and its base; an exact permuted copy of both (same functions, other unit order):
    the bases are aligned and each expert follows its base's permutation."""
    expert, base = bert(), bert(seed=1)
    spec = tm.discover(expert, inputs(batches()[0]))
    perms = spec.random_perms(seed=3)
    return expert, tm.permute(expert, spec, perms), [base, tm.permute(base, spec, perms)]


@pytest.mark.parametrize("align", ["weight", "activation"])
@pytest.mark.parametrize("method", METHODS)
def test_merging_a_model_with_its_permuted_copy_gives_the_model(twins, method, align):
    expert, twin, base = twins
    data = [batches(seed=1), batches(seed=2)]
    with pytest.warns(UserWarning) if method == "fisher" else _nothing():
        merged = tm.merge([expert, twin], method=method, base=base, data=data, align=align,
                          correction=None, **KWARGS.get(method, {}))
    assert isinstance(merged, type(expert)) and merged.config is not None
    for t in (0, 1):
        out = merged(**inputs(data[t][0]), task=t)
        assert type(out).__name__ == "SequenceClassifierOutput"
        with torch.no_grad():
            want = expert(**inputs(data[t][0])).logits
        torch.testing.assert_close(out.logits, want, rtol=1e-4, atol=1e-4)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
