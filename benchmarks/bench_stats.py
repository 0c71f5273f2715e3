"""Hook overhead of streaming statistics: ``tm.stats.collect`` vs a plain forward pass.

Usage:  python benchmarks/bench_stats.py [--batches 20] [--batch-size 128] [--repeats 3] [--device cpu]

Model: a ResNet-20-like CNN (widths 16/32/64, 32x32 inputs). Statistics pass: ``collect`` with
``stat="moments"`` on the output of every Conv2d / BatchNorm2d / Linear (43 sites). Plain pass: the
same batches through the model under ``torch.no_grad()`` in eval mode. The two are timed in
alternation (``--repeats`` rounds, median), so a noisy shared machine slows both alike; the process's
CPU time and the load average are recorded too (wall-clock ratios from a loaded machine mislead).
Prints a table and writes ``benchmarks/results/stats.json``. Target: ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from torchmerge.stats import collect  # noqa: E402

sys.path.insert(0, str(HERE))
from models import ResNet20  # noqa: E402

TARGET_RATIO = 1.3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_pass(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in batches:
            model(x)


def stats_pass(model: nn.Module, sites: list[str], batches: list[torch.Tensor]) -> dict:
    return collect(model, sites, batches, stat="moments")


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) — CPU time is less sensitive to other load."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(HERE / "results" / "stats.json"))
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ResNet20(width=1).to(device).eval()
    sites = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    batches = [torch.randn(args.batch_size, 3, 32, 32, device=device) for _ in range(args.batches)]

    plain_pass(model, batches[:2])  # warm-up (allocator, kernels, lazy init)
    stats_pass(model, sites, batches[:2])
    plain_s, stats_s, plain_cpu, stats_cpu = [], [], [], []
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):  # alternate so machine load hits both alike
        for wall, cpu, fn in ((plain_s, plain_cpu, lambda: plain_pass(model, batches)),
                              (stats_s, stats_cpu, lambda: stats_pass(model, sites, batches))):
            w, c = timed(fn, device)
            wall.append(w)
            cpu.append(c)
    load_after = os.getloadavg()[0]
    cpu_ratio = statistics.median(stats_cpu) / statistics.median(plain_cpu)
    plain, stats = statistics.median(plain_s), statistics.median(stats_s)
    ratio = stats / plain
    best_ratio = min(stats_s) / min(plain_s)

    images = args.batches * args.batch_size
    rows = [("plain forward (no_grad)", plain, images / plain),
            (f"collect moments, {len(sites)} sites", stats, images / stats)]
    print(f"device={device}  threads={torch.get_num_threads()}  batches={args.batches}x{args.batch_size}  "
          f"repeats={args.repeats}")
    print(f"{'pass':34s} {'median s':>9s} {'img/s':>9s}")
    for name, sec, ips in rows:
        print(f"{name:34s} {sec:9.3f} {ips:9.1f}")
    verdict = "OK" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"overhead ratio (median) {ratio:.3f}x   (best-of) {best_ratio:.3f}x   target <= {TARGET_RATIO}x  {verdict}")
    print(f"CPU-time ratio (median) {cpu_ratio:.3f}x   load average {load_before:.2f} -> {load_after:.2f} "
          f"on {os.cpu_count()} cores (rerun when the machine is idle if this is high)")

    result = {
        "benchmark": "stats_hook_overhead", "model": "resnet20 (widths 16/32/64, 32x32)",
        "sites": len(sites), "stat": "moments", "batches": args.batches, "batch_size": args.batch_size,
        "repeats": args.repeats, "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "platform": platform.platform(),
        "plain_s": plain_s, "stats_s": stats_s, "plain_median_s": plain, "stats_median_s": stats,
        "ratio": ratio, "ratio_best_of": best_ratio, "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "plain_cpu_s": plain_cpu, "stats_cpu_s": stats_cpu, "ratio_cpu_time": cpu_ratio,
        "load_average_before_after": [load_before, load_after], "cpu_count": os.cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
