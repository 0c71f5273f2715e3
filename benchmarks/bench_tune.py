"""``correction="affine+tune"``: the tuning loop with the experts' logits kept between passes over
the batches vs recomputed every step (the former behaviour).

Usage:  python benchmarks/bench_tune.py [--steps 200] [--batches 16] [--repeats 2] [--device cpu]

Model: two ``transformers.GPT2LMHeadModel`` (vocabulary 256, 64 positions, width 64, 2 layers,
4 heads; random init, the second perturbed), merged by averaging; ``correct.tune`` of task 0 with
per-task rank-8 maps at the 8 sites, ``--steps`` Adam steps over ``--batches`` batches of 32 × 64
tokens. Kept: the expert runs once per batch; recomputed (``TARGET_CACHE_BYTES = 0``): once per
step. Timed in alternation (``--repeats`` rounds, median); both end at the same tuned rows (checked).
Also the inference cost of the maps: a forward of the task-conditioned merged model with rank-8
maps vs with affines only, on the same batches (``--repeats`` alternating rounds of 5 passes).
Prints a table and writes ``benchmarks/results/tune.json``. Target: ratio (kept / recomputed) <= 0.85.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torchmerge as tm  # noqa: E402
from torchmerge import correct  # noqa: E402

TARGET_RATIO = 0.85


def gpt2_pair(device):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    a = GPT2LMHeadModel(config).eval().to(device)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return [a, b]


def tuned_rows(merged, expert, batches, steps, cache_bytes) -> tuple[float, dict]:
    model = copy.deepcopy(merged)
    correct.TARGET_CACHE_BYTES = cache_bytes
    t0 = time.perf_counter()
    correct.tune(model, expert, batches, 0, steps=steps)
    if batches[0]["input_ids"].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, {k: v.clone() for k, v in model.state_dict().items() if k.startswith("task_sites")}


def inference_ratio(with_maps, affine_only, batches, repeats) -> float:
    """Median seconds of 5 no-grad passes over ``batches``, with maps / without (alternating)."""
    def passes(model):
        model.set_task(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(5):
                for b in batches:
                    model(**b)
        return time.perf_counter() - t0
    times = {"maps": [], "affine": []}
    for _ in range(repeats):
        times["maps"].append(passes(with_maps))
        times["affine"].append(passes(affine_only))
    return statistics.median(times["maps"]) / statistics.median(times["affine"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    experts = gpt2_pair(device)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 256, (32, 64), generator=gen).to(device)} for _ in range(args.batches)]
    data = [batches, batches]
    merged = tm.merge(experts, method="average", data=data, align=None, correction="affine", heads=["lm_head"])
    affine_only = copy.deepcopy(merged)
    for site in merged.sites().values():
        site.add_low_rank(8, torch.Generator().manual_seed(0))
    default = correct.TARGET_CACHE_BYTES
    kept_s, recomputed_s = [], []
    try:
        for _ in range(args.repeats):
            seconds, kept_rows = tuned_rows(merged, experts[0], batches, args.steps, default)
            kept_s.append(seconds)
            seconds, recomputed_rows = tuned_rows(merged, experts[0], batches, args.steps, 0)
            recomputed_s.append(seconds)
    finally:
        correct.TARGET_CACHE_BYTES = default
    if not kept_rows:
        raise RuntimeError("no site tensors found under task_sites: the benchmark compares nothing")
    same = all(torch.equal(v, recomputed_rows[k]) for k, v in kept_rows.items())
    ratio = statistics.median(kept_s) / statistics.median(recomputed_s)
    inference = inference_ratio(merged, affine_only, batches, args.repeats)
    result = {"benchmark": "tune: expert logits kept vs recomputed", "device": str(device),
              "threads": args.threads, "steps": args.steps, "batches": args.batches, "repeats": args.repeats,
              "kept_s": [round(s, 2) for s in kept_s], "recomputed_s": [round(s, 2) for s in recomputed_s],
              "ratio": round(ratio, 3), "target_ratio": TARGET_RATIO, "same_tuned_rows": same,
              "inference_rank8_over_affine": round(inference, 3),
              "python": platform.python_version(), "torch": torch.__version__}
    print(f"{'variant':<12} {'median s':>9}")
    print(f"{'recomputed':<12} {statistics.median(recomputed_s):>9.2f}")
    print(f"{'kept':<12} {statistics.median(kept_s):>9.2f}")
    print(f"ratio kept / recomputed {ratio:.3f} (target <= {TARGET_RATIO}); same tuned rows: {same}")
    print(f"inference, merged model with rank-8 maps / with affines only: {inference:.3f}")
    out = HERE / "results" / "tune.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
