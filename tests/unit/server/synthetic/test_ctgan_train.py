"""``synthport train --backend ctgan``: refused without the extra (runs everywhere), and,
where ``synthport[ctgan]`` is installed, trained, registered, served as a cohort and
evaluated end to end through the CLI."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner


def _cli(args: list[str], data_dir, db: str):
    from server.cli import main

    return CliRunner().invoke(main, [*args, "--data-dir", str(data_dir)],
                              env={"SYNTHPORT_DATABASE_URL": db})


def test_ctgan_backend_without_the_extra_names_it(db_url, tmp_path, monkeypatch):
    from server.config import load_config
    from server.errors import InvalidRequest
    from server.store import SqlStore
    from server.synthetic.registry import Registry
    from server.synthetic.training import CTGAN_LICENCE, TrainSettings, train

    monkeypatch.setitem(sys.modules, "ctgan", None)        # import ctgan -> ImportError
    cfg = load_config({"data_dir": str(tmp_path / "data"), "database_url": db_url}, environ={})
    store = SqlStore.from_url(db_url, cfg)
    try:
        lines: list[str] = []
        with pytest.raises(InvalidRequest, match=r"pip install 'synthport\[ctgan\]'"):
            train(Registry(store.engine, cfg.data_dir), store, None, "m",
                  TrainSettings(backend="ctgan"), echo=lines.append)
        assert lines == ["WARNING: " + CTGAN_LICENCE]
        assert "Business Source License 1.1" in CTGAN_LICENCE
    finally:
        store.engine.dispose()
    res = _cli(["train", "--name", "m", "--backend", "ctgan", "--quiet"], tmp_path / "data",
               cfg.resolved_database_url)
    assert res.exit_code != 0
    assert "synthport[ctgan]" in res.output and "Business Source License" in res.output


def test_train_ctgan_cohort_serves_and_evaluates(tmp_path):
    pytest.importorskip("ctgan")
    import torch

    torch.set_num_threads(1)
    from server.app import create_app
    from server.config import load_config
    from server.store import SqlStore
    from server.synthetic.demo import demo_population, load_records
    from server.synthetic.registry import Registry
    from server.synthetic.training import CTGAN_LICENCE

    data = tmp_path / "data"
    db = f"sqlite:///{tmp_path}/synthport.db"
    cfg = load_config({"data_dir": str(data), "database_url": db}, environ={})
    store = SqlStore.from_url(db, cfg)
    load_records(store, demo_population(30, seed=5))
    store.engine.dispose()

    res = _cli(["train", "--name", "cg", "--backend", "ctgan", "--epochs", "2",
                "--event-epochs", "1", "--image-epochs", "0", "--quiet"], data, db)
    assert res.exit_code == 0, res.output
    assert "WARNING: " + CTGAN_LICENCE in res.output
    assert "patient model (ctgan)" in res.output and "registered model cg v1" in res.output

    store = SqlStore.from_url(db, cfg)
    reg = Registry(store.engine, cfg.data_dir)
    row = reg.model("cg")
    assert row.licence == CTGAN_LICENCE and row.settings["backend"] == "ctgan"
    assert row.settings["patient_model"]["format"] == "synthport-tabular-ctgan"
    assert row.settings["patient_model"]["packages"]["ctgan"]
    pjson = json.loads((reg.model_dir("cg", 1) / "patients" / "model.json").read_text())
    assert pjson["licence"] == CTGAN_LICENCE and pjson["training"]["n_rows"] == 24

    res = _cli(["cohort", "create", "cgc", "--model", "cg", "--size", "40", "--seed", "3"], data, db)
    assert res.exit_code == 0, res.output
    client = create_app({"data_dir": str(data), "database_url": db}).test_client()
    r = client.get("/admin/models")
    got = {m["name"]: m for m in r.get_json()}["cg"]
    assert got["licence"] == CTGAN_LICENCE and got["settings"]["patient_model"]["backend"] == "ctgan"
    r = client.get("/synthetic/cgc/fhir/Patient/cgc-0")
    assert r.status_code == 200, r.get_data(as_text=True)
    p = r.get_json()
    assert p["resourceType"] == "Patient" and p["id"] == "cgc-0" and p["gender"] in ("male", "female")
    assert client.get("/synthetic/cgc/fhir/Patient/cgc-0").get_data() == r.get_data()
    r = client.get("/synthetic/cgc/fhir/Patient/cgc-7/$everything")
    assert r.status_code == 200 and r.get_json()["entry"][0]["resource"]["id"] == "cgc-7"
    r = client.get("/synthetic/cgc/fhir/Patient?_count=100")
    assert r.status_code == 200 and r.get_json()["total"] == 40

    # the cohort's index is a pure function of (model, seed): rebuilt in another way, same rows
    import datetime as dt

    import pandas as pd

    from generators.tabular import load_patient_model
    from server.synthetic.cohort import build_index

    pm = load_patient_model(reg.model_dir("cg", 1) / "patients")
    a = build_index(pm, 40, 3, dt.date(2025, 1, 1))
    b = build_index(pm, 70, 3, dt.date(2025, 1, 1), batch=9)
    pd.testing.assert_frame_equal(a, b.iloc[:40].reset_index(drop=True))
    served = pd.read_parquet(reg.cohort_dir("cgc") / "index.parquet")
    assert served.drop(columns=["_birth"]).equals(a.drop(columns=["_birth"]))

    res = _cli(["evaluate", "cg", "--n", "24", "--event-patients", "5", "--no-images",
                "--baselines", "gaussian_copula", "--out", str(tmp_path / "rep")], data, db)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["patients"]["rows"]["synthetic"] == 24
    assert report["events"]["order_violations_total"] == 0
    store.engine.dispose()
