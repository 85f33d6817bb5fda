"""PatientModel: fit / sample / save / load, conditions, constraints, determinism."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from generators.tabular import ModelFileError, PatientModel, TabularModelError  # noqa: E402
from generators.tabular.demo import REF_YEAR, make_health_table  # noqa: E402

REPO = Path(__file__).resolve().parents[4]
COND = "cond_44054006"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return make_health_table(200, seed=1)


@pytest.fixture(scope="module")
def model(table) -> PatientModel:
    torch.set_num_threads(1)
    return PatientModel(hidden=64, val_share=0.0).fit(table, epochs=12, progress=False)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    return model.save(tmp_path_factory.mktemp("model") / "m")


def _digest(df: pd.DataFrame) -> str:
    return hashlib.sha256(df.to_csv().encode()).hexdigest()


def test_sample_has_training_columns_and_dtypes(model, table):
    s = model.sample(300, seed=1)
    assert list(s.columns) == [c for c in table.columns if c != "patient_id"]
    assert list(s.index) == list(range(300))
    assert s["age"].dtype == np.int64 and s[COND].dtype == np.int64
    assert s["obs_8480-6_mean"].dtype == float
    assert set(s["sex"]) <= {"female", "male"}
    assert (s["enc_AMB"] == s["enc_AMB"].round()).all()
    # floats keep the training decimals (one)
    v = s["obs_4548-4_last"].dropna().to_numpy()
    assert np.allclose(v, np.round(v, 1))


def test_same_seed_same_rows_prefix_and_start(model):
    a = model.sample(40, seed=7)
    pd.testing.assert_frame_equal(a, model.sample(40, seed=7))
    pd.testing.assert_frame_equal(a.iloc[:20], model.sample(20, seed=7))
    pd.testing.assert_frame_equal(a.iloc[15:], model.sample(25, seed=7, start=15))
    pd.testing.assert_frame_equal(a, model.sample(40, seed=7, batch_size=7))
    assert not model.sample(40, seed=8).equals(a)


def test_save_load_round_trip(model, saved, table):
    meta = json.loads((saved / "model.json").read_text())
    assert meta["format"] == "synthport-tabular-argn"
    assert meta["training"]["fingerprint"] == hashlib.sha256(table.to_csv(index=True).encode()).hexdigest()
    assert meta["torch_version"] == torch.__version__
    assert [c["name"] for c in meta["columns"]] == model.columns
    loaded = PatientModel.load(saved)
    pd.testing.assert_frame_equal(loaded.sample(80, seed=3), model.sample(80, seed=3))
    cond = {"sex": "male", COND: 1}
    pd.testing.assert_frame_equal(loaded.sample(30, seed=4, conditions=cond),
                                  model.sample(30, seed=4, conditions=cond))


def test_damaged_weights_are_refused(saved, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_bytes((saved / "model.json").read_bytes())
    blob = bytearray((saved / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ModelFileError):
        PatientModel.load(bad)
    with pytest.raises(ModelFileError):
        PatientModel.load(tmp_path / "missing")


def test_determinism_across_processes(saved, model):
    code = ("import hashlib, torch; torch.set_num_threads(1); "
            "from generators.tabular import PatientModel; "
            f"m = PatientModel.load({str(saved)!r}); "
            "print(hashlib.sha256(m.sample(150, seed=11).to_csv().encode()).hexdigest())")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == _digest(model.sample(150, seed=11))


def test_conditions_are_honoured_exactly(model):
    s = model.sample(200, seed=2, conditions={"sex": "female", COND: 1})
    assert (s["sex"] == "female").all() and (s[COND] == 1).all()
    assert s[f"{COND}_onset_age"].notna().all()
    t = model.sample(100, seed=2, conditions={"age": 70, "obs_8480-6_mean": 151.3})
    assert (t["age"] == 70).all() and (t["obs_8480-6_mean"] == 151.3).all()
    assert (t["birth_year"] == REF_YEAR - 70).all()  # derived constraint, inverted
    onset = t.filter(like="_onset_age")
    assert (onset.isna() | (onset.le(70))).all().all()


def test_seed_rows_dataframe(model):
    seeds = pd.DataFrame({"sex": ["male", None, "female"], "age": [30, 80, np.nan],
                          "patient_id": ["a", "b", "c"]})
    s = model.sample(seed=5, conditions=seeds)
    assert len(s) == 3
    assert s.loc[0, "sex"] == "male" and s.loc[2, "sex"] == "female"
    assert s.loc[0, "age"] == 30 and s.loc[1, "age"] == 80
    with pytest.raises(TabularModelError):
        model.sample(4, seed=5, conditions=seeds)


def test_bad_conditions_raise(model):
    with pytest.raises(TabularModelError):
        model.sample(5, conditions={"no_such_column": 1})
    with pytest.raises(TabularModelError):
        model.sample(5, conditions={"sex": "unknown-value"})
    with pytest.raises(TabularModelError):
        model.sample(5, conditions={"sex": ["male", "female"]})


def test_rare_categories_are_not_reproduced(model, table):
    counts = table["country"].value_counts()
    rare = [v for v, c in counts.items() if c < 5]
    assert rare, "the demo table should have a rare country"
    s = model.sample(3000, seed=9)
    assert not set(rare) & set(s["country"])
    given = model.sample(10, seed=9, conditions={"country": rare[0]})
    assert (given["country"] == rare[0]).all()


def test_constraints_hold(model):
    s = model.sample(3000, seed=13)
    for code in [c[5:] for c in s.columns if c.startswith("cond_") and not c.endswith("_age")]:
        onset = s[f"cond_{code}_onset_age"]
        assert (onset.notna() == (s[f"cond_{code}"] == 1)).all(), code
        assert (onset.isna() | (onset <= s["age"])).all(), code
    assert (s["age_at_death"].notna() == (s["deceased"] == 1)).all()
    dead = s["age_at_death"].notna()
    assert (s.loc[dead, "age_at_death"] == s.loc[dead, "age"]).all()
    assert (s["birth_year"] + s["age"] == REF_YEAR).all()
    kinds = {(c.kind, c.column) for c in model.constraints}
    assert ("present_if", "age_at_death") in kinds and ("upper", f"{COND}_onset_age") in kinds


def test_declared_constraints_and_metadata_errors():
    r = np.random.default_rng(0)
    n = 120
    a = r.integers(20, 90, n)
    df = pd.DataFrame({"a": a, "b": np.round(a * r.uniform(0.2, 1.0, n), 1),
                       "flag": r.choice(["yes", "no"], n)})
    df["c"] = np.where(df["flag"] == "yes", r.normal(5, 1, n).round(2), np.nan)
    meta = {"b": {"kind": "numerical", "upper": "a"},
            "c": {"present_if": {"column": "flag", "values": ["yes"]}}}
    m = PatientModel(hidden=32, val_share=0.0).fit(df, meta, epochs=5, progress=False)
    s = m.sample(2000, seed=1)
    assert (s["b"] <= s["a"]).all()
    assert (s["c"].notna() == (s["flag"] == "yes")).all()
    s = m.sample(200, seed=1, conditions={"c": 4.0})
    assert (s["flag"] == "yes").all()
    with pytest.raises(TabularModelError):
        PatientModel().fit(df, {"b": {"upper": "zzz"}}, epochs=1, progress=False)
    with pytest.raises(TabularModelError):
        PatientModel().fit(df, {"nope": {"kind": "numerical"}}, epochs=1, progress=False)
    with pytest.raises(TabularModelError):
        PatientModel(no_such_hyper=1)


def test_kinds_from_metadata_and_dtypes_round_trip():
    r = np.random.default_rng(1)
    n = 150
    df = pd.DataFrame({
        "key": [f"k{i}" for i in range(n)],
        "flag": r.random(n) < 0.3,
        "grade": pd.Categorical(r.choice(["low", "mid", "high"], n), categories=["low", "mid", "high"]),
        "when": pd.to_datetime("2020-01-01") + pd.to_timedelta(r.integers(0, 900, n), unit="D"),
        "code": r.choice([1, 2, 3], n),
        "count": pd.array(np.where(r.random(n) < 0.1, None, r.poisson(3, n)), dtype="Int64"),
    })
    meta = {"key": {"kind": "key"}, "code": {"kind": "categorical"}}
    m = PatientModel(hidden=32, val_share=0.0).fit(df, meta, epochs=3, progress=False)
    assert "key" not in m.columns
    s = m.sample(400, seed=0)
    assert s["flag"].dtype == bool
    assert isinstance(s["grade"].dtype, pd.CategoricalDtype)
    assert list(s["grade"].cat.categories) == ["low", "mid", "high"]
    assert pd.api.types.is_datetime64_any_dtype(s["when"])
    assert (s["when"] == s["when"].dt.normalize()).all()  # whole days stay whole days
    assert set(s["code"]) <= {1, 2, 3} and s["code"].dtype == np.int64
    assert str(s["count"].dtype) == "Int64" and s["count"].isna().any()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_device_is_an_error(table):
    with pytest.raises(TabularModelError):
        PatientModel().fit(table, device="cuda", epochs=1, progress=False)


def test_category_dtype_is_fixed_and_hides_rare_values():
    r = np.random.default_rng(2)
    n = 120
    vals = r.choice(["a", "b"], n).astype(object)
    vals[:2] = "secret"  # seen twice: rare
    df = pd.DataFrame({"g": pd.Categorical(vals, categories=["a", "b", "secret"]),
                       "x": r.normal(size=n).round(2)})
    m = PatientModel(hidden=16, val_share=0.0).fit(df, epochs=2, progress=False)
    one, two = m.sample(5, seed=0), m.sample(500, seed=0)
    assert list(one["g"].cat.categories) == list(two["g"].cat.categories) == ["a", "b", "_RARE_"]
    assert list(m.sample(3, seed=0, conditions={"g": "secret"})["g"]) == ["secret"] * 3
