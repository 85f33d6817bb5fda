"""DICOM over a synthetic cohort: DICOMweb and C-FIND agree with the cohort's FHIR."""
from __future__ import annotations

import io

import pydicom
import pytest

from tests.unit.server.synthetic.conftest import COHORT, SIZE

FHIR = f"/synthetic/{COHORT}/fhir"
WEB = f"/synthetic/{COHORT}/dicomweb"


def _first_study(client) -> tuple[dict, dict]:
    for i in range(SIZE):
        b = client.get(f"{FHIR}/Patient/{COHORT}-{i}/$everything").get_json()
        res = [e["resource"] for e in b["entry"]]
        studies = [r for r in res if r["resourceType"] == "ImagingStudy"]
        if studies:
            return res[0], studies[0]
    pytest.fail("no virtual patient of the tiny cohort has an ImagingStudy")


def _v(ds_json: dict, tag: str):
    val = ds_json.get(tag, {}).get("Value", [None])[0]
    return val["Alphabetic"] if isinstance(val, dict) else val


def test_fhir_and_dicomweb_agree_on_a_virtual_study(cohort_env):
    from server.synthetic.dicom import body_part_of

    c = cohort_env.app().test_client()
    patient, study = _first_study(c)
    suid = study["identifier"][0]["value"].removeprefix("urn:oid:")
    series = study["series"][0]
    r = c.get(f"{WEB}/studies?StudyInstanceUID={suid}", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200, r.data
    (found,) = r.get_json()
    name = patient["name"][0]
    assert _v(found, "0020000D") == suid
    assert _v(found, "00100020") == patient["id"]
    assert _v(found, "00100010") == f"{name['family']}^{name['given'][0]}"
    assert _v(found, "00100030") == patient["birthDate"].replace("-", "")
    assert _v(found, "00100040") == {"male": "M", "female": "F"}.get(patient.get("gender"))
    assert _v(found, "00080020") == study["started"][:10].replace("-", "")
    assert series["modality"]["code"] in found["00080061"]["Value"]
    # series level: UID, modality, body part
    r = c.get(f"{WEB}/studies/{suid}/series", headers={"Accept": "application/dicom+json"})
    ser = {_v(s, "0020000E"): s for s in r.get_json()}
    assert set(ser) == {s["uid"] for s in study["series"]}
    # instance retrieval: a valid Part 10 file with the same identifying attributes
    inst = series["instance"][0]
    r = c.get(f"{WEB}/studies/{suid}/series/{series['uid']}/instances/{inst['uid']}",
              headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200
    body = r.data
    start = body.index(b"DICM") - 128
    ds = pydicom.dcmread(io.BytesIO(body[start:]))
    assert ds.SOPInstanceUID == inst["uid"] and ds.SeriesInstanceUID == series["uid"]
    assert ds.StudyInstanceUID == suid and ds.PatientID == patient["id"]
    assert ds.SOPClassUID == inst["sopClass"]["code"]
    assert ds.Modality == series["modality"]["code"]
    assert str(ds.get("BodyPartExamined", "")) == body_part_of(series.get("bodySite", {}).get("code"))
    assert ds.StudyDate == study["started"][:10].replace("-", "")
    assert str(ds.PatientBirthDate) == patient["birthDate"].replace("-", "")
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
    # the same bytes again (deterministic rendering), and writes are refused
    again = c.get(f"{WEB}/studies/{suid}/series/{series['uid']}/instances/{inst['uid']}",
                  headers={"Accept": 'multipart/related; type="application/dicom"'}).data
    assert again[again.index(b"DICM"):again.index(b"DICM") + 2000] == body[start + 128:start + 2128]
    r = c.post(f"{WEB}/studies", data=b"--x--", content_type='multipart/related; type="application/dicom"; boundary=x')
    assert r.status_code in (405, 400)
    assert c.get("/synthetic/nosuch/dicomweb/studies").status_code == 404


def test_c_find_to_the_cohort_ae_title(cohort_env):
    pytest.importorskip("pynetdicom")
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    from server.config import load_config
    from server.dicom.store import DicomStore
    from server.dimse.server import start_dimse
    from server.store import SqlStore
    from server.synthetic.dicom import dimse_sources

    c = cohort_env.app().test_client()
    patient, study = _first_study(c)
    suid = study["identifier"][0]["value"].removeprefix("urn:oid:")
    cfg = load_config({**cohort_env.config, "ae_title": "SYNTHPORT", "dimse_host": "127.0.0.1",
                       "dimse_timeout": 20}, environ={})
    sql = SqlStore.from_url(cohort_env.db_url, cfg)
    sources = dimse_sources(cfg, sql, DicomStore(sql, cfg))
    assert set(sources) == {"SYNTHPORT", COHORT.upper()}
    server = start_dimse(cfg, sources, port=0)
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(FIND)
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title=COHORT.upper())
        assert assoc.is_established
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = suid
        q.PatientID = ""
        q.PatientName = ""
        q.StudyDate = ""
        q.ModalitiesInStudy = ""
        found = []
        for st, ident in assoc.send_c_find(q, FIND):
            if st.Status in (0xFF00, 0xFF01):
                found.append(ident)
        assoc.release()
        assert len(found) == 1
        assert found[0].PatientID == patient["id"]
        assert found[0].StudyDate == study["started"][:10].replace("-", "")
        # C-GET of the study on the cohort AE title: the rendered instances come back
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
        from pydicom.uid import ExplicitVRLittleEndian

        sops = [i for s in study["series"] for i in s["instance"]]
        classes = sorted({i["sopClass"]["code"] for i in sops})
        got = {}

        def on_store(event):
            got[event.request.AffectedSOPInstanceUID] = event.dataset
            return 0x0000

        gae = AE(ae_title="TESTSCU")
        gae.add_requested_context(GET)
        for cls in classes:
            gae.add_requested_context(cls, [ExplicitVRLittleEndian])
        assoc = gae.associate("127.0.0.1", server.server_address[1], ae_title=COHORT.upper(),
                              ext_neg=[build_role(cls, scp_role=True) for cls in classes],
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        g = Dataset()
        g.QueryRetrieveLevel = "STUDY"
        g.StudyInstanceUID = suid
        rsps = [st for st, _ in assoc.send_c_get(g, GET)]
        assoc.release()
        assert rsps[-1].Status == 0x0000
        assert sorted(got) == sorted(i["uid"] for i in sops)
        ds = next(iter(got.values()))
        assert ds.PatientID == patient["id"] and ds.StudyInstanceUID == suid
        # a cohort created while the listener runs gets its AE title at the next refresh
        from server.synthetic.cohort import create_cohort
        from server.synthetic.dicom import refresh_dimse_sources

        probe = AE(ae_title="TESTSCU")
        probe.add_requested_context(FIND)
        late = probe.associate("127.0.0.1", server.server_address[1], ae_title="LATE")
        assert not late.is_established
        create_cohort(cohort_env.registry, "late", "tiny", 5, 1)
        assert refresh_dimse_sources(server, cfg, sql) == 1
        assert refresh_dimse_sources(server, cfg, sql) == 0
        late = probe.associate("127.0.0.1", server.server_address[1], ae_title="LATE")
        assert late.is_established
        late.release()
        # the real AE title does not see the cohort
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="SYNTHPORT")
        real = [i for st, i in assoc.send_c_find(q, FIND) if st.Status in (0xFF00, 0xFF01)]
        assoc.release()
        assert real == []
    finally:
        server.shutdown()
        sql.engine.dispose()


@pytest.mark.skipif(__import__("shutil").which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_rendered_instances_pass_dciodvfy(cohort_env, tmp_path):
    import subprocess

    from server.source import RequestContext
    from server.synthetic.cohort import load_cohort, make_uid
    from server.synthetic.dicom import SyntheticDicomSource

    cohort = load_cohort(cohort_env.registry, COHORT)
    src = SyntheticDicomSource(cohort)
    c = cohort_env.app().test_client()
    _, study = _first_study(c)
    suid = study["identifier"][0]["value"].removeprefix("urn:oid:")
    refs = src.instance_refs(RequestContext(), suid)
    files = [src.open_instance(RequestContext(), r) for r in refs[:3]]
    # and a CT slice of a series (cross-sectional: position and orientation per slice)
    base = src.instances(int(parse_index(cohort, suid)))[0]
    ct = dict(base, Modality="CT", BodyPartExamined="CHEST", InstanceNumber=2,
              NumberOfSeriesRelatedInstances=5, Rows=64, Columns=64,
              SeriesInstanceUID=make_uid(cohort.key, 0, 250, 1),
              SOPInstanceUID=make_uid(cohort.key, 0, 250, 1, 2))
    files.append(src.render(ct))
    for n, data in enumerate(files):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(data)
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]
        assert errors == [], (n, errors)
    ds = pydicom.dcmread(io.BytesIO(files[-1]))
    assert ds.ImagePositionPatient and ds.ImageOrientationPatient and ds.PixelSpacing
    assert src.render(ct) == files[-1]       # deterministic bytes


def parse_index(cohort, uid: str) -> int:
    from server.synthetic.cohort import parse_uid

    return parse_uid(cohort.key, uid)[0]


def test_imaging_study_search_and_qido_list_the_same_studies(cohort_env):
    c = cohort_env.app().test_client()
    fhir, url = [], f"{FHIR}/ImagingStudy?_count=4"
    while url:
        b = c.get(url).get_json()
        fhir += [e["resource"]["identifier"][0]["value"].removeprefix("urn:oid:")
                 for e in b.get("entry", []) if e["search"]["mode"] == "match"]
        url = next((x["url"] for x in b["link"] if x["relation"] == "next"), None)
        url = url and "/" + url.split("://", 1)[1].split("/", 1)[1]
    qido = [_v(s, "0020000D") for s in c.get(f"{WEB}/studies",
                                              headers={"Accept": "application/dicom+json"}).get_json()]
    assert fhir and qido == fhir
    # QIDO paging by offset gives the same sequence
    half = c.get(f"{WEB}/studies?offset=1&limit=2", headers={"Accept": "application/dicom+json"})
    assert [_v(s, "0020000D") for s in half.get_json()] == fhir[1:3]
