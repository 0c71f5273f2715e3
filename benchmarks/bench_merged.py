"""Merged-model inference overhead and calibration time.

Usage:  python benchmarks/bench_merged.py [--part inference calibration] [--device cpu|cuda]
                                          [--samples 2000] [--repeats 20] [--rounds 2]

inference   ResNet-20 (width 1 and 4), batch 128, 32x32, eval + no_grad: the plain expert, the
            merged model with the task fixed (``set_task``), with a mixed-task ``[B]`` id tensor,
            ``merged.export(task)`` (a GraphModule) and ``merged.export(task, like=expert)`` (the
            expert's own class with the merged weights, eager code: a control, as it runs the
            expert's own ops). Timed in alternation over ``--repeats`` rounds of one batch each,
            best (the headline) and median, as process CPU time on CPU (a shared machine's load inflates wall time
            unevenly) with ``--threads`` torch threads (default 1), wall time on CUDA. ``fx`` is
            the expert itself traced by torch.fx: fx's generated code frees activations at other
            points than eager Python, which with glibc's default malloc costs page faults (up to
            1.3x on ResNet-20x1); run with ``MALLOC_MMAP_THRESHOLD_=1000000000
            MALLOC_TRIM_THRESHOLD_=1000000000`` to see the merged model's own overhead (results
            go to ``..._cpu_malloc.json``).
            Targets: task-conditioned <= 1.10x the expert, exported <= 1.02x.
calibration ResNet-20x4 (widths 64/128/256), 4 tasks x ``--samples`` images (batches of 250):
            ``tm.calibrate(mode="affine")`` time (process CPU time on CPU, wall time on CUDA)
            against one plain forward pass over all the tasks' data, timed in alternation over
            ``--rounds`` rounds (each calibration against the mean of the plain passes either side;
            the median ratio); the calibration does 3 passes per task (one expert, two merged),
            so the ratio shows the overhead of hooks and fitting (ideal ~3; target <= 3.2).
Writes ``benchmarks/results/merged_inference_<device>.json`` / ``calibration_<device>.json``.
The data are random images: timings do not depend on the pixel values.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torchmerge as tm  # noqa: E402
from models import ResNet20, num_params  # noqa: E402

RESULTS = HERE / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _experts(width, n, device, seed=0):
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        model = ResNet20(width).to(device).eval()
        with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
        out.append(model)
    return out


def _alternate(fns: dict, repeats: int, device) -> dict:
    """Seconds of each function, timed round-robin (a noisy machine slows all alike): the best
    (minimum) and median of ``repeats`` rounds per function."""
    for fn in fns.values():
        fn()
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            times[name].append(clock() - t0)
    return {k: {"best": min(v), "median": statistics.median(v)} for k, v in times.items()}


RATIOS = {"fx": "expert_fx", "merged": "merged", "mixed": "merged_mixed", "exported": "exported",
          "exported_like": "exported_like"}


def inference(device, repeats, batch=128):
    rows = []
    for width in (1, 4):
        experts = _experts(width, 2, device)
        x = torch.randn(batch, 3, 32, 32, device=device)
        merged = tm.merge(experts, method="average", example_inputs=x, align=None,
                          correction=None).eval()
        with torch.no_grad():
            for site in merged.sites().values():  # non-identity affines: the real work
                site.scale.uniform_(0.5, 1.5)
                site.shift.normal_()
        merged.set_task(1)
        exported = merged.export(task=1).eval()
        own = merged.export(task=1, like=experts[1]).eval()  # the expert's class, eager code
        ids = torch.arange(batch, device=device) % 2

        def run(model, **kw):
            def go():  # one batch per call: short rounds, so a noisy neighbour hits few of them
                with torch.no_grad():
                    model(x, **kw)
            return go
        traced = torch.fx.symbolic_trace(experts[1])  # the expert as an fx graph, nothing else
        t = _alternate({"expert": run(experts[1]), "expert_fx": run(traced), "merged": run(merged),
                        "merged_mixed": run(merged, task=ids), "exported": run(exported),
                        "exported_like": run(own)}, repeats, device)
        row = {"model": f"resnet20x{width}", "params": num_params(experts[0]),
               "sites": len(merged.sites()), "batch": batch, "seconds": t}
        for stat in ("best", "median"):
            row[stat] = {k: t[v][stat] / t["expert"][stat] for k, v in RATIOS.items()}
        rows.append(row)
    print(f"{'model':12s} {'':6s} {'expert s':>9s} {'fx':>7s} {'merged':>7s} {'mixed':>7s} {'exported':>8s}"
          f" {'like=':>7s}")
    for r in rows:
        for stat in ("best", "median"):
            q = r[stat]
            print(f"{r['model']:12s} {stat:6s} {r['seconds']['expert'][stat]:9.3f} {q['fx']:6.3f}x "
                  f"{q['merged']:6.3f}x {q['mixed']:6.3f}x {q['exported']:7.3f}x {q['exported_like']:6.3f}x")
    print("ratios to the expert; 'best': minimum over rounds (the headline), 'median': the middle round")
    return {"benchmark": "merged_inference", "targets": {"merged": 1.10, "exported": 1.02},
            "rows": rows}


def calibration(device, samples, rounds=2, tasks=4, batch=250):
    experts = _experts(4, tasks, device, seed=10)
    gen = torch.Generator().manual_seed(0)
    data = [[(torch.randn(batch, 3, 32, 32, generator=gen) * (1 + 0.2 * t)).to(device)
             for _ in range(samples // batch)] for t in range(tasks)]
    merged = tm.merge(experts, method="average", data=data, align=None,
                      correction=None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time  # as inference()

    def timed(fn):
        _sync(device)
        t0 = clock()
        out = fn()
        _sync(device)
        return clock() - t0, out

    def plain_pass():
        with torch.no_grad():
            for d in data:
                for x in d:
                    experts[0](x)

    # alternate plain, calibrate, plain, ...: each calibration is divided by the mean of the plain
    # passes on either side of it, so a drifting load hits both; the median ratio is the figure
    plains, fits = [timed(plain_pass)[0]], []
    for _ in range(rounds):
        fit, report = timed(lambda: tm.calibrate(merged, experts, data, mode="affine"))
        fits.append(fit)
        plains.append(timed(plain_pass)[0])
    ratios = [f / ((a + b) / 2) for f, a, b in zip(fits, plains, plains[1:])]
    ratio = statistics.median(ratios)
    row = {"model": "resnet20x4", "params": num_params(experts[0]), "sites": len(merged.sites()),
           "tasks": tasks, "samples_per_task": samples, "clock": clock.__name__,
           "calibrate_s": fits, "plain_pass_s": plains, "ratios": ratios,
           "ratio_to_one_pass": ratio, "target": 3.2, "passes": report["passes"],
           "last_pass_change": max(v["change"] for v in report["tasks"].values())}
    print(f"calibrate resnet20x4, {tasks} tasks x {samples}: {statistics.median(fits):.1f} s "
          f"(one plain pass over all data {statistics.median(plains):.1f} s; ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; median {ratio:.2f}, ideal ~3, target <= 3.2)")
    return {"benchmark": "calibration", **row}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", default=["inference", "calibration"],
                        choices=["inference", "calibration"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="calibration rounds (alternating)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform(), "load_avg": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    RESULTS.mkdir(exist_ok=True)
    if "inference" in args.part:
        out = {**inference(device, args.repeats), **meta}
        tuned = "MALLOC_MMAP_THRESHOLD_" in os.environ
        out["malloc"] = "mmap/trim thresholds raised" if tuned else "glibc default"
        name = f"merged_inference_{device.type}{'_malloc' if tuned else ''}.json"
        (RESULTS / name).write_text(json.dumps(out, indent=2))
    if "calibration" in args.part:
        out = {**calibration(device, args.samples, args.rounds), **meta}
        (RESULTS / f"calibration_{device.type}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
