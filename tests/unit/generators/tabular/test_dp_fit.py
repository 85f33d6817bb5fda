"""PatientModel(dp=...): differentially private fit, its account and its file."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from generators import dp as dpa  # noqa: E402
from generators.tabular import PatientModel, TabularModelError  # noqa: E402
from generators.tabular.demo import make_health_table  # noqa: E402
from generators.tabular.dpfit import numeric_grid  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    t = make_health_table(400, seed=4)
    t["note"] = [f"free text {i}" for i in range(len(t))]        # one patient per value
    meta = {c: {"kind": "categorical", "binary": True} for c in t.columns
            if c.startswith("cond_") and not c.endswith("_age")}
    meta["sex"] = {"kind": "categorical", "values": ["female", "male", "other", "unknown"]}
    return t, meta


@pytest.fixture(scope="module")
def fitted(data):
    t, meta = data
    return PatientModel(hidden=16, dp={"epsilon": 6.0, "expected_batch": 40}).fit(
        t, meta, epochs=1, progress=False)


def test_dp_fit_spends_at_most_the_target(fitted, data):
    g = fitted.training["dp"]
    n, c = len(data[0]), len(fitted.codecs)
    assert 0 < g["epsilon"] <= g["epsilon_target"] == 6.0
    assert g["delta"] == min(1e-5, 1 / (10 * n)) and g["threshold_delta"] == g["delta"] / 2
    assert g["sample_rate"] == 40 / n and g["steps"] == round(1 / g["sample_rate"])
    assert g["noise_multiplier"] > 0 and g["clip_norm"] == 1.0
    # the recorded figures reproduce the recorded epsilon with the accountant
    extra = dpa.rdp_gaussian(np.sqrt(c), g["histogram_noise_std"])
    again = dpa.epsilon(g["sample_rate"], g["noise_multiplier"], g["steps"],
                        g["delta"] - g["threshold_delta"], extra_rdp=extra)
    assert again == pytest.approx(g["epsilon"], abs=1e-5)
    # the target is met tightly: 10 % less noise would overspend
    assert dpa.epsilon(g["sample_rate"], 0.9 * g["noise_multiplier"], g["steps"],
                       g["delta"] - g["threshold_delta"], extra_rdp=extra) > 6.0


def test_dp_encoders_keep_public_values_and_hide_single_patients(fitted, data):
    by = {c.name: c for c in fitted.codecs}
    assert by["sex"].categories[:2] and set(by["sex"].categories) == {"female", "male", "other",
                                                                       "unknown"}
    assert by["note"].categories == [] and by["note"].has_rare      # no free text survives
    assert set(fitted.sample(300, seed=1)["note"].dropna()) <= {"_RARE_"}
    # numerical bins sit on the public grid, not on training values
    grid = set(numeric_grid(by["age"].integer).tolist())
    assert set(by["age"].edges) <= grid and by["age"].knots == []
    # constraints come from the names only (no derived rule inferred from the data)
    kinds = {(c.kind, c.column) for c in fitted.constraints}
    assert ("present_if", "cond_44054006_onset_age") in kinds
    assert not any(c.kind == "derived" for c in fitted.constraints)
    s = fitted.sample(500, seed=2)
    assert (s["cond_44054006_onset_age"].notna() == (s["cond_44054006"] == 1)).all()


def test_dp_model_file_round_trip_without_fingerprint(fitted, tmp_path):
    path = fitted.save(tmp_path / "m")
    meta = json.loads((path / "model.json").read_text())
    assert "fingerprint" not in meta["training"]
    assert meta["training"]["dp"]["epsilon"] == fitted.training["dp"]["epsilon"]
    assert meta["hyper"]["dp"]["epsilon"] == 6.0
    loaded = PatientModel.load(path)
    pd.testing.assert_frame_equal(loaded.sample(50, seed=3), fitted.sample(50, seed=3))


def test_dp_settings_are_checked(data):
    t, meta = data
    for bad in ({}, {"epsilon": 0}, {"epsilon": float("inf")}, {"epsilon": 1, "delta": 0.01},
                {"epsilon": 1, "clip": 0}, {"epsilon": 1, "nope": 1},
                {"epsilon": 1, "preprocess_share": 1.0}):
        with pytest.raises(TabularModelError):
            PatientModel(hidden=8, dp=bad).fit(t, meta, epochs=1, progress=False)


def test_dp_samples_can_be_evaluated(fitted, data):
    # a DP model keeps a missing-value token in every column: its rows may be NaN where
    # the training table never is, and the DCR encoding must still line up
    from generators.evaluation.privacy import distance_to_closest_record

    t, meta = data
    s = fitted.sample(200, seed=5)
    s.loc[0, "age"] = np.nan
    d = distance_to_closest_record(t.iloc[:300], s, t.iloc[300:], meta)
    assert d["n_synthetic"] == 200 and d["synthetic_to_train_median"] > 0
