"""Writers queue: ``store.write_gate`` (the loader's) around a transaction, and the SQLite
file's lock file at ``BEGIN IMMEDIATE``."""
from __future__ import annotations

import fcntl
import os
import threading

import pytest

from server.errors import SynthportError
from server.source import RequestContext
from server.store import SqlStore

CTX = RequestContext(prefer_return="minimal")


class _Gate:
    """A lock that records what happened while it was held."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[str] = []

    def acquire(self, timeout: float = -1) -> bool:
        ok = self.lock.acquire(timeout=timeout)
        self.events.append("acquire")
        return ok

    def release(self) -> None:
        self.events.append("release")
        self.lock.release()


def _tx(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def _post(res: dict, full_url: str | None = None) -> dict:
    e = {"resource": res, "request": {"method": "POST", "url": res["resourceType"]}}
    if full_url:
        e["fullUrl"] = full_url
    return e


@pytest.fixture()
def store(db_url):
    s = SqlStore.from_url(db_url)
    s.write_gate = _Gate()
    yield s
    s.engine.dispose()


def test_transaction_holds_the_gate_around_its_writes(store):
    seen = []
    orig = store.write_versions

    def spy(conn, items, ts=None):
        seen.append(store.write_gate.lock.locked())
        return orig(conn, items, ts)

    store.write_versions = spy
    store.bundle(CTX, _tx(_post({"resourceType": "Patient", "gender": "female"})))
    assert seen == [True]
    assert store.write_gate.events == ["acquire", "release"]
    assert not store.write_gate.lock.locked()


def test_invalid_resources_are_refused_before_the_gate(store):
    with pytest.raises(SynthportError, match=r"Bundle.entry\[0\]"):
        store.bundle(CTX, _tx(_post({"resourceType": "Patient", "gender": 3})))
    assert store.write_gate.events == []


def test_a_failing_transaction_releases_the_gate(store):
    bad = _tx(_post({"resourceType": "Patient"}),
              {"resource": {"resourceType": "Observation", "status": "final",
                            "code": {"text": "x"}, "subject": {"reference": "Patient?identifier=none|0"}},
               "request": {"method": "POST", "url": "Observation"}})
    with pytest.raises(SynthportError, match="matched 0 resources"):
        store.bundle(CTX, bad)
    assert store.write_gate.events == ["acquire", "release"]
    assert not store.write_gate.lock.locked()
    with store.engine.connect() as conn:
        from sqlalchemy import text
        assert conn.execute(text("SELECT count(*) FROM resource")).scalar_one() == 0


# ------------------------------------------------- the SQLite file's writer queue
def test_sqlite_writers_queue_on_a_lock_file_beside_the_database(db_url):
    from server.db.engine import writer_lock_path
    from server.fhir.transaction import write_gate

    s = SqlStore.from_url(db_url)
    try:
        assert write_gate(s) is None     # only an injected gate (the loader's)
        s.bundle(CTX, _tx(_post({"resourceType": "Patient"})))
        if db_url.startswith("sqlite"):
            path = writer_lock_path(s.engine.url.database)
            assert path == s.engine.url.database + "-writers.lock"
            fd = os.open(path, os.O_RDWR)
            try:                          # released after the transaction
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
    finally:
        s.engine.dispose()


def test_a_writer_waits_on_the_lock_file_until_the_holder_commits(tmp_path):
    from server.db.engine import begin_write, make_engine, writer_lock_path

    db = tmp_path / "q.db"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    held = os.open(writer_lock_path(str(db)), os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)          # another process's writer holds the queue
    done = threading.Event()

    def writer():
        c = begin_write(engine)
        try:
            with c.begin():
                c.exec_driver_sql("INSERT INTO t VALUES (1)")
        finally:
            c.close()
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    assert not done.wait(0.3)                 # queued, not in SQLite yet
    with engine.connect() as c:               # readers are never queued
        assert c.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 0
    os.close(held)
    assert done.wait(5)
    t.join(5)
    # a rolled-back write releases the queue as well
    c = begin_write(engine)
    with pytest.raises(ValueError):
        with c.begin():
            c.exec_driver_sql("INSERT INTO t VALUES (2)")
            raise ValueError
    c.close()
    fd = os.open(writer_lock_path(str(db)), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 1
    engine.dispose()


def test_a_lock_file_that_cannot_be_opened_lets_writers_through(tmp_path):
    from server.db.engine import begin_write, make_engine

    db = tmp_path / "ro.db"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    conn = begin_write(engine)
    dbapi = conn.connection.dbapi_connection
    dbapi.lock_path = str(tmp_path / "missing-dir" / "ro.db-writers.lock")
    try:
        with conn.begin():
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    finally:
        conn.close()
    engine.dispose()
