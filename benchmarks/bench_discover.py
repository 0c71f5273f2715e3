"""Time permutation discovery and permuting on ResNet-50, ViT-B/16 and BERT-base (CPU, batch 1).

Usage:  python benchmarks/bench_discover.py [--models resnet50 vit_b16 bert_base] [--repeats 3]

Inputs: 224x224 images; ``bert_base`` is a random-init transformers BertForSequenceClassification
of BERT-base size (hidden 768, 12 layers, 12 heads, FFN 3072) on 128 tokens, given as a keyword
dict ``{"input_ids", "attention_mask"}`` and captured through torch.export (skipped when
transformers is not installed).

For each model: median wall time of ``tm.discover(model, x)`` and of
``tm.permute(model, spec, spec.random_perms(0))`` over ``--repeats`` runs after one warm-up run,
and the largest absolute output difference between the model and its permuted twin.
Prints a table and writes ``benchmarks/results/discover.json``. Target: < 2 s for each timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # hf_zoo.bert_base
sys.path.insert(0, str(HERE.parent))  # the checkout, also when not installed

import torchmerge as tm  # noqa: E402
from models import MODELS, num_params  # noqa: E402

TARGET_S = 2.0


def timed(fn, repeats: int):
    """Run ``fn`` once to warm up, then ``repeats`` times; return (median seconds, last result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bert_base():
    from hf_zoo import bert_base as make  # tests/hf_zoo.py: the zoo's BERT-base-size config
    return make(seq=128, batch=1)


def model_and_input(name: str):
    """(model in eval mode, example input: an image tensor, or a keyword dict for bert_base)."""
    if name == "bert_base":
        return bert_base()
    torch.manual_seed(0)
    return MODELS[name]().eval(), torch.randn(1, 3, 224, 224)


def forward(model, x) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(x, dict):
            return model(**x).logits
        return model(x)


def bench_one(name: str, repeats: int) -> dict:
    model, x = model_and_input(name)

    discover_s, spec = timed(lambda: tm.discover(model, x), repeats)
    perms = spec.random_perms(seed=0)
    permute_s, twin = timed(lambda: tm.permute(model, spec, perms), repeats)

    y, y_twin = forward(model, x), forward(twin.eval(), x)
    max_diff = (y - y_twin).abs().max().item()
    return {
        "model": name,
        "params": num_params(model),
        "groups": len(spec.groups),
        "permuted_channels": sum(g.size for g in spec.groups.values()),
        "frozen": len(spec.frozen),
        "discover_s": round(discover_s, 4),
        "permute_s": round(permute_s, 4),
        "max_abs_diff": max_diff,
        "output_abs_max": y.abs().max().item(),
    }


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<10} {'params':>12} {'groups':>7} {'frozen':>7} {'discover s':>11} " \
             f"{'permute s':>10} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        flag = "" if max(r["discover_s"], r["permute_s"]) < TARGET_S else "  (over target)"
        print(f"{r['model']:<10} {r['params']:>12,} {r['groups']:>7} {r['frozen']:>7} "
              f"{r['discover_s']:>11.3f} {r['permute_s']:>10.3f} {r['max_abs_diff']:>11.2e}{flag}")
    print(f"target: < {TARGET_S:.0f} s for discover and for permute")


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b16", "bert_base"],
                        choices=sorted(MODELS) + ["bert_base"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "discover.json")
    args = parser.parse_args(argv)

    names = [n for n in args.models if n != "bert_base" or _has_transformers()]
    if len(names) < len(args.models):
        print("skipped bert_base: transformers is not installed")
    rows = [bench_one(name, args.repeats) for name in names]
    print_table(rows)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "discover",
        "input_shape": [1, 3, 224, 224],
        "bert_base_input": {"input_ids": [1, 128], "attention_mask": [1, 128]},
        "repeats": args.repeats,
        "statistic": "median after 1 warm-up",
        "target_s": TARGET_S,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "num_threads": torch.get_num_threads(),
        "results": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(Path.cwd()) if args.out.is_relative_to(Path.cwd()) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
