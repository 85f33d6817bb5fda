"""Cross-fitted privacy risks (generators/evaluation/crossfit.py)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from generators.evaluation.crossfit import crossfit_risks, pool
from generators.evaluation.risks import _result


@pytest.fixture(scope="module")
def population() -> pd.DataFrame:
    from generators.tabular.demo import make_health_table

    return make_health_table(700, seed=21)


def test_pool_sums_the_counts_before_the_risk():
    a = _result(100, 60, 40, 20, 100, 30, 0.95)
    b = _result(100, 50, 40, 18, 100, 28, 0.95)
    p = pool([a, b, {"value": 0.9}])            # a result without counts is skipped
    assert p == {**_result(200, 110, 80, 38, 200, 58, 0.95), "folds_used": 2}
    assert p["ci"][1] - p["ci"][0] < a["ci"][1] - a["ci"][0]   # more attacks, narrower
    assert math.isnan(pool([])["value"])


def test_every_row_is_a_control_once_and_a_copying_generator_is_caught(population):
    real = population.iloc[:200].reset_index(drop=True)
    fresh = population.iloc[200:].reset_index(drop=True)
    seen: list[tuple[int, int]] = []

    def copier(train, n, seed):                 # "memorises": its output is its input
        seen.append((len(train), n))
        return train.reset_index(drop=True)

    def independent(train, n, seed):            # knows the population, not these patients
        return fresh.sample(n, random_state=seed).reset_index(drop=True)

    leak = crossfit_risks(real, copier, folds=5, seed=3)
    ok = crossfit_risks(real, independent, folds=5, seed=3)
    assert seen == [(160, 160)] * 5
    for r in (leak, ok):
        assert r["status"] == "ok" and r["folds"] == 5 and len(r["per_fold"]) == 5
        assert r["singling_out"]["folds_used"] == 5
        for s in r["secrets"]:
            inf = r["inference"][s]
            assert inf["n_control_attacks"] == 200             # each real row once
            assert inf["n_attacks"] == 5 * 160
    assert leak["inference_max"] > 0.3 and min(v["ci"][0] for v in leak["inference"].values()) > 0
    assert leak["singling_out"]["ci"][0] > 0 and leak["linkability"]["ci"][0] > 0
    # nothing leaks: every pooled interval reaches down to 0
    assert all(v["ci"][0] <= 0.02 for v in ok["inference"].values())
    assert ok["singling_out"]["ci"][0] <= 0.02 and ok["linkability"]["ci"][0] <= 0.02


def test_too_few_rows_or_folds(population):
    assert crossfit_risks(population.iloc[:7], lambda t, n, s: t, folds=5)["status"] == "skipped"
    with pytest.raises(ValueError):
        crossfit_risks(population, lambda t, n, s: t, folds=1)


def test_paired_estimates_compare_each_patient_with_itself(population):
    from generators.evaluation.crossfit import paired

    real = population.iloc[:200].reset_index(drop=True)
    fresh = population.iloc[200:].reset_index(drop=True)
    leak = crossfit_risks(real, lambda t, n, s: t.reset_index(drop=True), folds=4, seed=5)
    ok = crossfit_risks(real, lambda t, n, s: fresh.sample(n, random_state=s).reset_index(drop=True),
                        folds=4, seed=5)
    for s, v in leak["paired"]["inference"].items():
        assert v["n_patients"] == 200 and v["ci"][0] > 0.3 and v["target_rate"] > v["control_rate"]
    assert leak["paired"]["inference_max"] > 0.5 and leak["paired"]["linkability"]["ci"][0] > 0
    assert all(v["ci"][0] <= 0.02 for v in ok["paired"]["inference"].values())
    assert ok["paired"]["linkability"]["ci"][0] <= 0.02
    # hand-made outcomes: two patients, each a target twice and a control once
    runs = [{"outcomes": {"train_index": ["a"], "control_index": ["b"],
                          "inference": {"x": {"train": [True], "control": [False]}}}},
            {"outcomes": {"train_index": ["b", "a"], "control_index": [],
                          "inference": {"x": {"train": [True, False], "control": []}}}},
            {"outcomes": {"train_index": ["b"], "control_index": ["a"],
                          "inference": {"x": {"train": [False], "control": [True]}}}}]
    p = paired(runs, "inference", "x", n_boot=50)
    # targets: a 0.5, b 0.5; controls: a 1, b 0 -> (0.5 - 0.5) / (1 - 0.5) = 0
    assert p["n_patients"] == 2 and p["target_rate"] == 0.5 and p["control_rate"] == 0.5
    assert p["value"] == 0.0
    assert math.isnan(paired(runs, "linkability")["value"])
