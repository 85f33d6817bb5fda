"""Round trip on the EHDS Spanish document bundles (patient summary + medical imaging).

The regenerated records validate (fhir.resources R4B) and, mapped again, give the same
events and patient table; ImagingStudy UIDs are kept.
"""
from __future__ import annotations

import pandas as pd
import pytest

from mappings.records import iter_ehds_archive
from mappings.tables import map_records

from .roundtrip_helpers import check, round_trip

N_EHDS = 4


@pytest.fixture(scope="module")
def ehds_records():
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "ehds-es-200-seed1001.tar.xz"
    if not path.is_file():
        pytest.skip("../shared/data not present")
    return list(iter_ehds_archive(path, limit=N_EHDS))


@pytest.mark.shared_data
def test_ehds_round_trip(ehds_records):
    records = ehds_records
    assert len(records) == N_EHDS
    # patient summary and medical imaging documents are joined into one record per patient
    assert any(r["resourceType"] == "ImagingStudy" for rec in records for r in rec)
    assert all(sum(r["resourceType"] == "Patient" for r in rec) == 1 for rec in records)
    src, regenerated, again = round_trip(records)
    assert (src.events["kind"] == "imaging_study").any()
    assert src.patients["country"].astype(str).eq("ES").all()
    check(src, regenerated, again)
    for rec, orig in zip(regenerated, records):
        assert rec[0]["birthDate"] == orig[0]["birthDate"]
        src_studies = sorted(i["value"] for r in orig if r["resourceType"] == "ImagingStudy"
                             for i in r.get("identifier", []) if i.get("system") == "urn:dicom:uid")
        new_studies = sorted(i["value"] for r in rec if r["resourceType"] == "ImagingStudy"
                             for i in r["identifier"])
        assert src_studies == new_studies


@pytest.mark.shared_data
def test_ehds_documents_as_parts_map_like_complete_records(shared_data, ehds_records):
    """One streaming pass (a record per document, merged by map_records) = complete records."""
    path = shared_data / "ehds-es-200-seed1001.tar.xz"
    parts = list(iter_ehds_archive(path, limit=3, complete=False))
    assert len(parts) > 3                       # summary + imaging documents
    whole = map_records(ehds_records[:3])
    merged = map_records(parts)
    pd.testing.assert_frame_equal(whole.patients, merged.patients)
    key = ["patient_id", "event_id"]
    pd.testing.assert_frame_equal(
        whole.events.sort_values(key).reset_index(drop=True),
        merged.events.sort_values(key).reset_index(drop=True))
