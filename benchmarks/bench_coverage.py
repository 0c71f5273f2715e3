"""How much of each model ``tm.discover`` permutes: groups, permuted output channels, frozen reasons.

Usage:  python benchmarks/bench_coverage.py [--models bert_cls llama_gqa ...] [--repeats 1] [--no-base]

Models: the tiny Hugging Face zoo of ``tests/hf_zoo.py`` (random init from configs), a
BERT-base-size BertForSequenceClassification (hidden 768, 12 layers, 12 heads, seq 128, random
init; the discover-time target row), and torchvision / timm models when those packages are
importable (skipped otherwise): random init (``weights=None`` / ``pretrained=False``), eval
mode, constant tensors randomised, 1x3x64x64 inputs (224 for ViT and Swin). For those rows
``tm.permute`` is also checked with two random seeds (``--check-permute``: on every row).
Vision rows only (``--vision``; writes ``benchmarks/results/coverage_vision.json``):
    python benchmarks/bench_coverage.py --vision      # e.g. with a venv that has torchvision, timm

**Channel permuted.** For every ``nn.Linear``, ``nn.Conv{1,2,3}d`` (weight axis 0),
``nn.ConvTranspose*`` with groups=1 (axis 1), transformers ``Conv1D`` (``[in, out]`` weight,
axis 1) and ``nn.Embedding`` (the embedding-dim axis 1), each tensor once (tied weights once), the
output axis's indices are counted. An index is *permuted* if a group acts on it: an axis that is
a group counts fully; a concatenation counts its blocks by size; a product axis (heads x head-dim,
conv groups x channels, flatten) counts an index if **any** factor's coordinate is acted on
(``1 - prod(1 - s_k)`` of the factors' shares ``s_k``), so heads x dims with the heads fixed and
the dims permuted counts fully. ``strict`` counts a product index only if every factor of size > 1
is acted on (``prod(s_k)``). Axes the spec fixes as the model's own input or output (frozen with
reason "model output", "model input" or "embedding rows are indexed by input ids": task heads,
vocabulary, and a residual stream that is returned as ``last_hidden_state``) are left out of the
count and reported as ``excluded``. ``lost`` attributes the unpermuted channels to the frozen
reason of their axis ("in no group" when the axis is fixed without one).

Prints a table and writes ``benchmarks/results/coverage.json``. Targets (the issue): >= 95 % on
BERT, RoBERTa, DistilBERT, ViT, CLIP, GPT-2, T5; >= 90 % on Llama / Mistral; discover < 2 s on
the BERT-base-size model; >= 95 % on torchvision ViT-B/16, EfficientNet, ConvNeXt and timm ViT,
>= 90 % on GhostNet, >= 85 % on Swin; discover < 2 s on ResNet-50 and ViT-B/16.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))  # the checkout, also when not installed

import torchmerge as tm  # noqa: E402
from architectures import randomize_  # noqa: E402
from hf_zoo import HF_BY_NAME, HF_IDS, bert_base, call, coverage, flat_outputs  # noqa: E402
from torchmerge.spec import ROUTINE  # noqa: E402

TIME_TARGET_S = 2.0


# --------------------------------------------------------------------------- models

def _vision_inputs(size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _torchvision(name: str, size: int = 64):
    """torchvision ``name`` (``weights=None``: random init, no download), eval mode, its constant
    tensors (BatchNorm/LayerNorm ones and zeros, zero tokens) randomised so permuting them shows."""
    def make():
        import torchvision
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
        return randomize_(model, seed=1).eval(), _vision_inputs(size)
    return make


def _timm(name: str, size: int = 64):
    """timm ``name`` (``pretrained=False``), eval mode, constants randomised as for torchvision."""
    def make():
        import timm
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        return randomize_(model, seed=1).eval(), _vision_inputs(size)
    return make


def _zoo(name: str):
    def make():
        case = HF_BY_NAME[name]
        return case.make_model(), case.make_inputs()
    return make


OPTIONAL = {  # name -> (package, factory, target); 64x64 inputs unless the model fixes 224
    "tv_resnet50": ("torchvision", _torchvision("resnet50"), None),
    "tv_vit_b_16": ("torchvision", _torchvision("vit_b_16", 224), 0.95),
    "tv_efficientnet_b0": ("torchvision", _torchvision("efficientnet_b0"), 0.95),
    "tv_efficientnet_v2_s": ("torchvision", _torchvision("efficientnet_v2_s"), 0.95),
    "tv_convnext_tiny": ("torchvision", _torchvision("convnext_tiny"), 0.95),
    "tv_swin_t": ("torchvision", _torchvision("swin_t", 224), 0.85),
    "tv_shufflenet_v2": ("torchvision", _torchvision("shufflenet_v2_x1_0"), None),
    "tv_mobilenet_v3_s": ("torchvision", _torchvision("mobilenet_v3_small"), None),
    "tv_densenet121": ("torchvision", _torchvision("densenet121"), None),
    "tv_regnet_y_400mf": ("torchvision", _torchvision("regnet_y_400mf"), None),
    "timm_vit_small": ("timm", _timm("vit_small_patch16_224", 224), 0.95),
    "timm_resnet50": ("timm", _timm("resnet50"), None),
    "timm_ghostnet_100": ("timm", _timm("ghostnet_100"), 0.90),
    "timm_ghostnetv2_100": ("timm", _timm("ghostnetv2_100"), 0.90),
    "timm_swin_tiny": ("timm", _timm("swin_tiny_patch4_window7_224", 224), 0.85),
    "timm_convnext_nano": ("timm", _timm("convnext_nano"), 0.95),
    "timm_efficientnet_b0": ("timm", _timm("efficientnet_b0"), 0.95),
}
# discover-time targets (seconds) besides bert_base
TIME_TARGETS = {"bert_base": TIME_TARGET_S, "tv_resnet50": TIME_TARGET_S, "tv_vit_b_16": TIME_TARGET_S}
PERMUTE_SEEDS = (1, 2)
PERMUTE_TOL = 1e-4  # max |permuted - original| / max |original|, per output


def available(package: str) -> bool:
    try:
        __import__(package)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- one row

def top_frozen(spec, k: int = 3) -> list:
    """The k most frequent non-routine frozen reasons, each with one op and module path."""
    notable = [f for f in spec.frozen if f.reason not in ROUTINE]
    counts = Counter(f.reason for f in notable)
    out = []
    for reason, n in counts.most_common(k):
        f = next(f for f in notable if f.reason == reason)
        out.append({"reason": reason, "count": n, "op": f.op, "module_path": f.module_path})
    return out


def permute_check(model, spec, inputs, seeds=PERMUTE_SEEDS) -> dict:
    """``tm.permute`` with each seed's random permutations: the largest output change relative to
    that output's scale (max |y' - y| / max |y|, over every output tensor and seed)."""
    reference = flat_outputs(call(model, inputs))
    worst = 0.0
    for seed in seeds:
        twin = tm.permute(model, spec, spec.random_perms(seed))
        for key, y in flat_outputs(call(twin, inputs)).items():
            x = reference[key]
            if not x.is_floating_point():
                worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
                continue
            worst = max(worst, (x - y).abs().max().item() / (x.abs().max().item() + 1e-12))
    return {"permute_ok": worst < PERMUTE_TOL, "permute_rel_diff": float(f"{worst:.3g}"),
            "permute_seeds": list(seeds)}


def bench_one(name: str, make, target, repeats: int, check: bool = False) -> dict:
    model, inputs = make()
    times, spec = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        spec = tm.discover(model, inputs)
        times.append(time.perf_counter() - t0)
    cov = coverage(model, spec)
    row = {
        "model": name,
        "class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "groups": len(spec.groups),
        "channels": cov["channels"],
        "excluded": cov["excluded"],
        "share": round(cov["share"], 4),
        "strict_share": round(cov["strict_share"], 4),
        "target": target,
        "lost": cov["lost"],
        "frozen": len(spec.frozen),
        "top_frozen": top_frozen(spec),
        "discover_s": round(min(times), 4),
        "discover_first_s": round(times[0], 4),
    }
    if name in TIME_TARGETS and name != "bert_base":
        row["time_target_s"] = TIME_TARGETS[name]
    if check:
        row.update(permute_check(model, spec, inputs))
    return row


def failed_row(name: str, target, err: BaseException) -> dict:
    return {"model": name, "target": target, "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc(limit=-3)}


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':<18} {'groups':>6} {'channels':>8} {'excl':>6} {'permuted':>9} {'strict':>7} "
              f"{'target':>6} {'discover s':>10}  top lost / frozen")
    print(header)
    print("-" * len(header))
    for r in rows:
        target = f"{r['target']:.0%}" if r.get("target") else "-"
        if "error" in r:
            print(f"{r['model']:<18} FAILED {r['error'].splitlines()[0][:110]}")
            continue
        flags = []
        if r["target"] and r["share"] < r["target"]:
            flags.append("below target")
        if r["model"] in TIME_TARGETS and r["discover_s"] >= TIME_TARGETS[r["model"]]:
            flags.append("over time target")
        if r.get("permute_ok") is False:
            flags.append(f"permute changes outputs: rel diff {r['permute_rel_diff']:.2g}")
        lost = ", ".join(f"{k} ({v})" for k, v in list(r["lost"].items())[:2])
        if not lost and r["top_frozen"]:
            lost = "frozen: " + ", ".join(f"{f['reason']} x{f['count']}" for f in r["top_frozen"][:2])
        flag = f"  ({'; '.join(flags)})" if flags else ""
        print(f"{r['model']:<18} {r['groups']:>6} {r['channels']:>8} {r['excluded']:>6} {r['share']:>9.1%} "
              f"{r['strict_share']:>7.1%} {target:>6} {r['discover_s']:>10.3f}  {lost[:70]}{flag}")
    print(f"permuted: share of Linear/Conv/Embedding output channels a group acts on (model input/"
          f"output axes excluded); target discover time < {TIME_TARGET_S:.0f} s on "
          + ", ".join(TIME_TARGETS))
    checked = [r for r in rows if "permute_ok" in r]
    if checked:
        print(f"tm.permute with seeds {PERMUTE_SEEDS} (rel. output diff < {PERMUTE_TOL:g}): "
              + ", ".join(f"{r['model']} {'ok' if r['permute_ok'] else 'FAILS'} ({r['permute_rel_diff']:.1g})"
                          for r in checked))


def main(argv=None) -> int:
    choices = HF_IDS + ["bert_base"] + sorted(OPTIONAL)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, choices=choices,
                        help="default: the zoo, bert_base, and every importable optional model")
    parser.add_argument("--repeats", type=int, default=2, help="discover runs per model (min is reported)")
    parser.add_argument("--no-base", action="store_true", help="skip the BERT-base-size row")
    parser.add_argument("--vision", action="store_true",
                        help="only the torchvision/timm rows (default --out: results/coverage_vision.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/coverage.json, or "
                             "coverage_vision.json with --vision, so the HF table is kept)")
    parser.add_argument("--check-permute", action="store_true",
                        help=f"also check tm.permute with seeds {PERMUTE_SEEDS} on every row "
                             "(always done for torchvision/timm rows)")
    args = parser.parse_args(argv)

    if args.out is None:
        args.out = HERE / "results" / ("coverage_vision.json" if args.vision else "coverage.json")
    if args.vision and not args.models:
        args.models = list(OPTIONAL)
    names = args.models or [n for n in choices if n != "bert_base" or not args.no_base]
    rows, skipped = [], []
    for name in names:
        if name in OPTIONAL:
            package, make, target = OPTIONAL[name]
            if not available(package):
                skipped.append(f"{name} ({package} not installed)")
                continue
        elif not available("transformers"):
            skipped.append(f"{name} (transformers not installed)")
            continue
        elif name == "bert_base":
            make, target = bert_base, None
        else:
            make, target = _zoo(name), HF_BY_NAME[name].target
        try:
            rows.append(bench_one(name, make, target, args.repeats,
                                  check=args.check_permute or name in OPTIONAL))
        except Exception as err:  # a failing model is a row of the report, not the end of it
            rows.append(failed_row(name, target, err))
    print_table(rows)
    if skipped:
        print("skipped: " + ", ".join(skipped))

    if not rows:
        print(f"nothing measured: {args.out} left as it is")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "coverage",
        "definition": "share of Linear/Conv/Conv1D output and Embedding-dim channels a group acts on; "
                      "product axes count an index if any factor is permuted (strict: every factor); "
                      "axes frozen as model input/output excluded",
        "repeats": args.repeats,
        "statistic": "discover_s: min of repeats (first run included)",
        "time_target_s": TIME_TARGET_S,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__ if available("transformers") else None,
        **{pkg: __import__(pkg).__version__ for pkg in ("torchvision", "timm")
           if any(OPTIONAL[n][0] == pkg for n in names if n in OPTIONAL) and available(pkg)},
        "permute_check": {"seeds": list(PERMUTE_SEEDS), "tolerance": PERMUTE_TOL,
                          "measure": "max |permuted - original| / max |original| per output"},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "num_threads": torch.get_num_threads(),
        "skipped": skipped,
        "results": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(Path.cwd()) if args.out.is_relative_to(Path.cwd()) else args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
