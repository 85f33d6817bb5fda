"""The report sections and the Anonymeter-style risks (generators/evaluation/report.py, risks.py)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def population() -> pd.DataFrame:
    from generators.tabular.demo import make_health_table

    return make_health_table(500, seed=11)


def test_wilson_rate_and_residual_risk():
    from generators.evaluation.risks import residual_risk, success_rate

    rate, err = success_rate(50, 100)
    assert rate == pytest.approx(0.5) and err == pytest.approx(0.0967, abs=1e-3)
    r0, e0 = success_rate(0, 100)
    assert 0 < r0 < 0.02 and e0 > 0        # Wilson never says 0 with certainty
    same = residual_risk((0.3, 0.05), (0.3, 0.05))
    assert same["value"] == 0 and same["ci"][0] < 0 < same["ci"][1]
    leak = residual_risk((0.8, 0.05), (0.2, 0.05))
    assert leak["value"] == pytest.approx(0.75) and leak["ci"][0] < 0.75 < leak["ci"][1]
    assert residual_risk((0.1, 0.05), (0.4, 0.05))["value"] == 0     # clipped, interval is not


def test_risks_separate_a_copy_from_fresh_rows(population):
    from generators.evaluation.risks import privacy_risks

    train, control = population.iloc[:200], population.iloc[200:300]
    fresh = population.iloc[300:500].reset_index(drop=True)
    copy = privacy_risks(train, train.reset_index(drop=True), control)
    new = privacy_risks(train, fresh, control)
    assert copy["status"] == new["status"] == "ok"
    assert copy["singling_out"]["value"] > 0.2 > new["singling_out"]["value"]
    assert copy["inference_max"] > 0.5 > new["inference_max"] - 0.2
    assert copy["linkability"]["value"] > new["linkability"]["value"]
    assert copy["linkability"]["aux_columns"][0][0] == "sex"    # demographics vs diagnoses
    assert len(copy["secrets"]) == 5 and all(s.startswith("cond_") for s in copy["secrets"])
    assert privacy_risks(train, fresh, control.iloc[:1])["status"] == "skipped"


def test_table_section_counts_an_exact_copy(population):
    from generators.evaluation.report import clean, table_section

    train, holdout = population.iloc[:160], population.iloc[160:200]
    synthetic = population.iloc[300:400].reset_index(drop=True)
    sec = table_section(train, holdout, synthetic, seed=1)
    assert sec["privacy"]["exact_copies"] == 0
    leaked = pd.concat([synthetic.iloc[:99], train.iloc[[7]]], ignore_index=True)
    sec = table_section(train, holdout, leaked, seed=1)
    assert sec["privacy"]["exact_copies"] == 1
    fid = sec["fidelity"]
    assert 0 < fid["quality"] <= 1 and 0 < fid["holdout_vs_train_quality"] <= 1
    assert len(fid["column_shapes_details"]) == sec["columns"] == population.shape[1] - 1  # no id
    assert sec["privacy"]["dcr"]["n_holdout"] == 40 and sec["privacy"]["dcr"]["plot"]["edges"]
    assert sec["privacy"]["risks"]["status"] == "ok"
    u = sec["utility"]
    assert u["status"] == "ok" and u["target"].startswith("cond_")
    assert 0.5 < u["gbm"]["trtr_auc"] <= 1 and 0.5 < u["gbm"]["tstr_auc"] <= 1
    import json

    json.dumps(clean(sec), allow_nan=False)     # strict JSON once cleaned
    no_holdout = table_section(train, None, synthetic, risks=False)
    assert no_holdout["utility"]["status"] == "skipped" and "dcr" not in no_holdout["privacy"]


def test_event_section_reports_order_violations_and_prevalence():
    from generators.evaluation.report import event_section
    from generators.events.synthetic import make_synthetic_tables

    patients, events = make_synthetic_tables(40, seed=2)
    real_p, syn_p = patients.iloc[:20], patients.iloc[20:]
    real_e = events[events["patient_id"].isin(real_p["patient_id"])]
    syn_e = events[events["patient_id"].isin(syn_p["patient_id"])].reset_index(drop=True)
    # the generator's own rules are checked (here none: rules learned from 20 real patients
    # would be broken by the 20 others, see docs/generators.md)
    sec = event_section(real_e, real_p, syn_e, syn_p, dependencies=[])
    assert sec["order_violations_total"] == 0 == sec["order_constraints_violated"]["total"]
    prev = sec["prevalence"]
    assert prev["codes"] > 5 and len(prev["top"]) <= 30 and prev["top"][0]["real"] >= prev["top"][-1]["real"]
    assert not math.isnan(prev["correlation"]) and sec["plot"]["events_per_patient"]["edges"]
    # an event moved before birth breaks an order constraint
    broken = syn_e.copy()
    broken.loc[broken.index[0], "t_days"] = -5.0
    assert event_section(real_e, real_p, broken, syn_p, dependencies=[])["order_violations_total"] >= 1


def test_histogram_shares():
    from generators.evaluation.report import histogram

    h = histogram([1, 2, 3, 4], [2, 2, np.nan], bins=3)
    assert len(h["edges"]) == 4 and sum(h["a"]) == pytest.approx(1) and sum(h["b"]) == pytest.approx(1)
    assert histogram([], [])["edges"] == []
