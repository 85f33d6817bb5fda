"""server/fhir/ids.py: server-assigned ids are version 7 UUIDs, ordered by time."""
from __future__ import annotations

import time
import uuid

from server.fhir.ids import new_id
from server.fhir.validation import valid_id


def test_ids_are_rfc9562_version_7_and_valid_fhir_ids():
    for _ in range(200):
        s = new_id()
        u = uuid.UUID(s)
        assert str(u) == s and len(s) == 36 and valid_id(s)
        assert u.version == 7 and u.variant == uuid.RFC_4122


def test_ids_start_with_the_creation_time_and_sort_after_older_ones():
    before = time.time_ns() // 1_000_000
    s = new_id()
    after = time.time_ns() // 1_000_000
    ms = uuid.UUID(s).int >> 80
    assert before <= ms <= after
    older = [new_id() for _ in range(50)]
    time.sleep(0.003)
    newer = [new_id() for _ in range(50)]
    assert max(older) < min(newer)          # text order is time order across milliseconds


def test_ids_differ_within_one_millisecond():
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)


def test_creates_get_time_ordered_ids_on_both_databases(db_url):
    from server.source import RequestContext
    from server.store import SqlStore

    ctx = RequestContext(prefer_return="minimal")
    store = SqlStore.from_url(db_url)
    try:
        one = store.create(ctx, "Basic", {"resourceType": "Basic", "code": {"text": "a"}})
        time.sleep(0.003)
        out = store.bundle(ctx, {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {"resourceType": "Basic", "code": {"text": str(i)}},
             "request": {"method": "POST", "url": "Basic"}} for i in range(20)]})
        ids = [e["response"]["location"].split("/")[1] for e in out["entry"]]
        for s in [one.resource.res_id] + ids:
            assert uuid.UUID(s).version == 7
        assert min(ids) > one.resource.res_id
    finally:
        store.engine.dispose()
