"""DICOMweb through the Flask app (in-process): STOW-RS, QIDO-RS, WADO-RS, the exact
requests OHIF v3 sends, errors and CORS; on SQLite and PostgreSQL."""
from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import pytest
from PIL import Image

from sqlalchemy import select

from server.app import create_app
from server.db.engine import begin_write
from server.dicom.store import ST
from server.dicom.multipart import parse_media_type, split_multipart
from tests.unit.server.dicom.factory import dataset, instance, multipart, part10, series_of

OCTET_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
DICOM_ACCEPT = "multipart/related; type=application/dicom"
EVRLE, IVRLE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def url_of(ds) -> str:
    """The WADO-RS instance path of a dataset."""
    return (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


@pytest.fixture
def client(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path), "max_count": 50})
    yield app.test_client()
    app.extensions["synthport"]["store"].engine.dispose()


def stow(client, parts, path="/dicomweb/studies", **kw):
    ctype, body = multipart(parts, **kw)
    return client.post(path, data=body, content_type=ctype, headers={"Accept": "application/dicom+json"})


def parts_of(resp) -> list:
    ctype = parse_media_type(resp.headers["Content-Type"])
    assert ctype.mime == "multipart/related", resp.headers["Content-Type"]
    return split_multipart(resp.get_data(), ctype.params["boundary"])


@pytest.fixture
def ct_study(client):
    """Three CT instances in one series, stored through STOW-RS."""
    study, series, files = series_of(3, PatientID="PID-42", PatientName="Xavier^Young",
                                     PatientBirthDate="19800101", StudyDate="20240315",
                                     StudyDescription="CHEST CT", ReferringPhysicianName="Ref^Doc",
                                     WindowCenter="40", WindowWidth="400")
    r = stow(client, files)
    assert r.status_code == 200, r.data
    sops = [pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files]
    return study, series, sops, files


# --------------------------------------------------------------------------- STOW-RS
def test_stow_all_stored(client):
    study, series, files = series_of(2)
    r = stow(client, files, quoted=False)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/dicom+json"       # exactly (dicomweb-client)
    body = r.get_json(force=True)
    assert body["00081190"]["Value"] == [f"http://localhost/dicomweb/studies/{study}"]
    refs = body["00081199"]["Value"]
    assert len(refs) == 2 and "00081198" not in body
    assert refs[0]["00081150"]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
    sop = refs[0]["00081155"]["Value"][0]
    assert refs[0]["00081190"]["Value"] == [
        f"http://localhost/dicomweb/studies/{study}/series/{series}/instances/{sop}"]
    assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_stow_partial_failure_is_202_with_failed_sequence(client):
    good = instance()
    r = stow(client, [good, b"this is not a DICOM file at all" * 10])
    assert r.status_code == 202, r.data
    body = r.get_json(force=True)
    assert len(body["00081199"]["Value"]) == 1
    [failed] = body["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert "Warning" in r.headers


def test_stow_all_failed_is_409_and_study_mismatch(client):
    data = dataset()
    r = stow(client, [b"MZ" + part10(data)[2:]])
    assert r.status_code == 409
    [failed] = r.get_json(force=True)["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    assert failed["00081155"]["Value"] == [data.SOPInstanceUID]
    r = stow(client, [part10(data)], path="/dicomweb/studies/1.2.3.4")
    assert r.status_code == 409
    [failed] = r.get_json(force=True)["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC409]
    r = stow(client, [part10(data)], path=f"/dicomweb/studies/{data.StudyInstanceUID}")
    assert r.status_code == 200


def test_stow_bad_requests(client):
    r = client.post("/dicomweb/studies", data=b"{}", content_type="application/json")
    assert r.status_code == 415 and r.get_json(force=True)["errors"][0]["status"] == 415
    r = client.post("/dicomweb/studies", data=b"x",
                    content_type='multipart/related; type="application/dicom+xml"; boundary=a')
    assert r.status_code == 415
    r = client.post("/dicomweb/studies", data=b"--x\r\n",
                    content_type='multipart/related; type="application/dicom"')
    assert r.status_code == 400
    r = client.post("/dicomweb/studies", data=instance(), content_type="application/dicom")
    assert r.status_code == 200


# --------------------------------------------------------------------------- QIDO-RS (OHIF)
def test_ohif_study_list(client, ct_study):
    study = ct_study[0]
    stow(client, [instance(PatientID="OTHER", PatientName="Zed^Zoe", StudyDate="20240316")])
    r = client.get("/dicomweb/studies?PatientName=*avie*&00100020=*ID-4*&StudyDate=20240101-20241231"
                   "&limit=101&offset=0&fuzzymatching=false"
                   "&includefield=00081030,00080060,00080090,00100030",
                   headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom+json"
    [hit] = r.get_json(force=True)
    assert hit["0020000D"]["Value"] == [study]
    assert hit["00081030"]["Value"] == ["CHEST CT"]
    assert hit["00080090"]["Value"] == [{"Alphabetic": "Ref^Doc"}]
    assert hit["00100030"]["Value"] == ["19800101"]
    assert hit["00080061"]["Value"] == ["CT"]
    assert hit["00201208"]["Value"] == [3] and hit["00201206"]["Value"] == [1]
    assert hit["00081190"]["Value"] == [f"http://localhost/dicomweb/studies/{study}"]
    # fuzzy matching: lower-case prefix of a name component
    r = client.get("/dicomweb/studies?PatientName=xav&fuzzymatching=true")
    assert [h["0020000D"]["Value"][0] for h in r.get_json(force=True)] == [study]


def test_ohif_series_list_metadata_and_frames(client, ct_study):
    study, series, sops, files = ct_study
    r = client.get(f"/dicomweb/studies/{study}/series",
                   headers={"Accept": "application/dicom+json, "
                                      "multipart/related; type=application/octet-stream"})
    assert r.status_code == 200
    [se] = r.get_json(force=True)
    assert se["0020000E"]["Value"] == [series] and se["00201209"]["Value"] == [3]
    assert se["00080060"]["Value"] == ["CT"]
    assert se["00081190"]["Value"] == [f"http://localhost/dicomweb/studies/{study}/series/{series}"]

    r = client.get(f"/dicomweb/studies/{study}/series/{series}/metadata",
                   headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom+json"
    meta = r.get_json(force=True)
    assert [m["00200013"]["Value"][0] for m in meta] == [1, 2, 3]
    for kw in ("0020000D", "0020000E", "00080018", "00080016", "00080060", "00280004", "00280010",
               "00280011", "00280100", "00280103", "00280030", "00281052", "00281053", "00281050",
               "00281051", "00200032", "00200037"):
        assert kw in meta[0], kw
    pixel_uri = meta[0]["7FE00010"]["BulkDataURI"]
    assert pixel_uri == (f"http://localhost/dicomweb/studies/{study}/series/{series}"
                         f"/instances/{sops[0]}/bulkdata/7FE00010")
    r = client.get(pixel_uri.replace("http://localhost", ""), headers={"Accept": OCTET_ACCEPT})
    assert r.status_code == 200
    expected = pydicom.dcmread(io.BytesIO(files[0])).PixelData
    assert parts_of(r)[0].content == expected

    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sops[1]}/frames/1",
                   headers={"Accept": OCTET_ACCEPT})
    assert r.status_code == 200
    [part] = parts_of(r)
    assert part.headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert part.content == pydicom.dcmread(io.BytesIO(files[1])).PixelData
    assert 'type="application/octet-stream"' in r.headers["Content-Type"]

    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sops[0]}/metadata")
    assert len(r.get_json(force=True)) == 1
    r = client.get(f"/dicomweb/studies/{study}/metadata")
    assert len(r.get_json(force=True)) == 3


def test_qido_levels_paging_and_errors(client, ct_study):
    study, series, sops, _ = ct_study
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances?limit=2&offset=1")
    got = r.get_json(force=True)
    assert [g["00080018"]["Value"][0] for g in got] == sops[1:]
    r = client.get(f"/dicomweb/instances?SOPInstanceUID={sops[0]},{sops[2]}")
    got = r.get_json(force=True)
    assert [g["00080018"]["Value"][0] for g in got] == [sops[0], sops[2]]
    assert got[0]["0020000D"]["Value"] == [study] and got[0]["00100020"]["Value"] == ["PID-42"]
    assert got[0]["00080060"]["Value"] == ["CT"]                  # series attributes on /instances
    r = client.get("/dicomweb/series?Modality=CT&includefield=all")
    [se] = r.get_json(force=True)
    assert se["00100010"]["Value"] == [{"Alphabetic": "Xavier^Young"}]   # study attributes on /series
    r = client.get("/dicomweb/studies?PatientID=nobody")
    assert r.status_code == 200 and r.get_json(force=True) == []
    r = client.get("/dicomweb/studies?limit=1000")
    assert r.status_code == 200 and "limit capped" in r.headers["Warning"]
    r = client.get("/dicomweb/studies?PatientAge=040Y")
    assert r.status_code == 200 and "not supported for matching" in r.headers["Warning"]
    for bad in ("NoSuchKeyword=1", "StudyDate=yesterday", "limit=-1", "fuzzymatching=maybe",
                "includefield=Nope", "0010002=1"):
        r = client.get(f"/dicomweb/studies?{bad}")
        assert r.status_code == 400, bad
        assert r.get_json(force=True)["errors"][0]["message"]
    r = client.get("/dicomweb/studies", headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406


# --------------------------------------------------------------------------- WADO-RS
def test_retrieve_instances_and_transcoding(client, ct_study):
    study, series, sops, files = ct_study
    r = client.get(f"/dicomweb/studies/{study}",
                   headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200
    parts = parts_of(r)
    assert [p.content for p in parts] == files
    assert parts[0].headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sops[0]}",
                   headers={"Accept": f"{DICOM_ACCEPT}; transfer-syntax={IVRLE}"})
    [part] = parts_of(r)
    ds = pydicom.dcmread(io.BytesIO(part.content))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2" and ds.SOPInstanceUID == sops[0]
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(io.BytesIO(files[0])).pixel_array)
    r = client.get(f"/dicomweb/studies/{study}/series/{series}", headers={"Accept": "*/*"})
    assert r.status_code == 200

    j2k = dataset("JPEG2000.dcm")
    stow(client, [part10(j2k)])
    base = url_of(j2k)
    r = client.get(base, headers={"Accept": f"{DICOM_ACCEPT}; transfer-syntax={EVRLE}"})
    assert r.status_code == 406
    r = client.get(base, headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"})
    assert r.status_code == 200
    r = client.get(f"{base}/frames/1", headers={"Accept": OCTET_ACCEPT})
    [part] = parts_of(r)
    ts = j2k.file_meta.TransferSyntaxUID          # JPEG 2000 (1.2.840.10008.1.2.4.91)
    assert part.headers["content-type"] == f"application/octet-stream; transfer-syntax={ts}"
    assert part.content[:4] in (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")       # a J2K codestream
    r = client.get(f"{base}/frames/1", headers={"Accept": "multipart/related; type=image/jp2"})
    assert parts_of(r)[0].headers["content-type"] == f"image/jp2; transfer-syntax={ts}"
    r = client.get(f"{base}/frames/1",
                   headers={"Accept": f"multipart/related; type=application/octet-stream; "
                                      f"transfer-syntax={EVRLE}"})
    assert r.status_code == 406


def test_multiframe_frames(client):
    mf = dataset("SC_rgb_rle_2frame.dcm")
    native = dataset("rtdose.dcm")
    stow(client, [part10(mf), part10(native)])
    base = url_of(mf)
    r = client.get(f"{base}/frames/1,2", headers={"Accept": OCTET_ACCEPT})
    parts = parts_of(r)
    assert len(parts) == 2
    assert parts[1].headers["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.5")
    r = client.get(f"{base}/frames/3", headers={"Accept": OCTET_ACCEPT})
    assert r.status_code == 404
    r = client.get(f"{base}/frames/x", headers={"Accept": OCTET_ACCEPT})
    assert r.status_code == 400
    nb = url_of(native)
    r = client.get(f"{nb}/frames/2,15", headers={"Accept": OCTET_ACCEPT})
    arr = native.pixel_array
    got = [np.frombuffer(p.content, dtype="<u4").reshape(10, 10) for p in parts_of(r)]
    assert np.array_equal(got[0], arr[1]) and np.array_equal(got[1], arr[14])


def test_rendered_and_thumbnails(client, ct_study):
    study, series, sops, _ = ct_study
    base = f"/dicomweb/studies/{study}/series/{series}/instances/{sops[0]}"
    r = client.get(f"{base}/rendered")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.data))
    assert img.format == "JPEG" and img.size == (128, 128)
    r = client.get(f"{base}/rendered?window=40,400&quality=70", headers={"Accept": "image/png"})
    img = Image.open(io.BytesIO(r.data))
    assert img.format == "PNG" and img.mode == "L" and 0 < np.asarray(img).mean() < 255
    assert client.get(f"{base}/rendered", headers={"Accept": "image/gif"}).status_code == 406
    assert client.get(f"{base}/rendered?window=abc").status_code == 400
    r = client.get(f"{base}/thumbnail?viewport=64,32")
    assert Image.open(io.BytesIO(r.data)).size == (32, 32)
    for url in (f"/dicomweb/studies/{study}/thumbnail", f"/dicomweb/studies/{study}/series/{series}/thumbnail",
                f"{base}/frames/1/thumbnail", f"{base}/frames/1/rendered"):
        r = client.get(url, headers={"Accept": "image/*"})
        assert r.status_code == 200, url
        assert Image.open(io.BytesIO(r.data)).format == "JPEG"


def test_rendered_colour_monochrome1_and_multiframe(client):
    rgb = dataset("SC_rgb_rle_2frame.dcm")
    mono1 = dataset("CT_small.dcm", PhotometricInterpretation="MONOCHROME1")
    stow(client, [part10(rgb), part10(mono1)])
    base = url_of(rgb)
    img = Image.open(io.BytesIO(client.get(f"{base}/frames/2/rendered", headers={"Accept": "image/png"}).data))
    assert img.mode == "RGB" and img.size == (100, 100)
    assert np.array_equal(np.asarray(img), rgb.pixel_array[1])
    mbase = url_of(mono1)
    inverted = np.asarray(Image.open(io.BytesIO(client.get(f"{mbase}/rendered?window=0,2000",
                                                           headers={"Accept": "image/png"}).data)))
    plain = dataset("CT_small.dcm")
    stow(client, [part10(plain)])
    pbase = url_of(plain)
    normal = np.asarray(Image.open(io.BytesIO(client.get(f"{pbase}/rendered?window=0,2000",
                                                         headers={"Accept": "image/png"}).data)))
    assert np.abs(inverted.astype(int) + normal.astype(int) - 255).max() <= 1


def test_errors_cors_and_unknown_routes(client, ct_study):
    study = ct_study[0]
    r = client.get("/dicomweb/studies/1.2.3/metadata")
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/json"
    assert r.get_json(force=True)["errors"][0]["status"] == 404
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert client.get("/dicomweb/nothing/here").status_code == 404
    assert client.get("/dicomweb/nothing/here").get_json(force=True)["errors"]
    assert client.delete(f"/dicomweb/studies/{study}").status_code == 405
    r = client.get(f"/dicomweb/studies/{study}/metadata", headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406
    r = client.options("/dicomweb/studies", headers={
        "Origin": "http://ohif.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "accept, authorization"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "GET" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Headers"] == "accept, authorization"
    assert int(r.headers["Access-Control-Max-Age"]) > 0
    r = client.get("/dicomweb/studies", headers={"Origin": "http://ohif.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Warning" in r.headers["Access-Control-Expose-Headers"]
    r = client.head(f"/dicomweb/studies/{study}/series")
    assert r.status_code == 200


def test_cors_origin_list(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path),
                      "dicomweb_cors_origins": "http://ohif.example, http://other.example"})
    c = app.test_client()
    r = c.get("/dicomweb/studies", headers={"Origin": "http://ohif.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://ohif.example"
    assert "Origin" in r.headers.get("Vary", "")
    r = c.get("/dicomweb/studies", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    app.extensions["synthport"]["store"].engine.dispose()


def test_fhir_sees_the_stowed_study(client, ct_study):
    study = ct_study[0]
    r = client.get(f"/fhir/ImagingStudy?identifier=urn:oid:{study}")
    bundle = r.get_json(force=True)
    [entry] = bundle["entry"]
    res = entry["resource"]
    assert res["numberOfInstances"] == 3
    patient = client.get(f"/fhir/{res['subject']['reference']}").get_json(force=True)
    assert patient["identifier"][0]["value"] == "PID-42"
    endpoint = client.get(f"/fhir/{res['endpoint'][0]['reference']}").get_json(force=True)
    assert endpoint["address"] == "http://localhost/dicomweb"
    r = client.get(f"/fhir/ImagingStudy?patient={res['subject']['reference']}&modality=CT&started=2024-03-15")
    assert len(r.get_json(force=True)["entry"]) == 1
    assert re.match(r"^\d{4}-\d{2}-\d{2}", res["started"])


# --------------------------------------------------------------------------- STOW-RS batches
def _imaging_study(client, study: str) -> dict:
    [entry] = client.get(f"/fhir/ImagingStudy?identifier=urn:oid:{study}").get_json(force=True)["entry"]
    return entry["resource"]


def _instance_uids(res: dict) -> list[list[str]]:
    return [[i["uid"] for i in se["instance"]] for se in res["series"]]


def test_stow_batch_gives_one_imaging_study_version_per_request(client):
    study, series, files = series_of(5)
    files = [files[3], files[0], files[4], files[2], files[1]]        # out of order
    r = stow(client, files)
    assert r.status_code == 200, r.data
    res = _imaging_study(client, study)
    assert res["meta"]["versionId"] == "1"
    assert res["numberOfInstances"] == 5
    assert [i["number"] for i in res["series"][0]["instance"]] == [1, 2, 3, 4, 5]
    # A second request to the study that exists: one more version, the new instances
    # in place (another series, and numbers between the stored ones in the first).
    _, series2, more = series_of(2, study=study)
    extra = [instance(study=study, series=series, InstanceNumber=n) for n in (0, 3)]
    r = stow(client, more + extra)
    assert r.status_code == 200, r.data
    res = _imaging_study(client, study)
    assert res["meta"]["versionId"] == "2"
    assert res["numberOfInstances"] == 9 and res["numberOfSeries"] == 2
    by_uid = {se["uid"]: se for se in res["series"]}
    assert [i["number"] for i in by_uid[series]["instance"]] == [0, 1, 2, 3, 3, 4, 5]
    assert by_uid[series]["instance"][4]["uid"] == pydicom.dcmread(io.BytesIO(extra[1])).SOPInstanceUID
    assert len(by_uid[series2]["instance"]) == 2
    history = client.get(f"/fhir/ImagingStudy/{res['id']}/_history").get_json(force=True)
    assert len(history["entry"]) == 2
    # The incrementally built body equals the one rebuilt from the rows (no new version).
    store = client.application.extensions["synthport"]["dicom"]
    conn = begin_write(store.engine)
    with conn.begin():
        pk = conn.execute(select(ST.c.pk).where(ST.c.study_uid == study)).scalar_one()
        store._link_fhir(conn, None, pk, None)
    conn.close()
    assert _imaging_study(client, study)["meta"]["versionId"] == "2"


def test_stow_batch_partial_failure_stores_the_good_ones(client):
    study, series, files = series_of(3)
    r = stow(client, [files[0], b"this is not a DICOM file at all" * 10, files[1], files[2]])
    assert r.status_code == 202, r.data
    body = r.get_json(force=True)
    assert len(body["00081199"]["Value"]) == 3
    assert len(body["00081198"]["Value"]) == 1
    res = _imaging_study(client, study)
    assert res["meta"]["versionId"] == "1" and res["numberOfInstances"] == 3


def test_stow_batch_falls_back_to_one_by_one_when_the_transaction_fails(client):
    stored = dataset()
    assert stow(client, [part10(stored)]).status_code == 200
    # Same SOP Instance UID with another SOP class: refused inside the transaction, so
    # the batch is rolled back and stored one by one; the others still get stored.
    clash = dataset("MR_small.dcm", study=stored.StudyInstanceUID, sop=stored.SOPInstanceUID)
    study, series, files = series_of(2)
    r = stow(client, [files[0], part10(clash), files[1]])
    assert r.status_code == 202, r.data
    body = r.get_json(force=True)
    assert len(body["00081199"]["Value"]) == 2
    [failed] = body["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [stored.SOPInstanceUID]
    assert "SOP Class" in r.headers["Warning"]
    res = _imaging_study(client, study)
    assert res["numberOfInstances"] == 2 and res["meta"]["versionId"] == "2"   # one by one
    assert client.get(url_of(stored), headers={"Accept": DICOM_ACCEPT}).status_code == 200
