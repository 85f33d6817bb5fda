"""EventModel: persistence, determinism, coherence and bounds of sampled event tables."""
from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from generators.events import EVENT_COLUMNS, EventModel, EventModelError, order_violations, \
    patient_consistency
from generators.events.constraints import DAYS_PER_YEAR, reference_days
from generators.events.synthetic import DM, HTN, MEDS

REPO = Path(__file__).resolve().parents[4]


def _digest(df: pd.DataFrame) -> str:
    return hashlib.sha256(df.to_csv(index=False, float_format="%.17g").encode()).hexdigest()


def test_sample_shape_and_order(fitted, tables):
    patients, events = tables
    out = fitted.sample(patients.iloc[:10], seed=3)
    assert list(out.columns) == list(events.columns)
    assert set(out["patient_id"]) <= set(patients["patient_id"].iloc[:10])
    assert out["event_id"].is_unique
    for _, g in out.groupby("patient_id"):
        assert g["t_days"].is_monotonic_increasing
    assert set(out["kind"]) <= {"encounter", "condition_onset", "condition_abatement", "observation",
                                "procedure", "medication", "immunization", "diagnostic_report",
                                "imaging_study"}
    # Encounter membership points at an encounter of the same patient.
    enc = out[out["kind"] == "encounter"].set_index("event_id")["patient_id"]
    mem = out[out["encounter_id"].notna()]
    assert len(mem) > 0
    assert (enc.reindex(mem["encounter_id"]).to_numpy() == mem["patient_id"].to_numpy()).all()


def test_save_load_round_trip_never_unpickles(fitted, tables, tmp_path, monkeypatch):
    patients, _ = tables
    before = fitted.sample(patients.iloc[:8], seed=11)
    fitted.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.json", "weights.safetensors"}
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format"] == "synthport-event-model"

    def refuse(*a, **k):
        raise AssertionError("unpickling while loading a model")

    import torch

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = EventModel.load(tmp_path / "m")
    after = loaded.sample(patients.iloc[:8], seed=11)
    pd.testing.assert_frame_equal(before, after)
    # ... and the weights really came back: the torch module round-trips them.
    sd = loaded.to_torch().state_dict()
    assert all(np.array_equal(sd[k].numpy(), fitted.params[k]) for k in fitted.params)


def test_seed_changes_output(fitted, tables):
    patients, _ = tables
    a = fitted.sample(patients.iloc[:5], seed=1)
    b = fitted.sample(patients.iloc[:5], seed=2)
    assert _digest(a) != _digest(b)


def test_batch_equals_one_by_one(fitted, tables):
    patients, _ = tables
    rows = patients.iloc[:24]
    batch = fitted.sample(rows, seed=5)
    single = pd.concat([fitted.sample(rows.iloc[[i]], seed=5) for i in range(len(rows))],
                       ignore_index=True)
    pd.testing.assert_frame_equal(batch, single)
    # Order of the batch and batch size do not matter either.
    rev = fitted.sample(rows.iloc[::-1], seed=5, batch_size=7)
    key = ["patient_id", "event_id"]
    pd.testing.assert_frame_equal(
        rev.sort_values(key, kind="mergesort").reset_index(drop=True),
        batch.sort_values(key, kind="mergesort").reset_index(drop=True))


def test_same_events_in_another_process(fitted, tables, tmp_path):
    patients, _ = tables
    fitted.save(tmp_path / "m")
    patients.iloc[:6].to_json(tmp_path / "p.json", orient="records")
    here = _digest(EventModel.load(tmp_path / "m").sample(
        pd.read_json(tmp_path / "p.json", orient="records", dtype=False), seed=9))
    code = (
        "import sys, hashlib, pandas as pd\n"
        "from generators.events import EventModel\n"
        "m = EventModel.load(sys.argv[1])\n"
        "p = pd.read_json(sys.argv[2], orient='records', dtype=False)\n"
        "df = m.sample(p, seed=9)\n"
        "print(hashlib.sha256(df.to_csv(index=False, float_format='%.17g').encode()).hexdigest())\n"
    )
    env = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "p.json")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == here


def test_no_order_constraint_violated(fitted, tables):
    patients, _ = tables
    deps = fitted.meta["dependencies"]
    assert deps, "the synthetic training data has treatments that always follow a condition"
    for seed in (0, 1, 2):
        out = fitted.sample(patients, seed=seed)
        v = order_violations(out, patients, deps)
        assert v["total"] == 0, v


def test_patient_rows_drive_condition_onsets(fitted, tables):
    patients, _ = tables
    rows = patients.iloc[:12].copy()
    # Flip the flags: everyone now has diabetes from 2 years before the reference age,
    # nobody has hypertension.
    rows[f"cond_{DM}"] = 1
    rows[f"cond_{DM}_onset_age"] = np.maximum(rows["age"] - 2.0, 0.5)
    rows[f"cond_{HTN}"] = 0
    rows[f"cond_{HTN}_onset_age"] = np.nan
    out = fitted.sample(rows, seed=4)
    c = patient_consistency(rows, out)
    assert c["checked"] > 0
    assert (c["missing_onset"], c["unexpected_onset"], c["onset_age_mismatch"]) == (0, 0, 0), c
    dm = out[(out["kind"] == "condition_onset") & (out["code"] == DM)]
    assert set(dm["patient_id"]) == set(rows["patient_id"])
    first = dm.groupby("patient_id")["t_days"].min()
    target = rows.set_index("patient_id")[f"cond_{DM}_onset_age"] * DAYS_PER_YEAR
    assert (np.abs(first - target.reindex(first.index)) <= 31.0 + 1e-6).all()
    assert not ((out["kind"] == "condition_onset") & (out["code"] == HTN)).any()
    # Hypertension's medication always followed its onset in training: none without it.
    assert not ((out["kind"] == "medication") & (out["code"] == MEDS[HTN][0])).any()


def test_events_within_life_and_reference_age(fitted, tables):
    patients, _ = tables
    rows = patients.iloc[:10].copy()
    rows["age"] = [3.0, 5.5, 40.2, 70.0, 80.1, 1.0, 30.3, 60.0, 45.5, 20.0]
    rows["deceased"] = [False, False, True, True, False, False, True, False, False, False]
    rows["age_at_death"] = [np.nan, np.nan, 38.0, 65.25, np.nan, np.nan, 30.0, np.nan, np.nan, np.nan]
    for col in [c for c in rows.columns if c.endswith("_onset_age")]:
        rows[col] = np.minimum(rows[col], rows["age"] - 0.5)
    out = fitted.sample(rows, seed=8)
    bound = pd.Series(reference_days(rows), index=rows["patient_id"])
    assert (out["t_days"] >= 0).all()
    assert (out["t_days"].to_numpy() <= bound.reindex(out["patient_id"]).to_numpy() + 1e-9).all()
    ends = out["end_t_days"].dropna()
    assert (ends.to_numpy() >= out.loc[ends.index, "t_days"].to_numpy()).all()
    assert bound["p00002"] == pytest.approx(38.0 * DAYS_PER_YEAR + DAYS_PER_YEAR - 1)
    assert order_violations(out, rows, fitted.meta["dependencies"])["after_reference"] == 0


def test_labs_carry_values_and_units(fitted, tables):
    patients, _ = tables
    out = fitted.sample(patients, seed=0)
    obs = out[out["kind"] == "observation"]
    a1c = obs[obs["code"] == "4548-4"]
    assert len(a1c) and a1c["value_num"].notna().mean() > 0.9
    assert set(a1c["unit"]) == {"%"}
    smoke = obs[obs["code"] == "72166-2"]
    assert len(smoke) and set(smoke["value_code"].dropna()) <= {"449868002", "266919005"}


def test_errors(tmp_path, tables):
    patients, events = tables
    with pytest.raises(EventModelError):
        EventModel().sample(patients.iloc[:1])
    with pytest.raises(EventModelError):
        EventModel.load(tmp_path)
    with pytest.raises(EventModelError):
        EventModel().fit(patients, events.drop(columns=["t_days"]), epochs=1, progress=False)
    assert set(EVENT_COLUMNS) <= set(events.columns)


def test_long_histories_train_in_chunks(tables):
    import torch

    torch.set_num_threads(1)
    patients, events = tables
    sub = patients.iloc[:16]
    ev = events[events["patient_id"].isin(set(sub["patient_id"]))]
    m = EventModel(hidden=16, d_in=16, chunk_len=8).fit(sub, ev, epochs=2, progress=False)
    loss = m.meta["training"]["loss"]
    assert len(loss) == 2 and all(np.isfinite(loss))
    out = m.sample(sub.iloc[:3], seed=1)
    assert order_violations(out, sub.iloc[:3], m.meta["dependencies"])["total"] == 0


def test_sampler_time_class_matches_training(fitted):
    # The sampler feeds back the same time class that training computed for each event.
    from generators.events.encoding import gap_class

    s = fitted._get_sampler()
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 30000, 2000)
    t_new = t + np.where(rng.random(2000) < 0.4, 0.0, rng.exponential(400, 2000))
    ref = np.where(rng.random(2000) < 0.2, np.inf, t_new + rng.exponential(3000, 2000))
    for first in (False, True):
        assert np.array_equal(s._input_bin(t_new, t, ref, first),
                              gap_class(t, t_new, ref, s.edges, first))
