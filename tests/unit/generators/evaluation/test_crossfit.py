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


def test_repeated_splits_make_each_row_a_control_once_per_pass(population):
    from generators.evaluation.risks import residual_risk, success_rate

    real = population.iloc[:120].reset_index(drop=True)
    fresh = population.iloc[200:].reset_index(drop=True)
    controls: list[frozenset] = []

    def independent(train, n, seed):
        controls.append(frozenset(set(real.index) - set(train.index)))
        return fresh.sample(n, random_state=seed).reset_index(drop=True)

    one = crossfit_risks(real, independent, folds=3, seed=4)
    controls.clear()
    rep = crossfit_risks(real, independent, folds=3, repeats=2, seed=4)
    assert rep["repeats"] == 2 and len(rep["per_fold"]) == 6
    assert [(p["repeat"], p["fold"]) for p in rep["per_fold"]] == [(r, k) for r in (0, 1) for k in range(3)]
    # the first pass is the single cross-fit; the second draws another split
    assert [p["inference_max"] for p in rep["per_fold"][:3]] == [p["inference_max"] for p in one["per_fold"]]
    first, second = controls[:3], controls[3:]
    for passed in (first, second):
        assert sorted(i for c in passed for i in c) == list(range(120))
    assert set(first) != set(second)
    for s, v in rep["inference"].items():
        assert v["n_control_attacks"] == 240 and v["repeats"] == 2
        # the interval is that of one pass's counts (the sample is not twice as large)
        want = residual_risk(success_rate(v["successes"] / 2, v["n_attacks"] / 2),
                             success_rate(v["control_successes"] / 2, v["n_control_attacks"] / 2))
        assert v["ci"] == pytest.approx(want["ci"]) and v["value"] == pytest.approx(want["value"])
        assert rep["paired"]["inference"][s]["n_patients"] == 120
    with pytest.raises(ValueError):
        crossfit_risks(real, independent, folds=3, repeats=0)


def test_paired_averages_a_patients_controls_over_the_passes():
    from generators.evaluation.crossfit import paired

    runs = [{"outcomes": {"train_index": ["a"], "control_index": ["b"],
                          "inference": {"x": {"train": [True], "control": [True]}}}},
            {"outcomes": {"train_index": ["b"], "control_index": ["a"],
                          "inference": {"x": {"train": [True], "control": [False]}}}},
            {"outcomes": {"train_index": ["a"], "control_index": ["b"],   # second pass
                          "inference": {"x": {"train": [True], "control": [False]}}}}]
    r = paired(runs, "inference", "x", n_boot=50)
    # targets a: 1, 1; b: 1 -> 1.0; controls a: 0; b: (1 + 0) / 2 -> mean 0.25
    assert r["n_patients"] == 2 and r["target_rate"] == 1.0 and r["control_rate"] == 0.25
    assert r["value"] == pytest.approx(1.0)
