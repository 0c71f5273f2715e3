"""Pieces the Hugging Face examples share (``hf_vit_mnist.py``, ``hf_gpt2_stdlib.py``): training
through the HF forward, the printed table, the JSON results. Not an example itself."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging


def parse_args(doc: str, quick_help: str, default_out: str, threads: int, argv=None):
    """``--quick`` and ``--out``; also sets the torch threads and quiets transformers' logging."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=default_out, help="where the JSON results go")
    args = parser.parse_args(argv)
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    return args


def train(model, data: list, epochs: int, lr: float, seed: int):
    """AdamW with a cosine schedule through the HF forward (``labels`` in the batch, ``.loss`` out)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = max(1, epochs * len(data))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for epoch in range(epochs):
        for i in torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist():
            opt.zero_grad(set_to_none=True)
            model(**data[i]).loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def for_task(model, task=None):
    """``model`` in eval mode, with ``task`` set first when it is a merged model's task."""
    model.eval()
    if task is not None:
        model.set_task(task)
    return model


def print_table(rows: list, columns: list, log=print) -> None:
    """One line per row: method, align, correction, then ``columns`` — ``(header, row -> text)``."""
    head = ["method", "align", "correction", *(h for h, _ in columns)]
    body = [[r["method"], r["align"], r["correction"], *(cell(r) for _, cell in columns)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for row in [head] + body:
        log("  ".join(x.ljust(w) if i < 3 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths))))


def write_results(results: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {path} ({results['seconds']} s)")
