"""DICOM matching rules without a database: parsing, the in-memory predicate that
synthetic sources use, multipart/Accept parsing and DICOM JSON bulk data handling."""
from __future__ import annotations

import io

import pytest
from pydicom import Dataset, dcmread

from server.dicom import attributes as A
from server.dicom.dicomjson import absolutize, from_stored, stored_json, stored_json_obj
from server.dicom.matching import fold, matches, name_tokens, parse, time_key
from server.dicom.multipart import accepts_json, parse_accept, split_multipart
from server.errors import InvalidRequest
from tests.unit.server.dicom.factory import dataset, sample_path


def match(kind, query, value, fuzzy=False):
    return matches(kind, parse(kind, "Key", query, fuzzy), value)


def test_normalising():
    assert fold("Müller^Zoë") == "muller^zoe"
    assert name_tokens("Smith^John^Q=山田") == " smith john q 山田 "
    assert time_key("07") == "070000.000000" and time_key("07", upper=True) == "075959.999999"
    assert time_key("141516.25") == "141516.250000" and time_key("xx") == ""


def test_python_matching_follows_the_sql_rules():
    assert match("pn", "doe^jane", "DOE^JANE") and not match("pn", "doe", "DOE^JANE")
    assert match("pn", "d?e*", "Doe^Jane")
    assert match("pn", "muller ha", "Müller^Hans", fuzzy=True)
    assert not match("pn", "uller", "Müller^Hans", fuzzy=True)
    assert match("str", "ACC*", "ACC-1") and not match("str", "acc*", "ACC-1")
    assert match("uid", "1.2,1.3", "1.3") and match("uid", "1.2\\1.3", "1.2")
    assert match("cs", "CT\\MR", "MR") and match("modalities", "MR", ["CT", "MR"])
    assert match("date", "20240101-20240131", "20240115") and not match("date", "20240101-", "")
    assert match("date", "-20240101", "20231231") and not match("date", "20240102", "20240101")
    assert match("time", "07-08", "0745") and match("time", "0730", "073015")
    assert match("int", "1\\3", 3) and not match("int", "2", "3")
    assert match("str", "*", None) and match("str", "", "x")


def test_parse_errors():
    with pytest.raises(InvalidRequest):
        parse("uid", "StudyInstanceUID", "1.2.*")
    with pytest.raises(InvalidRequest):
        parse("date", "StudyDate", "2024-01-01")
    with pytest.raises(InvalidRequest):
        parse("int", "SeriesNumber", "x")
    with pytest.raises(InvalidRequest):
        A.canonical_name("NotAKeyword")
    assert A.canonical_name("00100020") == "PatientID"
    assert A.canonical_name("00400275.00400009") == "RequestAttributesSequence.ScheduledProcedureStepID"
    assert A.canonical_name("00091001") == "00091001"


def test_accept_and_multipart_parsing():
    ranges = parse_accept('multipart/related; type="application/octet-stream"; transfer-syntax=*, '
                          'image/png;q=0.2, application/dicom+json;q=0.5')
    assert [r.mime for r in ranges] == ["multipart/related", "application/dicom+json", "image/png"]
    assert ranges[0].type_param == "application/octet-stream" and ranges[0].transfer_syntax == "*"
    assert accepts_json("application/dicom+json, multipart/related; type=application/octet-stream")
    assert accepts_json(None) and not accepts_json("application/dicom+xml")
    body = (b"preamble\r\n--b\r\nContent-Type: application/dicom\r\n\r\nONE"
            b"\r\n--b\nX-A: 1\n\nTWO\r\n--b--epilogue")
    parts = split_multipart(body, "b")
    assert [p.content for p in parts] == [b"ONE", b"TWO"] and parts[1].headers == {"x-a": "1"}
    with pytest.raises(InvalidRequest):
        split_multipart(b"no boundary here", "b")


def test_stored_json_keeps_bulk_data_out():
    ds = dataset("CT_small.dcm")
    icon = Dataset()
    icon.PixelData = b"\x01" * 4096
    icon.add_new(0x00091010, "OB", b"\x02" * 10)
    ds.IconImageSequence = [icon]
    raw = stored_json(ds, "1.2", "3.4", "5.6")
    assert len(raw) < 40_000
    served = absolutize(raw, "http://h/dicomweb")
    base = b"http://h/dicomweb/studies/1.2/series/3.4/instances/5.6/bulkdata/"
    assert base + b"7FE00010" in served
    assert base + b"00880200/0/7FE00010" in served
    back = from_stored(raw)
    assert back.PixelData.path.endswith("/bulkdata/7FE00010")
    assert back.IconImageSequence[0][0x00091010].value == b"\x02" * 10      # small: inline
    assert back.PatientName == ds.PatientName


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "rtplan.dcm", "JPEG2000.dcm"])
def test_stored_json_equals_pydicom_json(name):
    """The cached fast path of to_json gives pydicom's DICOM JSON (bulk data apart), for
    explicit, implicit and big endian files, on a first (cache miss) and a second read."""
    data = sample_path(name).read_bytes()
    ref = dcmread(io.BytesIO(data)).to_json_dict(1024, lambda elem: "bulk")

    def plain(obj: dict) -> dict:
        return {k: ({"vr": v["vr"]} if "BulkDataURI" in v or k == "7FE00010"
                    else {**v, "Value": [plain(i) for i in v["Value"]]} if v["vr"] == "SQ" and "Value" in v
                    else v)
                for k, v in obj.items() if int(k, 16) & 0xFFFF}

    for _ in range(2):
        mine = stored_json_obj(dcmread(io.BytesIO(data)), "1.2", "3.4", "5.6")
        assert plain(mine) == plain(ref)
        if name != "rtplan.dcm":          # the plan has no pixel data
            assert mine["7FE00010"]["BulkDataURI"].endswith("/instances/5.6/bulkdata/7FE00010")
