"""The application's own request checks (server/app.py), on SQLite and PostgreSQL."""
from __future__ import annotations

import pytest

from server.app import create_app


@pytest.fixture
def client(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path), "auth": "off"})
    yield app.test_client()
    app.extensions["synthport"]["store"].engine.dispose()


@pytest.mark.parametrize("path", [
    "/fhir/Patient?name=%00", "/fhir/Patient?family=a%00b", "/fhir/Patient?identifier=x%00|y",
    "/fhir/Observation?code=%00", "/fhir/Patient?_id=%00", "/fhir/Patient/%00",
    "/fhir/Patient?_has:Observation:subject:code=%00", "/fhir/ValueSet/$expand?url=%00",
    "/fhir/CodeSystem/$lookup?system=%00&code=x", "/fhir/Patient?name:contains=%00",
    "/fhir/Patient?_tag=%00", "/fhir/Patient?a%00=1",
])
def test_a_nul_in_a_fhir_request_is_400(client, path):
    """PostgreSQL text cannot hold NUL: each of these was a 500 there (DataError)."""
    r = client.get(path)
    assert r.status_code == 400, r.data
    oo = r.get_json(force=True)
    assert oo["resourceType"] == "OperationOutcome" and "NUL" in oo["issue"][0]["diagnostics"]


def test_a_nul_in_a_posted_search_form_is_400(client):
    r = client.post("/fhir/Patient/_search", data="name=a%00",
                    content_type="application/x-www-form-urlencoded")
    assert r.status_code == 400, r.data


@pytest.mark.parametrize("path", ["/dicomweb/studies?PatientID=%00", "/dicomweb/studies/1.2%00/metadata",
                                  "/dicomweb/instances?SOPClassUID=%00&ModalitiesInStudy=-"])
def test_a_nul_in_a_dicomweb_request_is_400(client, path):
    r = client.get(path, headers={"Accept": "application/dicom+json"})
    assert r.status_code == 400, r.data
    assert "NUL" in r.get_json(force=True)["errors"][0]["message"]


def test_a_trailing_nul_of_a_uid_in_c_find_is_padding_not_an_error():
    """PS3.5 §6.2 pads UI values with NUL: matching strips it; inside a value it is refused."""
    from server.dicom.matching import parse
    from server.errors import InvalidRequest

    assert parse("uid", "StudyInstanceUID", "1.2.3\x00").values == ("1.2.3",)
    with pytest.raises(InvalidRequest, match="NUL"):
        parse("text", "PatientID", "a\x00b")


@pytest.mark.parametrize("path", [
    "/fhir/Patient?_offset=99999999999999999999", "/fhir/Patient?_offset=9223372036854775808",
    "/fhir/Patient/_history?_offset=99999999999999999999", "/fhir/_history?_count=99999999999999999999",
    "/fhir/Patient?_snapshot=99999999999999999999&_offset=1",
    "/dicomweb/studies?offset=99999999999999999999", "/dicomweb/studies?limit=9223372036854775808",
])
def test_an_integer_query_value_beyond_2_to_53_is_400(client, path):
    """SQL binds 64-bit integers: each offset here was a 500 (OverflowError on SQLite,
    NumericValueOutOfRange on PostgreSQL)."""
    r = client.get(path, headers={"Accept": "application/dicom+json"} if "dicomweb" in path else {})
    assert r.status_code == 400, r.data
    assert b"9007199254740991" in r.data
    ok = client.get(path.replace("99999999999999999999", "9007199254740991")
                    .replace("9223372036854775808", "9007199254740991"),
                    headers={"Accept": "application/dicom+json"} if "dicomweb" in path else {})
    assert ok.status_code == 200, ok.data
