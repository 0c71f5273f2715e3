"""Weight matching (``tm.align(method="weight")``) vs a straightforward NumPy float64 baseline.

Usage:  python benchmarks/bench_align.py [--models resnet50 vgg16_bn] [--repeats 1] [--noise 0.01]

The pair: a model (``benchmarks/models.py``, seed 0) and a randomly permuted copy of it
(``spec.random_perms(seed=1)``) plus Gaussian noise of ``--noise`` x each tensor's std, so the
alignment has real work to do and a known answer.

The baseline (``baseline_weight_matching`` below) is Git Re-Basin weight matching written the
obvious way: state dicts converted once to float64 NumPy arrays; for each group, in the same
seeded visiting order as torchmerge (``random.Random(seed).shuffle`` of the group list every
sweep), a Python loop over the group's member tensors builds the cost matrix (other groups'
current permutations applied with ``np.take`` per axis, the group's axis moved to the front,
reshaped to ``[n, -1]``, ``A += W_ref @ W_other.T``), then ``linear_sum_assignment(maximize=True)``;
a group moves only if its gain is > 1e-12; sweeps repeat until no group moves. It visits every
group every sweep and recomputes every term (torchmerge skips groups whose neighbours did not
change, and keeps expensive score terms until a group they depend on moves: same answer).
Members that are blocks of an axis (flatten into a Linear: the axis is group x spatial) are read
through the spec's own description (``spec.positions`` / ``spec.index``), as torchmerge does.
Not reproduced: torchmerge's extra checks for a group on two axes of one tensor and its escape
step for groups that are factors of one axis (attention heads x head dim); neither model has such
groups (asserted), so both follow the same path and must reach the same objective.

Measured, each implementation in a fresh subprocess (``--worker``), glibc told to return freed
blocks at once (``MALLOC_MMAP_THRESHOLD_=131072``) so RSS follows live allocations:

- wall time of the call (median of ``--repeats``; inputs built beforehand);
- the weight-matching objective Σ⟨W_ref, π(W_other)⟩ (float64) after the last sweep, and sweeps;
- peak memory above the RSS before the call (kernel ``VmHWM`` reset through
  ``/proc/self/clear_refs``), for both; for the baseline also ``tracemalloc``'s peak (NumPy reports
  its buffers to tracemalloc; torch does not, hence RSS for torchmerge);
- both relative to one model's parameter+buffer bytes (float32).

Targets (issue 3): torchmerge >= 3x faster than the baseline on CPU; its peak extra memory < 3x one
model. Prints a table and writes ``benchmarks/results/align.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import torchmerge as tm  # noqa: E402
from models import MODELS  # noqa: E402
from torchmerge.spec import _names  # noqa: E402

SPEED_TARGET, MEMORY_TARGET = 3.0, 3.0
ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# --------------------------------------------------------------------------- the baseline


def baseline_weight_matching(reference, other, spec, max_iter: int = 100, seed: int = 0):
    """Git Re-Basin weight matching, per-tensor Python loops, float64 NumPy. Returns
    (perms as {group: ndarray}, objective after each sweep, sweeps)."""
    heads = set(spec.heads)
    ref = {k: v.detach().numpy().astype(np.float64) for k, v in _tensors(reference).items()}
    oth = {k: v.detach().numpy().astype(np.float64) for k, v in _tensors(other).items()}
    axes_of, members = {}, {g: [] for g in spec.groups}
    for (p, a), e in spec.axes.items():
        if p in heads:
            continue
        axes_of.setdefault(p, []).append((a, e))
        for g in set(_names(e)):
            members[g].append((p, a, e))
    perms = {g: np.arange(grp.size) for g, grp in spec.groups.items()}

    def index(e, perms):  # the index vector of one axis, from the spec's description
        return spec.index(e, {g: torch.from_numpy(p) for g, p in perms.items()}).numpy()

    def objective(perms):
        total = 0.0
        for p, axes in axes_of.items():
            w = oth[p]
            for a, e in axes:
                w = np.take(w, index(e, perms), axis=a)
            total += float(np.sum(ref[p] * w))
        return total

    def cost(g, perms):
        n = spec.groups[g].size
        free = {**perms, g: np.arange(n)}
        A = np.zeros((n, n))
        for p, a, e in members[g]:
            w_oth = oth[p]
            for b, e2 in axes_of[p]:
                if b != a:
                    w_oth = np.take(w_oth, index(e2, perms), axis=b)
            rows_ref = spec.positions(e, g, {}).numpy().reshape(-1)
            rows_oth = spec.positions(e, g, {k: torch.from_numpy(v) for k, v in free.items()}).numpy()
            r = np.moveaxis(ref[p], a, 0)[rows_ref].reshape(n, -1)
            o = np.moveaxis(w_oth, a, 0)[rows_oth.reshape(-1)].reshape(n, -1)
            A += r @ o.T
        return A

    order = [g for g in spec.groups if members[g]]
    rng = random.Random(seed)
    history, sweeps = [objective(perms)], 0
    for sweep in range(max_iter):
        rng.shuffle(order)
        progress = False
        for g in order:
            A = cost(g, perms)
            new = linear_sum_assignment(A, maximize=True)[1]
            rows = np.arange(len(new))
            gain = A[rows, new].sum() - A[rows, perms[g]].sum()
            if gain > 1e-12 and not np.array_equal(new, perms[g]):
                perms[g], progress = new, True
        sweeps = sweep + 1
        history.append(objective(perms))
        if not progress:
            break
    return perms, history, sweeps


def _tensors(model) -> dict:
    return dict(model.named_parameters()) | dict(model.named_buffers())


# --------------------------------------------------------------------------- inputs and memory


def make_pair(name: str, noise: float):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    spec = tm.discover(model, torch.randn(1, 3, 224, 224))
    other = tm.permute(model, spec, spec.random_perms(seed=1))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in _tensors(other).values():
            if t.is_floating_point() and t.numel() > 1:
                t.add_(torch.randn(t.shape, generator=gen) * (noise * float(t.std())))
    return model, other, spec


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(model).values())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(impl: str, name: str, repeats: int, noise: float) -> dict:
    model, other, spec = make_pair(name, noise)
    unsupported = _factored_or_quadratic(spec)
    if unsupported:
        raise SystemExit(f"{name}: the baseline does not reproduce groups {unsupported[:4]}")
    times, peaks, traced = [], [], None
    for r in range(repeats):
        traced_run = impl == "baseline" and r == 0
        before = rss_bytes()
        reset_peak()
        if traced_run:
            tracemalloc.start()
        t0 = time.perf_counter()
        if impl == "torchmerge":
            res = tm.align(model, other, spec, method="weight", return_result=True)
            perms, history, sweeps = res.perms, res.objective, res.sweeps
        else:
            perms, history, sweeps = baseline_weight_matching(model, other, spec)
        times.append(time.perf_counter() - t0)
        if traced_run:
            traced = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        peaks.append(peak_rss_bytes() - before)
    true = {g: torch.argsort(p) for g, p in spec.random_perms(seed=1).items()}
    recovered = all(np.array_equal(np.asarray(perms[g]), true[g].numpy()) for g in true)
    return {"impl": impl, "model": name, "time_s": statistics.median(times), "times_s": times,
            "objective": history[-1], "objective_history": history, "sweeps": sweeps,
            "peak_rss_extra_bytes": max(peaks), "tracemalloc_peak_bytes": traced,
            "model_bytes": model_bytes(model), "groups": len(spec.groups),
            "recovered_true_perms": recovered,
            "perms_digest": float(sum(float(np.dot(np.asarray(perms[g], dtype=np.float64),
                                                   np.arange(len(perms[g])) + 1.0)) for g in perms))}


def _factored_or_quadratic(spec) -> list:
    out = []
    for (p, a), e in spec.axes.items():
        if e[0] == "prod" and len(set(_names(e))) > 1:
            out.append(e)
    for g in spec.groups:
        per_param = {}
        for (p, a), e in spec.axes.items():
            per_param[p] = per_param.get(p, 0) + _names(e).count(g)
        out += [(g, p) for p, c in per_param.items() if c > 1]
    return out


# --------------------------------------------------------------------------- driver


def run_worker(impl: str, name: str, repeats: int, noise: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--models", name, "--repeats", str(repeats),
           "--noise", str(noise)]
    out = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {impl}/{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(name: str, repeats: int, noise: float) -> dict:
    tm_row = run_worker("torchmerge", name, repeats, noise)
    base = run_worker("baseline", name, repeats, noise)
    mb = tm_row["model_bytes"]
    return {
        "model": name, "groups": tm_row["groups"], "model_bytes": mb,
        "sweeps": {"torchmerge": tm_row["sweeps"], "baseline": base["sweeps"]},
        "time_s": {"torchmerge": round(tm_row["time_s"], 3), "baseline": round(base["time_s"], 3)},
        "times_s": {"torchmerge": tm_row["times_s"], "baseline": base["times_s"]},
        "speedup": round(base["time_s"] / tm_row["time_s"], 2),
        "objective": {"torchmerge": tm_row["objective"], "baseline": base["objective"]},
        "objective_history": {"torchmerge": tm_row["objective_history"],
                              "baseline": base["objective_history"]},
        "objective_rel_diff": abs(tm_row["objective"] - base["objective"]) / abs(base["objective"]),
        "same_perms": tm_row["perms_digest"] == base["perms_digest"],
        "recovered_true_perms": {"torchmerge": tm_row["recovered_true_perms"],
                                 "baseline": base["recovered_true_perms"]},
        "peak_extra_memory_x_model": {
            "torchmerge_rss": round(tm_row["peak_rss_extra_bytes"] / mb, 2),
            "baseline_rss": round(base["peak_rss_extra_bytes"] / mb, 2),
            "baseline_tracemalloc": round(base["tracemalloc_peak_bytes"] / mb, 2)},
    }


def print_table(rows: list) -> None:
    head = (f"{'model':<10} {'groups':>6} {'sweeps':>7} {'baseline s':>11} {'torchmerge s':>13} "
            f"{'speedup':>8} {'objective (torchmerge)':>23} {'rel diff':>9} "
            f"{'mem tm':>7} {'mem base':>9} {'(tracem.)':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        m = r["peak_extra_memory_x_model"]
        print(f"{r['model']:<10} {r['groups']:>6} {r['sweeps']['torchmerge']:>3}/{r['sweeps']['baseline']:<3} "
              f"{r['time_s']['baseline']:>11.2f} {r['time_s']['torchmerge']:>13.2f} {r['speedup']:>7.2f}x "
              f"{r['objective']['torchmerge']:>23.10g} {r['objective_rel_diff']:>9.1e} "
              f"{m['torchmerge_rss']:>6.2f}x {m['baseline_rss']:>8.2f}x {m['baseline_tracemalloc']:>8.2f}x")
    print(f"memory: peak extra RSS during the call / one model's bytes; targets: speedup >= "
          f"{SPEED_TARGET:.0f}x, torchmerge memory < {MEMORY_TARGET:.0f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16_bn"], choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--worker", choices=["torchmerge", "baseline"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "align.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.models[0], args.repeats, args.noise)))
        return 0

    load_before = os.getloadavg()
    rows = [compare(name, args.repeats, args.noise) for name in args.models]
    load_after = os.getloadavg()
    print_table(rows)
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    payload = {
        "benchmark": "align (weight matching) vs NumPy float64 baseline",
        "pair": f"model vs permuted copy (random_perms seed 1) + {args.noise} x std Gaussian noise",
        "repeats": args.repeats, "statistic": "median",
        "memory": "peak RSS (VmHWM after clear_refs) above RSS before the call, fresh subprocess, "
                  "MALLOC_MMAP_THRESHOLD_=131072; baseline also tracemalloc peak",
        "targets": {"speedup": SPEED_TARGET, "memory_x_model": MEMORY_TARGET},
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
