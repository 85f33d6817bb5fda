"""``synthport map``: records read through the source protocol -> Parquet tables."""
from __future__ import annotations

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
