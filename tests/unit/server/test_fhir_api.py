"""FHIR REST behaviour through the Flask app (in-process), on SQLite and PostgreSQL."""
from __future__ import annotations

import base64
import json

import orjson
import pytest

from server.app import create_app

JSON = "application/fhir+json"


@pytest.fixture
def client(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path)})
    return app.test_client()


def patient(family="Doe", given="Jane", ident="123", **extra):
    body = {"resourceType": "Patient", "name": [{"family": family, "given": [given]}],
            "identifier": [{"system": "http://example.org/mrn", "value": ident}],
            "gender": "female", "birthDate": "1970-05-01"}
    body.update(extra)
    return body


def post(client, path, body, **headers):
    return client.post(f"/fhir/{path}", data=orjson.dumps(body), content_type=JSON, headers=headers)


def put(client, path, body, **headers):
    return client.put(f"/fhir/{path}", data=orjson.dumps(body), content_type=JSON, headers=headers)


def assert_oo(resp, status, code=None):
    assert resp.status_code == status, resp.data
    body = resp.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome", body
    if code:
        assert body["issue"][0]["code"] == code, body
    return body


def test_create_read_vread_update_delete(client):
    r = post(client, "Patient", patient())
    assert r.status_code == 201
    pid = r.get_json(force=True)["id"]
    assert r.headers["ETag"] == 'W/"1"'
    assert r.headers["Location"].endswith(f"/fhir/Patient/{pid}/_history/1")
    assert "Last-Modified" in r.headers

    r = client.get(f"/fhir/Patient/{pid}")
    assert r.status_code == 200
    body = r.get_json(force=True)
    assert body["meta"]["versionId"] == "1" and body["name"][0]["family"] == "Doe"
    assert r.content_type.startswith(JSON)

    body["gender"] = "other"
    r = put(client, f"Patient/{pid}", body)
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"'
    assert client.get(f"/fhir/Patient/{pid}/_history/1").get_json(force=True)["gender"] == "female"
    assert client.get(f"/fhir/Patient/{pid}/_history/2").get_json(force=True)["gender"] == "other"

    # a no-op update creates no version
    r = put(client, f"Patient/{pid}", body)
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"'

    assert client.delete(f"/fhir/Patient/{pid}").status_code == 204
    assert_oo(client.get(f"/fhir/Patient/{pid}"), 410, "deleted")
    assert client.get(f"/fhir/Patient/{pid}/_history/2").status_code == 200
    assert_oo(client.get("/fhir/Patient/nope"), 404, "not-found")


def test_update_as_create_and_if_match(client):
    r = put(client, "Patient/p1", patient(id="p1"))
    assert r.status_code == 201
    assert_oo(put(client, "Patient/p1", patient(id="p1", gender="male"), **{"If-Match": 'W/"7"'}), 412)
    r = put(client, "Patient/p1", patient(id="p1", gender="male"), **{"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"'
    # id in body must match URL
    assert_oo(put(client, "Patient/p1", patient(id="p2")), 400)


def test_conditional_read_headers(client):
    put(client, "Patient/c1", patient(id="c1"))
    r = client.get("/fhir/Patient/c1", headers={"If-None-Match": 'W/"1"'})
    assert r.status_code == 304
    r = client.get("/fhir/Patient/c1", headers={"If-None-Match": 'W/"0"'})
    assert r.status_code == 200
    lm = client.get("/fhir/Patient/c1").headers["Last-Modified"]
    assert client.get("/fhir/Patient/c1", headers={"If-Modified-Since": lm}).status_code == 304
    assert client.get("/fhir/Patient/c1", headers={
        "If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code == 200


def test_prefer_return(client):
    r = post(client, "Patient", patient(), Prefer="return=minimal")
    assert r.status_code == 201 and r.data == b"" and "Location" in r.headers
    r = post(client, "Patient", patient(), Prefer="return=OperationOutcome")
    assert r.status_code == 201 and r.get_json(force=True)["resourceType"] == "OperationOutcome"
    r = post(client, "Patient", patient(), Prefer="return=representation")
    assert r.get_json(force=True)["resourceType"] == "Patient"


def test_conditional_create_update_delete(client):
    hdr = {"If-None-Exist": "identifier=http://example.org/mrn|C1"}
    r1 = post(client, "Patient", patient(ident="C1"), **hdr)
    r2 = post(client, "Patient", patient(ident="C1"), **hdr)
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.get_json(force=True)["id"] == r2.get_json(force=True)["id"]
    # conditional update: one match -> update it
    r = client.put("/fhir/Patient?identifier=http://example.org/mrn|C1",
                   data=orjson.dumps(patient(ident="C1", gender="male")), content_type=JSON)
    assert r.status_code == 200 and r.get_json(force=True)["id"] == r1.get_json(force=True)["id"]
    # no match -> create
    r = client.put("/fhir/Patient?identifier=http://example.org/mrn|C2",
                   data=orjson.dumps(patient(ident="C2")), content_type=JSON)
    assert r.status_code == 201
    # several matches -> 412
    post(client, "Patient", patient(ident="C1"))
    assert_oo(client.put("/fhir/Patient?identifier=http://example.org/mrn|C1",
                         data=orjson.dumps(patient(ident="C1")), content_type=JSON), 412)
    assert_oo(post(client, "Patient", patient(ident="C1"), **hdr), 412)
    # conditional delete
    assert client.delete("/fhir/Patient?identifier=http://example.org/mrn|C2").status_code == 204
    r = client.get("/fhir/Patient?identifier=http://example.org/mrn|C2")
    assert r.get_json(force=True)["total"] == 0


def test_json_patch(client):
    put(client, "Patient/jp", patient(id="jp"))
    ops = [{"op": "replace", "path": "/gender", "value": "male"},
           {"op": "add", "path": "/name/0/given/-", "value": "Q"}]
    r = client.patch("/fhir/Patient/jp", data=json.dumps(ops), content_type="application/json-patch+json")
    assert r.status_code == 200, r.data
    body = r.get_json(force=True)
    assert body["gender"] == "male" and body["name"][0]["given"] == ["Jane", "Q"]
    assert body["meta"]["versionId"] == "2"
    bad = [{"op": "replace", "path": "/gender", "value": 42}]
    assert_oo(client.patch("/fhir/Patient/jp", data=json.dumps(bad),
                           content_type="application/json-patch+json"), 422)
    bad = [{"op": "remove", "path": "/nothing"}]
    assert_oo(client.patch("/fhir/Patient/jp", data=json.dumps(bad),
                           content_type="application/json-patch+json"), 422)
    assert client.get("/fhir/Patient/jp").get_json(force=True)["meta"]["versionId"] == "2"


def test_validation_errors_name_element_and_store_nothing(client):
    bad = patient()
    bad["birthDate"] = "not-a-date"
    oo = assert_oo(post(client, "Patient", bad), 422)
    assert "Patient.birthDate" in oo["issue"][0]["expression"]
    bad = {"resourceType": "Observation", "status": "final"}  # code missing
    oo = assert_oo(post(client, "Observation", bad), 422)
    assert oo["issue"][0]["expression"] == ["Observation.code"]
    assert_oo(post(client, "Observation", patient()), 422)  # type mismatch
    assert client.get("/fhir/Patient").get_json(force=True)["total"] == 0
    # $validate
    r = post(client, "Patient/$validate", patient())
    assert r.status_code == 200
    assert_oo(post(client, "Patient/$validate", {"resourceType": "Patient", "gender": 1}), 422)


def test_every_error_is_operation_outcome(client):
    assert_oo(client.get("/fhir/NoSuchType"), 404)
    assert_oo(client.get("/fhir/NoSuchType/1"), 404)
    assert_oo(client.post("/fhir/Patient", data=b"{not json", content_type=JSON), 400)
    assert_oo(client.post("/fhir/Patient", data=b"<Patient/>", content_type="application/fhir+xml"), 415)
    assert_oo(client.get("/fhir/Patient", headers={"Accept": "application/fhir+xml"}), 406)
    assert_oo(client.get("/fhir/Patient?_format=xml"), 406)
    assert_oo(client.get("/fhir/Patient/x/_history/abc"), 404)
    assert_oo(client.delete("/fhir/Patient/never"), 404)
    assert_oo(client.post("/fhir/Patient", data=b"", content_type=JSON), 400)
    assert client.open("/fhir/metadata", method="DELETE").status_code in (404, 405)
    assert_oo(client.open("/fhir/metadata", method="DELETE"), client.open("/fhir/metadata", method="DELETE").status_code)
    assert_oo(client.delete("/fhir/Patient"), 400)  # conditional delete without criteria
    assert_oo(client.get("/fhir/Patient?birthdate=notadate"), 400)
    assert_oo(client.get("/fhir/Patient?_count=abc"), 400)
    assert_oo(client.get("/fhir/Patient", headers={"Prefer": "handling=strict"},
                         query_string={"nonsense": "1"}), 400)
    assert_oo(client.get("/no/such/route"), 404)


def test_body_size_limit(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path), "max_body_bytes": 1000})
    c = app.test_client()
    r = c.post("/fhir/Patient", data=b"{" + b" " * 2000 + b"}", content_type=JSON)
    assert_oo(r, 413, "too-costly")


def test_metadata_is_r4(client):
    cs = client.get("/fhir/metadata").get_json(force=True)
    assert cs["fhirVersion"] == "4.0.1" and cs["kind"] == "instance"
    types = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert {"Patient", "Observation", "ImagingStudy", "Bundle"} <= set(types)
    obs = {p["name"] for p in types["Observation"]["searchParam"]}
    assert {"code", "subject", "date", "value-quantity", "code-value-quantity", "_id"} <= obs
    assert any(o["name"] == "everything" for o in types["Patient"]["operation"])
    assert {i["code"] for i in cs["rest"][0]["interaction"]} >= {"transaction", "batch"}


def _tx(entries, btype="transaction"):
    return {"resourceType": "Bundle", "type": btype, "entry": entries}


def test_transaction_urn_uuid_and_conditional_refs(client):
    put(client, "Organization/org1", {"resourceType": "Organization", "id": "org1", "name": "Hospital",
                                      "identifier": [{"system": "urn:org", "value": "H1"}]})
    bundle = _tx([
        {"fullUrl": "urn:uuid:obs-1", "resource": {
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": "urn:uuid:pat-1"},
            "performer": [{"reference": "Organization?identifier=urn:org|H1"}]},
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:pat-1", "resource": patient(ident="T1"),
         "request": {"method": "POST", "url": "Patient"}},
    ])
    r = post(client, "", bundle)
    assert r.status_code == 200, r.data
    resp = r.get_json(force=True)
    assert resp["type"] == "transaction-response"
    assert [e["response"]["status"] for e in resp["entry"]] == ["201 Created", "201 Created"]
    obs_loc = resp["entry"][0]["response"]["location"]
    pat_loc = resp["entry"][1]["response"]["location"]
    obs = client.get("/fhir/" + obs_loc.split("/_history")[0]).get_json(force=True)
    assert obs["subject"]["reference"] == pat_loc.split("/_history")[0]
    assert obs["performer"][0]["reference"] == "Organization/org1"


def test_transaction_is_atomic(client):
    bundle = _tx([
        {"fullUrl": "urn:uuid:a", "resource": patient(ident="A1"),
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final"},  # invalid: no code
         "request": {"method": "POST", "url": "Observation"}},
    ])
    oo = assert_oo(post(client, "", bundle), 422)
    assert "Bundle.entry[1]" in oo["issue"][0]["diagnostics"]
    assert client.get("/fhir/Patient").get_json(force=True)["total"] == 0
    # failure during the write phase (unresolvable conditional reference) also rolls back
    bundle = _tx([
        {"fullUrl": "urn:uuid:a", "resource": patient(ident="A2"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient?identifier=nobody"}},
         "request": {"method": "POST", "url": "Observation"}},
    ])
    assert_oo(post(client, "", bundle), 412)
    assert client.get("/fhir/Patient").get_json(force=True)["total"] == 0


def test_transaction_order_delete_put_get(client):
    put(client, "Patient/old", patient(id="old"))
    bundle = _tx([
        {"request": {"method": "GET", "url": "Patient?_id=old,new"}},
        {"resource": patient(id="new"), "request": {"method": "PUT", "url": "Patient/new"}},
        {"request": {"method": "DELETE", "url": "Patient/old"}},
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json",
                      "data": base64.b64encode(b'[{"op":"replace","path":"/gender","value":"male"}]').decode()},
         "request": {"method": "PATCH", "url": "Patient/pp"}},
    ])
    put(client, "Patient/pp", patient(id="pp"))
    r = post(client, "", bundle)
    assert r.status_code == 200, r.data
    resp = r.get_json(force=True)["entry"]
    assert resp[1]["response"]["status"] == "201 Created"
    assert resp[2]["response"]["status"] == "204 No Content"
    assert resp[3]["response"]["status"] == "200 OK"
    found = resp[0]["resource"]
    assert [e["resource"]["id"] for e in found["entry"] if e["search"]["mode"] == "match"] == ["new"]
    assert client.get("/fhir/Patient/pp").get_json(force=True)["gender"] == "male"


def test_batch_reports_each_entry(client):
    bundle = _tx([
        {"resource": patient(ident="B1"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": 5}, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/missing"}},
    ], "batch")
    r = post(client, "", bundle)
    assert r.status_code == 200
    e = r.get_json(force=True)["entry"]
    assert e[0]["response"]["status"] == "201 Created"
    assert e[1]["response"]["status"] == "422"
    assert e[1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert e[2]["response"]["status"] == "404"


def test_large_batch(client):
    n = 10_000
    bundle = _tx([{"resource": {"resourceType": "Basic", "code": {"text": f"b{i}"}},
                   "request": {"method": "POST", "url": "Basic"}} for i in range(n)], "batch")
    r = post(client, "", bundle)
    assert r.status_code == 200
    assert len(r.get_json(force=True)["entry"]) == n
    assert client.get("/fhir/Basic?_summary=count").get_json(force=True)["total"] == n


def test_document_bundle_refused_as_transaction(client):
    doc = {"resourceType": "Bundle", "type": "document", "entry": []}
    oo = assert_oo(post(client, "", doc), 400)
    assert "document" in oo["issue"][0]["diagnostics"] and "synthport load" in oo["issue"][0]["diagnostics"]


def test_history_levels_and_paging(client):
    put(client, "Patient/h1", patient(id="h1"))
    put(client, "Patient/h1", patient(id="h1", gender="male"))
    client.delete("/fhir/Patient/h1")
    put(client, "Patient/h2", patient(id="h2"))
    h = client.get("/fhir/Patient/h1/_history").get_json(force=True)
    assert h["type"] == "history" and h["total"] == 3
    assert [e["request"]["method"] for e in h["entry"]] == ["DELETE", "PUT", "POST"]
    t = client.get("/fhir/Patient/_history?_count=2").get_json(force=True)
    assert t["total"] == 4 and len(t["entry"]) == 2
    nxt = next(l["url"] for l in t["link"] if l["relation"] == "next")
    put(client, "Patient/h3", patient(id="h3"))  # concurrent write does not shift pages
    page2 = client.get(nxt.split("localhost", 1)[-1]).get_json(force=True)
    assert len(page2["entry"]) == 2 and page2["total"] == 4
    s = client.get("/fhir/_history").get_json(force=True)
    assert s["total"] == 5
    assert_oo(client.get("/fhir/Patient/zzz/_history"), 404)


def test_everything(client):
    put(client, "Practitioner/dr", {"resourceType": "Practitioner", "id": "dr"})
    put(client, "Patient/e1", patient(id="e1"))
    put(client, "Patient/e2", patient(id="e2"))
    for i in range(5):
        put(client, f"Encounter/enc{i}", {"resourceType": "Encounter", "id": f"enc{i}", "status": "finished",
                                          "class": {"code": "AMB"}, "subject": {"reference": "Patient/e1"},
                                          "participant": [{"individual": {"reference": "Practitioner/dr"}}]})
    put(client, "Encounter/other", {"resourceType": "Encounter", "id": "other", "status": "finished",
                                    "class": {"code": "AMB"}, "subject": {"reference": "Patient/e2"}})
    b = client.get("/fhir/Patient/e1/$everything").get_json(force=True)
    ids = [e["resource"]["id"] for e in b["entry"]]
    assert ids[0] == "e1" and set(ids) == {"e1", "dr"} | {f"enc{i}" for i in range(5)}
    # paging
    p = client.get("/fhir/Patient/e1/$everything?_count=3").get_json(force=True)
    seen = [e["resource"]["id"] for e in p["entry"]]
    while any(l["relation"] == "next" for l in p["link"]):
        nxt = next(l["url"] for l in p["link"] if l["relation"] == "next")
        p = client.get(nxt.split("localhost", 1)[-1]).get_json(force=True)
        seen += [e["resource"]["id"] for e in p["entry"]]
    assert seen == ids
    t = client.get("/fhir/Patient/e1/$everything?_type=Patient,Encounter").get_json(force=True)
    assert "dr" not in [e["resource"]["id"] for e in t["entry"]]
    assert_oo(client.get("/fhir/Patient/nobody/$everything"), 404)


def test_search_paging_links_use_host(client):
    for i in range(5):
        post(client, "Patient", patient(ident=f"S{i}"))
    r = client.get("/fhir/Patient?_count=2", headers={"Host": "fhir.example.org:9999"})
    b = r.get_json(force=True)
    assert b["total"] == 5 and len(b["entry"]) == 2
    nxt = next(l["url"] for l in b["link"] if l["relation"] == "next")
    assert nxt.startswith("http://fhir.example.org:9999/fhir/Patient?")
    assert all(e["fullUrl"].startswith("http://fhir.example.org:9999/fhir/Patient/") for e in b["entry"])


def test_post_search_and_summary_elements(client):
    post(client, "Patient", patient(family="Smith"))
    r = client.post("/fhir/Patient/_search", data="family=smith",
                    content_type="application/x-www-form-urlencoded")
    assert r.get_json(force=True)["total"] == 1
    b = client.get("/fhir/Patient?_elements=name").get_json(force=True)
    res = b["entry"][0]["resource"]
    assert "name" in res and "gender" not in res
    assert any(t["code"] == "SUBSETTED" for t in res["meta"]["tag"])
    b = client.get("/fhir/Patient?_summary=count").get_json(force=True)
    assert b["total"] == 1 and "entry" not in b


def test_all_routes_answer_errors_as_operation_outcome(client):
    """Every /fhir route and method, given bad input, answers an OperationOutcome."""
    app = client.application
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/fhir"):
            continue
        url = (rule.rule.replace("<res_type>", "NoSuchType").replace("<res_id>", "x!")
               .replace("<version>", "nan"))
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            r = client.open(url, method=method, data=b"<xml/>", content_type="application/xml")
            if r.status_code >= 400:
                body = r.get_json(force=True)
                assert body["resourceType"] == "OperationOutcome", (method, url, r.data)
                assert body["issue"][0]["severity"] == "error"
                checked += 1
    assert checked >= 15


def test_conditional_reference_to_conditional_create_in_same_transaction(client):
    bundle = _tx([
        {"fullUrl": "urn:uuid:org", "resource": {"resourceType": "Organization", "name": "H",
                                                  "identifier": [{"system": "urn:h", "value": "1"}]},
         "request": {"method": "POST", "url": "Organization", "ifNoneExist": "identifier=urn:h|1"}},
        {"resource": {"resourceType": "Location", "name": "L",
                      "managingOrganization": {"reference": "Organization?identifier=urn:h|1"}},
         "request": {"method": "POST", "url": "Location"}},
    ])
    r = post(client, "", bundle)
    assert r.status_code == 200, r.data
    org = r.get_json(force=True)["entry"][0]["response"]["location"].split("/_history")[0]
    loc = r.get_json(force=True)["entry"][1]["response"]["location"].split("/_history")[0]
    assert client.get(f"/fhir/{loc}").get_json(force=True)["managingOrganization"]["reference"] == org
