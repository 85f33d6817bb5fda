"""Shared pytest fixtures for every synthport test suite.

* ``shared_data``: the read-only sample data in ``../shared/data`` (skips when absent).
* ``db_url``: one SQLAlchemy URL per database backend. Every test that uses it runs
  twice, once on SQLite (a fresh file under ``tmp_path``) and once on PostgreSQL
  (a fresh schema ``t_<random>`` in the database named by
  ``SYNTHPORT_TEST_PG_URL``, dropped again after the test). The PostgreSQL run
  skips, with the reason, when the server is not reachable or the variable is
  set to the empty string (``.ci/run`` does that when no server answers, and puts
  its reason in ``SYNTHPORT_TEST_PG_SKIP_REASON``).
* ``free_port()``: a TCP port that is free right now on 127.0.0.1.

The end-to-end harness (``run_server``) lives in ``tests/e2e/server.py``.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.server import free_port  # noqa: F401  (re-exported for tests)

# The suites of the interfaces run in development mode (no tokens); the security
# suites (tests/unit/server/auth, audit, e2e/test_security*) ask for
# ``create_app({"auth": "required"})`` or ``SYNTHPORT_AUTH=required`` explicitly.
os.environ.setdefault("SYNTHPORT_AUTH", "off")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

PG_URL_ENV = "SYNTHPORT_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_CONNECT_TIMEOUT_S = 2

# Probed once per session: (url, None) when reachable, (url, reason) when not.
_pg_probe: tuple[str, str | None] | None = None


@pytest.fixture
def shared_data() -> Path:
    """The folder ``../shared/data`` beside the repository; skips without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


# --------------------------------------------------------------------------- PostgreSQL


def _pg_base_url() -> str:
    """The configured PostgreSQL URL ("" means: PostgreSQL tests are switched off)."""
    return os.environ.get(PG_URL_ENV, DEFAULT_PG_URL).strip()


def _libpq_conninfo(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql://...`` as libpq/psycopg understands it."""
    from sqlalchemy.engine import make_url

    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_connect(sqlalchemy_url: str):
    import psycopg

    return psycopg.connect(_libpq_conninfo(sqlalchemy_url), connect_timeout=PG_CONNECT_TIMEOUT_S,
                           autocommit=True)


def _pg_available() -> tuple[str, str | None]:
    """Return (url, skip_reason); skip_reason is None when PostgreSQL answers."""
    global _pg_probe
    if _pg_probe is None:
        url = _pg_base_url()
        if not url:
            why = os.environ.get("SYNTHPORT_TEST_PG_SKIP_REASON", "").strip()
            _pg_probe = ("", why or f"PostgreSQL tests switched off ({PG_URL_ENV} is set to the empty string)")
        else:
            try:
                with _pg_connect(url) as conn:
                    conn.execute("SELECT 1")
                _pg_probe = (url, None)
            except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
                reason = " ".join(str(exc).split()) or type(exc).__name__
                _pg_probe = (url, f"PostgreSQL not reachable at {_safe(url)}: {reason}")
    return _pg_probe


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<unparsable URL>"


def _with_schema(url: str, schema: str) -> str:
    """``url`` whose connections use ``schema`` (search_path) and are tagged with its name."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    options = u.query.get("options", "")
    if isinstance(options, tuple):  # repeated query key
        options = " ".join(options)
    options = (options + " " if options else "") + f"-csearch_path={schema}"
    return u.update_query_dict(
        {"options": options, "application_name": f"synthport-test-{schema}"}
    ).render_as_string(hide_password=False)


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL bound to a fresh, empty schema; the schema is dropped afterwards."""
    base, reason = _pg_available()
    if reason:
        pytest.skip(reason)
    schema = "t_" + secrets.token_hex(6)
    try:
        with _pg_connect(base) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not usable at {_safe(base)}: cannot create a schema: {exc}")
    try:
        yield _with_schema(base, schema)
    finally:
        _drop_schema(base, schema)


def _drop_schema(base: str, schema: str) -> None:
    import psycopg

    with _pg_connect(base) as conn:
        conn.execute("SET lock_timeout = '2s'")
        try:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            return
        except psycopg.errors.LockNotAvailable:
            pass
        # A connection left open by the test (or by a server it started) still holds
        # locks on the schema: end those sessions, then drop.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (f"synthport-test-{schema}",),
        )
        conn.execute("SET lock_timeout = '30s'")
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# --------------------------------------------------------------------------- both backends


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLAlchemy URL for an empty database; the test runs once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/synthport.db"
    return request.getfixturevalue("pg_schema_url")
