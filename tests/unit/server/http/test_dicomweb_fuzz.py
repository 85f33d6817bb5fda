"""Mutation fuzzing of STOW-RS and what serves the result (tests/unit/server/dicom/fuzz.py),
in-process on SQLite and PostgreSQL, with a fixed seed and budget; and one regression
test for each thing the fuzzing found."""
from __future__ import annotations

import io

import orjson
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from server.app import create_app
from server.dicom.store import parse_instance
from server.errors import InvalidResource
from tests.unit.server.dicom.factory import dataset, multipart, part10
from tests.unit.server.dicom.fuzz import (_elements, cases, check_store, flask_client,
                                          request_cases, request_targets, run_requests, run_stow)

# Hostile values are the point; pydicom's warnings about them are not findings.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Cases per database: every mutation and seed file comes up (about 15 s on SQLite here).
BUDGET = 160
SEED = 20261129


@pytest.fixture
def app(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path), "auth": "off"})
    yield app
    app.extensions["synthport"]["store"].engine.dispose()


def _http(client):
    post, get, _ = flask_client(client)
    return post, get


def test_fuzzed_instances_get_an_answer_and_leave_the_store_whole(app, tmp_path):
    post, get = _http(app.test_client())
    report = run_stow(cases(SEED, BUDGET), post, get)
    assert not report.findings, report.summary()
    # the run exercised both sides: instances stored and served, and instances refused
    assert report.stored > BUDGET // 4 and report.refused > BUDGET // 4, report.summary()
    assert report.statuses.get("frames 200") and report.statuses.get("rendered 200"), report.summary()
    engine = app.extensions["synthport"]["store"].engine
    assert check_store(engine, tmp_path / "dicom") == []


REQUESTS = 400


def test_fuzzed_requests_get_an_answer_that_says_why(app):
    client = app.test_client()
    post, _, send = flask_client(client)
    report = run_requests(request_cases(SEED, REQUESTS, *request_targets(post)), send)
    assert not report.findings, report.summary()
    for answered in ("GET 200", "GET 400", "GET 406", "POST 400", "POST 415"):
        assert report.statuses.get(answered), report.summary()


def test_the_cases_are_the_same_for_a_seed():
    assert [c.data for c in cases(7, 30)] == [c.data for c in cases(7, 30)]
    salted = [c.data for c in cases(7, 30, salt="again")]
    assert [len(d) for d in salted] == [len(c.data) for c in cases(7, 30)]
    assert salted != [c.data for c in cases(7, 30)]
    assert {c.mutation for c in cases(7, 60)} == {"flip", "truncate", "value", "length", "attribute"}


def test_check_store_sees_a_missing_blob_and_a_wrong_count(app, tmp_path):
    from sqlalchemy import update

    from server.db import schema as S
    from server.db.engine import begin_write
    post, get = _http(app.test_client())
    ctype, body = multipart([part10(dataset()), part10(dataset())])
    assert post(body, ctype).status == 200
    engine = app.extensions["synthport"]["store"].engine
    assert check_store(engine, tmp_path / "dicom") == []
    next((tmp_path / "dicom").rglob("*.dcm")).unlink()
    with begin_write(engine) as conn, conn.begin():
        conn.execute(update(S.dicom_series).values(num_instances=S.dicom_series.c.num_instances + 1))
    problems = check_store(engine, tmp_path / "dicom")
    assert any("missing" in p for p in problems) and any("num_instances" in p for p in problems)


# --------------------------------------------------------------------------- what it found
@pytest.mark.parametrize("cut", [-1000, -1, -5, "value", "header", "header+4"])
def test_a_file_cut_short_is_refused(cut):
    """Cut inside a value (pixel data, padding, an element in the middle) or inside the
    header of the element after it."""
    data = part10(dataset())
    elems, _, _ = _elements(data)
    tag, offset, length, _ = next(e for e in elems if e[0] > 0x0020000E and e[2] > 2)
    boundary = offset + length          # where a whole element ends
    at = {"value": boundary - 1, "header": boundary + 3, "header+4": boundary + 7}.get(cut, cut)
    with pytest.raises(InvalidResource, match="cut short"):
        parse_instance(data[:at])
    parse_instance(data)
    # Cut exactly between two elements, the rest is a whole, shorter data set: nothing
    # in the bytes tells it from one sent so.
    assert parse_instance(data[:boundary]).sop_uid


def test_encapsulated_pixel_data_without_its_delimiter_is_refused():
    data = part10(dataset("JPEG2000.dcm"))
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")       # PS3.5 §7.5.2
    with pytest.raises(InvalidResource, match="delimiter is missing"):
        parse_instance(data[:-1])


def test_stow_of_a_cut_file_says_why_and_stores_nothing(app, tmp_path):
    client = app.test_client()
    ds = dataset()
    ctype, body = multipart([part10(ds)[:-1000]])
    r = client.post("/dicomweb/studies", data=body, content_type=ctype,
                    headers={"Accept": "application/dicom+json"})
    assert r.status_code == 409
    assert r.get_json(force=True)["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert "ends inside element (7FE0,0010)" in r.headers["Warning"]
    assert client.get(f"/dicomweb/studies/{ds.StudyInstanceUID}/metadata").status_code == 404
    assert not list((tmp_path / "dicom").rglob("*.dcm"))


def _with_raw(ds: pydicom.Dataset, tag: int, vr: str, value: bytes) -> bytes:
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("tag, vr, value", [
    # not a whole number of values, and long (short values take another path)
    (0x00181318, "FD", b"\x01" * 1030),
    (0x00200013, "IS", b"1e99"),                          # integral, beyond any JSON integer
])
def test_a_value_pydicom_or_json_cannot_hold_is_left_out_of_the_metadata(app, tag, vr, value):
    """The instance is stored as received; the element is written with its VR and no
    value (as for any value DICOM JSON cannot represent) instead of failing the store."""
    post, get = _http(app.test_client())
    ds = dataset()
    data = _with_raw(ds, tag, vr, value)
    ctype, body = multipart([data])
    assert post(body, ctype).status == 200
    meta = get(f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
               f"{ds.SOPInstanceUID}/metadata", "application/dicom+json")
    assert orjson.loads(meta.body)[0][f"{tag:08X}"] == {"vr": vr}


@pytest.mark.parametrize("name, change", [
    ("CT_small.dcm", {"Rows": 1024}),                   # more pixels than the value holds
    ("MR_small_bigendian.dcm", {"Columns": 65535}),
    ("CT_small.dcm", {"BitsAllocated": 12}),            # PS3.5 §8.1.1: 1 or a multiple of 8
])
def test_a_frame_the_pixel_data_does_not_hold_is_404_not_a_short_frame(app, name, change):
    post, get = _http(app.test_client())
    ds = dataset(name, **change)
    ctype, body = multipart([part10(ds)])
    assert post(body, ctype).status == 200
    r = get(f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
            f"{ds.SOPInstanceUID}/frames/1",
            "multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert r.status == 404, r.body
    assert b"Frame 1 is not in the stored Pixel Data" in r.body or b"describe no frame" in r.body


def test_a_frame_in_broken_encapsulated_pixel_data_is_404(app):
    post, get = _http(app.test_client())
    ds = dataset("JPEG2000.dcm")
    raw = bytearray(ds.PixelData)
    raw[8:12] = b"\x65\xff\x00\xe0"             # the first fragment's item tag, garbled
    ds.PixelData = bytes(raw)
    ctype, body = multipart([part10(ds)])
    assert post(body, ctype).status == 200
    r = get(f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
            f"{ds.SOPInstanceUID}/frames/1", "multipart/related; type=application/octet-stream; "
                                             "transfer-syntax=*")
    assert r.status == 404, r.body
    assert b"cannot be read from the stored encapsulated Pixel Data" in r.body



@pytest.mark.parametrize("uid", ["..", "1..2", ".1.2", "1.2."])
def test_a_uid_with_an_empty_component_is_refused(uid):
    """'..' passed the old pattern and made WADO-RS URLs that name the parent path."""
    ds = dataset()
    with pytest.raises(InvalidResource, match="not a valid UID"):
        parse_instance(_with_raw(ds, 0x0020000D, "UI", uid.encode() + b"\0" * (len(uid) % 2)))


def test_the_warning_header_holds_only_printable_ascii(app):
    """A refused UID with control bytes is quoted in the Warning header: gunicorn refuses
    a header value with control characters and answers 500 for the whole request."""
    ds = dataset()
    data = _with_raw(ds, 0x0020000E, "UI", b"1.2.\x1b[31m\xff\xfe")
    ctype, body = multipart([data])
    r = app.test_client().post("/dicomweb/studies", data=body, content_type=ctype,
                               headers={"Accept": "application/dicom+json"})
    assert r.status_code == 409
    warning = r.headers["Warning"]
    assert "not a valid UID" in warning
    assert all(" " <= ch <= "~" for ch in warning), warning


def test_a_refused_part_whose_sop_class_cannot_be_read_is_409_not_500(app):
    """The FailedSOPSequence item leaves out a UID that is not one (here an unknown VR
    made pydicom fail to read it) instead of failing the request."""
    data = bytearray(part10(dataset()))
    at = data.index(b"\x08\x00\x16\x00UI") + 4          # (0008,0016) SOP Class UID's VR
    data[at:at + 2] = b"\x55\x08"
    ctype, body = multipart([bytes(data[:-1000])])         # and cut short: refused
    r = app.test_client().post("/dicomweb/studies", data=body, content_type=ctype,
                               headers={"Accept": "application/dicom+json"})
    assert r.status_code == 409, r.data
    item = r.get_json(force=True)["00081198"]["Value"][0]
    assert item["00081197"]["Value"] == [0xC000]
    assert "Value" not in item.get("00081150", {})


@pytest.mark.parametrize("query", ["SeriesNumber=99999999999999999999999", "InstanceNumber=2147483648",
                                   "InstanceNumber=1\\-2147483649"])
def test_an_integer_beyond_is_range_is_400_not_500(app, query):
    """IS is -2^31..2^31-1 (PS3.5 Table 6.2-1); a bigger number reached SQLite as an
    integer it cannot bind (OverflowError, 500)."""
    r = app.test_client().get(f"/dicomweb/instances?{query}", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 400, r.data
    assert b"outside the range of an integer string" in r.data
    ok = app.test_client().get("/dicomweb/instances?InstanceNumber=2147483647")
    assert ok.status_code == 200



def test_a_nul_inside_a_name_is_stored_and_indexed_without_it(app):
    """PostgreSQL text cannot hold NUL: the instance failed there with a processing
    failure (0x0110) and was stored on SQLite."""
    post, get = _http(app.test_client())
    ds = dataset()
    data = _with_raw(ds, 0x00100010, "PN", b"Doe\x00^Jo\x00")
    ctype, body = multipart([data])
    assert post(body, ctype).status == 200
    found = get(f"studies?StudyInstanceUID={ds.StudyInstanceUID}&includefield=PatientName",
                "application/dicom+json")
    assert orjson.loads(found.body)[0]["00100010"]["Value"][0]["Alphabetic"].replace("\x00", "") == "Doe^Jo"
    assert orjson.loads(get(f"studies?PatientName=Doe*", "application/dicom+json").body)


def _stored(app, ds) -> str:
    post, _ = _http(app.test_client())
    ctype, body = multipart([part10(ds)])
    assert post(body, ctype).status == 200
    return (f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
            f"{ds.SOPInstanceUID}")


def test_a_palette_without_its_lut_is_406_not_500(app):
    ds = dataset(PhotometricInterpretation="PALETTE COLOR")
    _, get = _http(app.test_client())
    r = get(_stored(app, ds) + "/rendered", "image/jpeg")
    assert r.status == 406 and b"Cannot render these pixel data" in r.body, r.body


def test_a_frame_whose_image_attributes_cannot_be_read_is_404(app):
    data = bytearray(part10(dataset()))
    at = data.index(b"\x28\x00\x00\x01US") + 4          # (0028,0100) BitsAllocated's VR
    data[at:at + 2] = b"\x55\xc2"
    ds = pydicom.dcmread(io.BytesIO(bytes(data)), stop_before_pixels=True)
    post, get = _http(app.test_client())
    ctype, body = multipart([bytes(data)])
    assert post(body, ctype).status == 200
    r = get(f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
            f"{ds.SOPInstanceUID}/frames/1",
            "multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert r.status == 404 and b"cannot be read as stored" in r.body, r.body


def test_a_frame_behind_a_broken_offset_table_is_404(app):
    ds = dataset("JPEG2000.dcm")
    raw = bytearray(ds.PixelData)
    raw[4:8] = (0x460000).to_bytes(4, "little")     # Basic Offset Table length beyond the value
    ds.PixelData = bytes(raw)
    _, get = _http(app.test_client())
    r = get(_stored(app, ds) + "/frames/1",
            "multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert r.status == 404, r.body
