"""generators.baselines: the Gaussian copula fits and samples; optional packages are skipped."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    rs = np.random.default_rng(3)
    n = 300
    age = rs.integers(20, 90, n)
    sbp = 100 + 0.6 * age + rs.normal(0, 6, n)
    smoker = rs.random(n) < 0.3
    htn = ((sbp > 140) | (rs.random(n) < 0.1)).astype(np.int8)
    onset = np.where(htn == 1, np.round(age - rs.uniform(0, 10, n), 1), np.nan)
    return pd.DataFrame({
        "patient_id": [f"p{i}" for i in range(n)],
        "sex": rs.choice(["female", "male"], n),
        "age": pd.array(age, dtype="Int64"),
        "sbp": np.round(sbp, 1),
        "smoker": smoker,
        "cond_htn": htn,
        "cond_htn_onset_age": onset,
        "country": pd.Categorical(rs.choice(["ES", "FR", "DE", "IT"], n, p=[.5, .2, .2, .1])),
    })


def test_gaussian_copula_fits_and_samples(table):
    from generators.baselines import GaussianCopula
    from generators.evaluation.fidelity import quality_report

    m = GaussianCopula().fit(table)
    a = m.sample(500, seed=1)
    assert list(a.columns) == [c for c in table.columns if c != "patient_id"] and len(a) == 500
    # deterministic for a seed, different for another
    pd.testing.assert_frame_equal(a, m.sample(500, seed=1))
    assert not a.equals(m.sample(500, seed=2))
    # values come from the training support: categories seen, numbers within the range
    assert set(a["sex"]) <= {"female", "male"} and set(a["country"]) <= {"ES", "FR", "DE", "IT"}
    assert a["age"].dtype == "Int64" and a["age"].min() >= 20 and a["age"].max() <= 89
    assert a["smoker"].dtype == bool and a["cond_htn"].dtype == np.int8
    assert table["sbp"].min() <= a["sbp"].min() and a["sbp"].max() <= table["sbp"].max()
    assert np.allclose(a["sbp"], a["sbp"].round(1))
    # missingness and frequencies are kept; the correlation is learned
    assert abs(a["cond_htn_onset_age"].isna().mean() - table["cond_htn_onset_age"].isna().mean()) < 0.08
    assert abs((a["country"] == "ES").mean() - 0.5) < 0.08
    r = np.corrcoef(a["age"].astype(float), a["sbp"])[0, 1]
    assert r > 0.6, r
    q = quality_report(table.drop(columns=["patient_id"]), a)
    assert q["column_shapes"]["score"] > 0.9 and q["score"] > 0.8


def test_gaussian_copula_with_more_columns_than_rows():
    from generators.baselines import GaussianCopula

    rs = np.random.default_rng(0)
    df = pd.DataFrame({f"c{j}": rs.integers(0, 2, 12) for j in range(40)})
    df["x"] = rs.normal(size=12)
    out = GaussianCopula().fit(df).sample(30, seed=0)
    assert out.shape == (30, 41) and not out.isna().any().any()


def test_missing_packages_are_reported(monkeypatch):
    import importlib.util

    from generators import baselines

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("sdv", "ctgan", "mostlyai")
                        else real(name, *a))
    for name in ("sdv_gaussian_copula", "ctgan", "tabularargn"):
        assert not baselines.available(name)
        with pytest.raises(baselines.BaselineUnavailable):
            baselines.make_baseline(name)
    assert baselines.available("gaussian_copula")
    assert isinstance(baselines.make_baseline("gaussian_copula"), baselines.GaussianCopula)
    with pytest.raises(KeyError):
        baselines.make_baseline("nope")
