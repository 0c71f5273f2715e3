"""Merge non-local GPT-2 language models trained on Python's own text into one ``GPT2LMHeadModel``.

The language-model counterpart of ``examples/hf_vit_mnist.py``:

- data: text that ships with Python, read as bytes (vocabulary 256): four tasks, each split into
  windows of 64 bytes, the first 90 % of a task's text for training and the last 10 % held out —
  ``prose`` (pydoc's English help topics, ``pydoc_data.topics``), ``asyncio`` (the sources of the
  asyncio package), ``email`` (the sources of the email package) and ``docstrings`` (the
  docstrings of a dozen other standard-library modules, read with ``ast``);
- model: ``transformers.GPT2LMHeadModel`` from a tiny ``GPT2Config`` (64 positions, width 64,
  2 layers, 4 heads), random init, nothing downloaded;
- two *pretrainings* on all four tasks' training text from different seeds (A and B): two basins;
- four experts fine-tuned from them (all weights, the tied embedding/LM head included):
  ``prose`` and ``asyncio`` from A, ``email`` and ``docstrings`` from B;
- merging: ``tm.merge(experts, method, base=[pretraining of each expert], data=[dict batches of
  input_ids per task], align, correction, heads=["lm_head"])``: one LM head per task (GPT-2 ties it
  to the input embedding, which is merged). The merged model is still a ``GPT2LMHeadModel``; each
  task is evaluated as ``merged.set_task(t); merged(input_ids=x, labels=x).loss``; the
  ``affine+tune`` rows distil each expert into its task's correction — affines alone
  (``tune_rank=0``), with rank-8 low-rank maps at every site and 600 steps (the defaults on
  transformers), 100 steps, the LM heads too, rank 16 (``--quick``: 100 steps); PLeaS rows
  (``method="pleas"``, widths 1, 1.5 and 2: only the MLPs can widen) need no correction.

Metric: perplexity on each task's held-out windows; *normalized* = mean over tasks of expert
perplexity / merged perplexity (1.0: as good as each task's own expert). The pretraining of each
task's lineage is a reference row: a merge worse than it has lost what the fine-tuning added.

Printed and written to ``--out`` (JSON). Run: python examples/hf_gpt2_stdlib.py [--quick]
[--out hf-gpt2-demo/results.json] (needs transformers; about 15 min on two CPU threads — the
600-step tuning rows, PLeaS and activation matching are the slow ones —, ``--quick`` about 1 min)
"""
from __future__ import annotations

import ast
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import torchmerge as tm
import hf_common
from hf_common import train

WINDOW, BATCH, SEED = 64, 32, 0
DOCSTRING_MODULES = ("json", "http", "urllib", "logging", "unittest", "collections", "concurrent",
                     "xml", "importlib", "multiprocessing", "sqlite3", "tomllib", "zipfile", "argparse")
FULL = dict(task_bytes=240_000, pretrain_epochs=2, finetune_epochs=3, calib_batches=16, calibration={},
            settings=[("task_arithmetic", "weight", None), ("task_arithmetic", "weight", "affine"),
                      ("tall", "weight", None), ("tall", "weight", "affine"), ("tall", "weight", "affine+tune"),
                      ("tall", "activation", None), ("tall", "activation", "affine"),
                      ("tall", "activation", "affine+tune", {"calibration": {"tune_rank": 0}}),
                      ("tall", "activation", "affine+tune"),  # "auto": rank 8, 600 steps on a transformer
                      ("tall", "activation", "affine+tune", {"calibration": {"tune_steps": 100}}),
                      ("tall", "activation", "affine+tune", {"calibration": {"tune_heads": True}}),
                      ("tall", "activation", "affine+tune", {"calibration": {"tune_rank": 16}})]
            + [("pleas", None, None, {"width": w}) for w in (1.0, 1.5, 2.0)])
QUICK = dict(task_bytes=60_000, pretrain_epochs=2, finetune_epochs=2, calib_batches=4,
             calibration={"tune_steps": 100},  # a smoke run: not the 600 steps "auto" gives transformers
             settings=[("task_arithmetic", "weight", None), ("tall", "activation", "affine"),
                       ("tall", "activation", "affine+tune", {"calibration": {"tune_rank": 0}}),
                       ("tall", "activation", "affine+tune")])


@dataclass(frozen=True)
class Task:
    name: str
    parent: str  # the pretraining it is fine-tuned from


TASKS = (Task("prose", "A"), Task("asyncio", "A"), Task("email", "B"), Task("docstrings", "B"))


def task_text(name: str) -> bytes:
    """A task's text, from files and modules of this Python installation (sorted: reproducible)."""
    if name == "prose":
        import pydoc_data.topics
        return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).encode()
    if name in ("asyncio", "email"):
        return b"\n".join(p.read_bytes() for p in _sources(name))
    docs = []
    for module in DOCSTRING_MODULES:
        for path in _sources(module):
            tree = ast.parse(path.read_bytes())
            docs += [d for node in ast.walk(tree)
                     if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                     and (d := ast.get_docstring(node))]
    return "\n\n".join(docs).encode()


def _sources(package: str) -> list:
    """The ``.py`` files of a standard-library package (or the one file of a module)."""
    spec = __import__("importlib.util").util.find_spec(package)
    origin = Path(spec.origin)
    return sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]


def windows(text: bytes, limit: int) -> tuple:
    """Train and held-out windows ``[N, 64]`` of byte ids: the first 90 % of the text's first
    ``limit`` bytes, and the last 10 %."""
    ids = torch.tensor(list(text[:limit]), dtype=torch.long)
    cut = int(0.9 * len(ids))
    def chop(x):
        return x[: len(x) // WINDOW * WINDOW].view(-1, WINDOW)
    return chop(ids[:cut]), chop(ids[cut:])


def dict_batches(x: torch.Tensor, batch_size: int, seed: int | None = None) -> list:
    """``[{"input_ids": [B, 64], "labels": the same}, ...]`` (shuffled once when ``seed``): HF
    computes the next-byte loss from ``labels``; tm.merge drops the key (labels are never used)."""
    order = torch.arange(len(x)) if seed is None else torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x[order[i:i + batch_size]], "labels": x[order[i:i + batch_size]]}
            for i in range(0, len(x), batch_size)]


def gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=256, n_positions=WINDOW, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def perplexity(model, data: list, task=None) -> float:
    """exp(mean next-byte cross-entropy); ``task``: set on a merged model first (``set_task``)."""
    hf_common.for_task(model, task)
    total = count = 0.0
    for batch in data:
        ids = batch["input_ids"]
        n = ids.numel() - len(ids)  # predicted positions
        total += float(model(input_ids=ids, labels=ids).loss) * n
        count += n
    return math.exp(total / count)


def build_setting(cfg: dict, log=print):
    """Two pretrainings (A, B) on all tasks' training text and four experts fine-tuned from them."""
    splits = [windows(task_text(t.name), cfg["task_bytes"]) for t in TASKS]
    train_sets = [dict_batches(tr, BATCH, seed=SEED + i) for i, (tr, _) in enumerate(splits)]
    test_sets = [dict_batches(te, 256) for _, te in splits]
    union = dict_batches(torch.cat([tr for tr, _ in splits]), BATCH, seed=SEED)
    pre = {}
    for i, p in enumerate("AB"):
        torch.manual_seed(SEED + 100 * (i + 1))  # A and B: different inits, different basins
        pre[p] = train(gpt2(), union, cfg["pretrain_epochs"], 3e-3, SEED + i + 1)
        log(f"pretraining {p}: perplexity " + ", ".join(
            f"{t.name} {perplexity(pre[p], te):.2f}" for t, te in zip(TASKS, test_sets)))
    experts = []
    for i, t in enumerate(TASKS):
        expert = gpt2()
        expert.load_state_dict(pre[t.parent].state_dict())
        experts.append(train(expert, train_sets[i], cfg["finetune_epochs"], 1e-3, SEED + 10 + i))
    return pre, experts, train_sets, test_sets


def merge_and_evaluate(setting, method, align, correction, cfg, expert_ppl, options=None) -> dict:
    """One ``tm.merge`` call; ``options``: more of its keyword arguments (PLeaS's ``width``, ...),
    ``calibration`` on top of the run's (``cfg["calibration"]``, not in the row's label)."""
    pre, experts, train_sets, test_sets = setting
    t0 = time.perf_counter()
    label = method + "".join(f" {k}={v}" for k, v in (options or {}).items())
    options = dict(options or {})
    if correction is not None:
        options["calibration"] = {**cfg["calibration"], **options.get("calibration", {})}
    merged = tm.merge(experts, method=method, base=[pre[t.parent] for t in TASKS], data=train_sets,
                      align=align, correction=correction, heads=["lm_head"],
                      task_names=[t.name for t in TASKS], max_batches=cfg["calib_batches"], seed=SEED,
                      **options)
    if not isinstance(merged, GPT2LMHeadModel):
        raise TypeError(f"the merged model is a {type(merged).__name__}, not a GPT2LMHeadModel")
    return _row(label, str(align), str(correction),
                [perplexity(merged, te, task=t.name) for t, te in zip(TASKS, test_sets)], expert_ppl,
                seconds=round(time.perf_counter() - t0, 1),
                site_parameters_per_task=0 if correction is None else  # affines (and low-rank maps)
                sum(p[0].numel() for site in merged.sites().values() for p in site.parameters()))


def _row(method, align, correction, ppl, expert_ppl, **extra) -> dict:
    return {"method": method, "align": align, "correction": correction,
            "perplexity": {t.name: p for t, p in zip(TASKS, ppl)},
            "normalized": sum(e / p for p, e in zip(ppl, expert_ppl)) / len(ppl), **extra}


def print_table(rows: list, log=print) -> None:
    columns = [(t.name, lambda r, n=t.name: f"{r['perplexity'][n]:.2f}") for t in TASKS]
    hf_common.print_table(rows, columns + [("normalized", lambda r: f"{r['normalized']:.3f}")], log)


def main(argv=None) -> dict:
    args = hf_common.parse_args(__doc__, "a smoke run: less text and training, 3 merges", "hf-gpt2-demo/results.json", threads=2, argv=argv)
    cfg = QUICK if args.quick else FULL
    start = time.perf_counter()
    setting = build_setting(cfg)
    pre, experts, _, test_sets = setting
    expert_ppl = [perplexity(e, te) for e, te in zip(experts, test_sets)]
    rows = [_row("experts", "-", "-", expert_ppl, expert_ppl),
            _row("pretraining of the task's lineage", "-", "-",
                 [perplexity(pre[t.parent], te) for t, te in zip(TASKS, test_sets)], expert_ppl)]
    print(f"experts trained ({time.perf_counter() - start:.0f} s); merging {len(cfg['settings'])} settings")
    for method, align, correction, *options in cfg["settings"]:
        rows.append(merge_and_evaluate(setting, method, align, correction, cfg, expert_ppl, *options))
        print(f"  {method}, align={align}, correction={correction}: normalized {rows[-1]['normalized']:.3f} "
              f"({rows[-1]['seconds']} s)")
    print()
    print_table(rows)
    results = {"command": " ".join(["python examples/hf_gpt2_stdlib.py", *(argv if argv is not None else sys.argv[1:])]),
               "quick": args.quick, "tasks": [{"name": t.name, "parent": t.parent} for t in TASKS],
               "python": sys.version.split()[0],
               "config": {k: v for k, v in cfg.items() if k != "settings"}, "rows": rows,
               "seconds": round(time.perf_counter() - start, 1)}
    hf_common.write_results(results, args.out)
    return results


if __name__ == "__main__":
    main()
