"""The order-constraint and consistency checkers find what they claim to find."""
from __future__ import annotations

import numpy as np
import pandas as pd

from generators.events.constraints import (
    EVENT_COLUMNS, condition_columns, learn_dependencies, order_violations, patient_consistency,
    reference_days,
)


def _ev(rows):
    out = []
    for i, r in enumerate(rows):
        e = dict.fromkeys(EVENT_COLUMNS)
        e.update(event_id=f"e{i}", end_t_days=np.nan, value_num=np.nan, system="s")
        e.update(r)
        out.append(e)
    return pd.DataFrame(out, columns=EVENT_COLUMNS)


def test_clean_table_has_no_violations():
    ev = _ev([
        {"patient_id": "a", "kind": "encounter", "t_days": 10.0, "code": "E", "end_t_days": 10.5},
        {"patient_id": "a", "kind": "condition_onset", "t_days": 10.0, "code": "C", "encounter_id": "e0"},
        {"patient_id": "a", "kind": "medication", "t_days": 10.2, "code": "M", "encounter_id": "e0"},
        {"patient_id": "a", "kind": "condition_abatement", "t_days": 30.0, "code": "C"},
    ])
    pats = pd.DataFrame({"patient_id": ["a"], "age": [1.5]})
    deps = [{"kind": "medication", "system": "s", "code": "M", "cond_system": "s", "cond_code": "C"}]
    v = order_violations(ev, pats, deps)
    assert v["total"] == 0, v


def test_each_rule_is_detected():
    ev = _ev([
        {"patient_id": "a", "kind": "encounter", "t_days": 10.0, "code": "E", "end_t_days": 10.5},
        {"patient_id": "a", "kind": "medication", "t_days": 10.2, "code": "M", "encounter_id": "e0"},
        {"patient_id": "a", "kind": "condition_abatement", "t_days": 11.0, "code": "C"},
        {"patient_id": "a", "kind": "observation", "t_days": 5.0, "code": "O", "encounter_id": "e0"},
        {"patient_id": "a", "kind": "procedure", "t_days": 900.0, "code": "P", "end_t_days": 800.0},
        {"patient_id": "a", "kind": "observation", "t_days": -1.0, "code": "O"},
    ])
    pats = pd.DataFrame({"patient_id": ["a"], "age": [2.2]})  # bound 803.55 days
    deps = [{"kind": "medication", "system": "s", "code": "M", "cond_system": "s", "cond_code": "C"}]
    v = order_violations(ev, pats, deps)
    assert v["time_backwards"] == 2  # 11.0 -> 5.0 and 900 -> -1
    assert v["abatement_without_onset"] == 1
    assert v["dependency"] == 1
    assert v["outside_encounter"] == 1
    assert v["end_before_start"] == 1
    assert v["after_reference"] == 1
    assert v["before_birth"] == 1
    assert v["total"] == 8


def test_learn_dependencies_needs_the_order_in_every_patient():
    rows = []
    for p in range(4):
        rows += [{"patient_id": f"p{p}", "kind": "condition_onset", "t_days": 1.0, "code": "C"},
                 {"patient_id": f"p{p}", "kind": "medication", "t_days": 2.0, "code": "M"},
                 {"patient_id": f"p{p}", "kind": "medication", "t_days": 0.5 if p == 0 else 3.0, "code": "N"}]
    deps = learn_dependencies(_ev(rows), min_support=3)
    assert [(d["code"], d["cond_code"]) for d in deps] == [("M", "C")]


def test_categorical_columns_give_the_same_rules_and_counts():
    """Event tables read from Parquet have categorical columns. pandas 2 (the evaluation
    environment of the optional baselines pins it) groups them by every combination of
    categories unless ``observed=True``: support counted over unobserved patients, and a
    merge of the product (221 GiB on the EHDS sample). Same answers as with plain columns."""
    rows = []
    for p in range(6):
        rows += [{"patient_id": f"p{p}", "kind": "condition_onset", "t_days": 1.0, "code": f"C{p % 2}"},
                 {"patient_id": f"p{p}", "kind": "medication", "t_days": 2.0, "code": f"M{p % 2}"},
                 {"patient_id": f"p{p}", "kind": "procedure", "t_days": 3.0, "code": f"P{p % 3}"},
                 {"patient_id": f"p{p}", "kind": "condition_abatement", "t_days": 4.0, "code": f"C{p % 2}"}]
    plain = _ev(rows)
    cat = plain.astype({c: "category" for c in ("patient_id", "kind", "system", "code")})
    deps = learn_dependencies(plain, min_support=3)
    assert sorted((d["code"], d["cond_code"]) for d in deps) == [("M0", "C0"), ("M1", "C1")]
    assert learn_dependencies(cat, min_support=3) == deps
    assert order_violations(cat, None, deps) == order_violations(plain, None, deps)
    assert order_violations(plain, None, deps)["total"] == 0


def test_reference_days_and_condition_columns():
    pats = pd.DataFrame({"patient_id": ["a", "b", "c"], "age": [10.5, 10.0, np.nan],
                         "deceased": [True, False, False], "age_at_death": [5.25, np.nan, np.nan],
                         "cond_123": [1, 0, 0], "cond_123_onset_age": [2.0, np.nan, np.nan],
                         "cond_other": [3, 0, 1]})
    ref = reference_days(pats)
    assert ref[0] == 5.25 * 365.25 and ref[1] == 11 * 365.25 - 1 and np.isinf(ref[2])
    assert np.array_equal(ref, reference_days(pats.to_dict(orient="list")))
    cols = condition_columns(pats)
    assert [(c.code, c.onset_age) for c in cols] == [("123", "cond_123_onset_age")]


def test_patient_consistency_counts_mismatches():
    pats = pd.DataFrame({"patient_id": ["a", "b"], "age": [30.0, 30.0], "cond_C": [1, 0],
                         "cond_C_onset_age": [20.0, np.nan]})
    ok = _ev([{"patient_id": "a", "kind": "condition_onset", "t_days": 20.5 * 365.25, "code": "C"}])
    assert patient_consistency(pats, ok)["onset_age_mismatch"] == 0
    bad = _ev([{"patient_id": "a", "kind": "condition_onset", "t_days": 25 * 365.25, "code": "C"},
               {"patient_id": "b", "kind": "condition_onset", "t_days": 3.0, "code": "C"}])
    c = patient_consistency(pats, bad)
    assert (c["onset_age_mismatch"], c["unexpected_onset"], c["missing_onset"]) == (1, 1, 0)
    assert patient_consistency(pats, bad.iloc[1:])["missing_onset"] == 1


def test_reference_days_without_age_from_a_mapping():
    cols = {"patient_id": ["a", "b", "c"], "sex": ["F", "M", "F"]}
    assert np.isinf(reference_days(cols)).all() and len(reference_days(cols)) == 3
