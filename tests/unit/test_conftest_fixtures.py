"""Tests of the test harness itself: db_url, pg_schema_url, free_port, shared_data."""
from __future__ import annotations

import socket

import pytest
import sqlalchemy as sa

from tests import conftest
from tests.conftest import free_port

# Names of the PostgreSQL schemas handed out so far in this module (in run order).
_seen_pg_schemas: list[str] = []


def _schema_exists(name: str) -> bool:
    base, _ = conftest._pg_available()
    with conftest._pg_connect(base) as conn:
        row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,)).fetchone()
    return row is not None


@pytest.mark.parametrize("round_", [1, 2])
def test_db_url_gives_a_fresh_empty_database(db_url: str, round_: int) -> None:
    # Both rounds create the same table: the second only succeeds if it does not
    # see the first one's database.
    engine = sa.create_engine(db_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE probe (id INTEGER PRIMARY KEY, v TEXT)"))
            conn.execute(sa.text("INSERT INTO probe (id, v) VALUES (1, :v)"), {"v": f"round {round_}"})
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT v FROM probe")).scalar_one() == f"round {round_}"
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
                assert schema.startswith("t_")
                # The table went into the test's schema, not into public.
                where = conn.execute(sa.text(
                    "SELECT table_schema FROM information_schema.tables WHERE table_name = 'probe'"
                    " AND table_schema = current_schema()")).scalar_one()
                assert where == schema
            _seen_pg_schemas.append(schema)
    finally:
        engine.dispose()


def test_pg_schemas_are_dropped_after_their_test(pg_schema_url: str) -> None:
    # Runs after the parametrised test above (file order): its schemas are gone.
    assert _seen_pg_schemas, "the PostgreSQL rounds above did not run"
    for name in _seen_pg_schemas:
        assert not _schema_exists(name), f"schema {name} was not dropped"


def test_pg_url_survives_a_string_round_trip(pg_schema_url: str) -> None:
    # The URL is passed to servers as SYNTHPORT_DATABASE_URL, i.e. as a string.
    url = sa.engine.make_url(str(pg_schema_url))
    engine = sa.create_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_schema()")).scalar_one().startswith("t_")
    finally:
        engine.dispose()


def test_drop_schema_ends_sessions_that_still_hold_locks(pg_schema_url: str) -> None:
    base, _ = conftest._pg_available()
    schema = "t_" + "droptest" + str(free_port())
    with conftest._pg_connect(base) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    engine = sa.create_engine(conftest._with_schema(base, schema))
    conn = engine.connect()
    try:
        conn.execute(sa.text("CREATE TABLE held (id INTEGER)"))
        conn.commit()
        conn.execute(sa.text("LOCK TABLE held IN ACCESS EXCLUSIVE MODE"))  # left open
        conftest._drop_schema(base, schema)
        assert not _schema_exists(schema)
    finally:
        with pytest.raises(Exception):  # its session was terminated
            conn.execute(sa.text("SELECT 1"))
        conn.invalidate()
        engine.dispose()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_shared_data_fixture(shared_data) -> None:
    assert shared_data.is_dir()
    assert shared_data.name == "data" and shared_data.parent.name == "shared"


# --------------------------------------------------------------------------- run_server

_FAKE_SERVE = r'''
import os, sys, http.server
args = sys.argv[1:]
assert args[0] == "serve", args
opts = dict(zip(args[1::2], args[2::2]))
if os.environ.get("FAKE_FAIL"):
    print("fake server refuses to start", file=sys.stderr)
    sys.exit(3)
if os.environ.get("FAKE_SILENT"):
    import time
    time.sleep(600)
assert os.path.isdir(opts["--data-dir"])
assert opts["--workers"] == "2"
assert os.environ["SYNTHPORT_DATABASE_URL"] == os.environ["EXPECT_DB_URL"]
assert "SYNTHPORT_LEAKED" not in os.environ
assert os.environ["SYNTHPORT_DIMSE_PORT"].isdigit()

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/fhir/metadata"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/fhir+json")
        self.end_headers()
        self.wfile.write(b'{"resourceType": "CapabilityStatement"}')
    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", int(opts["--http-port"])), H).serve_forever()
'''


@pytest.fixture
def fake_synthport(tmp_path, monkeypatch):
    import sys

    from tests.e2e import server as harness

    script = tmp_path / "fake_synthport.py"
    script.write_text(_FAKE_SERVE)
    monkeypatch.setattr(harness, "synthport_command", lambda: [sys.executable, str(script)])
    monkeypatch.setenv("SYNTHPORT_LEAKED", "1")
    return harness


def test_run_server_waits_for_metadata_and_stops_the_server(tmp_path, fake_synthport) -> None:
    import urllib.request

    url = f"sqlite:///{tmp_path}/synthport.db"
    with fake_synthport.run_server(tmp_path, url, {"EXPECT_DB_URL": url}) as base:
        assert base.startswith("http://127.0.0.1:") and base.endswith("/fhir")
        with urllib.request.urlopen(f"{base}/metadata", timeout=5) as resp:
            assert resp.status == 200
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/metadata", timeout=2)


def test_run_server_fails_with_the_servers_output(tmp_path, fake_synthport) -> None:
    with pytest.raises(pytest.fail.Exception, match="(?s)exited with status 3.*refuses to start"):
        with fake_synthport.run_server(tmp_path, "sqlite://", {"FAKE_FAIL": "1"}):
            pass


def test_run_server_gives_up_after_the_timeout(tmp_path, fake_synthport) -> None:
    with pytest.raises(pytest.fail.Exception, match="did not answer GET .* within 1 s"):
        with fake_synthport.run_server(tmp_path, "sqlite://", {"FAKE_SILENT": "1"}, start_timeout=1):
            pass
