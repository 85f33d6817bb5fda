"""DicomStore: files, SQL rows, FHIR link, DICOM matching; on SQLite and PostgreSQL."""
from __future__ import annotations

import os

import orjson
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from server.db import schema as S
from server.dicom.dicomjson import BulkRef
from server.dicom.store import DicomStore, blob_key
from server.errors import (InstanceRefused, InvalidRequest, InvalidResource, NotFound,
                           SopClassMismatch)
from server.fhir.validation import validate
from server.source import RequestContext
from server.store import SqlStore
from tests.unit.server.dicom.factory import dataset, instance, part10, series_of

CTX = RequestContext(base_url="http://dicom.test/dicomweb")


@pytest.fixture
def stores(db_url, tmp_path):
    sql = SqlStore.from_url(db_url, {})
    yield sql, DicomStore(sql, {"data_dir": str(tmp_path), "dicom_timezone": "+01:00"})
    sql.engine.dispose()


@pytest.fixture
def dicom(stores):
    return stores[1]


def count(sql, table) -> int:
    with sql.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def fhir(sql, res_type, params=()):
    return [orjson.loads(r.body) for r in sql.search(RequestContext(), res_type, list(params)).matches]


# --------------------------------------------------------------------------- storage
def test_store_replace_without_duplicates(stores, tmp_path):
    sql, dicom = stores
    study, series, files = series_of(2)
    outs = [dicom.store_instance(CTX, f) for f in files]
    assert [o.replaced for o in outs] == [False, False]
    again = dicom.store_instance(CTX, files[0])
    assert again.replaced and again.sop_instance_uid == outs[0].sop_instance_uid
    assert again.study_uid == study and again.series_uid == series
    assert (count(sql, S.dicom_patient), count(sql, S.dicom_study), count(sql, S.dicom_series),
            count(sql, S.dicom_instance)) == (1, 1, 1, 2)
    key = blob_key(outs[0].sop_instance_uid)
    path = tmp_path / "dicom" / key[:2] / f"{key}.dcm"
    assert path.read_bytes() == files[0]
    refs = dicom.instance_refs(CTX, study)
    assert [r.instance_number for r in refs] == [1, 2]
    assert dicom.open_instance(CTX, refs[1]) == files[1]
    assert len(fhir(sql, "ImagingStudy")) == 1 and len(fhir(sql, "Patient")) == 1
    [study_ds] = dicom.find(CTX, "STUDY", {"StudyInstanceUID": study})
    assert study_ds.NumberOfStudyRelatedInstances == 2


def test_executable_preamble_and_garbage_refused(stores):
    sql, dicom = stores
    data = instance()
    with pytest.raises(InstanceRefused):
        dicom.store_instance(CTX, b"MZ" + data[2:])
    with pytest.raises(InstanceRefused):
        dicom.store_instance(CTX, b"\x7fELF" + data[4:])
    with pytest.raises(InvalidResource):
        dicom.store_instance(CTX, b"not dicom at all" * 20)
    with pytest.raises(InvalidResource):
        dicom.store_instance(CTX, data[:128] + b"DICM" + b"\x02\x00garbage")
    ds = dataset()
    del ds.SOPInstanceUID
    with pytest.raises(InvalidResource, match="SOP Instance UID"):
        dicom.store_instance(CTX, part10(ds))
    # file meta says MR Image Storage, the data set CT Image Storage (same length UIDs)
    mismatched = data.replace(b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.840.10008.5.1.4.1.1.4\x00", 1)
    assert mismatched != data
    with pytest.raises(SopClassMismatch):
        dicom.store_instance(CTX, mismatched)
    assert count(sql, S.dicom_instance) == 0 and fhir(sql, "ImagingStudy") == []


def test_same_sop_uid_with_other_sop_class_refused(dicom):
    data = dataset()
    dicom.store_instance(CTX, part10(data))
    other = dataset("MR_small.dcm", study=data.StudyInstanceUID, series=data.SeriesInstanceUID,
                    sop=data.SOPInstanceUID)
    with pytest.raises(SopClassMismatch):
        dicom.store_instance(CTX, part10(other))


def test_tag_values_never_become_paths(stores, tmp_path):
    sql, dicom = stores
    evil = dataset(PatientID="../../../../tmp/evil", StudyDescription="../../x")
    out = dicom.store_instance(CTX, part10(evil))
    for bad_uid in ("../../../../tmp/evil", "1.2/../../3", "/etc/passwd"):
        with pytest.raises(InvalidResource, match="not a valid UID"):
            dicom.store_instance(CTX, part10(dataset(sop=bad_uid)))
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "synthport.db"
             and not p.name.startswith("synthport.db")]
    key = blob_key(out.sop_instance_uid)
    assert files == [tmp_path / "dicom" / key[:2] / f"{key}.dcm"]
    assert not list(tmp_path.parent.glob("evil*")) and not os.path.exists("/tmp/evil")
    [pat] = dicom.find(CTX, "PATIENT", {"PatientID": "../../../../tmp/evil"})
    assert pat.PatientID == "../../../../tmp/evil"



def test_uids_read_from_the_bytes_as_pydicom_would_give_them():
    """parse_instance reads the UIDs from the bytes as read (no pydicom conversion): padding
    stripped, the first of several values, implicit VR alike; a non-ASCII byte is not a UID."""
    from pydicom.uid import ImplicitVRLittleEndian

    from server.dicom.store import parse_instance

    ds = dataset(series="1.2.3")           # odd length: written as "1.2.3\\0"
    parsed = parse_instance(part10(ds))
    assert (parsed.sop_uid, parsed.study_uid, parsed.series_uid) == (
        ds.SOPInstanceUID, ds.StudyInstanceUID, "1.2.3")
    assert part10(ds).count(b"UI\x06\x001.2.3\x00") == 1
    spaced = parse_instance(part10(ds).replace(b"UI\x06\x001.2.3\x00", b"UI\x06\x001.2.3 "))
    assert spaced.series_uid == "1.2.3"
    multi = dataset(study="1.2.3.4")
    multi.StudyInstanceUID = ["1.2.3.4", "1.2.3.5"]
    assert parse_instance(part10(multi)).study_uid == "1.2.3.4"
    implicit = dataset()
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    parsed = parse_instance(part10(implicit))
    assert (parsed.sop_uid, parsed.series_uid) == (implicit.SOPInstanceUID, implicit.SeriesInstanceUID)
    data = part10(dataset(sop="1.2.34"))
    bad = data.replace(b"1.2.34", b"1.2.\xe94", 2)
    with pytest.raises(InvalidResource, match="not a valid UID"):
        parse_instance(bad)

# --------------------------------------------------------------------------- FHIR link
def test_fhir_patient_and_one_imaging_study_per_study(stores):
    sql, dicom = stores
    s1, se1, files1 = series_of(2, PatientID="PX-1", PatientName="Doe^Jane",
                                PatientBirthDate="19700501", PatientSex="F", Modality="CT",
                                StudyDate="20240102", StudyTime="101500", AccessionNumber="ACC1",
                                TimezoneOffsetFromUTC="")   # -> the dicom_timezone setting
    s2, se2, files2 = series_of(1, "MR_small.dcm", PatientID="PX-1", PatientName="Doe^Jane",
                                StudyDate="20240310", StudyTime="", AccessionNumber="ACC2")
    for f in files1 + files2:
        dicom.store_instance(CTX, f)
    [patient] = fhir(sql, "Patient")
    assert patient["identifier"] == [{"system": "urn:synthport:dicom:patient-id", "value": "PX-1"}]
    assert patient["name"][0]["family"] == "Doe" and patient["name"][0]["given"] == ["Jane"]
    assert patient["gender"] == "female" and patient["birthDate"] == "1970-05-01"
    studies = fhir(sql, "ImagingStudy")
    assert len(studies) == 2
    for body in studies + [patient] + fhir(sql, "Endpoint"):
        validate(body)
    by_uid = {s["identifier"][0]["value"]: s for s in studies}
    one = by_uid[f"urn:oid:{s1}"]
    assert one["status"] == "available" and one["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert one["started"] == "2024-01-02T10:15:00+01:00"
    assert one["numberOfSeries"] == 1 and one["numberOfInstances"] == 2
    assert one["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]
    assert [i["number"] for i in one["series"][0]["instance"]] == [1, 2]
    assert one["series"][0]["uid"] == se1
    assert one["series"][0]["instance"][0]["sopClass"]["code"] == "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    [endpoint] = fhir(sql, "Endpoint")
    assert endpoint["address"] == "http://dicom.test/dicomweb"
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert one["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]
    assert by_uid[f"urn:oid:{s2}"]["started"] == "2024-03-10"

    def ids(params):
        return {s["id"] for s in fhir(sql, "ImagingStudy", params)}
    assert ids([("patient", f"Patient/{patient['id']}")]) == {s["id"] for s in studies}
    assert ids([("modality", "CT")]) == {one["id"]}
    assert ids([("modality", "http://dicom.nema.org/resources/ontology/DCM|MR")]) == \
        {by_uid[f"urn:oid:{s2}"]["id"]}
    assert ids([("started", "ge2024-03-01")]) == {by_uid[f"urn:oid:{s2}"]["id"]}
    assert ids([("identifier", f"urn:oid:{s1}")]) == {one["id"]}
    assert ids([("series", se1)]) == {one["id"]}

    # one more instance: the same ImagingStudy gets a new version, nothing new is created
    dicom.store_instance(CTX, instance(study=s1, series=se1, PatientID="PX-1", InstanceNumber=3))
    assert len(fhir(sql, "ImagingStudy")) == 2 and len(fhir(sql, "Patient")) == 1
    again = sql.read(RequestContext(), "ImagingStudy", one["id"])
    assert orjson.loads(again.body)["numberOfInstances"] == 3 and again.version == 3


def test_existing_fhir_patient_is_linked_not_duplicated(stores):
    sql, dicom = stores
    created = sql.create(RequestContext(), "Patient", {
        "resourceType": "Patient", "name": [{"family": "Fhirfirst"}],
        "identifier": [{"system": "urn:synthport:dicom:patient-id", "value": "P,1|x"}]})
    dicom.store_instance(CTX, instance(PatientID="P,1|x", PatientName="Other^Name"))
    [patient] = fhir(sql, "Patient")
    assert patient["id"] == created.resource.res_id
    assert patient["name"] == [{"family": "Fhirfirst"}]        # FHIR demographics not overwritten
    [study] = fhir(sql, "ImagingStudy")
    assert study["subject"]["reference"] == f"Patient/{patient['id']}"


def test_fhir_only_imaging_study_is_not_listed_by_qido(stores):
    sql, dicom = stores
    pat = sql.create(RequestContext(), "Patient", {"resourceType": "Patient"}).resource.res_id
    uid = generate_uid()
    sql.create(RequestContext(), "ImagingStudy", {
        "resourceType": "ImagingStudy", "status": "available",
        "identifier": [{"system": "urn:dietf:rfc:3986", "value": f"urn:oid:{uid}"}],
        "subject": {"reference": f"Patient/{pat}"}})
    assert dicom.find(CTX, "STUDY", {}) == []
    with pytest.raises(NotFound):
        dicom.instance_refs(CTX, uid)
    stored = dicom.store_instance(CTX, instance())
    found = dicom.find(CTX, "STUDY", {})
    assert [d.StudyInstanceUID for d in found] == [stored.study_uid]
    assert len(fhir(sql, "ImagingStudy")) == 2


def test_stored_instance_adopts_fhir_imaging_study_with_its_uid(stores):
    sql, dicom = stores
    pat = sql.create(RequestContext(), "Patient", {"resourceType": "Patient"}).resource.res_id
    uid = generate_uid()
    made = sql.create(RequestContext(), "ImagingStudy", {
        "resourceType": "ImagingStudy", "status": "registered",
        "identifier": [{"system": "urn:dietf:rfc:3986", "value": f"urn:oid:{uid}"}],
        "subject": {"reference": f"Patient/{pat}"}}).resource.res_id
    dicom.store_instance(CTX, instance(study=uid))
    [study] = fhir(sql, "ImagingStudy")
    assert study["id"] == made and study["status"] == "available" and study["numberOfInstances"] == 1


# --------------------------------------------------------------------------- queries
def test_one_result_per_entity_at_each_level(dicom):
    study, series, files = series_of(3, PatientID="ONE", Modality="CT")
    for f in files:
        dicom.store_instance(CTX, f)
    [st] = dicom.find(CTX, "STUDY", {"PatientID": "ONE"})
    assert st.StudyInstanceUID == study and st.NumberOfStudyRelatedInstances == 3
    assert st.NumberOfStudyRelatedSeries == 1 and st.ModalitiesInStudy == "CT"
    [se] = dicom.find(CTX, "SERIES", {"StudyInstanceUID": study})
    assert se.SeriesInstanceUID == series and se.NumberOfSeriesRelatedInstances == 3
    assert se.StudyInstanceUID == study
    images = dicom.find(CTX, "IMAGE", {"SeriesInstanceUID": series})
    assert [i.InstanceNumber for i in images] == [1, 2, 3]
    assert all(i.StudyInstanceUID == study and i.SeriesInstanceUID == series for i in images)
    [pat] = dicom.find(CTX, "PATIENT", {"PatientID": "ONE"})
    assert (pat.NumberOfPatientRelatedStudies, pat.NumberOfPatientRelatedSeries,
            pat.NumberOfPatientRelatedInstances) == (1, 1, 3)
    assert [i.InstanceNumber for i in dicom.find(CTX, "IMAGE", {}, limit=2, offset=1)] == [2, 3]


@pytest.fixture
def corpus(dicom):
    """Four studies with names, dates, times, modalities and accession numbers to match."""
    rows = [
        dict(PatientID="A1", PatientName="Doe^Jane", StudyDate="20240105", StudyTime="073000",
             AccessionNumber="ACC-100", Modality="CT", ReferringPhysicianName="House^Gregory"),
        dict(PatientID="A2", PatientName="Müller^Hans", StudyDate="20240220", StudyTime="141516.25",
             AccessionNumber="acc-200", Modality="MR", ReferringPhysicianName="Grey^Meredith"),
        dict(PatientID="A3", PatientName="DOE^JOHN^Q", StudyDate="20231231", StudyTime="2359",
             AccessionNumber="ACC-300", Modality="CT", ReferringPhysicianName=""),
        dict(PatientID="A4", PatientName="Smith^Anne", StudyDate="", StudyTime="",
             AccessionNumber="", Modality="US", ReferringPhysicianName=""),
    ]
    uids, first = {}, dict(rows[0])
    for row in rows:
        name = "MR_small.dcm" if row["Modality"] == "MR" else "CT_small.dcm"
        study, _, files = series_of(1, name, **row)
        for f in files:
            dicom.store_instance(CTX, f)
        uids[row["PatientID"]] = study
    first.update(Modality="MR", SeriesNumber=7)   # a second series, MR, in A1's study
    dicom.store_instance(CTX, instance("MR_small.dcm", study=uids["A1"], **first))
    return uids


def _pids(dicom, query, level="STUDY", **kw):
    return sorted(str(d.PatientID) for d in dicom.find(CTX, level, query, **kw))


def test_matching_semantics(dicom, corpus):
    assert _pids(dicom, {}) == ["A1", "A2", "A3", "A4"]
    assert _pids(dicom, {"PatientName": "", "PatientID": "*"}) == ["A1", "A2", "A3", "A4"]
    # person names: case-insensitive single value and wildcards
    assert _pids(dicom, {"PatientName": "doe^jane"}) == ["A1"]
    assert _pids(dicom, {"PatientName": "DOE*"}) == ["A1", "A3"]
    assert _pids(dicom, {"PatientName": "*an*"}) == ["A1", "A2", "A4"]
    assert _pids(dicom, {"PatientName": "?OE^J*"}) == ["A1", "A3"]
    assert _pids(dicom, {"PatientName": "muller*"}) == []
    # fuzzy: accents and case ignored, word prefixes of any component
    assert _pids(dicom, {"PatientName": "muller"}, fuzzy=True) == ["A2"]
    assert _pids(dicom, {"PatientName": "jo"}, fuzzy=True) == ["A3"]
    assert _pids(dicom, {"PatientName": "doe ja"}, fuzzy=True) == ["A1"]
    assert _pids(dicom, {"PatientName": "ane"}, fuzzy=True) == []
    assert _pids(dicom, {"PatientName": "MÜL*"}, fuzzy=True) == ["A2"]
    # other strings are case-sensitive
    assert _pids(dicom, {"AccessionNumber": "ACC-*"}) == ["A1", "A3"]
    assert _pids(dicom, {"AccessionNumber": "acc-200"}) == ["A2"]
    assert _pids(dicom, {"AccessionNumber": "ACC_100"}) == []          # no SQL wildcard leak
    assert _pids(dicom, {"ReferringPhysicianName": "house^gregory"}) == ["A1"]
    # dates and times: single, ranges (open ends), never matching an empty value
    assert _pids(dicom, {"StudyDate": "20240105"}) == ["A1"]
    assert _pids(dicom, {"StudyDate": "20240101-20240301"}) == ["A1", "A2"]
    assert _pids(dicom, {"StudyDate": "20240201-"}) == ["A2"]
    assert _pids(dicom, {"StudyDate": "-20240105"}) == ["A1", "A3"]
    assert _pids(dicom, {"StudyTime": "0700-0800"}) == ["A1"]
    assert _pids(dicom, {"StudyTime": "14"}) == ["A2"]
    assert _pids(dicom, {"StudyTime": "2300-"}) == ["A3"]
    # UID lists (backslash and comma), modalities, lower-level keys
    assert _pids(dicom, {"StudyInstanceUID": f"{corpus['A1']}\\{corpus['A2']}"}) == ["A1", "A2"]
    assert _pids(dicom, {"StudyInstanceUID": f"{corpus['A3']},{corpus['A4']}"}) == ["A3", "A4"]
    assert _pids(dicom, {"ModalitiesInStudy": "MR"}) == ["A1", "A2"]
    assert _pids(dicom, {"ModalitiesInStudy": "US\\MR"}) == ["A1", "A2", "A4"]
    assert _pids(dicom, {"Modality": "CT"}) == ["A1", "A3"]              # series key at STUDY level
    assert _pids(dicom, {"SeriesNumber": "7"}) == ["A1"]
    assert _pids(dicom, {"Modality": "MR"}, level="SERIES") == ["A1", "A2"]
    assert _pids(dicom, {"PatientName": "doe*", "Modality": "MR"}, level="IMAGE") == ["A1"]
    [a1] = dicom.find(CTX, "STUDY", {"PatientID": "A1"})
    assert list(a1.ModalitiesInStudy) == ["CT", "MR"] and a1.NumberOfStudyRelatedSeries == 2
    # a key that is not a matching key is returned but matches universally
    [one] = dicom.find(CTX, "STUDY", {"PatientID": "A2", "PatientAge": "999Y"})
    assert "PatientAge" in one


def test_bad_queries_are_refused(dicom, corpus):
    for query in ({"StudyDate": "2024-01-05"}, {"StudyDate": "yesterday"},
                  {"StudyInstanceUID": "1.2.*"}, {"NotAKeyword": "x"}, {"SeriesNumber": "one"},
                  {"StudyTime": "25x"}):
        with pytest.raises(InvalidRequest):
            dicom.find(CTX, "STUDY", query)
    with pytest.raises(InvalidRequest):
        dicom.find(CTX, "FRAME", {})


def test_return_attributes_and_includefields(dicom):
    study, series, files = series_of(1, PatientID="INC", PatientAge="042Y", SliceThickness="2.5")
    dicom.store_instance(CTX, files[0])
    [st] = dicom.find(CTX, "STUDY", {"PatientID": "INC"}, includefields={"PatientAge", "00081030"})
    for kw in ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
               "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
               "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
               "NumberOfStudyRelatedInstances", "InstanceAvailability", "SpecificCharacterSet"):
        assert kw in st, kw
    assert st.PatientAge == "042Y" and "StudyDescription" in st and "SOPInstanceUID" not in st
    [img] = dicom.find(CTX, "IMAGE", {"StudyInstanceUID": study}, includefields={"00180050"})
    assert float(img.SliceThickness) == 2.5 and img.Rows == 128 and img.BitsAllocated == 16
    [full] = dicom.find(CTX, "IMAGE", {"StudyInstanceUID": study}, include_all=True)
    assert isinstance(full.PixelData, BulkRef) and full.PixelData.path.endswith("/bulkdata/7FE00010")
    assert full.AvailableTransferSyntaxUID == "1.2.840.10008.1.2.1" and len(full) > 100
    [raw] = dicom.metadata_json(CTX, study, series)
    assert b'"BulkDataURI":"synthport-bulk:studies/' in raw


def test_instance_refs_order_and_not_found(dicom):
    study, s1, files = series_of(2, SeriesNumber=2)
    _, s2, more = series_of(2, study=study, SeriesNumber=1)
    for f in reversed(files + more):
        dicom.store_instance(CTX, f)
    refs = dicom.instance_refs(CTX, study)
    assert [(r.series_uid, r.instance_number) for r in refs] == [(s2, 1), (s2, 2), (s1, 1), (s1, 2)]
    assert len(dicom.instance_refs(CTX, study, s1)) == 2
    assert len(dicom.instance_refs(CTX, patient_id=refs[0].patient_id)) == 4
    for kw in ({"study_uid": "1.2.3"}, {"study_uid": study, "series_uid": "9.9"},
               {"sop_uid": "4.5.6"}, {"patient_id": "nobody"}):
        with pytest.raises(NotFound):
            dicom.instance_refs(CTX, **kw)


def _rows(sql) -> dict:
    """Every DICOM row by its natural key, without pks, times and blob keys."""
    out = {}
    skip = {"pk", "updated", "patient_pk", "study_pk", "series_pk", "fhir_id", "blob_key"}
    with sql.engine.connect() as conn:
        for table, key in ((S.dicom_patient, "patient_id"), (S.dicom_study, "study_uid"),
                           (S.dicom_series, "series_uid"), (S.dicom_instance, "sop_uid")):
            for r in conn.execute(select(table)).mappings():
                out[(table.name, r[key])] = {k: (bytes(v) if isinstance(v, memoryview) else v)
                                             for k, v in r.items() if k not in skip}
    return out


def _drop_dicom_rows(sql) -> None:
    with sql.engine.begin() as conn:
        for t in (S.dicom_instance, S.dicom_series, S.dicom_study, S.dicom_patient):
            conn.execute(t.delete())
    sql.engine.dispose()


def _assert_same_rows(a: dict, b: dict) -> None:
    """Equal row sets; a difference names the row and its differing columns."""
    for key in a:
        x, y = a[key], b.get(key, {})
        assert x == y, (key, {k: (x[k], y.get(k)) for k in x if x[k] != y.get(k)})
    assert a == b


def test_store_many_rows_equal_one_by_one(db_url, tmp_path):
    """The batched row writes of store_many (one upsert per patient/study/series) leave
    the same rows as storing each instance in order: later non-empty values win, empty
    ones never blank a value, a re-sent instance is replaced."""
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    first = instance(study=study, series=s1, InstanceNumber=1, PatientID="P-MANY",
                     StudyDescription="", SeriesDescription="first")
    files = [first,
             instance(study=study, series=s1, InstanceNumber=2, PatientID="P-MANY",
                      StudyDescription="later", SeriesDescription=""),
             instance(study=study, series=s2, InstanceNumber=1, PatientID="P-MANY",
                      StudyDescription="", Modality="MR"),
             instance(study=generate_uid(), series=generate_uid(), PatientID="P-OTHER")]
    results = []
    for mode in ("many", "one"):
        sql = SqlStore.from_url(db_url, {})
        try:
            dicom = DicomStore(sql, {"data_dir": str(tmp_path / mode)})
            dicom.store_instance(CTX, first)          # stored before: replaced in the batch
            if mode == "many":
                outs = dicom.store_many(CTX, files)
            else:
                outs = [dicom.store_instance(CTX, f) for f in files]
            assert [o.replaced for o in outs] == [True, False, False, False]
            [st] = dicom.find(CTX, "STUDY", {"StudyInstanceUID": study})
            assert (st.StudyDescription, st.NumberOfStudyRelatedSeries,
                    st.NumberOfStudyRelatedInstances, list(st.ModalitiesInStudy)) == (
                "later", 2, 3, ["CT", "MR"])
            results.append(_rows(sql))
            assert len(fhir(sql, "ImagingStudy")) == 2
        finally:
            _drop_dicom_rows(sql)       # each mode gets a clean schema
    _assert_same_rows(*results)
    assert results[0][("dicom_series", s1)]["series_description"] == "first"


def test_series_rows_read_in_one_statement_update_like_separate_lookups(db_url, tmp_path):
    """An instance of a stored series reads its series, study and patient rows in one
    joined statement: its new values land as with three lookups (store_many's path). An
    instance that files a stored series under another study moves the series with its
    instances, and both studies' counts follow, one by one and batched alike."""
    study, other_study, series = generate_uid(), generate_uid(), generate_uid()
    files = [instance(study=study, series=series, PatientID="P-JOIN", PatientName="A^B",
                      SeriesDescription="", InstanceNumber=1),
             instance(study=study, series=series, PatientID="P-JOIN", PatientName="A^C",
                      SeriesDescription="named", StudyDescription="late", InstanceNumber=2),
             instance(study=other_study, series=series, PatientID="P-JOIN", PatientName="",
                      InstanceNumber=3),
             instance(study=other_study, series=series, PatientID="P-MOVED", PatientName="",
                      InstanceNumber=4)]
    results = []
    for mode in ("many", "one"):
        sql = SqlStore.from_url(db_url, {})
        try:
            dicom = DicomStore(sql, {"data_dir": str(tmp_path / mode)})
            dicom.store_instance(CTX, files[0])
            if mode == "many":
                for f in files[1:]:
                    dicom.store_many(CTX, [f, instance(PatientID="P-PAD")])  # the batch path
            else:
                for f in files[1:]:
                    dicom.store_instance(CTX, f)
                    dicom.store_instance(CTX, instance(PatientID="P-PAD"))
            rows = _rows(sql)
            results.append({k: v for k, v in rows.items()
                            if k[1] in (study, other_study, series, "P-JOIN", "P-MOVED")})
            series_row = rows[("dicom_series", series)]
            assert series_row["series_description"] == "named"
            assert rows[("dicom_patient", "P-JOIN")]["patient_name"] == "A^C"
            [moved] = dicom.find(CTX, "SERIES", {"SeriesInstanceUID": series})
            assert moved.StudyInstanceUID == other_study and moved.PatientID == "P-MOVED"
            # the series took its earlier instances along; the study it left is empty
            assert len(dicom.find(CTX, "IMAGE", {"StudyInstanceUID": other_study,
                                                 "SeriesInstanceUID": series})) == 4
            assert dicom.find(CTX, "IMAGE", {"StudyInstanceUID": study}) == []
            assert [(r["num_series"], r["num_instances"], r["modalities"]) for r in (
                rows[("dicom_study", study)], rows[("dicom_study", other_study)])] == [
                (0, 0, ""), (1, 4, "CT")]
        finally:
            _drop_dicom_rows(sql)       # each mode gets a clean schema
    _assert_same_rows(*results)


def test_a_study_a_series_left_is_linked_even_when_links_are_deferred(stores):
    """C-STORE defers the ImagingStudy of the studies it stores into to the association's
    end (link_pending with their UIDs); the study a moved series left is not among them,
    so it is linked at once: no pending mark left behind, its ImagingStudy loses the series."""
    sql, dicom = stores
    study, other_study, series = generate_uid(), generate_uid(), generate_uid()
    dicom.store_instance(CTX, instance(study=study, series=series, PatientID="P-DEF"))
    out = dicom.store_instance(CTX, instance(study=other_study, series=series, PatientID="P-DEF"),
                               defer_link=True)
    assert out.study_uid == other_study
    with sql.engine.connect() as conn:
        pending = set(conn.execute(select(S.dicom_study.c.study_uid)
                                   .where(S.dicom_study.c.fhir_pending.is_(True))).scalars())
    assert pending == {other_study}
    [left] = fhir(sql, "ImagingStudy", [("identifier", f"urn:oid:{study}")])
    assert not left.get("series") and left.get("numberOfInstances", 0) == 0
    assert dicom.link_pending(CTX, [other_study]) == 1
    [moved] = fhir(sql, "ImagingStudy", [("identifier", f"urn:oid:{other_study}")])
    assert [s["uid"] for s in moved["series"]] == [series] and moved["numberOfInstances"] == 2
