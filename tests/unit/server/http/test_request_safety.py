"""Hostile or oversized requests to the FHIR API: refused with a 4xx OperationOutcome,
never a 5xx, never parsed as XML, never echoed back.

Complements tests/unit/server/test_fhir_api.py (which covers an XML create, the
Accept/_format basics and a body over the limit with Content-Length).
"""
from __future__ import annotations

import io

import orjson
import pytest

from server.app import create_app

JSON = "application/fhir+json"
XML_TYPES = ("application/fhir+xml", "application/xml", "text/xml")
MAX_BODY = 64 * 1024

XXE = (b'<?xml version="1.0"?>\n<!DOCTYPE Patient [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
       b'<Patient xmlns="http://hl7.org/fhir"><id value="x1"/><name><family value="&xxe;"/></name></Patient>')
LAUGHS = (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
          + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                     for i in range(1, 10))
          + b']>\n<Patient xmlns="http://hl7.org/fhir"><id value="&lol9;"/></Patient>')


@pytest.fixture
def client(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path), "auth": "off",
                      "max_body_bytes": MAX_BODY, "max_bundle_entries": 5})
    return app.test_client()


def assert_oo(resp, status: int | None = None, code: str | None = None) -> dict:
    if status is None:
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.data[:300])
    else:
        assert resp.status_code == status, (resp.status_code, resp.data[:300])
    body = orjson.loads(resp.data)
    assert body["resourceType"] == "OperationOutcome", body
    if code:
        assert body["issue"][0]["code"] == code, body
    return body


def total(client, query: str = "Patient") -> int:
    return client.get(f"/fhir/{query}", query_string={"_summary": "count"}).get_json(force=True)["total"]


def patient(pid: str = "p1") -> dict:
    return {"resourceType": "Patient", "id": pid, "name": [{"family": "Safe"}]}


def tx(n: int, btype: str = "transaction") -> dict:
    return {"resourceType": "Bundle", "type": btype, "entry": [
        {"resource": patient(f"b{i}"), "request": {"method": "PUT", "url": f"Patient/b{i}"}}
        for i in range(n)]}


# --------------------------------------------------------------------------- XML and XXE
@pytest.mark.parametrize("ctype", XML_TYPES)
@pytest.mark.parametrize("method,path", [("POST", "/fhir/Patient"), ("PUT", "/fhir/Patient/x1"),
                                         ("POST", "/fhir"), ("POST", "/fhir/Patient/$validate")])
def test_xml_bodies_are_refused_unparsed(client, method, path, ctype):
    for payload in (XXE, LAUGHS):
        r = client.open(path, method=method, data=payload, content_type=ctype)
        body = assert_oo(r, 415, "not-supported")
        text = r.get_data(as_text=True)
        assert "root:" not in text and "lollol" not in text and "ENTITY" not in text, body
    assert total(client) == 0


@pytest.mark.parametrize("payload", [XXE, LAUGHS], ids=["xxe", "billion-laughs"])
@pytest.mark.parametrize("method,path", [("POST", "/fhir/Patient"), ("PUT", "/fhir/Patient/x1"),
                                         ("POST", "/fhir"), ("PATCH", "/fhir/Patient/x1")])
def test_xml_sent_as_json_is_invalid_json_and_not_echoed(client, payload, method, path):
    r = client.open(path, method=method, data=payload, content_type=JSON)
    assert_oo(r, 400, "invalid")
    text = r.get_data(as_text=True)
    assert "not valid JSON" in text
    for leaked in ("root:", "/etc/passwd", "ENTITY", "DOCTYPE", "lollol"):
        assert leaked not in text, text
    assert total(client) == 0


@pytest.mark.parametrize("kwargs", [
    {"query_string": {"_format": "application/fhir+xml"}},
    {"query_string": {"_format": "text/xml"}},
    {"headers": {"Accept": "application/xml"}},
    {"headers": {"Accept": "text/xml, application/fhir+xml;q=0.9"}},
])
@pytest.mark.parametrize("path", ["/fhir/metadata", "/fhir/Patient/p1", "/fhir/Patient/p1/_history"])
def test_xml_formats_get_406(client, path, kwargs):
    client.put("/fhir/Patient/p1", data=orjson.dumps(patient()), content_type=JSON)
    assert_oo(client.get(path, **kwargs), 406, "not-supported")


def test_xml_format_on_a_write_stores_nothing(client):
    r = client.post("/fhir/Patient?_format=xml", data=orjson.dumps(patient()), content_type=JSON)
    assert_oo(r, 406)
    assert total(client) == 0
    # JSON among the acceptable types is served
    r = client.get("/fhir/metadata", headers={"Accept": "application/fhir+xml;q=1, application/fhir+json;q=0.5"})
    assert r.status_code == 200


# --------------------------------------------------------------------------- sizes
def test_body_over_limit_without_content_length(client):
    """Chunked transfer (no Content-Length): the limit holds while reading the stream."""
    big = orjson.dumps(tx(1)) + b" " * (MAX_BODY + 1)
    for method, path in (("POST", "/fhir"), ("PUT", "/fhir/Patient/p1"), ("POST", "/fhir/Patient")):
        r = client.open(path, method=method, input_stream=io.BytesIO(big),
                        headers={"Content-Type": JSON, "Transfer-Encoding": "chunked"},
                        environ_overrides={"wsgi.input_terminated": True})
        assert_oo(r, 413, "too-costly")
    assert total(client) == 0
    # just under the limit, the same way, is read and stored
    ok = orjson.dumps(patient("small"))
    r = client.put("/fhir/Patient/small", input_stream=io.BytesIO(ok),
                   headers={"Content-Type": JSON, "Transfer-Encoding": "chunked"},
                   environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 201, r.data


@pytest.mark.parametrize("btype", ["transaction", "batch"])
def test_bundle_over_max_entries(client, btype):
    assert_oo(client.post("/fhir", data=orjson.dumps(tx(6, btype)), content_type=JSON), 413, "too-costly")
    assert total(client) == 0
    assert client.post("/fhir", data=orjson.dumps(tx(5, btype)), content_type=JSON).status_code == 200
    assert total(client) == 5


@pytest.mark.parametrize("url", [
    "/fhir/Patient/" + "a" * 100_000,
    "/fhir/Patient/" + "a" * 100_000 + "/_history/1",
    "/fhir/Patient?name=" + "a" * 100_000,
    "/fhir/Patient?birthdate=" + "1" * 100_000,
    "/fhir/Patient?_sort=" + ",".join(["name"] * 5000),
    "/fhir/Patient?" + "&".join(f"name=x{i}" for i in range(5000)),
    "/fhir/Patient?name=" + ",".join(f"x{i}" for i in range(5000)),
    "/fhir/Observation?" + "&".join(f"code=s|c{i}" for i in range(150)),
    "/fhir/Observation?subject:Patient.organization.partof.partof.partof.partof.partof.name="
    + ",".join(f"x{i}" for i in range(25)),
    # within the parser's limits; SQLite's own parser gives up on 9 nested subqueries
    "/fhir/Observation?" + "&".join(f"subject:Patient.organization{'.partof' * 6}.name=x{i}" for i in range(12)),
    "/fhir/Patient?_include=" + "Patient:x" * 5000,
    "/fhir/Patient?_id=" + ",".join(f"i{i}" for i in range(20_000)),
])
def test_long_urls_and_parameter_floods_are_not_5xx(client, url):
    r = client.get(url)
    assert r.status_code < 500, (r.status_code, r.data[:300])
    if r.status_code >= 400:
        assert_oo(r)


def test_search_limits_name_the_limit(client):
    body = assert_oo(client.get("/fhir/Patient?" + "&".join(f"name=x{i}" for i in range(101))), 400)
    assert "at most 100" in body["issue"][0]["diagnostics"]
    body = assert_oo(client.get("/fhir/Patient?_sort=" + ",".join(["name"] * 21)), 400)
    assert "_sort" in body["issue"][0]["diagnostics"]
    body = assert_oo(client.get("/fhir/Patient?name=" + ",".join(f"x{i}" for i in range(201))), 400)
    assert "comma-separated" in body["issue"][0]["diagnostics"]
    # within the limits: answered
    assert client.get("/fhir/Patient?name=" + ",".join(f"x{i}" for i in range(200))).status_code == 200
    assert client.get("/fhir/Patient?" + "&".join(f"name=x{i}" for i in range(100))).status_code == 200
    # the same limits hold where a search is implied: conditional update
    r = client.put("/fhir/Patient?" + "&".join(f"name=x{i}" for i in range(101)),
                   data=orjson.dumps({"resourceType": "Patient"}), content_type=JSON)
    assert_oo(r, 400)
    assert total(client) == 0


def _nested(levels: int, opener: bytes, closer: bytes, inner: bytes) -> bytes:
    return opener * levels + inner + closer * levels


def test_deeply_nested_json_is_refused(client):
    # 100k nested arrays: beyond the JSON parser's depth limit (and this body limit)
    deep = _nested(100_000, b"[", b"]", b"")
    for method, path in (("POST", "/fhir/Patient"), ("POST", "/fhir"), ("PATCH", "/fhir/Patient/p1")):
        r = client.open(path, method=method, data=deep, content_type=JSON)
        assert_oo(r)
    # within the body limit, beyond the parser's depth
    r = client.post("/fhir/Patient", data=_nested(5_000, b"[", b"]", b""), content_type=JSON)
    assert_oo(r, 400, "invalid")


@pytest.mark.parametrize("levels", [150, 450])
def test_deeply_nested_extensions_are_422_not_500(client, levels):
    """Valid JSON a few hundred levels deep: the validator's recursion ends in 422."""
    ext = _nested(levels, b'{"url":"http://e.org/x","extension":[', b"]}", b'{"url":"http://e.org/x","valueString":"v"}')
    body = b'{"resourceType":"Patient","id":"deep","extension":[' + ext + b"]}"
    for method, path in (("POST", "/fhir/Patient"), ("PUT", "/fhir/Patient/deep"),
                         ("POST", "/fhir/Patient/$validate")):
        r = client.open(path, method=method, data=body, content_type=JSON)
        assert_oo(r, 422)
    bundle = b'{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"PUT",' \
             b'"url":"Patient/deep"},"resource":' + body + b"}]}"
    r = client.post("/fhir", data=bundle, content_type=JSON)
    assert r.status_code in (400, 422), r.data[:300]
    assert total(client) == 0
    # a moderately nested extension (20 levels) is fine
    ok = _nested(20, b'{"url":"http://e.org/x","extension":[', b"]}", b'{"url":"http://e.org/x","valueString":"v"}')
    r = client.put("/fhir/Patient/ok", data=b'{"resourceType":"Patient","id":"ok","extension":[' + ok + b"]}",
                   content_type=JSON)
    assert r.status_code == 201, r.data[:300]


@pytest.mark.parametrize("body", [b"null", b"[]", b"1", b'"x"', b'{"resourceType":"Parameters","parameter":"x"}',
                                  b'{"resourceType":"Parameters","parameter":[1,null]}'])
def test_validate_with_a_body_that_is_not_a_resource(client, body):
    assert_oo(client.post("/fhir/Patient/$validate", data=body, content_type=JSON), 422)


# --------------------------------------------------------------------------- numbers
SUPERSCRIPT_TWO = "\u00b2"     # "²": str.isdigit() is true, int() refuses it (and it is Latin-1)


def test_digits_that_are_not_ascii_are_not_numbers(client):
    """``"9²".isdigit()`` is true but ``int("9²")`` raises: each of these was a 500."""
    sup = SUPERSCRIPT_TWO
    client.put("/fhir/Patient/p1", data=orjson.dumps(patient()), content_type=JSON)
    assert_oo(client.get(f"/fhir/Patient/p1/_history/9{sup}"), 404)
    assert_oo(client.put("/fhir/Patient/p1", data=orjson.dumps(patient()), content_type=JSON,
                         headers={"If-Match": f'W/"{sup}"'}), 400)
    assert_oo(client.get(f"/fhir/Patient/p1/$everything?_count={sup}"), 400)
    assert_oo(client.post("/fhir/Patient/p1/$everything", data={"_offset": sup}), 400)
    assert_oo(client.get(f"/fhir/AuditEvent/1{sup}"))
    for url in (f"/audit/entry/1{sup}", f"/audit/proof/inclusion?index=1{sup}&tree_size=2",
                f"/admin/models/x/evaluation?version=1{sup}"):
        r = client.get(url)
        assert 400 <= r.status_code < 500, (url, r.status_code, r.data[:200])


def test_version_ordering_and_cohort_uids_ignore_non_ascii_digits():
    from server.synthetic.cohort import parse_uid
    from server.terminology.provider import version_key
    from terminologies.provider import _version_key

    assert parse_uid(1, "2.25.1" + SUPERSCRIPT_TWO) is None
    assert version_key("1." + SUPERSCRIPT_TWO) < version_key("1.0")
    assert _version_key("1." + SUPERSCRIPT_TWO) < _version_key("1.0")
