"""``tm.merge`` of two BERT-base-size classifiers: wall time per stage and peak memory (CPU).

Usage:  python benchmarks/bench_hf_merge.py [--layers 12] [--batches 8] [--batch 16] [--seq 128]

The issue's setting: two ``BertForSequenceClassification`` experts (hidden 768, 12 layers, 12
heads, FFN 3072; heads of 2 and 3 labels), weight matching and the affine correction, 8 batches of
16 × 128 tokens per task (dict batches with labels), in two cases:

- ``independent``: two random inits, the worst case for weight matching (no structure to find:
  about 11 sweeps, each re-solving every 3072-wide MLP assignment);
- ``finetuned``: the usual case, two fine-tunes of one pretrained model, stood in for by one random
  init plus a small random task vector per expert (1 % of each tensor's std).

Random weights: the timing and memory are the point, not the accuracy. The run happens in a subprocess (``--worker``) so its peak
resident set (``VmHWM``, reset after the experts are built) is its own, with
``MALLOC_MMAP_THRESHOLD_`` set so RSS follows live tensors (see bench_methods.py). Reported:

- ``seconds`` of the whole call, and a reference: the plain forward passes the correction needs
  (one expert pass and two merged passes per task over its batches), timed on the expert;
- ``peak_copies``: peak RSS growth over the RSS before the experts were built, in units of one
  expert's parameter bytes — the target is ≤ T + 2 (here 4), experts included.

Prints a table and writes ``benchmarks/results/hf_merge.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_methods import max_rss_bytes, reset_peak, rss_bytes  # noqa: E402


CASES = ("independent", "finetuned")


def build(layers: int, batches: int, batch: int, seq: int, case: str = "independent"):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    experts = []
    for labels in (2, 3):
        cfg = BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                         intermediate_size=3072, num_labels=labels)
        experts.append(BertForSequenceClassification(cfg).eval())
    if case == "finetuned":  # one pretrained body, a small task vector per expert
        body = experts[0].bert.state_dict()
        with torch.no_grad():
            for e in experts:
                e.bert.load_state_dict(body)
                for t in e.bert.parameters():
                    t.add_(torch.randn_like(t) * 0.01 * (t.std() if t.numel() > 1 else 1))
    g = torch.Generator().manual_seed(0)
    data = [[{"input_ids": torch.randint(0, 30522, (batch, seq), generator=g),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long),
              "labels": torch.randint(0, labels, (batch,), generator=g)} for _ in range(batches)]
            for labels in (2, 3)]
    return experts, data


def worker(args) -> dict:
    import torch

    import torchmerge as tm

    import transformers  # noqa: F401  (its import is not the merge's memory)
    from transformers import BertForSequenceClassification  # noqa: F401

    torch.set_num_threads(args.threads)
    before = rss_bytes()
    experts, data = build(args.layers, args.batches, args.batch, args.seq, args.case)
    copy_bytes = sum(p.numel() * p.element_size() for p in experts[0].parameters())
    stages = _timed_stages()
    reset_peak()
    t0 = time.perf_counter()
    merged = tm.merge(experts, method="average", data=data, align="weight", correction="affine")
    seconds = time.perf_counter() - t0
    peak = max_rss_bytes() - before
    # the plain forward passes calibration needs: 1 expert + 2 merged passes per task
    t1 = time.perf_counter()
    with torch.no_grad():
        for e, batches in zip(experts, data):
            for b in batches:
                e(**{k: v for k, v in b.items() if k != "labels"})
    one_pass = time.perf_counter() - t1
    return {"seconds": seconds, "plain_pass_s": one_pass, "calibration_passes_s": 3 * one_pass,
            "peak_copies": peak / copy_bytes, "copy_mb": copy_bytes / 2 ** 20,
            "sites": len(merged.sites()), "build": merged.info.get("build"),
            "groups": len(merged.info["spec"].groups), "sweeps": merged.info["alignment"]["iterations"],
            "stages_s": {k: round(v, 1) for k, v in stages.items()}}


def _timed_stages() -> dict:
    """Seconds spent in tm.merge's stages (discovery, alignment, calibration), by wrapping the
    functions the pipeline calls; the rest of ``seconds`` is merging, building and copying."""
    pipeline = sys.modules["torchmerge.pipeline"]
    seconds: dict = {}
    for name in ("discover", "align_many", "fit_affines"):
        def timed(*args, _fn=getattr(pipeline, name), _name=name, **kwargs):
            t = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - t
        setattr(pipeline, name, timed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", choices=CASES, default=None, help="one case (default: both)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MKL_DISABLE_FAST_MM": "1"}
    results = {}
    for case in [args.case] if args.case else CASES:
        cmd = [sys.executable, __file__, "--worker", f"--case={case}"] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "case")]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(out.stderr[-4000:])
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'setting':<56} {'seconds':>8} {'3 plain passes':>15} {'peak (copies)':>14}")
    for case, r in results.items():
        setting = f"BERT {args.layers}L x2 {case}, {args.batches}x{args.batch}x{args.seq}, weight+affine"
        print(f"{setting:<56} {r['seconds']:>8.1f} {r['calibration_passes_s']:>15.1f} {r['peak_copies']:>14.2f}")
    copy_mb = next(iter(results.values()))["copy_mb"]
    print(f"targets: < 120 s on 2 cores; peak <= T + 2 = 4 copies ({copy_mb:.0f} MB each)")
    payload = {"benchmark": "hf_merge", "args": vars(args), "results": results,
               "python": platform.python_version(), "machine": platform.machine()}
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "hf_merge.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
