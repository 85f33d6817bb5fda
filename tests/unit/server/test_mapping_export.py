"""``synthport map``: records read through the source protocol -> Parquet tables."""
from __future__ import annotations

import orjson
import pandas as pd
import pytest
from click.testing import CliRunner

from mappings.io import read_tables
from mappings.tables import map_records
from server.mapping_export import export_tables, iter_source_records, patient_record
from server.source import RequestContext
from server.store import SqlStore
from tests.unit.mappings.records_fixture import small_cohort


def _load(store: SqlStore, records) -> None:
    entries = []
    for rec in records:
        for r in rec:
            entries.append({"fullUrl": f"urn:uuid:{r['id']}", "resource": r,
                            "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}})
    out = store.bundle(RequestContext(), {"resourceType": "Bundle", "type": "transaction",
                                          "entry": entries})
    assert out["resourceType"] == "Bundle"


@pytest.fixture
def store(db_url):
    s = SqlStore.from_url(db_url)
    _load(s, small_cohort())
    yield s
    s.engine.dispose()


def test_records_through_source(store):
    ctx = RequestContext(caller="test")
    recs = list(iter_source_records(store, ctx))
    assert sorted(r[0]["id"] for r in recs) == ["p1", "p2", "p3", "p4", "p5"]
    p1 = next(r for r in recs if r[0]["id"] == "p1")
    assert p1[0]["resourceType"] == "Patient"
    # $everything paged with a small page size gives the same resources
    small = patient_record(store, ctx, "p1", page_size=3)
    assert sorted((r["resourceType"], r["id"]) for r in small) == \
        sorted((r["resourceType"], r["id"]) for r in p1)
    assert any(r["resourceType"] == "Medication" for r in p1)


def test_export_matches_direct_mapping(store, tmp_path):
    report = export_tables(store, tmp_path / "out", min_count=1)
    assert report.patients == 5 and report.events > 50
    back = read_tables(tmp_path / "out")
    direct = map_records(small_cohort(), min_count=1)
    pd.testing.assert_frame_equal(back.patients.sort_index(), direct.patients.sort_index(),
                                  check_exact=False, rtol=1e-9)
    assert len(back.events) == len(direct.events)
    # consent hook: a predicate on the Patient resource
    r2 = export_tables(store, tmp_path / "o2", include_patient=lambda p: p["id"] != "p3",
                       min_count=1, limit=4)
    assert r2.patients == 3 and r2.excluded == 1


def test_cli_map(tmp_path):
    from server.cli import main

    data_dir = tmp_path / "data"
    s = SqlStore.from_url(f"sqlite:///{data_dir}/synthport.db" if data_dir.mkdir() is None else "")
    _load(s, small_cohort()[:3])
    s.engine.dispose()
    res = CliRunner().invoke(main, ["map", "--data-dir", str(data_dir), "--out", str(tmp_path / "t"),
                                    "--limit", "2", "--min-count", "1"])
    assert res.exit_code == 0, res.output
    assert "mapped 2 patients" in res.output
    assert len(read_tables(tmp_path / "t").patients) == 2


# ---------------------------------------------------------------- the real store's fast read


def _edge_cases(store: SqlStore) -> None:
    """What ``$everything`` has to get right beyond one patient's own resources."""
    ctx = RequestContext()
    store.update(ctx, "Practitioner", "dr1", {"resourceType": "Practitioner", "id": "dr1"})
    enc = store.read(ctx, "Encounter", "p1-e1")
    body = orjson.loads(enc.body)
    body["participant"] = [{"individual": {"reference": "Practitioner/dr1"}}]
    store.update(ctx, "Encounter", "p1-e1", body)          # a newer version, the old one hidden
    # in p1's and p2's compartments; references p2's encounter (another compartment)
    store.update(ctx, "Observation", "shared", {
        "resourceType": "Observation", "id": "shared", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "Patient/p2"},
                                                               {"reference": "Practitioner/dr1"}],
        "encounter": {"reference": "Encounter/p2-e1"},
        "effectiveDateTime": "2011-01-01T00:00:00Z", "valueQuantity": {"value": 60.0}})
    p3 = orjson.loads(store.read(ctx, "Patient", "p3").body)
    p3["link"] = [{"other": {"reference": "Patient/p4"}, "type": "seealso"}]
    store.update(ctx, "Patient", "p3", p3)                  # a Patient in p4's compartment
    store.delete(ctx, "Observation", "p2-w2")


def test_compartment_reader_equals_everything(store):
    from server.mapping_export import parse_record

    _edge_cases(store)
    ctx = RequestContext(caller="test")
    reader = store.compartments(RequestContext())
    try:
        for pid in ("p1", "p2", "p3", "p4", "p5"):
            fast = parse_record(reader.bodies(pid))
            assert fast == patient_record(store, ctx, pid), pid
        p4 = parse_record(reader.bodies("p4"))
        assert [r["id"] for r in p4[:2]] == ["p4", "p3"]     # Patients first
        p1 = parse_record(reader.bodies("p1"))
        assert {"dr1", "shared", "p2-e1"} <= {r["id"] for r in p1}
        assert "p2-w2" not in {r["id"] for r in parse_record(reader.bodies("p2"))}
        # one snapshot for the whole read: later writes are not seen, deletes not either
        store.update(ctx, "Observation", "late", {
            "resourceType": "Observation", "id": "late", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": "Patient/p1"}})
        store.delete(ctx, "Patient", "p5")
        assert "late" not in {r["id"] for r in parse_record(reader.bodies("p1"))}
        assert parse_record(reader.bodies("p5"))[0]["id"] == "p5"
        assert reader.bodies("nobody") is None
    finally:
        reader.close()
    again = store.compartments(RequestContext())
    try:
        assert again.bodies("p5") is None                    # deleted before this snapshot
        assert "late" in {r["id"] for r in parse_record(again.bodies("p1"))}
    finally:
        again.close()


def test_parallel_export_same_tables_consent_and_audit(store, tmp_path, monkeypatch):
    """Worker processes read and extract; the tables are those of one process, patients
    whose Consent denies research use are left out, and the export is audited once."""
    import server.mapping_export as me

    _edge_cases(store)
    store.create(RequestContext(), "Consent", {
        "resourceType": "Consent", "status": "active", "dateTime": "2025-01-01",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": "Patient/p3"}, "provision": {"type": "deny"}})
    audits = []
    monkeypatch.setattr(me, "_audit_export", lambda src, ctx, patients: audits.append(list(patients)))
    monkeypatch.setattr(me, "CHUNK", 1)                     # 4 chunks: a worker takes some
    one = export_tables(store, tmp_path / "one", min_count=1, jobs=1)
    two = export_tables(store, tmp_path / "two", min_count=1, jobs=2)
    assert one.patients == two.patients == 4 and one.excluded == two.excluded == 1
    assert one.resources == two.resources
    assert audits == [["p1", "p2", "p4", "p5"]] * 2
    a, b = read_tables(tmp_path / "one"), read_tables(tmp_path / "two")
    pd.testing.assert_frame_equal(a.patients, b.patients, check_exact=True)
    pd.testing.assert_frame_equal(a.events, b.events, check_exact=True)
    assert "p3" not in set(a.patients.index)
    # the same tables as mapping the $everything records in one process
    ctx = RequestContext()
    direct = map_records([patient_record(store, ctx, p) for p in ("p1", "p2", "p4", "p5")],
                         min_count=1)
    pd.testing.assert_frame_equal(a.patients, direct.patients, check_exact=True)
    pd.testing.assert_frame_equal(a.events.reset_index(drop=True),
                                  direct.events.reset_index(drop=True), check_exact=True)


def test_worker_failure_is_reported(store, tmp_path, monkeypatch):
    """A worker that cannot read fails the export with its traceback (this process, which
    claims no chunk here, would otherwise wait for parts that never come)."""
    import server.mapping_export as me
    from mappings.errors import MappingError

    monkeypatch.setattr(me, "CHUNK", 1)
    monkeypatch.setattr(me, "_claim", lambda counter, n: None)   # this process only waits
    monkeypatch.setattr(me, "_shareable_url",
                        lambda engine: "postgresql+psycopg://nobody@127.0.0.1:9/none")
    with pytest.raises(MappingError, match="worker process of the export failed"):
        export_tables(store, tmp_path / "x", min_count=1, jobs=2)


def test_the_guarded_source_has_no_unguarded_bulk_reader(store):
    from server.access import Policy, GuardedSource
    from server.mapping_export import bulk_readable

    guarded = GuardedSource(store, Policy(enforce=True))
    assert not hasattr(guarded, "compartments") and not bulk_readable(guarded)
    assert bulk_readable(store)
