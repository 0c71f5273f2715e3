"""The ``torchmerge`` console command: demo (quick run) and bench, and its argument errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from torchmerge.cli import main


@pytest.mark.slow
def test_demo_quick_writes_table(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    docs = tmp_path / "results.md"
    assert main(["demo", "--quick", "--out", str(out), "--docs", str(docs)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    methods = {(r["method"], r["correction"]) for r in results["rows"]}
    assert {("experts", "-"), ("average", "None"), ("average", "affine"), ("ties", "None"),
            ("ties", "affine")} <= methods
    assert results["best_method"] in ("average", "ties")
    assert {(m, c) for m in ("route", "route unaligned") for c in ("None", "affine")} <= methods
    routed = {r["method"]: r["compatibility"] for r in results["rows"] if r["method"].startswith("route")}
    assert "unit_correlation_aligned" in routed["route"] and "unit_correlation_aligned" not in routed["route unaligned"]
    assert {(results["best_method"], c) for c in ("repair", "affine+tune")} <= methods
    for row in results["rows"]:
        assert set(row["accuracy"]) == {t["name"] for t in results["tasks"]}
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
    assert set(results["variance_ratios"]) == {"None", "affine"}
    sites = list(results["variance_ratios"]["None"]["digits0-4"])
    assert sites[0] == "features.1 (BatchNorm2d)", sites  # module paths, not fx node names
    table = (out / "results.md").read_text()
    assert "| method | correction |" in table and "normalized" in table and "features.1 (BatchNorm2d)" in table
    assert "Reproducible: the same command with the same seeds" in table and "`route` rows:" in table
    assert "normalized" in printed and "ties" in printed
    assert list((out / "cache").glob("*/expert_*.pt"))  # experts cached for the next run
    if pytest.importorskip("matplotlib"):
        assert (out / "accuracy.png").exists() and (out / "variance_ratios.png").exists()
        assert results["plots"] == ["accuracy.png", "variance_ratios.png"]
        last = printed.strip().splitlines()[-1]
        assert "plots: " in last and str(out / "accuracy.png") in last and str(out / "variance_ratios.png") in last
        assert "[accuracy.png](accuracy.png)" in table  # linked next to the plots...
        assert "[accuracy.png](demo/accuracy.png)" in docs.read_text()  # ...and from the --docs file


@pytest.mark.parametrize("argv,message", [
    (["nope"], "invalid choice"),
    (["demo", "--methods", "average,nope"], "unknown method(s) ['nope']; valid: average"),
    (["demo", "--methods", ","], "unknown method"),
    (["demo", "--methods", "average,tie"], "unknown method(s) ['tie'] (did you mean 'ties'?); valid: average"),
    (["demo", "--methods", "RegMean"], "(did you mean 'regmean'? names are case-sensitive)"),
    (["demo", "--threads", "0"], "expected a positive integer, got '0'"),
    (["demo", "--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_argument_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_outside_a_checkout_says_what_to_do(tmp_path, capsys):
    assert main(["bench", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no benchmarks found" in err and "source checkout" in err


def test_bench_list_and_unknown_name(capsys):
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not list(root.glob("bench_*.py")):
        pytest.skip("not a source checkout")
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "discover" in out and "results in" in out
    assert main(["bench", "nope", "--list"]) == 2
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err


def test_bench_runs_a_script_and_reports_failure(tmp_path, capsys):
    (tmp_path / "bench_ok.py").write_text("import json, pathlib\n"
                                          "p = pathlib.Path(__file__).parent / 'results'\n"
                                          "p.mkdir(exist_ok=True)\n"
                                          "(p / 'ok.json').write_text(json.dumps({'seconds': 1}))\n")
    (tmp_path / "bench_bad.py").write_text("raise SystemExit(3)\n")
    assert main(["bench", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "ok.json" in captured.out and "[seconds]" in captured.out
    assert "failed: bad" in captured.err
    assert main(["bench", "ok", "--dir", str(tmp_path)]) == 0


def test_module_entry_point_help():
    done = subprocess.run([sys.executable, "-m", "torchmerge.cli", "demo", "--help"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0 and "--quick" in done.stdout and "--retrain" in done.stdout


@pytest.mark.slow
def test_demo_training_is_deterministic(tmp_path):
    """Same seed, same experts, whatever the global RNG state before (heads are seeded too)."""
    pytest.importorskip("sklearn")
    import torch

    from torchmerge import demo

    states = []
    for run, noise in enumerate((1, 2)):
        torch.manual_seed(noise)  # a different global RNG state before each build
        cfg = demo.DemoConfig.quick_config(out=str(tmp_path / f"run{run}"), retrain=True)
        setting = demo.build_setting(cfg, log=lambda *a: None)
        states.append([e.state_dict() for e in setting.experts])
    for a, b in zip(*states):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_arguments_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: torchmerge") and "demo" in out and "bench" in out and "--version" in out


def test_version(capsys):
    import torchmerge
    from torchmerge.cli import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchmerge {version()}"
    assert version() == torchmerge.__version__  # installed metadata and the package agree


def test_version_falls_back_to_the_package(monkeypatch):
    from importlib import metadata

    import torchmerge
    from torchmerge import cli

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli.version() == torchmerge.__version__


def test_merge_misspelt_method_did_you_mean():
    import torch

    import torchmerge as tm

    nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)) for _ in range(2)]
    with pytest.raises(tm.ArgumentError, match=r"unknown merge method 'regmaen' \(did you mean 'regmean'\?\); "
                                               r"valid: 'average', .*'pleas'"):
        tm.merge(nets, method="regmaen", example_inputs=torch.randn(2, 3), correction=None)


@pytest.mark.parametrize("argv, out", [
    (["demo", "--quick"], "torchmerge-demo/quick"),
    (["demo"], "torchmerge-demo"),
    (["demo", "--quick", "--out", "elsewhere"], "elsewhere"),
])
def test_quick_demo_has_its_own_folder(argv, out, monkeypatch):
    """A quick run never overwrites the full run's results.json, results.md and plots."""
    from torchmerge import demo

    seen = []
    monkeypatch.setattr(demo, "run", lambda cfg, **kw: seen.append(cfg))
    assert main(argv) == 0
    assert seen[0].out == out and seen[0].quick == ("--quick" in argv)


@pytest.mark.slow
def test_demo_quick_default_folder(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--no-plot", "--methods", "average"]) == 0
    assert (tmp_path / "torchmerge-demo" / "quick" / "results.json").exists()
    assert not (tmp_path / "torchmerge-demo" / "results.json").exists()
