"""Terminology operations over HTTP: GET with query parameters, POST with Parameters,
type and instance level, errors as OperationOutcome with the right status."""
from __future__ import annotations

import orjson
import pytest

from server.fhir import terminology_ops

from .conftest import JSON, SCT, assert_oo, params_of, post

VS_URL = "http://example.org/fhir/ValueSet/diabetes"
VS = {"resourceType": "ValueSet", "url": VS_URL, "version": "1", "status": "active",
      "compose": {"include": [{"system": SCT, "filter": [
          {"property": "concept", "op": "is-a", "value": "73211009"}]}]}}
CM = {"resourceType": "ConceptMap", "url": "http://example.org/fhir/ConceptMap/sct-icd", "status": "active",
      "group": [{"source": SCT, "target": "http://hl7.org/fhir/sid/icd-10",
                 "element": [{"code": "44054006", "target": [{"code": "E11", "equivalence": "equivalent"}]},
                             {"code": "46635009", "target": [{"code": "E10", "equivalence": "equivalent"}]}]}]}


def parameters(*pairs):
    out = []
    for name, value in pairs:
        key = {bool: "valueBoolean", int: "valueInteger", dict: "valueCoding"}.get(type(value), "valueString")
        if isinstance(value, dict) and value.get("resourceType"):
            out.append({"name": name, "resource": value})
        else:
            out.append({"name": name, key: value})
    return {"resourceType": "Parameters", "parameter": out}


def op(client, path, *pairs):
    return client.post(f"/fhir/{path}", data=orjson.dumps(parameters(*pairs)), content_type=JSON)


def test_lookup(client):
    r = client.get("/fhir/CodeSystem/$lookup", query_string={"system": SCT, "code": "44054006"})
    assert r.status_code == 200 and r.content_type.startswith(JSON)
    out = params_of(r.get_json())
    assert out["display"] == "Diabetes mellitus type 2" and out["name"] == "SNOMED CT fragment"
    r = op(client, "CodeSystem/$lookup", ("coding", {"system": SCT, "code": "73211009"}))
    assert params_of(r.get_json())["display"] == "Diabetes mellitus"
    r = client.get("/fhir/CodeSystem/$lookup", query_string={"coding": f"{SCT}|46635009"})
    assert params_of(r.get_json())["display"] == "Diabetes mellitus type 1"
    cs_id = client.get("/fhir/CodeSystem", query_string={"url": SCT}).get_json()["entry"][0]["resource"]["id"]
    r = client.get(f"/fhir/CodeSystem/{cs_id}/$lookup", query_string={"code": "38341003"})
    assert params_of(r.get_json())["display"] == "Hypertensive disorder"
    # errors
    assert_oo(client.get("/fhir/CodeSystem/$lookup", query_string={"system": SCT, "code": "0"}),
              404, "code-invalid")
    assert_oo(client.get("/fhir/CodeSystem/$lookup", query_string={"system": "http://nope", "code": "0"}),
              404, "not-found")
    assert_oo(client.get("/fhir/CodeSystem/$lookup", query_string={"code": "0"}), 400, "invalid")
    assert_oo(client.get("/fhir/CodeSystem/nope/$lookup", query_string={"code": "0"}), 404, "not-found")
    assert_oo(client.get("/fhir/CodeSystem/$lookup", query_string={"coding": "no-bar"}), 400)


def test_validate_code_and_subsumes(client):
    r = client.get("/fhir/CodeSystem/$validate-code", query_string={"url": SCT, "code": "44054006"})
    out = params_of(r.get_json())
    assert out["result"] is True and out["display"] == "Diabetes mellitus type 2"
    r = client.get("/fhir/CodeSystem/$validate-code", query_string={"url": SCT, "code": "0"})
    assert params_of(r.get_json())["result"] is False
    r = op(client, "CodeSystem/$validate-code", ("url", SCT),
           ("codeableConcept", {"coding": [{"system": SCT, "code": "46635009"}]}))
    assert r.status_code == 200 and params_of(r.get_json())["result"] is True
    assert_oo(client.get("/fhir/CodeSystem/$validate-code", query_string={"url": "http://nope", "code": "1"}),
              404, "not-found")
    # a CodeableConcept cannot travel in a query string
    assert_oo(client.get("/fhir/CodeSystem/$validate-code",
                         query_string={"url": SCT, "codeableConcept": "x"}), 400)

    for a, b, outcome in (("73211009", "90781000119102", "subsumes"),
                          ("90781000119102", "73211009", "subsumed-by"),
                          ("44054006", "44054006", "equivalent"),
                          ("46635009", "44054006", "not-subsumed")):
        r = client.get("/fhir/CodeSystem/$subsumes", query_string={"system": SCT, "codeA": a, "codeB": b})
        assert params_of(r.get_json())["outcome"] == outcome, (a, b)
    r = op(client, "CodeSystem/$subsumes", ("codingA", {"system": SCT, "code": "404684003"}),
           ("codingB", {"system": SCT, "code": "38341003"}))
    assert params_of(r.get_json())["outcome"] == "subsumes"
    assert_oo(client.get("/fhir/CodeSystem/$subsumes", query_string={"system": SCT, "codeA": "73211009",
                                                                     "codeB": "0"}), 404, "code-invalid")


def test_expand_and_valueset_validate_code(client):
    r = post(client, "ValueSet", VS)
    assert r.status_code == 201
    vs_id = r.get_json()["id"]
    r = client.get("/fhir/ValueSet/$expand", query_string={"url": VS_URL})
    assert r.status_code == 200, r.data
    exp = r.get_json()["expansion"]
    codes = [c["code"] for c in exp["contains"]]
    assert set(codes) == {"73211009", "44054006", "46635009", "90781000119102"} and exp["total"] == 4
    r = client.get(f"/fhir/ValueSet/{vs_id}/$expand", query_string={"count": "2", "offset": "1"})
    exp = r.get_json()["expansion"]
    assert [c["code"] for c in exp["contains"]] == codes[1:3] and exp["total"] == 4
    r = client.get("/fhir/ValueSet/$expand", query_string={"url": VS_URL, "filter": "microalbuminuria"})
    assert [c["code"] for c in r.get_json()["expansion"]["contains"]] == ["90781000119102"]
    inline = dict(VS, url="http://example.org/inline")
    r = op(client, "ValueSet/$expand", ("valueSet", inline))
    assert r.get_json()["expansion"]["total"] == 4
    r = client.get("/fhir/ValueSet/$validate-code", query_string={"url": VS_URL, "system": SCT,
                                                                  "code": "44054006"})
    assert params_of(r.get_json())["result"] is True
    r = client.get(f"/fhir/ValueSet/{vs_id}/$validate-code", query_string={"system": SCT, "code": "38341003"})
    assert params_of(r.get_json())["result"] is False
    # errors
    assert_oo(client.get("/fhir/ValueSet/$expand", query_string={"url": "http://nope"}), 404, "not-found")
    assert_oo(client.get("/fhir/ValueSet/$expand"), 400, "invalid")
    assert_oo(client.get("/fhir/ValueSet/$expand", query_string={"url": VS_URL, "count": "x"}), 400)
    assert_oo(client.post("/fhir/ValueSet/$expand", data=orjson.dumps(VS), content_type=JSON), 400)
    assert_oo(client.post("/fhir/ValueSet/$expand", data=b"<x/>", content_type="application/xml"), 415)


def test_expand_too_costly(client, monkeypatch):
    post(client, "ValueSet", VS)
    monkeypatch.setitem(terminology_ops.OPERATIONS[("ValueSet", "expand")].extra, "max_size", 2)
    assert_oo(client.get("/fhir/ValueSet/$expand", query_string={"url": VS_URL}), 422, "too-costly")
    r = client.get("/fhir/ValueSet/$expand", query_string={"url": VS_URL, "count": "2"})
    assert r.status_code == 200 and len(r.get_json()["expansion"]["contains"]) == 2


def test_translate(client):
    r = post(client, "ConceptMap", CM)
    assert r.status_code == 201
    cm_id = r.get_json()["id"]
    r = client.get("/fhir/ConceptMap/$translate", query_string={"system": SCT, "code": "44054006"})
    body = r.get_json()
    assert params_of(body)["result"] is True
    match = next(p for p in body["parameter"] if p["name"] == "match")
    concept = next(p["valueCoding"] for p in match["part"] if p["name"] == "concept")
    assert concept["code"] == "E11"
    r = op(client, f"ConceptMap/{cm_id}/$translate", ("coding", {"system": "http://hl7.org/fhir/sid/icd-10",
                                                                  "code": "E10"}), ("reverse", True))
    body = r.get_json()
    match = next(p for p in body["parameter"] if p["name"] == "match")
    assert next(p["valueCoding"] for p in match["part"] if p["name"] == "concept")["code"] == "46635009"
    r = client.get("/fhir/ConceptMap/$translate", query_string={"system": SCT, "code": "38341003"})
    assert params_of(r.get_json())["result"] is False
    assert_oo(client.get("/fhir/ConceptMap/$translate", query_string={"url": "http://nope", "system": SCT,
                                                                      "code": "1"}), 404, "not-found")
    assert_oo(client.get("/fhir/ConceptMap/$translate", query_string={"system": SCT, "code": "1",
                                                                      "reverse": "maybe"}), 400)


@pytest.mark.parametrize("path", ["CodeSystem/$lookup", "ValueSet/$expand", "ConceptMap/$translate"])
def test_post_body_must_be_parameters(client, path):
    assert_oo(client.post(f"/fhir/{path}", data=orjson.dumps({"resourceType": "Patient"}),
                          content_type=JSON), 400)
    assert_oo(client.post(f"/fhir/{path}", data=b"", content_type=JSON), 400)


def test_capability_statement_lists_operations(client):
    cs = client.get("/fhir/metadata").get_json()
    types = {r["type"]: r for r in cs["rest"][0]["resource"]}
    ops = {t: {o["name"] for o in types[t]["operation"]} for t in ("CodeSystem", "ValueSet", "ConceptMap")}
    assert {"lookup", "validate-code", "subsumes"} <= ops["CodeSystem"]
    assert {"expand", "validate-code"} <= ops["ValueSet"]
    assert "translate" in ops["ConceptMap"]
