"""generators.evaluation.events: the event-sequence statistics of the evaluation report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from generators.evaluation.events import event_statistics, ks_complement
from generators.events.synthetic import make_synthetic_tables


@pytest.fixture(scope="module")
def real():
    return make_synthetic_tables(40, seed=3)


def test_ks_complement():
    a = np.arange(100.0)
    assert ks_complement(a, a) == 1.0
    assert ks_complement(a, a + 1000) == 0.0
    assert 0.4 < ks_complement(a, a + 50) < 0.6


def test_identical_tables_score_one(real):
    patients, events = real
    r = event_statistics(events, events, patients, patients)
    json.dumps(r)
    assert r["events_per_patient"]["ks_complement"] == 1.0
    assert r["time_gaps"]["ks_complement"] == 1.0
    assert all(v["mean_abs_diff"] == 0 for v in r["code_prevalence"].values())
    assert r["observation_values"]["mean_ks_complement"] == 1.0
    assert r["order_constraints_violated"]["total"] == 0
    assert r["dependencies_checked"] > 0
    assert r["patient_consistency"]["missing_onset"] == 0


def test_differences_lower_the_scores(real):
    patients, events = real
    other_p, other = make_synthetic_tables(40, seed=4, years=1.0)
    # Shift every synthetic medication before any condition: dependencies break.
    bad = other.copy()
    bad.loc[bad["kind"] == "medication", "t_days"] = 0.0
    bad = bad.sort_values(["patient_id", "t_days"], kind="mergesort")
    r = event_statistics(events, bad, patients, other_p)
    assert r["events_per_patient"]["ks_complement"] < 0.8
    assert r["order_constraints_violated"]["dependency"] > 0
    assert r["order_constraints_violated"]["total"] > 0


def test_given_rules_are_checked_and_real_rules_reported(real):
    patients, events = real
    rule = {"kind": "immunization", "system": "http://hl7.org/fhir/sid/cvx", "code": "140",
            "cond_system": "http://snomed.info/sct", "cond_code": "38341003"}
    r = event_statistics(events, events, patients, patients, dependencies=[rule])
    assert r["dependencies_checked"] == 1
    # Flu shots before (or without) hypertension break the given rule ...
    assert r["order_constraints_violated"]["dependency"] > 0
    # ... while the rules learned from the real table hold in the same table.
    assert r["real_rules_broken"]["rules"] > 0 and r["real_rules_broken"]["broken"] == 0
