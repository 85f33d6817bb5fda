"""The OpenAPI description derived from the CapabilityStatement (server/fhir/openapi.py)."""
from __future__ import annotations

import pytest
import schemathesis

from server.app import create_app
from server.fhir.capability import capability_statement
from server.fhir.openapi import openapi_document

BASE = "http://fhir.example.org/fhir"


@pytest.fixture(scope="module")
def doc() -> dict:
    return openapi_document(capability_statement(BASE), BASE)


def test_every_declared_interaction_has_its_path(doc):
    cs = capability_statement(BASE)
    paths = doc["paths"]
    for res in cs["rest"][0]["resource"]:
        t = res["type"]
        if t == "AuditEvent":       # read and search only: the server writes the audit log
            assert set(paths["/AuditEvent"]) == {"get"} and set(paths["/AuditEvent/{id}"]) == {"get"}
            continue
        assert {"get", "post", "put", "delete"} <= set(paths[f"/{t}"]), t
        assert {"get", "put", "patch", "delete"} <= set(paths[f"/{t}/{{id}}"]), t
        assert "get" in paths[f"/{t}/{{id}}/_history/{{vid}}"] and "get" in paths[f"/{t}/_history"]
        # search: every declared search parameter, as a string query parameter
        declared = {sp["name"] for sp in res["searchParam"]}
        query = {p["name"]: p for p in paths[f"/{t}"]["get"]["parameters"]}
        assert declared <= set(query), t
        assert all(query[n]["in"] == "query" and query[n]["schema"] == {"type": "string"} for n in declared)
        for o in res["operation"]:
            assert f"/{t}/${o['name']}" in paths or f"/{t}/{{id}}/${o['name']}" in paths, (t, o["name"])
    for o in cs["rest"][0].get("operation", []):
        assert "post" in paths[f"/${o['name']}"]
    assert {"get", "post"} <= set(paths["/Patient/{id}/$everything"])
    assert {"get", "post"} <= set(paths["/CodeSystem/$lookup"]) and "/ConceptMap/{id}/$translate" in paths
    assert {"/metadata", "/", "/_history", "/_search"} <= set(paths)
    assert paths["/"]["post"]["requestBody"]["content"]["application/fhir+json"]["schema"] == {
        "$ref": "#/components/schemas/TransactionBundle"}


def test_bodies_errors_and_security(doc):
    create = doc["paths"]["/Observation"]["post"]
    schema = create["requestBody"]["content"]["application/fhir+json"]["schema"]
    assert schema["required"] == ["resourceType"] and schema["properties"]["resourceType"]["enum"] == ["Observation"]
    assert any(p.get("name") == "If-None-Exist" for p in create["parameters"])
    patch = doc["paths"]["/Observation/{id}"]["patch"]
    assert list(patch["requestBody"]["content"]) == ["application/json-patch+json"]
    error = doc["components"]["responses"]["Error"]["content"]["application/fhir+json"]["schema"]
    assert error == {"$ref": "#/components/schemas/OperationOutcome"}
    ops = [op for item in doc["paths"].values() for op in item.values()]
    assert all(op["responses"]["4XX"] == {"$ref": "#/components/responses/Error"} for op in ops)
    assert len({op["operationId"] for op in ops}) == len(ops)
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/metadata"]["get"]["security"] == []
    assert doc["openapi"] == "3.0.3" and doc["servers"] == [{"url": BASE}]


def test_read_only_source_describes_no_writes():
    doc = openapi_document(capability_statement(BASE, writable=False, name="c1"), BASE)
    methods = {m for item in doc["paths"].values() for m in item}
    assert "put" not in methods and "patch" not in methods and "delete" not in methods
    assert "post" not in doc["paths"]["/Patient"]
    assert "post" in doc["paths"]["/"]          # batch (of reads) stays


def test_schemathesis_reads_every_operation(doc):
    schema = schemathesis.openapi.from_dict(doc)
    results = list(schema.get_all_operations())
    bad = [r for r in results if type(r).__name__ != "Ok"]
    assert not bad and len(results) > 1000


def test_served_at_fhir_openapi_json(db_url, tmp_path):
    client = create_app({"database_url": db_url, "data_dir": str(tmp_path)}).test_client()
    r = client.get("/fhir/openapi.json", base_url="https://fhir.example.org")
    assert r.status_code == 200 and r.mimetype == "application/json"
    body = r.get_json()
    assert body["servers"] == [{"url": "https://fhir.example.org/fhir"}]
    assert body["paths"].keys() == openapi_document(
        capability_statement("https://fhir.example.org/fhir"), "https://fhir.example.org/fhir")["paths"].keys()
    # not a search of a resource type called "openapi.json", and nothing new in /metadata
    cs = client.get("/fhir/metadata").get_json(force=True)
    assert "openapi.json" not in str(cs)
