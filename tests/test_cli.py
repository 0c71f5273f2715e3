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
    assert {(results["best_method"], c) for c in ("repair", "affine+tune")} <= methods
    for row in results["rows"]:
        assert set(row["accuracy"]) == {t["name"] for t in results["tasks"]}
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
    assert set(results["variance_ratios"]) == {"None", "affine"}
    table = (out / "results.md").read_text()
    assert table == docs.read_text() and "| method | correction |" in table and "normalized" in table
    assert "normalized" in printed and "ties" in printed
    assert list((out / "cache").glob("*/expert_*.pt"))  # experts cached for the next run
    if pytest.importorskip("matplotlib"):
        assert (out / "accuracy.png").exists() and (out / "variance_ratios.png").exists()


@pytest.mark.parametrize("argv,message", [
    ([], "required"),
    (["nope"], "invalid choice"),
    (["demo", "--methods", "average,nope"], "unknown method(s) ['nope']; valid: average"),
    (["demo", "--methods", ","], "unknown method"),
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
