"""``synthport train --dp-epsilon``: refusal without the non-DP acknowledgement, the DP
figures in the model and the registry, and the statement on every served resource."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from server.errors import InvalidRequest  # noqa: E402


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


def test_dp_train_records_and_serves_the_guarantee(env, db_url, tmp_path):
    import torch

    torch.set_num_threads(1)
    from server.app import create_app
    from server.synthetic import cohort as cohort_mod
    from server.synthetic.cohort import DP_EXTENSION, create_cohort
    from server.synthetic.demo import demo_population, load_records
    from server.synthetic.training import NON_DP_SCOPE, TrainSettings, train

    cfg, store, dicom, reg = env
    load_records(store, demo_population(24, seed=2))
    base = dict(epochs=1, event_epochs=1, image_epochs=0, hidden=16, event_hidden=16,
                min_count=1, progress=False, dp_epsilon=8.0)
    # the event model cannot be trained with DP: refused unless acknowledged
    with pytest.raises(InvalidRequest, match="allow-non-dp-events"):
        train(reg, store, dicom, "dpm", TrainSettings(**base), echo=lambda _m: None)
    assert reg.models() == []
    lines = []
    info = train(reg, store, dicom, "dpm", TrainSettings(**base, allow_non_dp=True),
                 echo=lines.append)
    assert any("-DP: noise multiplier" in x for x in lines)
    dp = reg.model("dpm").settings["dp"]
    assert 0 < dp["epsilon"] <= 8.0 and dp["patients"]["epsilon_target"] == 8.0
    assert dp["events"] == "not differentially private" and dp["scope"] == NON_DP_SCOPE
    g = json.loads((reg.model_dir("dpm", info.version) / "patients" / "model.json").read_text())
    assert g["training"]["dp"]["epsilon"] == dp["epsilon"]
    for key in ("delta", "noise_multiplier", "clip_norm", "steps", "sample_rate"):
        assert dp["patients"][key] == g["training"]["dp"][key]

    create_cohort(reg, "dpc", "dpm", 8, 3)
    try:
        c = create_app({"data_dir": str(tmp_path / "data"), "database_url": db_url}).test_client()
        everything = c.get("/synthetic/dpc/fhir/Patient/dpc-0/$everything").get_json()
        resources = [e["resource"] for e in everything["entry"]]
        assert {r["resourceType"] for r in resources} > {"Patient"}
        for r in resources + [c.get("/synthetic/dpc/fhir/Patient/dpc-1").get_json()]:
            ext = {e["url"]: e for e in r["meta"]["extension"]}[DP_EXTENSION]
            parts = {p["url"]: next(v for k, v in p.items() if k.startswith("value"))
                     for p in ext["extension"]}
            assert parts["epsilon"] == dp["epsilon"] and parts["delta"] == dp["delta"]
            assert "NOT covered" in parts["scope"] and parts["mechanism"].startswith("DP-SGD")
    finally:
        cohort_mod._COHORTS.clear()


def test_cohorts_of_non_dp_models_carry_no_dp_extension(cohort_env_plain):
    c = cohort_env_plain.test_client()
    r = c.get("/synthetic/plain/fhir/Patient/plain-0").get_json()
    assert "extension" not in r["meta"]


@pytest.fixture
def cohort_env_plain(env, db_url, tmp_path):
    import torch

    torch.set_num_threads(1)
    from server.app import create_app
    from server.synthetic import cohort as cohort_mod
    from server.synthetic.cohort import create_cohort
    from server.synthetic.demo import demo_population, load_records
    from server.synthetic.training import TrainSettings, train

    cfg, store, dicom, reg = env
    load_records(store, demo_population(12, seed=1))
    train(reg, store, dicom, "pm", TrainSettings(epochs=1, event_epochs=1, image_epochs=0,
                                                 hidden=16, event_hidden=16, min_count=1,
                                                 progress=False), echo=lambda _m: None)
    create_cohort(reg, "plain", "pm", 4, 1)
    try:
        yield create_app({"data_dir": str(tmp_path / "data"), "database_url": db_url})
    finally:
        cohort_mod._COHORTS.clear()


def test_cli_refuses_dp_without_the_acknowledgement(tmp_path):
    from click.testing import CliRunner

    from server.cli import main

    r = CliRunner().invoke(main, ["train", "--data-dir", str(tmp_path / "d"), "--name", "x",
                                  "--dp-epsilon", "2", "--quiet"])
    assert r.exit_code != 0 and "--allow-non-dp-events" in r.output
    r = CliRunner().invoke(main, ["train", "--data-dir", str(tmp_path / "d"), "--name", "x",
                                  "--dp-epsilon", "-1", "--allow-non-dp-events", "--quiet"])
    assert r.exit_code != 0 and "must be positive" in r.output
