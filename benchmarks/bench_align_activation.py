"""Activation matching (``tm.align_many(method="activation")``) vs the plain forward passes it needs.

Usage:  python benchmarks/bench_align_activation.py [--experts 4] [--batches 12] [--rounds 3]

The setting of issue 16: T experts of a 2-conv, 64-channel CNN (conv-bn-relu ×2, pooling, a
linear head; independent random inits), ``--batches`` batches of 32 × 3 × 32 × 32. The baseline is
every expert run once over the alignment data (``T · batches`` batch forwards, no grad) — the
passes activation matching cannot avoid. Both are timed in alternating rounds in one process
(the machine is shared and noisy), one thread; reported: the median over rounds of
``time(align_many) / time(plain passes)``, target ≤ 3. (The pairwise implementation runs the
reference once per other expert: 2(T−1) passes for T needed, so 1.5 is its floor at T = 4.)

Prints a table and writes ``benchmarks/results/align_activation.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import torchmerge as tm

HERE = Path(__file__).resolve().parent


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    experts = [cnn() for _ in range(args.experts)]
    data = [torch.randn(32, 3, 32, 32) for _ in range(args.batches)]
    spec = tm.discover(experts[0], data[0])
    rows = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        with torch.no_grad():
            for e in experts:
                for x in data:
                    e(x)
        plain = time.perf_counter() - t
        t = time.perf_counter()
        tm.align_many(experts, spec, method="activation", data=data)
        act = time.perf_counter() - t
        rows.append({"plain_s": plain, "activation_s": act, "ratio": act / plain})
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"{'round':>5} {'plain passes s':>15} {'activation s':>13} {'ratio':>6}")
    for i, r in enumerate(rows):
        print(f"{i:>5} {r['plain_s']:>15.2f} {r['activation_s']:>13.2f} {r['ratio']:>6.2f}")
    print(f"median ratio {ratio:.2f} (target <= 3); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    out = HERE / "results" / "align_activation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"benchmark": "activation matching vs plain passes", "args": vars(args),
                               "rounds": rows, "median_ratio": ratio, "torch": torch.__version__,
                               "python": platform.python_version(),
                               "load_average": os.getloadavg()[0]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
