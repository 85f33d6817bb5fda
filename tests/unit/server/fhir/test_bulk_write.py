"""Bulk writes of a transaction: every version row, its pk and its index rows belong together."""
from __future__ import annotations

import orjson
from sqlalchemy import text

from server.source import RequestContext
from server.store import SqlStore

CTX = RequestContext(prefer_return="minimal")


def _bundle(n: int, start: int, gender: str = "female") -> dict:
    entries = []
    for i in range(start, start + n):
        entries.append({"resource": {"resourceType": "Patient", "id": f"p{i}",
                                     "gender": gender, "identifier": [{"system": "urn:test", "value": f"v{i}"}]},
                        "request": {"method": "PUT", "url": f"Patient/p{i}"}})
        entries.append({"resource": {"resourceType": "Observation", "status": "final",
                                     "code": {"text": f"obs {i}"}, "subject": {"reference": f"Patient/p{i}"}},
                        "request": {"method": "POST", "url": "Observation"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def test_rows_pks_and_index_rows_match(db_url):
    store = SqlStore.from_url(db_url)
    try:
        store.bundle(CTX, _bundle(40, 0))
        store.bundle(CTX, _bundle(40, 20, "male"))   # 20 updates (new versions), 20 + 40 creates
        with store.engine.connect() as conn:
            rows = conn.execute(text("SELECT pk, res_type, res_id, version, body, superseded_by "
                                     "FROM resource ORDER BY pk")).all()
            ident = dict(conn.execute(text(
                "SELECT res_pk, code FROM idx_token WHERE param = 'identifier'")).all())
            subj = dict(conn.execute(text(
                "SELECT res_pk, target_id FROM idx_reference WHERE param = 'subject'")).all())
        assert len(rows) == 80 + 80
        for pk, res_type, res_id, version, body, superseded in rows:
            doc = orjson.loads(body)
            assert (doc["resourceType"], doc["id"], doc["meta"]["versionId"]) == (res_type, res_id, str(version))
            if res_type == "Patient":
                assert ident[pk] == doc["identifier"][0]["value"]
            else:
                assert subj[pk] == doc["subject"]["reference"].split("/")[1]
        by_pk = {r[0]: r for r in rows}
        old = [r for r in rows if r[5] is not None]
        assert len(old) == 20
        for pk, res_type, res_id, version, _, superseded in old:
            assert by_pk[superseded][1:4] == (res_type, res_id, version + 1)
    finally:
        store.engine.dispose()
