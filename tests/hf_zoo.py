"""Tiny random-init Hugging Face transformers models with example inputs as keyword dicts.

Every :class:`HFCase` builds its model from a config (no downloads): 2 layers, hidden 32-64,
vocabulary 100, sequences of 7 tokens, 16x16 images in 4x4 patches, so that one discovery takes
well under 2 s on a CPU. Models are in eval mode with fixed seeds, and every constant tensor
(LayerNorm weights of ones, zero biases) is randomised so that permuting it is observable.
``make_inputs(batch, seed)`` returns the keyword arguments of one batch, e.g.
``{"input_ids": ..., "attention_mask": ..., "use_cache": False}`` (causal LMs need
``use_cache=False`` to be captured); text masks pad the tail of every other row.

``target`` is the issue's permuted-channel share (see ``benchmarks/bench_coverage.py`` for the
definition); ``floor`` is what the tests assert (the share the implementation reaches today,
when that is below the target). ``attn`` selects ``attn_implementation`` ("sdpa" or "eager").

Used by tests/test_hf_discover.py and benchmarks/bench_coverage.py; imports transformers lazily
so the module itself imports without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from architectures import randomize_

VOCAB, SEQ, IMAGE, PATCH = 100, 7, 16, 4
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=32, initializer_range=0.2)


# --------------------------------------------------------------------------- inputs

def text_inputs(batch: int = 2, seed: int = 0, *, seq: int = SEQ, mask: bool = True,
                causal: bool = False) -> dict:
    """Random token ids; the mask pads the last 2 tokens of every odd row."""
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.long)
        m[1::2, -2:] = 0
        out["attention_mask"] = m
    if causal:
        out["use_cache"] = False
    return out


def causal_inputs(batch: int = 2, seed: int = 0, *, seq: int = SEQ) -> dict:
    return text_inputs(batch, seed, seq=seq, causal=True)


def image_inputs(batch: int = 2, seed: int = 0, **_) -> dict:
    """Random 16x16 images (a ``seq`` argument is ignored: the patch grid is fixed)."""
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=g)}


# --------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class HFCase:
    name: str
    build: Callable[[str], nn.Module]        # attn_implementation -> model (random init)
    make_inputs: Callable[..., dict]         # (batch=2, seed=0) -> keyword arguments
    target: float                            # the permuted-channel share
    floor: float | None = None               # asserted share (None: the target)
    attn: str = "sdpa"
    note: str = field(default="", compare=False)

    def make_model(self, attn: str | None = None) -> nn.Module:
        torch.manual_seed(0)
        model = self.build(attn or self.attn)
        return randomize_(model, seed=1).eval()

    @property
    def min_coverage(self) -> float:
        return self.target if self.floor is None else self.floor

    def __str__(self):
        return self.name


def _hf(model_cls: str, config_cls: str, **config):
    """A builder: ``transformers.<model_cls>(transformers.<config_cls>(**config))``."""
    def build(attn: str) -> nn.Module:
        import transformers
        cfg = getattr(transformers, config_cls)(**config)
        cfg._attn_implementation = attn
        return getattr(transformers, model_cls)(cfg)
    return build


_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=32, initializer_range=0.2)
_VIT = dict(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, initializer_range=0.2)

HF_CASES = [
    # outputs last_hidden_state + pooler_output: the residual stream is a model output (fixed)
    HFCase("bert", _hf("BertModel", "BertConfig", **_TEXT), text_inputs, 0.95,
           note="stream is the model output"),
    HFCase("bert_cls", _hf("BertForSequenceClassification", "BertConfig", num_labels=3, **_TEXT),
           text_inputs, 0.95),
    HFCase("roberta_cls", _hf("RobertaForSequenceClassification", "RobertaConfig", num_labels=3,
                              pad_token_id=1, **_TEXT), text_inputs, 0.95),
    HFCase("distilbert_cls", _hf("DistilBertForSequenceClassification", "DistilBertConfig",
                                 vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                 max_position_embeddings=32, num_labels=3, initializer_range=0.2),
           text_inputs, 0.95),
    HFCase("vit_cls", _hf("ViTForImageClassification", "ViTConfig", num_labels=3, **_VIT),
           image_inputs, 0.95),
    # outputs last_hidden_state (pre-norm stream) + pooler_output (post_layernorm of the cls token)
    HFCase("clip_vision", _hf("CLIPVisionModel", "CLIPVisionConfig", **_VIT), image_inputs, 0.95,
           note="stream is the model output"),
    # tied lm_head = wte; Conv1D layers ([in, out] weights)
    HFCase("gpt2_lm", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2,
                          n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
                          initializer_range=0.2), causal_inputs, 0.95),
    # GQA: 8 query heads, 2 key/value heads of dim 8; RoPE; SwiGLU
    HFCase("llama_gqa", _hf("LlamaForCausalLM", "LlamaConfig", **_LLAMA), causal_inputs, 0.90),
    HFCase("mistral_gqa", _hf("MistralForCausalLM", "MistralConfig", sliding_window=4, **_LLAMA),
           causal_inputs, 0.90),
    # relative position bias; RMSNorm without mean; outputs last_hidden_state
    HFCase("t5_encoder", _hf("T5EncoderModel", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                             num_layers=2, num_heads=4, initializer_factor=1.0), text_inputs, 0.95,
           note="stream is the model output"),
    # one layer's weights shared by both layers; factorised embedding 16 -> 32
    HFCase("albert", _hf("AlbertModel", "AlbertConfig", embedding_size=16, **_TEXT), text_inputs, 0.95,
           note="shared layer; stream is the model output"),
    # tied input/output embeddings on Llama (not tied by default)
    HFCase("llama_tied", _hf("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True, **_LLAMA),
           causal_inputs, 0.90),
]

HF_IDS = [c.name for c in HF_CASES]
HF_BY_NAME = {c.name: c for c in HF_CASES}


def bert_base(seq: int = 128, batch: int = 1):
    """A BERT-base-size BertForSequenceClassification (hidden 768, 12 layers, 12 heads, FFN 3072,
    random init) and its inputs: the issue's < 2 s discovery timing case."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                  num_attention_heads=12, intermediate_size=3072, num_labels=2)
    cfg._attn_implementation = "sdpa"
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    return model, inputs


# --------------------------------------------------------------------------- outputs

def call(model: nn.Module, inputs):
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple, ``model(inputs)`` otherwise."""
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def flat_outputs(out, prefix: str = "out") -> dict:
    """{path: tensor} for every tensor in a (nested) model output: ModelOutput, dict, tuple."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    items = out.items() if isinstance(out, dict) else enumerate(out) if isinstance(out, (tuple, list)) else ()
    flat: dict = {}
    for k, v in items:
        flat.update(flat_outputs(v, f"{prefix}.{k}"))
    return flat


# --------------------------------------------------------------------------- coverage

# Frozen reasons that mark an axis as the model's own input/output (task heads, vocabulary):
# such axes are outside the coverage measure.
EXCLUDED = frozenset({"model output", "model input", "embedding rows are indexed by input ids"})


def output_axes(model: nn.Module) -> list:
    """(module path, weight tensor, output axis) for every Linear, Conv, ConvTranspose (groups=1),
    Embedding (the embedding-dim axis 1) and transformers Conv1D (``[in, out]`` weight, axis 1)."""
    found = []
    for path, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            found.append((path, w, 0))
        elif isinstance(m, nn.modules.conv._ConvTransposeNd) and m.groups == 1:
            found.append((path, w, 1))
        elif isinstance(m, nn.Embedding):
            found.append((path, w, 1))
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            found.append((path, w, 1))
    return found


def share(expr, strict: bool = False) -> float:
    """Fraction of an axis's indices that a group acts on.

    ``("g", ...)``: 1; ``("fixed", n)``: 0; ``cat``: size-weighted mean of its blocks; ``prod``:
    an index (i1, i2, ...) counts if any factor's coordinate is acted on, i.e. 1 - prod(1 - s_k)
    (heads x dims with only the dims permuted counts fully). ``strict``: a prod counts only the
    indices whose every factor of size > 1 is acted on, i.e. prod(s_k).
    """
    kind = expr[0]
    if kind == "g":
        return 1.0
    if kind == "fixed":
        return 0.0
    parts = [(share(p, strict), p[-1]) for p in expr[1]]
    if kind == "cat":
        return sum(s * n for s, n in parts) / expr[-1]
    if strict:
        out = 1.0
        for s, n in parts:
            out *= s if n > 1 else 1.0
        return out
    rest = 1.0
    for s, _ in parts:
        rest *= 1.0 - s
    return 1.0 - rest


def coverage(model: nn.Module, spec) -> dict:
    """Share of output channels permuted (see ``benchmarks/bench_coverage.py``).

    Every Linear/Conv/Conv1D output axis and Embedding dimension axis of ``output_axes`` is
    counted once per tensor (tied weights once); axes the spec freezes as the model's input or
    output (``EXCLUDED`` reasons: task heads, vocabulary) are left out. Returns ``channels``
    (counted), ``share`` (permuted fraction, any-factor rule), ``strict_share``, ``excluded``
    (channels left out) and ``lost`` ({frozen reason: unpermuted channels}, largest first).
    """
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    frozen_at: dict = {}
    for f in spec.frozen:
        for member in f.members:
            frozen_at.setdefault(tuple(member[:2]), []).append(f)
    seen, channels, permuted, strict, excluded = set(), 0, 0.0, 0.0, 0
    lost: dict = {}
    for path, w, axis in output_axes(model):
        key = (names.get(id(w), f"{path}.weight"), axis)
        if key in seen:
            continue
        seen.add(key)
        size, expr = w.shape[axis], spec.axes.get(key)
        reasons = [f.reason for f in frozen_at.get(key, ())]
        if expr is None and any(r in EXCLUDED for r in reasons):
            excluded += size
            continue
        s = share(expr) if expr is not None else 0.0
        channels += size
        permuted += s * size
        strict += (share(expr, strict=True) if expr is not None else 0.0) * size
        if s < 1.0:
            why = next((r for r in reasons if r not in EXCLUDED), reasons[0] if reasons else "in no group")
            lost[why] = lost.get(why, 0) + round((1.0 - s) * size)
    return {
        "channels": channels,
        "share": permuted / channels if channels else 0.0,
        "strict_share": strict / channels if channels else 0.0,
        "excluded": excluded,
        "lost": dict(sorted(lost.items(), key=lambda kv: -kv[1])),
    }
