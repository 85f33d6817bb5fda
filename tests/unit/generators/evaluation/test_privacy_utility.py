"""Privacy (exact copies, DCR, anonymeter wrapper) and utility (TSTR vs TRTR)."""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from generators.evaluation.privacy import (anonymeter_risks, distance_to_closest_record,
                                           exact_copies)
from generators.tabular.demo import make_health_table


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    return make_health_table(300, seed=1)


@pytest.fixture(scope="module")
def holdout() -> pd.DataFrame:
    return make_health_table(300, seed=2)


def test_exact_copies_are_counted(train, holdout):
    assert exact_copies(train, holdout) == 0
    leaked = pd.concat([holdout.iloc[:50], train.iloc[[3, 10, 99]]], ignore_index=True)
    assert exact_copies(train, leaked) == 3
    # dtype differences do not hide a copy; patient ids are not compared
    retyped = train.iloc[[5]].copy()
    retyped["age"] = retyped["age"].astype(float)
    retyped["patient_id"] = "other"
    assert exact_copies(train, retyped) == 1
    changed = retyped.copy()
    changed["obs_8480-6_mean"] += 0.1
    assert exact_copies(train, changed) == 0


def test_dcr_separates_copies_from_fresh_rows(train, holdout):
    fresh = make_health_table(300, seed=3)
    d = distance_to_closest_record(train, fresh, holdout)
    assert d["synthetic_to_train_median"] > 0
    assert d["share_synthetic_closer_than_holdout_p5"] < 0.2
    assert abs(d["share_closer_to_train_than_holdout"] - 0.5) < 0.15
    noisy_copy = train.copy()
    noisy_copy["obs_8480-6_mean"] += 0.5
    c = distance_to_closest_record(train, noisy_copy, holdout)
    assert c["synthetic_to_train_median"] < d["holdout_to_train_p5"]
    assert c["share_synthetic_closer_than_holdout_p5"] > 0.9
    assert c["share_closer_to_train_than_holdout"] > 0.9


def test_anonymeter_missing_is_reported(train, holdout, monkeypatch):
    monkeypatch.setitem(sys.modules, "anonymeter", None)
    monkeypatch.setitem(sys.modules, "anonymeter.evaluators", None)
    out = anonymeter_risks(train, holdout, holdout)
    assert out["status"] == "not installed"


def test_anonymeter_runs_when_installed(train, holdout):
    pytest.importorskip("anonymeter", reason="anonymeter not installed (it pins numpy; see docs/generators.md)")
    out = anonymeter_risks(train.iloc[:200], holdout.iloc[:200], holdout.iloc[200:], n_attacks=50)
    assert out["status"] == "ok"
    for key in ("singling_out", "linkability"):
        assert 0.0 <= out[key]["value"] <= 1.0


def test_tstr_close_to_trtr_for_good_and_low_for_broken_synthetic(train, holdout):
    pytest.importorskip("sklearn", reason="scikit-learn not installed (test/eval extra)")
    from generators.evaluation.utility import tstr

    good = make_health_table(600, seed=4)
    out = tstr(train, good, holdout, "cond_44054006")
    assert out["trtr_auc"] > 0.75
    assert out["tstr_auc"] >= 0.9 * out["trtr_auc"]
    assert out["n_features"] > 10 and "cond_44054006_onset_age" not in str(out)
    broken = good.copy()
    broken["cond_44054006"] = broken["cond_44054006"].sample(frac=1, random_state=0).to_numpy()
    bad = tstr(train, broken, holdout, "cond_44054006", model="gbm")
    assert bad["tstr_auc"] < out["tstr_auc"] - 0.1
    with pytest.raises(ValueError):
        tstr(train, good, holdout, "cond_44054006", model="svm")
