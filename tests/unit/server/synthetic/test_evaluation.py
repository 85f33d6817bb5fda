"""Hold-out at training time, ``synthport evaluate``, the stored report and its admin routes."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


def test_split_holdout_is_deterministic_and_order_free():
    from server.errors import InvalidRequest
    from server.synthetic.training import split_holdout

    keys = [f"p{i}" for i in range(50)]
    train, held = split_holdout(keys, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40 and not set(train) & set(held)
    assert split_holdout(list(reversed(keys)), 0.2, seed=3) == (train, held)
    assert split_holdout(keys, 0.2, seed=4)[1] != held
    # a patient's membership does not depend on the others much: one more key moves few
    assert len(set(split_holdout(keys + ["p50"], 0.2, seed=3)[1]) ^ set(held)) <= 2
    assert split_holdout(keys, 0.0) == (sorted(keys), [])
    assert split_holdout(["a", "b", "c"], 0.9)[1] == split_holdout(["a", "b", "c"], 0.9)[1]
    assert len(split_holdout(["a", "b", "c"], 0.9)[0]) == 2    # training keeps two patients
    with pytest.raises(InvalidRequest):
        split_holdout(keys, 1.0)


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


def test_holdout_evaluate_store_and_serve(env, tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    from server.synthetic import training
    from server.synthetic.demo import demo_population, load_records
    from server.synthetic.training import TrainSettings, read_holdout, train

    cfg, store, dicom, reg = env
    load_records(store, demo_population(40, seed=5))
    seen = {}
    real_fit = training.fit_models

    def spy(tables, folder, settings, **kw):
        seen["patients"] = set(tables.patients.index.astype(str))
        seen["events"] = set(tables.events["patient_id"].astype(str))
        seen["exclude_images"] = kw.get("exclude_images")
        return real_fit(tables, folder, settings, **kw)

    monkeypatch.setattr(training, "fit_models", spy)
    settings = TrainSettings(epochs=3, event_epochs=1, image_epochs=0, hidden=16, event_hidden=16,
                             min_count=1, holdout=0.25, holdout_seed=1, progress=False)
    info = train(reg, store, dicom, "ev", settings, echo=lambda _m: None)

    # the hold-out: recorded, reproducible from the seed, never shown to a model
    hold = read_holdout(info.path)
    assert hold["n_holdout"] == 10 and hold["n_train"] == 30 and hold["seed"] == 1
    assert training.split_holdout(hold["train"] + hold["holdout"], 0.25, 1) == (hold["train"], hold["holdout"])
    assert seen["patients"] == set(hold["train"]) and not seen["patients"] & set(hold["holdout"])
    assert seen["events"] <= set(hold["train"]) and seen["events"]
    assert seen["exclude_images"] is not None
    model_json = json.loads((reg.model_dir("ev", 1) / "patients" / "model.json").read_text())
    assert model_json["training"]["n_rows"] == 30
    row = reg.model("ev")
    assert row.settings["holdout"]["n_holdout"] == 10 and "holdout" not in row.settings["holdout"]
    assert row.settings["n_patients"] == 40

    app_cfg = {"data_dir": str(cfg.data_dir), "database_url": cfg.resolved_database_url}
    from server.app import create_app

    client = create_app(app_cfg).test_client()
    r = client.get("/admin/models/ev/evaluation")
    assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"

    from server.cli import main

    out = tmp_path / "report"
    res = CliRunner().invoke(main, [
        "evaluate", "ev", "--n", "40", "--event-patients", "12", "--out", str(out),
        "--baselines", "gaussian_copula,ctgan", "--baseline-epochs", "5",
        "--data-dir", str(cfg.data_dir)],
        env={"SYNTHPORT_DATABASE_URL": cfg.resolved_database_url})
    assert res.exit_code == 0, res.output
    assert "event order violations 0" in res.output

    report = json.loads((out / "report.json").read_text())
    assert report == json.loads((reg.model_dir("ev", 1) / "evaluation" / "report.json").read_text())
    assert report["data"] == {**report["data"], "train": 30, "holdout": 10, "store_unchanged": True}
    pat = report["patients"]
    assert pat["rows"] == {"train": 30, "synthetic": 40, "holdout": 10}
    assert set(pat["fidelity"]) >= {"quality", "column_shapes", "column_pair_trends",
                                    "column_shapes_details", "holdout_vs_train_quality"}
    assert pat["privacy"]["exact_copies"] == 0 and pat["privacy"]["dcr"]["n_holdout"] == 10
    assert pat["privacy"]["risks"]["status"] == "ok"
    assert {"singling_out", "linkability", "inference"} <= set(pat["privacy"]["risks"])
    assert pat["utility"]["status"] == "ok" and "tstr_auc" in pat["utility"]["gbm"]
    ev = report["events"]
    assert ev["order_violations_total"] == 0 and ev["rows"]["synthetic_patients"] == 12
    assert ev["prevalence"]["top"] and "holdout" in ev["prevalence"]["top"][0]
    assert report["images"]["status"] == "skipped"          # procedural images only
    base = report["baselines"]
    assert base["gaussian_copula"]["status"] == "ok" and base["gaussian_copula"]["fidelity"]["quality"] > 0
    import importlib.util

    if importlib.util.find_spec("ctgan") is None:
        assert base["ctgan"]["status"] == "skipped: package not installed"
    else:                    # the optional package runs through the same report section
        assert base["ctgan"]["status"] == "ok", base["ctgan"]
        assert base["ctgan"]["privacy"]["dcr"]["n_holdout"] == 10 and base["ctgan"]["fit_seconds"] > 0
    assert set(report["summary"]["baselines"]) == {"gaussian_copula", "ctgan"}

    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http" not in html.split(
        "<body>")[1].replace('http://www.w3.org/2000/svg', '')
    for section in ("Summary", "Fidelity: patient table", "Fidelity: event sequences", "Privacy",
                    "Utility", "Baselines", "gaussian_copula", "<svg"):
        assert section in html

    # stored in the registry row, served by the admin API
    assert reg.model("ev", 1).evaluation == report
    r = client.get("/admin/models/ev/evaluation")
    assert r.status_code == 200 and r.get_json() == report
    r = client.get("/admin/models/ev/evaluation?version=1")
    assert r.status_code == 200 and r.get_json()["version"] == 1
    r = client.get("/admin/models/ev/evaluation.html")
    assert r.status_code == 200 and r.content_type.startswith("text/html")
    assert r.get_data(as_text=True) == html
    assert client.get("/admin/models/ev/evaluation?version=x").status_code == 400
    assert client.get("/admin/models/ev/evaluation?version=2").status_code == 404
    assert client.get("/admin/models/nope/evaluation.html").status_code == 404

    res = CliRunner().invoke(main, ["evaluate", "ev", "--baselines", "nope", "--data-dir",
                                    str(cfg.data_dir)],
                             env={"SYNTHPORT_DATABASE_URL": cfg.resolved_database_url})
    assert res.exit_code != 0 and "unknown baseline" in res.output

    # cross-fitted risks: the patient model refitted per fold with the stored settings
    res = CliRunner().invoke(main, [
        "evaluate", "ev", "--privacy-folds", "2", "--privacy-repeats", "2", "--baselines", "none",
        "--event-patients", "4",
        "--no-images", "--out", str(out), "--data-dir", str(cfg.data_dir)],
        env={"SYNTHPORT_DATABASE_URL": cfg.resolved_database_url})
    assert res.exit_code == 0, res.output
    assert "cross-fitted (2 folds x 2): singling-out" in res.output
    cf = json.loads((out / "report.json").read_text())["patients"]["privacy"]["crossfit"]
    assert cf["status"] == "ok" and cf["folds"] == 2 and cf["repeats"] == 2 and cf["rows"] == 40
    assert len(cf["per_fold"]) == 4
    assert all(v["n_control_attacks"] == 80 for v in cf["inference"].values())   # twice each
    assert set(cf["paired"]["inference"]) == set(cf["inference"])
    assert all(v["n_patients"] == 40 for v in cf["paired"]["inference"].values())
    assert ("Cross-fitted risks (2 folds x 2 repeated splits, 40 real patients)"
            in (out / "report.html").read_text())
    res = CliRunner().invoke(main, ["evaluate", "ev", "--privacy-folds", "1", "--data-dir",
                                    str(cfg.data_dir)],
                             env={"SYNTHPORT_DATABASE_URL": cfg.resolved_database_url})
    assert res.exit_code != 0 and "--privacy-folds" in res.output
    res = CliRunner().invoke(main, ["evaluate", "ev", "--privacy-folds", "2", "--privacy-repeats",
                                    "0", "--data-dir", str(cfg.data_dir)],
                             env={"SYNTHPORT_DATABASE_URL": cfg.resolved_database_url})
    assert res.exit_code != 0 and "--privacy-repeats must be at least 1" in res.output


def test_crossfit_refits_with_the_stored_models_class_and_hyper_parameters():
    import pandas as pd

    from server.synthetic.evaluation import _refit_sampler

    made = []

    class Stored:
        def __init__(self, **hyper):
            self.hyper = hyper
            made.append(self)

        def fit(self, df, meta, *, epochs, device, progress):
            self.fitted = (len(df), meta, epochs, device, progress)
            return self

        def sample(self, n, seed):
            return pd.DataFrame({"x": range(n)})

    stored = Stored(dropout=0.42, hidden=8)
    fit_sample = _refit_sampler(stored, {"epochs": 7, "device": None}, {"x": {"kind": "numerical"}})
    out = fit_sample(pd.DataFrame({"x": [1, 2, 3]}), 5, 1)
    fresh = made[-1]
    assert fresh is not stored and fresh.hyper == {"dropout": 0.42, "hidden": 8}
    assert fresh.fitted == (3, {"x": {"kind": "numerical"}}, 7, "cpu", False) and len(out) == 5
