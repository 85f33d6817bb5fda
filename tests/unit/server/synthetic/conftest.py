"""Fixtures for the synthetic cohort tests: TINY models trained once per session (seconds,
one thread), registered per test in the ``db_url`` database with a small cohort."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

COHORT = "tiny"
SIZE = 60
SEED = 7


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Patient, event and image models fitted on 40 made-up patients (image model: the
    procedural fallback, no training). 40, not 30: in the first 30 every patient with a
    chest X-ray also had diabetes, so the mined dependency asked for both conditions and the
    60-patient cohort drew no imaging study at all."""
    import torch

    torch.set_num_threads(1)
    from mappings.tables import map_records
    from server.synthetic.demo import demo_population
    from server.synthetic.training import TrainSettings, fit_models

    folder = tmp_path_factory.mktemp("tiny-model") / "v1"
    tables = map_records(demo_population(40, seed=3), min_count=1)
    settings = TrainSettings(epochs=3, event_epochs=1, image_epochs=0, hidden=32,
                             event_hidden=16, progress=False)
    fit_models(tables, folder, settings, echo=lambda _m: None)
    return folder


@dataclass
class CohortEnv:
    data_dir: Path
    db_url: str
    registry: Any
    config: dict

    def app(self):
        from server.app import create_app

        return create_app(self.config)


def register_tiny(registry, model_dir: Path, name: str = "tiny") -> None:
    from server.synthetic.registry import ModelInfo, now

    registry.register_model(ModelInfo(name=name, version=1, kinds=["patients", "events", "images"],
                                      path=str(model_dir), fingerprint="0" * 64, settings={},
                                      timings={}, evaluation=None, licence=None, created=now()))


@pytest.fixture
def cohort_env(db_url: str, tmp_path: Path, tiny_model_dir: Path) -> Iterator[CohortEnv]:
    """A data dir and database with model ``tiny`` v1 and cohort ``tiny`` (60 patients)."""
    from server.db.engine import make_engine, migrate
    from server.synthetic import cohort as cohort_mod
    from server.synthetic.cohort import create_cohort
    from server.synthetic.registry import Registry

    engine = make_engine(db_url)
    migrate(engine)
    reg = Registry(engine, tmp_path / "data")
    register_tiny(reg, tiny_model_dir)
    create_cohort(reg, COHORT, "tiny", SIZE, SEED)
    cfg = {"data_dir": str(tmp_path / "data"), "database_url": db_url}
    try:
        yield CohortEnv(tmp_path / "data", db_url, reg, cfg)
    finally:
        cohort_mod._COHORTS.clear()
        engine.dispose()
