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
