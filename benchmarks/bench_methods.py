"""Peak memory and time of every merge method on T=4 experts of a ~10M-parameter model (CPU).

Usage:  python benchmarks/bench_methods.py [--tasks 4] [--methods ties tall ...] [--no-base]

Each method runs in a fresh subprocess (``--worker``), so its peak resident set size
(the kernel's ``VmHWM``, reset through ``/proc/self/clear_refs`` after the inputs are built;
``getrusage`` ``ru_maxrss`` as a fallback — tracemalloc does not see torch's CPU allocations) is its
own. The model is a small ViT-style transformer state dict (dim 384, MLP 1536, 6 blocks,
10.7M float32 parameters, plus an integer buffer). Reported, in units of one model copy:

- ``inputs``: RSS growth while building the inputs (T experts + the base + statistics, if any);
- ``peak``: peak RSS growth over the process baseline *without* the base and statistics, i.e.
  T experts + everything the merge allocates — the target is ``peak ≤ T + 2``;
- ``extra``: peak RSS minus the RSS after building inputs (the merge's own working set: output,
  per-key temporaries, masks).

Each method runs twice: with glibc's default malloc, and with ``MALLOC_MMAP_THRESHOLD_=131072``
and ``MKL_DISABLE_FAST_MM=1`` (freed tensors return to the OS at once and MKL keeps no buffer
pool, so RSS follows live tensor bytes; the target is checked on this second run). Before measuring, each worker makes one small BLAS and LAPACK call, so the
libraries' one-time per-thread work buffers are not counted as the merge's memory.

Where ``fusion_bench`` is installed (never a dependency), a ``fusionbench_tall`` row runs its
``generate_task_masks`` + Task Arithmetic (``tall_mask/utils.py``: experts flattened into one
``[T, n]`` tensor, as its ``state_dict_to_vector`` does) on the same inputs, and checks that its
masks equal torchmerge's (``mask_agreement``).

Prints a table and writes ``benchmarks/results/methods.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ["average", "task_arithmetic", "ties", "dare", "tall", "consensus", "regmean", "fisher",
           "mats"]
PEER = "fusionbench_tall"  # FusionBench's TALL masks + Task Arithmetic, run only where it is installed
DIM, MLP, BLOCKS = 384, 1536, 6
# glibc's dynamic mmap threshold keeps freed large blocks in the heap; a fixed threshold makes RSS
# follow the live tensors, which is what the algorithm controls
ALLOCATORS = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072", "MKL_DISABLE_FAST_MM": "1"}}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the peak seen next is the merge's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def model_shapes() -> dict:
    shapes = {"embed.weight": (DIM, 3, 16, 16), "embed.bias": (DIM,), "pos": (1, 197, DIM)}
    for b in range(BLOCKS):
        p = f"blocks.{b}."
        shapes.update({
            p + "norm1.weight": (DIM,), p + "norm1.bias": (DIM,),
            p + "qkv.weight": (3 * DIM, DIM), p + "qkv.bias": (3 * DIM,),
            p + "proj.weight": (DIM, DIM), p + "proj.bias": (DIM,),
            p + "norm2.weight": (DIM,), p + "norm2.bias": (DIM,),
            p + "fc1.weight": (MLP, DIM), p + "fc1.bias": (MLP,),
            p + "fc2.weight": (DIM, MLP), p + "fc2.bias": (DIM,),
        })
    return shapes


def build_inputs(T: int, method: str, with_base: bool):
    import torch
    shapes = model_shapes()
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = []
    for _ in range(T):
        e = {k: torch.randn(v.shape, generator=g).mul_(0.01).add_(v) for k, v in base.items()}
        e["norm.num_batches_tracked"] = torch.tensor(100)
        experts.append(e)
    base["norm.num_batches_tracked"] = torch.tensor(0)
    stats = None
    if method in ("regmean", "mats"):
        stats = []
        for _ in range(T):
            s = {}
            for k, v in base.items():
                if k.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")):
                    x = torch.randn(64, v.shape[1], generator=g)
                    s[k] = x.T @ x + torch.eye(v.shape[1])
            stats.append(s)
    elif method == "fisher":
        stats = [{k: torch.rand(v.shape, generator=g) for k, v in base.items()
                  if v.is_floating_point()} for _ in range(T)]
    return experts, (base if with_base else None), stats


def peer_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("fusion_bench") is not None


def fusionbench_tall(experts, base, lam: float = 0.4):
    """FusionBench's TALL: flat task vectors, ``generate_task_masks``, θ₀ + Σ τ (its output)."""
    import contextlib
    import io

    import torch
    from fusion_bench.method.tall_mask.utils import generate_task_masks
    keys = [k for k in base if base[k].is_floating_point()]
    flat_ptm = torch.cat([base[k].reshape(-1) for k in keys])
    flat_ft = torch.stack([torch.cat([e[k].reshape(-1) for k in keys]) for e in experts])
    tvs = flat_ft - flat_ptm
    tv = tvs.sum(0)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the masks' sparsity
        masks = generate_task_masks(tvs, flat_ft, flat_ptm, tv=tv, tall_mask_lambda=lam)
    return masks, flat_ptm + tv


def mask_agreement(result, peer_masks, experts) -> float:
    """Fraction of (task, entry) mask bits on which torchmerge and the peer agree."""
    import torch
    keys = [k for k in experts[0] if k in result.masks]
    ours = torch.stack([torch.cat([result.mask(t, k).reshape(-1) for k in keys])
                        for t in range(len(experts))])
    return (ours == peer_masks).float().mean().item()


def worker(method: str, T: int, with_base: bool) -> dict:
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sys.path.insert(0, str(ROOT))
    from torchmerge.methods import merge_states
    merge_states("average", [{"w": torch.ones(4)}])  # warm up allocator / lazy imports
    if method == PEER:
        import fusion_bench.method.tall_mask.utils  # noqa: F401  (its import is not its merge)
    # BLAS/LAPACK allocate their per-thread work buffers on first use, once per process
    for dt in (torch.float32, torch.float64):
        torch.linalg.cholesky(torch.eye(64, dtype=dt) + torch.ones(64, 64, dtype=dt) @ torch.ones(64, 64, dtype=dt))
    rss0 = rss_bytes()
    experts, base, stats = build_inputs(T, "tall" if method == PEER else method, with_base)
    model_bytes = sum(v.numel() * v.element_size() for v in experts[0].values())
    rss1 = rss_bytes()
    peak_reset = reset_peak()
    side = sum(v.numel() * v.element_size() for v in (base or {}).values())
    side += sum(v.numel() * v.element_size() for s in (stats or []) for v in s.values())
    t0 = time.perf_counter()
    if method == PEER:
        result = fusionbench_tall(experts, base)
    else:
        result = merge_states(method, experts, base, stats=stats)
    seconds = time.perf_counter() - t0
    peak = max_rss_bytes()
    extra = {}
    if method == PEER:  # same output as torchmerge's TALL? (after the measurement)
        peer_masks, result = result
        extra["mask_agreement"] = mask_agreement(merge_states("tall", experts, base), peer_masks, experts)
        result = type("Peer", (), {"mask_bytes": lambda self: peer_masks.numel()})()
    return extra | {
        "method": method, "tasks": T, "base": with_base, "seconds": round(seconds, 3),
        "model_mb": round(model_bytes / 2**20, 2),
        "inputs_copies": round((rss1 - rss0) / model_bytes, 2),
        "peak_copies": round((peak - rss0 - side) / model_bytes, 2),
        "extra_copies": round((peak - rss1) / model_bytes, 2),
        "mask_mb": round(result.mask_bytes() / 2**20, 2),
        "peak_counter_reset": peak_reset,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--no-base", action="store_true", help="base=None (mean of the experts)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    with_base = not args.no_base
    if args.worker:
        print(json.dumps(worker(args.worker, args.tasks, with_base)))
        return
    rows = []
    methods = list(args.methods)
    if "tall" in methods and with_base and peer_installed():
        methods.append(PEER)
    for m in methods:
        cmd = [sys.executable, __file__, "--worker", m, "--tasks", str(args.tasks)]
        cmd += ["--no-base"] if not with_base else []
        row = None
        for mode, extra_env in ALLOCATORS.items():
            env = dict(os.environ, **extra_env)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if row is None:
                row = r
            row[f"peak_copies_{mode}"] = r.pop("peak_copies")
            row[f"extra_copies_{mode}"] = r.pop("extra_copies")
            row[f"seconds_{mode}"] = r.pop("seconds")
        rows.append(row)
    peer = next((r for r in rows if r["method"] == PEER), None)
    ours = next((r for r in rows if r["method"] == "tall"), None)
    target = args.tasks + 2
    print(f"T={args.tasks} experts of a {rows[0]['model_mb']} MB model, base={'given' if with_base else 'None'};"
          f" memory in model copies; target peak <= {target}")
    print(f"{'method':<16}{'time s':>8}{'peak':>8}{'extra':>8}{'peak*':>8}{'extra*':>8}"
          f"{'stats+base':>11}{'masks MB':>10}")
    for r in rows:
        ok = "ok" if r["peak_copies_mmap"] <= target else "OVER"
        side = r["inputs_copies"] - args.tasks
        print(f"{r['method']:<16}{r['seconds_default']:>8.2f}{r['peak_copies_default']:>8.2f}"
              f"{r['extra_copies_default']:>8.2f}{r['peak_copies_mmap']:>8.2f}"
              f"{r['extra_copies_mmap']:>8.2f}{side:>11.2f}{r['mask_mb']:>10.2f}  {ok}")
    print("peak/extra: default glibc malloc (freed per-key temporaries stay cached in the heap);\n"
          "peak*/extra*: MALLOC_MMAP_THRESHOLD_=131072 and MKL_DISABLE_FAST_MM=1, so freed tensors go"
          " back to the OS and the RSS tracks live tensor bytes.")
    peer_summary = None
    if peer and ours:
        peer_summary = {mode: round(ours[f"seconds_{mode}"] / peer[f"seconds_{mode}"], 2) for mode in ALLOCATORS}
        print(f"TALL vs FusionBench: time ratio (torchmerge / peer) {peer_summary}; extra memory "
              f"{ours['extra_copies_mmap']:.2f} vs {peer['extra_copies_mmap']:.2f} copies; masks agree on "
              f"{peer['mask_agreement']:.6f} of the bits")
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    payload = {"tasks": args.tasks, "base": with_base, "target_peak_copies": target,
               "machine": {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count()},
               "rows": rows, "tall_vs_fusionbench_time_ratio": peer_summary}
    (out_dir / "methods.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
