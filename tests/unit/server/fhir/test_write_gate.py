"""``store.write_gate``: a transaction holds it exactly around its write transaction."""
from __future__ import annotations

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


# ---------------------------------------------------------------------- FileWriteGate
def test_default_gate_is_a_lock_file_beside_a_sqlite_database(db_url):
    from server.fhir.transaction import FileWriteGate, write_gate

    s = SqlStore.from_url(db_url)
    try:
        gate = write_gate(s)
        if db_url.startswith("sqlite"):
            assert isinstance(gate, FileWriteGate)
            assert gate.path == s.engine.url.database + "-writers.lock"
            s.bundle(CTX, _tx(_post({"resourceType": "Patient"})))
            assert gate.acquire(timeout=1)   # released after the transaction
            gate.release()
        else:
            assert gate is None               # PostgreSQL: concurrent writers
    finally:
        s.engine.dispose()


def test_file_gate_queues_threads_and_times_out(tmp_path):
    from server.fhir.transaction import FileWriteGate

    gate = FileWriteGate(str(tmp_path / "db-writers.lock"))
    other = FileWriteGate(str(tmp_path / "db-writers.lock"))   # another process's view
    assert gate.acquire()
    assert other.acquire(timeout=0.05) is False
    got, done = [], threading.Event()

    def waiter():
        got.append(other.acquire(timeout=5))
        done.wait(5)
        other.release()

    t = threading.Thread(target=waiter)
    t.start()
    t.join(0.1)
    assert got == []                 # still waiting while the gate is held
    gate.release()
    for _ in range(500):
        if got:
            break
        threading.Event().wait(0.01)
    assert got == [True]
    assert gate.acquire(timeout=0.05) is False   # now the other one holds it
    done.set()
    t.join(5)
    assert gate.acquire(timeout=1)
    gate.release()


def test_file_gate_that_cannot_be_opened_lets_writers_through(tmp_path):
    from server.fhir.transaction import FileWriteGate

    assert FileWriteGate(str(tmp_path / "missing-dir" / "db-writers.lock")).acquire() is False
