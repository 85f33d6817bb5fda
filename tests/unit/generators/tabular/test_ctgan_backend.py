"""CtganPatientModel (optional extra synthport[ctgan], BUSL-1.1): fit / sample / save / load,
determinism by (seed, row), no unpickling, numpy decoding equal to ctgan's, conditions.

Skipped where ctgan is not installed (CI); where it is, these tests must pass."""
from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ctgan = pytest.importorskip("ctgan")
torch = pytest.importorskip("torch")

from generators.tabular import (CTGAN_LICENCE, TabularModelError,  # noqa: E402
                                load_patient_model)
from generators.tabular.ctgan_backend import FORMAT, CtganPatientModel  # noqa: E402
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
    return make_health_table(120, seed=1)


@pytest.fixture(scope="module")
def model(table) -> CtganPatientModel:
    torch.set_num_threads(1)
    return CtganPatientModel(generator_dim=[64, 64], discriminator_dim=[64, 64], batch_size=100,
                             embedding_dim=32).fit(table, epochs=4, progress=False)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    return model.save(tmp_path_factory.mktemp("ctgan") / "m")


def _digest(df: pd.DataFrame) -> str:
    return hashlib.sha256(df.to_csv().encode()).hexdigest()


def test_sample_has_training_columns_dtypes_and_ranges(model, table):
    s = model.sample(250, seed=1)
    assert list(s.columns) == [c for c in table.columns if c != "patient_id"]
    assert list(s.index) == list(range(250))
    assert s["age"].dtype == np.int64 and s[COND].dtype == np.int64
    assert s["obs_8480-6_mean"].dtype == float and s["sex"].dtype == object
    assert set(s["sex"]) <= {"female", "male"} and set(s[COND]) <= {0, 1}
    for col in ("age", "obs_8480-6_mean", "enc_AMB"):
        assert s[col].min() >= table[col].min() and s[col].max() <= table[col].max()
    # floats keep the training decimals (one); integers stay integers
    v = s["obs_8480-6_mean"].dropna()
    assert np.allclose(v, v.round(1))
    assert (s["enc_AMB"] == s["enc_AMB"].round()).all()


def test_constraints_hold(model):
    s = model.sample(500, seed=3)
    for code in ("44054006", "38341003", "195967001"):
        flag, onset = s[f"cond_{code}"], s[f"cond_{code}_onset_age"]
        assert (onset.notna() == (flag == 1)).all()             # present_if
        assert (onset.dropna() <= s.loc[onset.notna(), "age"]).all()   # upper age
    assert (s["birth_year"] == REF_YEAR - s["age"]).all()        # derived
    assert (s["age_at_death"].notna() == (s["deceased"] == 1)).all()


def test_rows_are_a_function_of_seed_and_index(model):
    a = model.sample(230, seed=5)
    b = model.sample(470, seed=5)
    pd.testing.assert_frame_equal(a, b.iloc[:230])
    c = model.sample(7, seed=5, start=98)                     # across a block boundary (100)
    pd.testing.assert_frame_equal(c, b.iloc[98:105])
    pd.testing.assert_frame_equal(model.sample(1, seed=5, start=333), b.iloc[333:334])
    assert not model.sample(230, seed=6).equals(a)
    assert model.sample(0, seed=5).shape == (0, a.shape[1])


def test_save_load_round_trip(model, saved):
    meta = json.loads((saved / "model.json").read_text())
    assert meta["format"] == FORMAT and meta["licence"] == CTGAN_LICENCE
    assert meta["training"]["licence"] == CTGAN_LICENCE
    assert meta["training"]["packages"]["ctgan"] == ctgan.__version__
    spans = {s["type"] for s in meta["spans"]}
    assert spans == {"continuous", "discrete"}
    assert all(len(s["means"]) == len(s["stds"]) >= 1 for s in meta["spans"] if s["type"] == "continuous")
    m2 = load_patient_model(saved)
    assert isinstance(m2, CtganPatientModel) and m2.columns == model.columns
    pd.testing.assert_frame_equal(m2.sample(300, seed=9), model.sample(300, seed=9))
    pd.testing.assert_frame_equal(m2.sample(5, seed=9, start=1234), model.sample(5, seed=9, start=1234))


def test_load_unpickles_nothing_and_needs_no_ctgan(saved, model, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("something was unpickled")

    real_torch_load = torch.load

    def torch_load(*a, **k):
        if not k.get("weights_only"):
            raise AssertionError("torch.load without weights_only")
        return real_torch_load(*a, **k)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", torch_load)
    real_import = builtins.__import__

    def no_ctgan(name, *a, **k):
        if name == "ctgan" or name.startswith(("ctgan.", "rdt")):
            raise ImportError(f"no {name} here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ctgan)
    m2 = load_patient_model(saved)
    pd.testing.assert_frame_equal(m2.sample(120, seed=2), model.sample(120, seed=2))


def test_damaged_weights_are_refused(saved, tmp_path):
    import shutil

    from generators.tabular import ModelFileError

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ModelFileError, match="sha256"):
        CtganPatientModel.load(bad)


def test_same_rows_in_a_fresh_process(saved, model):
    code = ("import hashlib, torch; torch.set_num_threads(2)\n"
            "from generators.tabular import load_patient_model\n"
            f"m = load_patient_model({str(saved)!r})\n"
            "df = m.sample(150, seed=11, start=40)\n"
            "print(hashlib.sha256(df.to_csv().encode()).hexdigest())\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == _digest(model.sample(150, seed=11, start=40))


def test_decoding_equals_ctgans_inverse_transform(model):
    tr = model.ctgan._transformer
    # on synthport's own activated blocks (one-hot choices)
    for block in (0, 3):
        act = model.activated_block(4, block)
        ours = model.plain_frame(model.decode(act))
        theirs = tr.inverse_transform(act.copy())
        pd.testing.assert_frame_equal(ours, theirs, check_dtype=False, rtol=1e-12, atol=1e-9)
    # on ctgan's own generator output (Gumbel-softmax, soft), from ctgan's own sampler
    g = model.ctgan._generator
    torch.manual_seed(0)
    np.random.seed(0)
    z = torch.randn(100, model.hyper["embedding_dim"])
    cond = torch.from_numpy(model.ctgan._data_sampler.sample_original_condvec(100))
    with torch.no_grad():
        act = model.ctgan._apply_activate(g(torch.cat([z, cond], 1))).double().numpy()
    pd.testing.assert_frame_equal(model.plain_frame(model.decode(act)),
                                  tr.inverse_transform(act.copy()), check_dtype=False,
                                  rtol=1e-6, atol=1e-6)


def test_generator_equals_ctgans_in_sampling_mode(model):
    """synthport's float64 forward pass = ctgan's Generator as CTGAN.sample runs it (train
    mode: batch-norm on the batch's statistics)."""
    import copy

    theirs = copy.deepcopy(model.ctgan._generator).cpu().double().train()
    x = torch.randn(100, model.hyper["embedding_dim"] + len(model.cond_probs), dtype=torch.float64)
    with torch.no_grad():
        want = theirs(x)
        got = model._net64(x)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_conditions_by_rejection(model):
    s = model.sample(120, seed=2, conditions={"sex": "female", COND: 1})
    assert (s["sex"] == "female").all() and (s[COND] == 1).all()
    assert s[f"{COND}_onset_age"].notna().all()
    # row i depends on (seed, i, conditions) only
    pd.testing.assert_frame_equal(
        s.iloc[50:60], model.sample(10, seed=2, start=50, conditions={"sex": "female", COND: 1}))
    # numbers: matched by the codec's bin, returned as given, constraints repaired around them
    t = model.sample(40, seed=2, conditions={"age": 70})
    assert (t["age"] == 70).all() and (t["birth_year"] == REF_YEAR - 70).all()
    onset = t.filter(like="_onset_age")
    assert (onset.isna() | onset.le(70)).all().all()
    # per-row conditions (a DataFrame of seed rows); None/NaN = not conditioned
    seeds = pd.DataFrame({"sex": ["male", None, "female"], COND: [1, 0, np.nan]})
    u = model.sample(seed=3, conditions=seeds)
    assert list(u["sex"].iloc[[0, 2]]) == ["male", "female"] and list(u[COND].iloc[:2]) == [1, 0]
    with pytest.raises(TabularModelError, match="unknown column"):
        model.sample(3, conditions={"nope": 1})
    with pytest.raises(TabularModelError, match="never seen"):
        model.sample(3, conditions={"sex": "other"})


def test_conditions_too_rare_raise_a_clear_error(model, monkeypatch):
    monkeypatch.setitem(model.hyper, "max_tries", 1)
    want = {"sex": "female", COND: 1, "cond_38341003": 1, "cond_195967001": 1, "deceased": 1}
    with pytest.raises(TabularModelError, match="rejection"):
        model.sample(300, seed=1, conditions=want)


def test_rare_categories_are_not_reproduced():
    df = make_health_table(80, seed=4)
    df.loc[:2, "country"] = ["XX", "YY", "ZZ"]              # three one-off values
    m = CtganPatientModel(generator_dim=[32], discriminator_dim=[32], batch_size=40,
                          embedding_dim=16).fit(df, epochs=1, progress=False)
    got = set(m.sample(400, seed=0)["country"].dropna())
    assert not got & {"XX", "YY", "ZZ"} and got <= set(df["country"].dropna()) | {"_RARE_"}


def test_missing_extra_is_named(monkeypatch, table):
    monkeypatch.setitem(sys.modules, "ctgan", None)          # import ctgan -> ImportError
    with pytest.raises(TabularModelError, match=r"synthport\[ctgan\]"):
        CtganPatientModel().fit(table, epochs=1, progress=False)
