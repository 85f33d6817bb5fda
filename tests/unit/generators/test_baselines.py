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


# ------------------------------------------------------------------ the optional packages
def _modelled(table):
    return [c for c in table.columns if c != "patient_id"]


def test_prepare_and_restore_keep_columns_and_dtypes(table):
    """The plain frame the packages see, and the way back (no package needed)."""
    from generators.baselines import _prepare, _restore

    plain, sd = _prepare(table, None)
    assert list(plain.columns) == _modelled(table)
    assert sd["sex"] == "categorical" and sd["sbp"] == "numerical"
    assert plain["country"].map(type).eq(str).all() and plain["smoker"].isin(["True", "False"]).all()
    assert plain["age"].dtype == float and plain["cond_htn_onset_age"].isna().sum() > 0
    back = _restore(plain, table[_modelled(table)])
    pd.testing.assert_frame_equal(back, table[_modelled(table)].reset_index(drop=True))
    # what packages return: floats for integers, strings for categories, NaN/None for missing
    syn = pd.DataFrame({"sex": ["male", None], "age": [30.4, np.nan], "sbp": ["120.5", 130],
                        "smoker": ["False", "True"], "cond_htn": ["1", "0"],
                        "cond_htn_onset_age": [np.nan, 50.0], "country": ["FR", "ES"]})
    out = _restore(syn, table[_modelled(table)])
    assert out["age"].dtype == "Int64" and out["age"].tolist()[0] == 30 and out["age"].isna().tolist()[1]
    assert out["smoker"].dtype == bool and out["smoker"].tolist() == [False, True]
    assert out["cond_htn"].dtype == np.int8 and out["cond_htn"].tolist() == [1, 0]
    assert out["country"].dtype == table["country"].dtype and out["country"].tolist() == ["FR", "ES"]
    assert out["sbp"].dtype == float and out["sex"].dtype == table["sex"].dtype
    assert out["sex"].iloc[0] == "male" and pd.isna(out["sex"].iloc[1])
    with pytest.raises(ValueError, match="no column"):
        _restore(syn.drop(columns=["sbp"]), table[_modelled(table)])
    # datetimes: kept as datetimes for the packages, back from nanoseconds (CTGAN) or dates
    like = pd.DataFrame({"seen": pd.to_datetime(["2020-01-02", None, "2021-06-30"])})
    plain, sd = _prepare(like, None)
    assert sd == {"seen": "datetime"} and plain["seen"].dtype == "datetime64[ns]"
    ns = plain["seen"].astype("int64").where(plain["seen"].notna()).astype(float)
    for got in (ns, plain["seen"]):
        pd.testing.assert_series_equal(_restore(pd.DataFrame({"seen": got}), like)["seen"],
                                       like["seen"])


def test_ctgan_adapter_fills_and_restores_missing_numbers(table, monkeypatch):
    """CTGAN refuses NaN in continuous columns: the adapter gives it a mean-filled column
    and a discrete missing flag, and blanks the sampled values whose flag is set (a fake
    ``ctgan`` module records what the package would see)."""
    import sys
    import types

    from generators import baselines

    seen = {}

    class FakeCTGAN:
        def __init__(self, epochs=300, enable_gpu=True):
            seen["epochs"], seen["gpu"] = epochs, enable_gpu

        def set_random_state(self, seed):
            seen.setdefault("seeds", []).append(seed)

        def fit(self, data, discrete_columns=()):
            seen["data"], seen["discrete"] = data.copy(), list(discrete_columns)

        def sample(self, n):
            d = seen["data"]
            return d.iloc[np.arange(n) % len(d)].reset_index(drop=True)

    monkeypatch.setitem(sys.modules, "ctgan", types.SimpleNamespace(CTGAN=FakeCTGAN))
    monkeypatch.setattr(baselines, "available", lambda name: True)
    m = baselines.make_baseline("ctgan", seed=4).fit(table)
    data = seen["data"]
    assert seen["epochs"] == 300 and seen["gpu"] is False and seen["seeds"] == [4]
    cont = [c for c in data.columns if c not in seen["discrete"]]
    assert not data[cont].isna().any().any()
    assert "cond_htn_onset_age__missing" in seen["discrete"] and "age__missing" not in data
    assert set(seen["discrete"]) >= {"sex", "smoker", "cond_htn", "country"}
    flag = data["cond_htn_onset_age__missing"] == "1"
    assert flag.sum() == table["cond_htn_onset_age"].isna().sum()
    assert np.isclose(data.loc[flag, "cond_htn_onset_age"], table["cond_htn_onset_age"].mean()).all()
    out = m.sample(len(table), seed=9)
    assert seen["seeds"] == [4, 9] and list(out.columns) == _modelled(table)
    pd.testing.assert_series_equal(out["cond_htn_onset_age"].isna(),
                                   table["cond_htn_onset_age"].isna().reset_index(drop=True))


def _fit_optional(name, module, table, **kw):
    pytest.importorskip(module)
    import torch

    from generators.baselines import make_baseline

    torch.set_num_threads(1)
    return make_baseline(name, seed=0, **kw).fit(table)


def _check_sample(a, table, n):
    assert list(a.columns) == _modelled(table) and len(a) == n
    assert list(a.index) == list(range(n))
    assert a["sex"].dtype == table["sex"].dtype and set(a["sex"].dropna()) <= {"female", "male"}
    assert a["country"].dtype == table["country"].dtype
    assert set(a["country"].dropna()) <= {"ES", "FR", "DE", "IT"} and a["country"].notna().mean() > 0.9
    assert a["age"].dtype == "Int64" and a["sbp"].dtype == float
    assert a["cond_htn"].dtype in (np.int8, "Int64") and set(a["cond_htn"].dropna()) <= {0, 1}
    assert a["smoker"].dtype in (bool, object) and a["cond_htn_onset_age"].dtype == float
    # the missing values of the onset are learned, not all or none
    assert 0.05 < a["cond_htn_onset_age"].isna().mean() < 0.95
    lo, hi = table["sbp"].min(), table["sbp"].max()
    assert a["sbp"].between(lo - 0.25 * (hi - lo), hi + 0.25 * (hi - lo)).mean() > 0.9


def test_sdv_gaussian_copula_samples_the_table(table):
    from generators.evaluation.fidelity import quality_report

    m = _fit_optional("sdv_gaussian_copula", "sdv", table)
    a = m.sample(400, seed=1)
    _check_sample(a, table, 400)
    assert a["age"].min() >= 20 and a["age"].max() <= 89          # min/max enforced
    assert a["smoker"].dtype == bool and a["cond_htn"].dtype == np.int8
    pd.testing.assert_frame_equal(a, m.sample(400, seed=1))
    assert not a.equals(m.sample(400, seed=2))
    # the fit is deterministic too
    pd.testing.assert_frame_equal(a, _fit_optional("sdv_gaussian_copula", "sdv", table).sample(400, seed=1))
    assert quality_report(table.drop(columns=["patient_id"]), a)["score"] > 0.75


def test_ctgan_samples_the_table(table):
    m = _fit_optional("ctgan", "ctgan", table, epochs=20)
    a = m.sample(400, seed=1)
    _check_sample(a, table, 400)
    pd.testing.assert_frame_equal(a, m.sample(400, seed=1))
    assert not a.equals(m.sample(400, seed=2))


def test_tabularargn_samples_the_table(table):
    m = _fit_optional("tabularargn", "mostlyai.engine", table, epochs=5)
    a = m.sample(400, seed=1)
    _check_sample(a, table, 400)
    pd.testing.assert_frame_equal(a, m.sample(400, seed=1))
    assert not a.equals(m.sample(400, seed=2))
    folder = m._dir
    import gc
    import os.path

    del m
    gc.collect()
    assert not os.path.exists(folder)              # the engine's workspace is removed
