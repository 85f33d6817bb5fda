"""The registry (SQL) of trained synthetic models and of the cohorts served from them.

Tables come from migration 0005. A model is (name, version): its files live under
``<data_dir>/models/<name>/v<version>/`` (``patients/``, ``events/``, ``images/``), written
to a temporary folder and renamed into place before the row is inserted, so a row always
names a complete folder. A cohort is (model, seed, size) plus what fixes its output: the
anchor date and the creation instant (``meta.lastUpdated`` of every resource).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (BigInteger, Column, Float, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, func, insert, select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from server.errors import Conflict, InvalidRequest, NotFound

metadata = MetaData()

model_table = Table(
    "synthetic_model", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("kinds", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("fingerprint", String(128), nullable=False),
    Column("settings", Text, nullable=False),
    Column("timings", Text, nullable=False),
    Column("evaluation", Text, nullable=True),
    Column("licence", Text, nullable=True),
    Column("created", Float, nullable=False),
    UniqueConstraint("name", "version", name="uq_synthetic_model_name_version"),
)

cohort_table = Table(
    "synthetic_cohort", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("model_name", String(64), nullable=False),
    Column("model_version", Integer, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("created", Float, nullable=False),
    Column("status", String(16), nullable=False),
    Column("settings", Text, nullable=False),
)

#: Model names: folder-safe. Cohort names: also a DIMSE AE title once upper-cased
#: (PS3.8 §9.3.1: at most 16 characters) and the first part of every resource id.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
COHORT_NAME = re.compile(r"^[a-z][a-z0-9\-]{0,15}$")
MAX_COHORT_SIZE = 10**9


@dataclass
class ModelInfo:
    """One registered model version."""

    name: str
    version: int
    kinds: list[str]
    path: str
    fingerprint: str
    settings: dict
    timings: dict
    evaluation: dict | None
    licence: str | None
    created: float

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "kinds": self.kinds,
                "path": self.path, "fingerprint": self.fingerprint, "settings": self.settings,
                "timings": self.timings, "evaluation": self.evaluation,
                "licence": self.licence, "created": self.created}


@dataclass
class CohortInfo:
    """One registered cohort."""

    name: str
    model_name: str
    model_version: int
    seed: int
    size: int
    created: float
    status: str
    settings: dict = field(default_factory=dict)

    @property
    def ae_title(self) -> str:
        return self.name.upper()[:16]

    def to_json(self) -> dict:
        return {"name": self.name, "model": self.model_name, "model_version": self.model_version,
                "seed": self.seed, "size": self.size, "created": self.created,
                "status": self.status, "ae_title": self.ae_title, **{
                    k: v for k, v in self.settings.items() if k in ("anchor", "build_seconds")}}


def _model(row) -> ModelInfo:
    return ModelInfo(row.name, int(row.version), json.loads(row.kinds), row.path, row.fingerprint,
                     json.loads(row.settings), json.loads(row.timings),
                     json.loads(row.evaluation) if row.evaluation else None, row.licence,
                     float(row.created))


def _cohort(row) -> CohortInfo:
    return CohortInfo(row.name, row.model_name, int(row.model_version), int(row.seed),
                      int(row.size), float(row.created), row.status, json.loads(row.settings))


class Registry:
    """Models and cohorts in the SQL store (the same engine as the FHIR store)."""

    def __init__(self, engine: Engine, data_dir: str | Path):
        self.engine = engine
        self.data_dir = Path(data_dir).resolve()

    # ------------------------------------------------------------------ models
    def model_dir(self, name: str, version: int) -> Path:
        return self.data_dir / "models" / name / f"v{version}"

    def next_version(self, name: str) -> int:
        with self.engine.connect() as conn:
            v = conn.execute(select(func.max(model_table.c.version))
                             .where(model_table.c.name == name)).scalar()
        # Also skip folders left by a run that never registered (renamed, then crashed).
        v = int(v or 0)
        while self.model_dir(name, v + 1).exists():
            v += 1
        return v + 1

    def register_model(self, info: ModelInfo) -> ModelInfo:
        if not MODEL_NAME.match(info.name):
            raise InvalidRequest(f"model name {info.name!r} must match {MODEL_NAME.pattern}")
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(model_table).values(
                    name=info.name, version=info.version, kinds=json.dumps(info.kinds),
                    path=info.path, fingerprint=info.fingerprint,
                    settings=json.dumps(info.settings, sort_keys=True, default=str),
                    timings=json.dumps(info.timings, sort_keys=True),
                    evaluation=json.dumps(info.evaluation) if info.evaluation else None,
                    licence=info.licence, created=info.created))
        except IntegrityError:
            raise Conflict(f"model {info.name} v{info.version} is already registered") from None
        return info

    def set_evaluation(self, name: str, version: int, report: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(model_table).where(model_table.c.name == name,
                                                   model_table.c.version == version)
                         .values(evaluation=json.dumps(report, default=str)))

    def models(self) -> list[ModelInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(model_table).order_by(model_table.c.name,
                                                             model_table.c.version)).all()
        return [_model(r) for r in rows]

    def model(self, name: str, version: int | None = None) -> ModelInfo:
        """A model version (the newest when ``version`` is None).

        Raises:
            NotFound: no such model (version).
        """
        q = select(model_table).where(model_table.c.name == name)
        q = q.where(model_table.c.version == version) if version is not None else \
            q.order_by(model_table.c.version.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        if row is None:
            raise NotFound(f"model {name!r}" + (f" v{version}" if version else "") + " is not registered")
        return _model(row)

    # ------------------------------------------------------------------ cohorts
    def cohort_dir(self, name: str) -> Path:
        return self.data_dir / "cohorts" / name

    def add_cohort(self, info: CohortInfo) -> CohortInfo:
        check_cohort_name(info.name)
        with self.engine.connect() as conn:
            others = conn.execute(select(cohort_table.c.name)).scalars().all()
        if any(o.upper() == info.ae_title for o in others if o != info.name):
            raise Conflict(f"AE title {info.ae_title} is taken by another cohort")
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(cohort_table).values(
                    name=info.name, model_name=info.model_name, model_version=info.model_version,
                    seed=info.seed, size=info.size, created=info.created, status=info.status,
                    settings=json.dumps(info.settings, sort_keys=True)))
        except IntegrityError:
            raise Conflict(f"cohort {info.name!r} exists already") from None
        return info

    def set_cohort_status(self, name: str, status: str, settings: dict | None = None) -> None:
        values: dict[str, Any] = {"status": status}
        if settings is not None:
            values["settings"] = json.dumps(settings, sort_keys=True)
        with self.engine.begin() as conn:
            conn.execute(update(cohort_table).where(cohort_table.c.name == name).values(**values))

    def delete_cohort_row(self, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(cohort_table.delete().where(cohort_table.c.name == name))

    def cohorts(self) -> list[CohortInfo]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(cohort_table).order_by(cohort_table.c.name)).all()
        return [_cohort(r) for r in rows]

    def cohort(self, name: str) -> CohortInfo:
        """Raises NotFound for an unknown cohort."""
        with self.engine.connect() as conn:
            row = conn.execute(select(cohort_table).where(cohort_table.c.name == name)).first()
        if row is None:
            raise NotFound(f"synthetic cohort {name!r} does not exist")
        return _cohort(row)


def check_cohort_name(name: str) -> None:
    if not isinstance(name, str) or not COHORT_NAME.match(name):
        raise InvalidRequest(f"cohort name {name!r} must match {COHORT_NAME.pattern} "
                             "(it becomes the DIMSE AE title, upper-cased, at most 16 characters)")


def now() -> float:
    return round(time.time(), 3)
