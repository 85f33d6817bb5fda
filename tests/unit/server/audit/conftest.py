"""Fixtures of the audit tests: a migrated database (both backends) and an AuditLog whose
signing key lives under tmp_path."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from server.audit.balp import audit_event
from server.audit.log import AuditLog
from server.config import load_config
from server.db.engine import make_engine, migrate


@pytest.fixture
def audit_cfg(tmp_path: Path):
    return load_config({"data_dir": str(tmp_path / "data")}, environ={})


@pytest.fixture
def audit_log(db_url: str, audit_cfg) -> Iterator[AuditLog]:
    engine = make_engine(db_url)
    migrate(engine)
    try:
        yield AuditLog(engine, audit_cfg)
    finally:
        engine.dispose()


def make_event(i: int = 0, *, agent: str | None = None, patients: list[str] | None = None,
               action: str = "R", subtype: str = "read", outcome: str = "0",
               recorded: float | None = None, what: list[str] | None = None,
               query: str | None = None) -> dict:
    """An AuditEvent for test entry ``i`` (client c<i%3>, patient <i%5>)."""
    return audit_event(action=action, subtype=subtype, outcome=outcome,
                       agent=agent if agent is not None else f"client-{i % 3}",
                       patients=patients if patients is not None else [f"p{i % 5}"],
                       query=query, what=what if what is not None else [f"Observation/o{i}"],
                       source="real", recorded=recorded if recorded is not None else time.time(),
                       network="127.0.0.1")


def fill(log: AuditLog, n: int, start: int = 0) -> list[int]:
    return [log.append(make_event(i)) for i in range(start, start + n)]
