"""Grouping resources into patient records and resolving references."""
from __future__ import annotations

from mappings.records import group_records, iter_ehds_archive, ref_id, records_from_bundle

from .records_fixture import patient_record


def test_ref_id_forms():
    assert ref_id({"reference": "urn:uuid:abc"}) == "abc"
    assert ref_id("Patient/x1") == "x1"
    assert ref_id("http://h/fhir/Encounter/e9/_history/2") == "e9"
    assert ref_id("Practitioner?identifier=a|b") is None
    assert ref_id({"display": "no ref"}) is None


def test_bundle_of_two_patients_with_shared_resources():
    a, b = patient_record("a1"), patient_record("b1", with_imaging=False)
    org = {"resourceType": "Organization", "id": "org1", "name": "H"}
    a[1]["serviceProvider"] = {"reference": "urn:uuid:org1"}
    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in a + b + [org]]
    recs = records_from_bundle({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert len(recs) == 2
    by = {r[0]["id"]: r for r in recs}
    assert by["a1"][0]["resourceType"] == "Patient"
    assert any(r["resourceType"] == "Organization" for r in by["a1"])
    assert not any(r["resourceType"] == "Organization" for r in by["b1"])
    # the Medication (no patient) goes where it is referenced
    assert any(r.get("id") == "a1-med" for r in by["a1"])
    assert not any(r.get("id") == "a1-med" for r in by["b1"])


def test_odd_full_urls_are_rewritten():
    pat = {"resourceType": "Patient", "id": "p"}
    obs = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "http://other/server/thing/123"}}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "http://other/server/thing/123", "resource": pat},
        {"fullUrl": "urn:uuid:o", "resource": obs}]}
    (rec,) = records_from_bundle(bundle)
    assert rec[1]["subject"]["reference"] == "Patient/p"


def test_duplicates_across_documents_kept_once():
    a = patient_record("d1", with_imaging=False)
    recs = group_records(a + [dict(a[0]), dict(a[1])])
    assert len(recs) == 1 and len(recs[0]) == len(a)


def test_iter_records_over_files_and_archives(tmp_path):
    import io
    import tarfile

    import orjson

    from mappings.records import iter_records

    def bundle(rec):
        return orjson.dumps({"resourceType": "Bundle", "type": "collection",
                             "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in rec]})

    a, b = patient_record("t1", with_imaging=False), patient_record("t2", with_imaging=False)
    (tmp_path / "one.json").write_bytes(bundle(a))
    assert [r[0]["id"] for r in iter_records(tmp_path / "one.json")] == ["t1"]
    # a plain tar of Bundles (not the EHDS layout)
    tar = tmp_path / "x.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        for name, rec in (("d/a.json", a), ("d/b.json", b), ("d/0-hospital.json", a)):
            data = bundle(rec)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    assert [r[0]["id"] for r in iter_records(tar)] == ["t1", "t2"]
    assert [r[0]["id"] for r in iter_records(tar, limit=1)] == ["t1"]
    # EHDS layout: the summary and imaging documents of a patient are joined
    ehds = tmp_path / "e.tar.xz"
    summary = [r for r in a if r["resourceType"] != "ImagingStudy"]
    imaging = [a[0], patient_record("t1")[-1]]
    with tarfile.open(ehds, "w:xz") as tf:
        for name, rec in (("patient-summary/T_One_t1_patient-summary.json", summary),
                          ("medical-imaging/T_One_t1_medical-imaging.json", imaging)):
            data = bundle(rec)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    (rec,) = list(iter_records(ehds))
    assert sum(r["resourceType"] == "Patient" for r in rec) == 1
    assert any(r["resourceType"] == "ImagingStudy" for r in rec)
    parts = list(iter_ehds_archive(ehds, complete=False))
    assert len(parts) == 2
