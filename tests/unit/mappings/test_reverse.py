"""Patient row + events -> FHIR R4 record: validity, references, codes, dates."""
from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from mappings.errors import MappingError
from mappings.reverse import dicom_uid, tables_to_fhir, to_fhir_record, validate_record
from mappings.tables import map_records

from .records_fixture import small_cohort


@pytest.fixture(scope="module")
def mapped():
    return map_records(small_cohort(), min_count=1)


def _record(mapped, pid="p1", prefix="syn-1", **kw):
    ev = mapped.events[mapped.events["patient_id"] == pid]
    return to_fhir_record(mapped.patients.loc[pid], ev, prefix, **kw)


def test_record_is_valid_and_complete(mapped):
    rec = _record(mapped)
    validate_record(rec)
    types = {r["resourceType"] for r in rec}
    assert types == {"Patient", "Encounter", "Condition", "Observation", "Procedure",
                     "MedicationRequest", "Immunization", "DiagnosticReport", "ImagingStudy"}
    assert rec[0]["resourceType"] == "Patient" and rec[0]["id"] == "syn-1"
    assert rec[0]["birthDate"] == "1980-05-17" and rec[0]["gender"] == "female"


def test_references_resolve(mapped):
    rec = _record(mapped)
    ids = {f"{r['resourceType']}/{r['id']}" for r in rec}
    refs = []

    def walk(o):
        if isinstance(o, dict):
            if "reference" in o:
                refs.append(o["reference"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(rec)
    assert refs and all(r in ids for r in refs)
    by_id = {r["id"]: r for r in rec}
    cond = next(r for r in rec if r["resourceType"] == "Condition"
                and r["code"]["coding"][0]["code"] == "444814009")
    assert by_id[cond["encounter"]["reference"].split("/")[1]]["resourceType"] == "Encounter"
    dr = next(r for r in rec if r["resourceType"] == "DiagnosticReport")
    glu = by_id[dr["result"][0]["reference"].split("/")[1]]
    assert glu["code"]["coding"][0]["code"] == "2339-0"


def test_facts_kept(mapped):
    rec = _record(mapped, displays=mapped.event_meta["table"]["displays"])
    bp = next(r for r in rec if r["resourceType"] == "Observation"
              and r["code"]["coding"][0]["code"] == "85354-9")
    assert [c["code"]["coding"][0]["code"] for c in bp["component"]] == ["8480-6", "8462-4"]
    assert bp["component"][0]["valueQuantity"] == {
        "value": 121, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
    # 2010-03-01T10:05+01:00 -> 09:05 UTC
    assert bp["effectiveDateTime"] == "2010-03-01T09:05:00+00:00"
    sin = next(r for r in rec if r["resourceType"] == "Condition"
               and r["code"]["coding"][0]["code"] == "444814009")
    assert sin["onsetDateTime"].startswith("2010-03-01T09:00")
    assert sin["abatementDateTime"].startswith("2010-03-15")
    assert sin["clinicalStatus"]["coding"][0]["code"] == "resolved"
    smk = next(r for r in rec if r["resourceType"] == "Observation"
               and r["code"]["coding"][0]["code"] == "72166-2")
    assert smk["valueCodeableConcept"]["coding"][0] == {
        "system": "http://snomed.info/sct", "code": "266919005", "display": "Never smoker"}
    enc = [r for r in rec if r["resourceType"] == "Encounter"]
    assert [e["class"]["code"] for e in enc] == ["AMB", "EMER"]
    assert enc[1]["period"] == {"start": "2012-07-10T04:30:00+00:00", "end": "2012-07-10T07:00:00+00:00"}
    proc = next(r for r in rec if r["resourceType"] == "Procedure")
    assert proc["performedPeriod"]["end"] == "2012-07-10T05:45:00+00:00"
    img = next(r for r in rec if r["resourceType"] == "ImagingStudy")
    assert [s["modality"]["code"] for s in img["series"]] == ["CR", "DX"]
    assert img["numberOfSeries"] == 2 and img["numberOfInstances"] == 3
    src = mapped.events.set_index("event_id")
    assert img["identifier"][0]["value"] == "urn:oid:" + src.loc["p1-img", "study_uid"]
    assert img["series"][0]["uid"] == src.loc["p1-img", "series_uid"]
    assert img["series"][0]["bodySite"]["display"] == "Thoracic structure"


def test_deterministic_ids_and_prefix(mapped):
    a, b = _record(mapped, prefix="c7-00012"), _record(mapped, prefix="c7-00012")
    assert a == b
    assert all(r["id"] == "c7-00012" or r["id"].startswith("c7-00012-") for r in a)
    with pytest.raises(MappingError):
        _record(mapped, prefix="bad id!")


def test_displays_from_provider(mapped):
    from terminologies.provider import InMemoryProvider

    prov = InMemoryProvider({"resourceType": "CodeSystem", "url": "http://snomed.info/sct",
                             "status": "active", "content": "fragment",
                             "concept": [{"code": "444814009", "display": "Viral sinusitis (disorder)"}]})
    rec = _record(mapped, provider=prov)
    sin = next(r for r in rec if r["resourceType"] == "Condition"
               and r["code"]["coding"][0]["code"] == "444814009")
    assert sin["code"]["coding"][0]["display"] == "Viral sinusitis (disorder)"


def test_synthetic_row_without_birth_date():
    row = {"sex": "male", "birth_year": 1970, "deceased": True, "age_at_death": 50.0}
    events = pd.DataFrame([
        {"event_id": "a", "kind": "encounter", "t_days": 10000.5, "code": "185349003",
         "system": "http://snomed.info/sct", "display": "Check up", "value_code": "AMB",
         "end_t_days": 10000.6},
        {"event_id": "b", "kind": "observation", "t_days": 10000.51, "code": "8310-5",
         "system": "http://loinc.org", "value_num": 37.1, "unit": "Cel", "encounter_id": "a"},
        {"event_id": "c", "kind": "condition_abatement", "t_days": 10010.0, "code": "444814009",
         "system": "http://snomed.info/sct"},
    ])
    rec = to_fhir_record(row, events, "s1")
    validate_record(rec)
    p = rec[0]
    assert p["birthDate"].startswith("1970-")
    assert p["deceasedDateTime"][:4] in ("2019", "2020")
    obs = next(r for r in rec if r["resourceType"] == "Observation")
    assert obs["encounter"]["reference"] == "Encounter/s1-enc-1"
    cond = next(r for r in rec if r["resourceType"] == "Condition")
    assert "abatementDateTime" in cond and "onsetDateTime" not in cond
    assert to_fhir_record(row, events, "s1") == rec
    with pytest.raises(MappingError):
        to_fhir_record({"sex": "male"}, events, "s2")
    rec2 = to_fhir_record({"age": 30.0}, events.iloc[:1], "s3", anchor=dt.date(2020, 1, 1))
    assert rec2[0]["birthDate"].startswith("1990-") or rec2[0]["birthDate"].startswith("1989-")


def test_tables_to_fhir_and_dicom_uid(mapped):
    recs = list(tables_to_fhir(mapped.patients, mapped.events, id_prefix="x"))
    assert [r[0]["id"] for r in recs] == ["x0", "x1", "x2", "x3", "x4"]
    kept = list(tables_to_fhir(mapped.patients, mapped.events, keep_ids=True))
    assert [r[0]["id"] for r in kept] == ["p1", "p2", "p3", "p4", "p5"]
    u = dicom_uid("a", 1)
    assert u == dicom_uid("a", 1) != dicom_uid("a", 2)
    assert u.startswith("2.25.") and len(u) <= 64


def test_event_rows_by_column_equal_cell_by_cell():
    """The column-wise conversion of an event frame gives what ``_v`` of each cell gives."""
    import numpy as np

    from mappings.reverse import _ordered_events, _v

    frame = pd.DataFrame({
        "event_id": ["e2", "e1", None, "e3"],
        "t_days": [3.5, np.nan, 1.0, 2.0],
        "value_num": pd.array([1.5, None, 2.0, None], dtype="Float64"),
        "code": pd.Series(["a", pd.NA, np.nan, "d"], dtype=object),
        "count": np.array([1, 2, 3, 4], dtype=np.int64),
        "flag": [True, False, True, False],
        "mixed": pd.Series([np.int64(7), np.float64(2.5), None, "x"], dtype=object),
        "when": pd.to_datetime(["2020-01-01", None, "2021-05-06", "2022-02-02"]),
        "label": pd.array(["p", None, "r", "s"], dtype="string"),
    })
    got = _ordered_events(frame)
    want = [{k: _v(v) for k, v in r.items()} for r in frame.to_dict("records")]
    want.sort(key=lambda r: (r["t_days"] if r["t_days"] is not None else float("inf"),
                             str(r["event_id"] or "")))
    assert got == want
    assert [r["mixed"] for r in got] == [None, "x", 7, 2.5]
    assert [type(r["mixed"]) for r in got] == [type(None), str, int, float]   # no numpy scalars
    assert got[-1]["t_days"] is None and got[-1]["code"] is None
