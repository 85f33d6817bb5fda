"""``synthport train`` / ``cohort create`` / the registry and the admin API."""
from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from server.errors import Conflict, InvalidRequest, NotFound
from server.source import RequestContext


@pytest.fixture
def env(db_url, tmp_path):
    from server.config import load_config
    from server.dicom.store import DicomStore
    from server.store import SqlStore
    from server.synthetic.registry import Registry

    cfg = load_config({"data_dir": str(tmp_path / "data"), "database_url": db_url}, environ={})
    store = SqlStore.from_url(db_url, cfg)
    yield cfg, store, DicomStore(store, cfg), Registry(store.engine, cfg.data_dir)
    store.engine.dispose()


def test_train_registers_a_complete_version(env, monkeypatch):
    import sys

    import torch

    torch.set_num_threads(1)
    from pydicom.data import get_testdata_file

    from server.synthetic.demo import demo_population, load_records
    from server.synthetic.training import TrainSettings, train, training_images

    cfg, store, dicom, reg = env
    load_records(store, demo_population(14, seed=5))
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()
    dicom.store_instance(RequestContext(), ct)
    images, origin = training_images(dicom, RequestContext(), 64)
    assert origin == "store" and len(images.images) == 1
    settings = TrainSettings(epochs=2, event_epochs=1, image_epochs=0, hidden=16,
                             event_hidden=16, min_count=1, progress=False)
    # a crashed earlier run left a temporary folder: it is removed, never registered
    stale = reg.model_dir("m", 1).parent / ".tmp-v1-999"
    stale.mkdir(parents=True)
    lines = []
    info = train(reg, store, dicom, "m", settings, echo=lines.append)
    assert info.version == 1 and not stale.exists()
    folder = reg.model_dir("m", 1)
    assert {p.name for p in folder.iterdir()} >= {"patients", "events", "images", "tables.json"}
    got = reg.model("m")
    assert got.fingerprint == info.fingerprint and len(got.fingerprint) == 64
    # 14 made-up patients + the Patient that the stored CT instance created
    assert got.settings["n_patients"] == 15 and got.timings["total_seconds"] > 0
    assert got.kinds == ["patients", "events", "images"]
    assert any("registered model m v1" in x for x in lines)
    info2 = train(reg, store, dicom, "m", settings, echo=lines.append)
    assert info2.version == 2 and info2.fingerprint == info.fingerprint
    assert [m.version for m in reg.models()] == [1, 2]
    with pytest.raises(InvalidRequest):
        train(reg, store, dicom, "bad name", settings)
    monkeypatch.setitem(sys.modules, "ctgan", None)   # as without the extra (test_ctgan_train.py)
    with pytest.raises(InvalidRequest, match="BUSL|ctgan"):
        train(reg, store, dicom, "m", TrainSettings(backend="ctgan"), echo=lines.append)
    assert any("Business Source License" in x for x in lines)


def test_cohort_registry_rules(cohort_env):
    from server.synthetic.cohort import create_cohort

    reg = cohort_env.registry
    c = reg.cohort("tiny")
    assert c.status == "ready" and c.ae_title == "TINY" and c.size == 60
    assert c.settings["anchor"] and c.settings["build_seconds"] >= 0
    with pytest.raises(Conflict):
        create_cohort(reg, "tiny", "tiny", 10, 1)
    for bad in ("Tiny", "a" * 17, "9x", "a_b"):
        with pytest.raises(InvalidRequest):
            create_cohort(reg, bad, "tiny", 10, 1)
    with pytest.raises(InvalidRequest):
        create_cohort(reg, "x", "tiny", 0, 1)
    with pytest.raises(NotFound):
        create_cohort(reg, "x", "nomodel", 10, 1)
    assert [x.name for x in reg.cohorts()] == ["tiny"]   # failures leave nothing behind


def test_index_is_a_pure_function_of_model_and_seed(tiny_model_dir):
    import datetime as dt

    import pandas as pd

    from generators.tabular import PatientModel
    from server.synthetic.cohort import build_index

    pm = PatientModel.load(tiny_model_dir / "patients")
    a = build_index(pm, 50, 3, dt.date(2025, 1, 1))
    b = build_index(pm, 80, 3, dt.date(2025, 1, 1), batch=7)
    pd.testing.assert_frame_equal(a, b.iloc[:50].reset_index(drop=True))
    c = build_index(pm, 50, 4, dt.date(2025, 1, 1))
    assert not a.drop(columns=["_n_img"]).equals(c.drop(columns=["_n_img"]))
    # split over processes (as cohort creation does for large cohorts): the same rows
    from server.synthetic import cohort as cohort_mod

    old = cohort_mod.PARALLEL_MIN_ROWS
    cohort_mod.PARALLEL_MIN_ROWS = 10
    try:
        d = build_index(pm, 80, 3, dt.date(2025, 1, 1), workers=2,
                        model_path=tiny_model_dir / "patients")
    finally:
        cohort_mod.PARALLEL_MIN_ROWS = old
    pd.testing.assert_frame_equal(b, d)
    t = time.perf_counter()
    build_index(pm, 20_000, 3, dt.date(2025, 1, 1))
    assert time.perf_counter() - t < 60


def test_admin_api(cohort_env):
    c = cohort_env.app().test_client()
    r = c.get("/admin/cohorts")
    assert r.status_code == 200 and [x["name"] for x in r.get_json()] == ["tiny"]
    r = c.post("/admin/cohorts", json={"name": "second", "model": "tiny", "size": 20, "seed": 3})
    assert r.status_code == 201, r.data
    assert r.get_json()["fhir"] == "/synthetic/second/fhir" and r.get_json()["ae_title"] == "SECOND"
    p = c.get("/synthetic/second/fhir/Patient/second-19")
    assert p.status_code == 200 and p.get_json()["id"] == "second-19"
    assert c.get("/synthetic/second/fhir/Patient/second-20").status_code == 404
    r = c.post("/admin/cohorts", json={"name": "second", "model": "tiny", "size": 20, "seed": 3})
    assert r.status_code == 409 and r.get_json()["resourceType"] == "OperationOutcome"
    assert c.post("/admin/cohorts", json={"name": "x", "model": "nope", "size": 2}).status_code == 404
    assert c.post("/admin/cohorts", data=b"{", content_type="application/json").status_code == 400
    assert c.post("/admin/cohorts", json={"name": "y", "model": "tiny", "size": "2"}).status_code == 400
    assert c.post("/admin/cohorts", json={"name": "y", "model": "tiny", "size": 2,
                                          "model_version": "1"}).status_code == 400
    models = c.get("/admin/models").get_json()
    assert models[0]["name"] == "tiny"


def test_cli_cohort_create_and_list(cohort_env):
    from server.cli import main

    env = {"SYNTHPORT_DATABASE_URL": cohort_env.db_url}
    r = CliRunner().invoke(main, ["cohort", "create", "clic", "--model", "tiny", "--size", "30",
                                  "--seed", "2", "--data-dir", str(cohort_env.data_dir)], env=env)
    assert r.exit_code == 0, r.output
    assert "30 virtual patients" in r.output and "AE title CLIC" in r.output
    r = CliRunner().invoke(main, ["cohort", "list", "--data-dir", str(cohort_env.data_dir)], env=env)
    assert "clic" in r.output and "tiny" in r.output
    r = CliRunner().invoke(main, ["cohort", "create", "clic", "--model", "tiny", "--size", "30",
                                  "--data-dir", str(cohort_env.data_dir)], env=env)
    assert r.exit_code != 0 and "exists" in r.output
