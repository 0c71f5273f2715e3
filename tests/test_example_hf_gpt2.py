"""examples/hf_gpt2_stdlib.py --quick: four GPT-2 language models from two pretrainings merged into
one GPT2LMHeadModel; the JSON it writes holds a finite perplexity for every task of every setting,
the corrected merge keeps more of the experts than the uncorrected one and than falling back
to each task's pretraining, and low-rank maps at the sites keep more than the affines alone."""
from __future__ import annotations

import math

import pytest

from example_runs import run_quick


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("transformers")
    return run_quick("hf_gpt2_stdlib.py", tmp_path_factory.mktemp("hf_gpt2"), timeout=600)


def _row(results, method, align, correction):
    rows = [r for r in results["rows"] if (r["method"], r["align"], r["correction"]) == (method, align, correction)]
    assert len(rows) == 1, f"expected one row {method}/{align}/{correction}"
    return rows[0]


def test_every_perplexity_is_finite(results):
    tasks = [t["name"] for t in results["tasks"]]
    assert results["quick"] is True and len(tasks) == 4 and len(results["rows"]) == 6
    for row in results["rows"]:
        assert sorted(row["perplexity"]) == sorted(tasks), row
        assert all(math.isfinite(p) and 1.0 <= p < 256.0 for p in row["perplexity"].values()), row
        assert math.isfinite(row["normalized"]) and 0.0 < row["normalized"] <= 1.5, row


def test_fine_tuning_beat_the_pretraining_on_every_task(results):
    experts, pretraining = results["rows"][0]["perplexity"], results["rows"][1]["perplexity"]
    assert all(experts[t] < pretraining[t] for t in experts), (experts, pretraining)


def test_corrected_merge_beats_uncorrected_and_the_pretrainings(results):
    plain = _row(results, "task_arithmetic", "weight", "None")["normalized"]
    pretraining = results["rows"][1]["normalized"]
    tuned = _row(results, "tall calibration={'tune_rank': 0}", "activation", "affine+tune")
    assert tuned["normalized"] > plain + 0.05 and tuned["normalized"] > pretraining, (tuned, plain, pretraining)
    assert tuned["site_parameters_per_task"] > 0


def test_low_rank_maps_add_capacity_and_keep_more(results):
    """tune_rank="auto" (8 on GPT-2): per-task low-rank maps at every site, tuned with the affines,
    fit the experts closer than the affines alone (tune_rank=0)."""
    low_rank = _row(results, "tall", "activation", "affine+tune")
    affines = _row(results, "tall calibration={'tune_rank': 0}", "activation", "affine+tune")
    assert low_rank["site_parameters_per_task"] > 2 * affines["site_parameters_per_task"]
    assert low_rank["normalized"] > affines["normalized"], (low_rank, affines)
