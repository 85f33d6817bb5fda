"""The SQL audit log on SQLite and PostgreSQL: appends, proofs, search, and verify against
rows edited, deleted and swapped behind its back."""
from __future__ import annotations

import base64
import threading
import time

import orjson
import pytest
from sqlalchemy import text

from server.audit import merkle
from server.audit.log import NODE_MIN_LEVEL, AuditLog, entry_table
from server.errors import InternalError, InvalidRequest, NotFound
from server.fhir.validation import validate
from tests.unit.server.audit.conftest import fill, make_event


def b64(s: str) -> bytes:
    return base64.b64decode(s)


def sql(log: AuditLog, stmt: str, **params) -> None:
    with log.engine.begin() as conn:
        conn.execute(text(stmt), params)


def test_append_stores_canonical_entry(audit_log):
    ev = make_event(0)
    seq = audit_log.append(ev)
    assert seq == 0 and "id" not in ev  # the caller's dict is left alone
    raw = audit_log.entry(0)
    body = orjson.loads(raw)
    assert raw == orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    assert body["id"] == "0" and body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")
    validate(body, "AuditEvent")
    stored = audit_log.read("0")
    assert stored.res_type == "AuditEvent" and stored.body == raw
    with pytest.raises(NotFound):
        audit_log.read("1")
    with pytest.raises(NotFound):
        audit_log.read("abc")
    with pytest.raises(NotFound):
        audit_log.read("00")


def test_append_inside_callers_transaction_rolls_back_with_it(audit_log):
    from server.db.engine import begin_write

    conn = begin_write(audit_log.engine)
    try:
        with pytest.raises(RuntimeError):
            with conn.begin():
                assert audit_log.append(make_event(0), conn=conn) == 0
                raise RuntimeError("the interaction failed after auditing")
        with conn.begin():
            assert audit_log.append(make_event(1), conn=conn) == 0
    finally:
        conn.close()
    assert audit_log.tree_size() == 1 and audit_log.verify().ok


def test_append_failure_raises(audit_log):
    sql(audit_log, "DELETE FROM audit_state")
    with pytest.raises(InternalError):
        audit_log.append(make_event(0))
    with pytest.raises(InternalError):
        audit_log.append({"resourceType": "AuditEvent"})  # no recorded


def test_concurrent_appends_are_contiguous(audit_log):
    threads, per = 8, 12
    seqs: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        try:
            start.wait()
            for i in range(per):
                s = audit_log.append(make_event(t * per + i))
                with lock:
                    seqs.append(s)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors
    assert sorted(seqs) == list(range(threads * per))
    report = audit_log.verify()
    assert report.ok and report.checked == threads * per


def test_verify_good_log_and_sths(audit_log):
    assert audit_log.verify().ok  # empty log
    empty = audit_log.sign_tree_head()
    assert empty["tree_size"] == 0
    assert b64(empty["sha256_root_hash"]) == merkle.EMPTY_ROOT
    fill(audit_log, 5)
    sth5 = audit_log.sign_tree_head()
    assert audit_log.sign_tree_head() == sth5  # the tree did not grow: same STH
    assert audit_log.latest_sth() == sth5
    assert audit_log.check_sth(sth5)
    assert not audit_log.check_sth(dict(sth5, tree_size=6))
    assert not audit_log.check_sth(dict(sth5, sha256_root_hash=empty["sha256_root_hash"]))
    fill(audit_log, 4, 5)
    assert audit_log.sign_tree_head(min_interval=3600) == sth5  # rate-limited: reused
    sth9 = audit_log.sign_tree_head()
    assert sth9["tree_size"] == 9
    size, root = audit_log.root()
    assert size == 9 and b64(sth9["sha256_root_hash"]) == root
    leaves = [merkle.leaf_hash(audit_log.entry(i)) for i in range(9)]
    assert root == merkle.mth(leaves)
    report = audit_log.verify()
    assert report.ok and report.checked == 9 and report.first_bad is None


def test_verify_catches_an_edited_entry(audit_log):
    fill(audit_log, 12)
    audit_log.sign_tree_head()
    forged = audit_log.entry(7).replace(b'"outcome":"0"', b'"outcome":"8"')
    sql(audit_log, "UPDATE audit_entry SET entry = :e WHERE seq = 7", e=forged)
    report = audit_log.verify()
    assert not report.ok and report.first_bad == "entry 7" and report.checked == 7
    assert "edited" in report.reason


def test_verify_catches_an_entry_edited_with_its_hash(audit_log):
    """Entry and leaf hash rewritten together: the signed tree head catches it."""
    fill(audit_log, 12)
    audit_log.sign_tree_head()
    body = orjson.loads(audit_log.entry(3))
    body["agent"][0]["who"]["identifier"]["value"] = "someone-else"
    body["agent"][0]["who"]["display"] = "someone-else"
    forged = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    sql(audit_log, "UPDATE audit_entry SET entry = :e, leaf_hash = :h, agent = 'someone-else' "
                   "WHERE seq = 3", e=forged, h=merkle.leaf_hash(forged))
    report = audit_log.verify()
    assert not report.ok and report.first_bad == "sth 12"


def test_verify_catches_a_deleted_entry(audit_log):
    fill(audit_log, 10)
    sql(audit_log, "DELETE FROM audit_ref WHERE seq = 4")
    sql(audit_log, "DELETE FROM audit_entry WHERE seq = 4")
    report = audit_log.verify()
    assert not report.ok and report.first_bad == "entry 4" and report.checked == 4
    assert "missing" in report.reason


def test_verify_catches_the_last_entry_deleted(audit_log):
    fill(audit_log, 10)
    sql(audit_log, "DELETE FROM audit_ref WHERE seq = 9")
    sql(audit_log, "DELETE FROM audit_entry WHERE seq = 9")
    report = audit_log.verify()
    assert not report.ok and report.first_bad == "entry 9"


@pytest.mark.parametrize("with_hashes", [False, True])
def test_verify_catches_swapped_entries(audit_log, with_hashes):
    fill(audit_log, 10)
    a, b = audit_log.entry(2), audit_log.entry(6)
    cols = ", leaf_hash = :h" if with_hashes else ""
    sql(audit_log, f"UPDATE audit_entry SET entry = :e{cols} WHERE seq = 2",
        e=b, h=merkle.leaf_hash(b))
    sql(audit_log, f"UPDATE audit_entry SET entry = :e{cols} WHERE seq = 6",
        e=a, h=merkle.leaf_hash(a))
    report = audit_log.verify()
    assert not report.ok and report.first_bad == "entry 2"


def test_verify_catches_edited_search_columns(audit_log):
    fill(audit_log, 6)
    sql(audit_log, "UPDATE audit_entry SET agent = 'nobody' WHERE seq = 1")
    report = audit_log.verify()
    assert report.first_bad == "entry 1" and "search columns" in report.reason


def test_verify_catches_a_hidden_patient_reference(audit_log):
    fill(audit_log, 6)
    sql(audit_log, "DELETE FROM audit_ref WHERE seq = 2 AND ref = 'Patient/p2'")
    report = audit_log.verify()
    assert report.first_bad == "entry 2" and "audit_ref" in report.reason


def test_verify_catches_edited_sth_signature_and_root(audit_log):
    fill(audit_log, 5)
    sth = audit_log.sign_tree_head()
    fill(audit_log, 3, 5)
    audit_log.sign_tree_head()
    assert audit_log.verify().ok
    sig = sth["signature"]
    forged = sig[:-6] + ("AAAAAA" if not sig.endswith("AAAAAA") else "BBBBBB")
    sql(audit_log, "UPDATE audit_sth SET signature = :s WHERE tree_size = 5", s=forged)
    report = audit_log.verify()
    assert not report.ok and report.first_bad == "sth 5" and "signature" in report.reason
    sql(audit_log, "UPDATE audit_sth SET signature = :s WHERE tree_size = 5", s=sig)
    assert audit_log.verify().ok
    sql(audit_log, "UPDATE audit_sth SET root_hash = :r WHERE tree_size = 8", r=bytes(32))
    report = audit_log.verify()
    assert not report.ok and report.first_bad == "sth 8"


def test_verify_catches_a_truncated_log(audit_log):
    """Deleting the newest entries and rewinding audit_state: the STH still covers them."""
    fill(audit_log, 6)
    audit_log.sign_tree_head()
    state = None
    with audit_log.engine.connect() as conn:
        state = conn.execute(text("SELECT frontier FROM audit_state")).scalar()
    fill(audit_log, 2, 6)
    audit_log.sign_tree_head()
    sql(audit_log, "DELETE FROM audit_ref WHERE seq >= 6")
    sql(audit_log, "DELETE FROM audit_entry WHERE seq >= 6")
    sql(audit_log, "UPDATE audit_state SET tree_size = 6, frontier = :f", f=state)
    report = audit_log.verify()
    assert not report.ok and report.first_bad == "sth 8"


def test_verify_catches_a_forged_state(audit_log):
    fill(audit_log, 3)
    sql(audit_log, "UPDATE audit_state SET frontier = '[]', tree_size = 0")
    report = audit_log.verify()
    assert report.first_bad == "audit_state"


def test_proofs_from_the_log_verify(audit_log):
    n = (1 << NODE_MIN_LEVEL) + 45  # crosses a stored subtree
    engine = audit_log.engine
    # Bulk appends in one transaction (the per-append path is tested above).
    from server.db.engine import begin_write

    conn = begin_write(engine)
    with conn.begin():
        for i in range(n):
            audit_log.append(make_event(i), conn=conn)
    conn.close()
    sth = audit_log.sign_tree_head()
    root = b64(sth["sha256_root_hash"])
    leaves = [merkle.leaf_hash(audit_log.entry(i)) for i in range(n)]
    assert merkle.mth(leaves) == root
    for index in (0, 1, 100, 255, 256, 257, n - 1):
        p = audit_log.inclusion(index, n)
        assert b64(p["leaf_hash"]) == leaves[index]
        assert b64(p["sha256_root_hash"]) == root
        assert merkle.verify_inclusion(index, n, leaves[index],
                                       [b64(h) for h in p["inclusion_path"]], root)
    p = audit_log.inclusion(3, 10)
    assert merkle.verify_inclusion(3, 10, leaves[3], [b64(h) for h in p["inclusion_path"]],
                                   merkle.mth(leaves[:10]))
    for first, second in ((1, n), (7, 300), (256, n), (257, n), (n, n), (0, 5)):
        c = audit_log.consistency(first, second)
        assert b64(c["first_root_hash"]) == merkle.mth(leaves[:first])
        assert b64(c["second_root_hash"]) == merkle.mth(leaves[:second])
        assert merkle.verify_consistency(first, second, merkle.mth(leaves[:first]),
                                         merkle.mth(leaves[:second]),
                                         [b64(h) for h in c["consistency_path"]])
    for bad in ((n, n), (-1, 5), (3, n + 1), (4, 4)):
        with pytest.raises(InvalidRequest):
            audit_log.inclusion(*bad)
    with pytest.raises(InvalidRequest):
        audit_log.consistency(5, 4)
    with pytest.raises(InvalidRequest):
        audit_log.consistency(1, n + 1)
    # A stored subtree hash edited: verify names the block.
    sql(audit_log, "UPDATE audit_node SET hash = :h WHERE level = :l AND idx = 0",
        h=bytes(32), l=NODE_MIN_LEVEL)
    report = audit_log.verify()
    assert report.first_bad == f"entries 0-{(1 << NODE_MIN_LEVEL) - 1}"


def ids(result) -> list[str]:
    return [m.res_id for m in result.matches]


def test_search(audit_log):
    t0 = 1_700_000_000.0
    day = 86400.0
    for i in range(10):
        audit_log.append(make_event(i, recorded=t0 + i * day,
                                    action="E" if i % 2 else "R",
                                    subtype="search-type" if i % 2 else "read",
                                    outcome="4" if i == 9 else "0",
                                    what=[f"Observation/o{i}", "1.2.3.4"] if i == 5 else None))
    s = audit_log.search
    assert ids(s([])) == [str(i) for i in range(9, -1, -1)]  # newest first
    assert s([]).total == 10
    assert ids(s([("patient", "p1")])) == ["6", "1"]
    assert ids(s([("patient", "Patient/p1,p2")])) == ["7", "6", "2", "1"]
    assert ids(s([("agent", "client-0")])) == ["9", "6", "3", "0"]
    assert ids(s([("agent", "client-0"), ("patient", "p3")])) == ["3"]
    assert ids(s([("action", "E")])) == ["9", "7", "5", "3", "1"]
    assert ids(s([("subtype", "http://hl7.org/fhir/restful-interaction|read")])) == \
        ["8", "6", "4", "2", "0"]
    assert ids(s([("outcome", "4")])) == ["9"]
    assert ids(s([("entity", "Observation/o4")])) == ["4"]
    assert ids(s([("entity", "1.2.3.4")])) == ["5"]
    assert ids(s([("source", "real")])) == ids(s([]))
    # 2023-11-14T22:13:20Z is t0: day 0; day 2 = 2023-11-16.
    assert ids(s([("date", "2023-11-16")])) == ["2"]
    assert ids(s([("date", "ge2023-11-21")])) == ["9", "8", "7"]
    assert ids(s([("date", "lt2023-11-16")])) == ["1", "0"]
    assert ids(s([("date", "gt2023-11-21"), ("date", "le2023-11-22")])) == ["8"]
    assert ids(s([("date", "2023-11-14T22:13:20Z")])) == ["0"]
    assert ids(s([("date", "2024")])) == []
    with pytest.raises(InvalidRequest):
        s([("date", "yesterday")])
    with pytest.raises(InvalidRequest):
        s([("_count", "x")])
    # Unknown parameters: a warning (lenient) or 400 (strict).
    assert s([("foo", "1")]).warnings
    with pytest.raises(InvalidRequest):
        s([("foo", "1")], handling="strict")
    assert s([("_summary", "count")]).matches == [] and s([("_summary", "count")]).total == 10


def test_search_paging(audit_log):
    fill(audit_log, 7)
    page = audit_log.search([("_count", "3")])
    assert ids(page) == ["6", "5", "4"] and page.total == 7
    assert page.next_params == [("_count", "3"), ("_before", "4")]
    fill(audit_log, 2, 7)  # new entries do not shift later pages
    page2 = audit_log.search(page.next_params)
    assert ids(page2) == ["3", "2", "1"]
    page3 = audit_log.search(page2.next_params)
    assert ids(page3) == ["0"] and page3.next_params is None


def test_search_bundle_links(audit_log):
    """The existing searchset code renders our pages, with a next link."""
    from server.fhir.bundles import search_bundle
    from server.source import RequestContext

    fill(audit_log, 3)
    ctx = RequestContext(base_url="http://h/fhir")
    bundle = search_bundle(ctx, "AuditEvent", audit_log.search([("_count", "2")]))
    assert bundle["total"] == 3
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["2", "1"]
    nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    assert nxt == ["http://h/fhir/AuditEvent?_count=2&_before=1"]
    validate(bundle["entry"][0]["resource"], "AuditEvent")


def test_append_speed(audit_log, capsys):
    """Not a pass/fail on time: prints the per-append figure for docs/audit.md."""
    fill(audit_log, 20)
    n = 300
    t = time.perf_counter()
    fill(audit_log, n, 20)
    ms = (time.perf_counter() - t) / n * 1000
    with capsys.disabled():
        print(f"\n[{audit_log.engine.dialect.name}] append: {ms:.2f} ms per entry")
    assert audit_log.tree_size() == n + 20
    assert entry_table.name == "audit_entry"
