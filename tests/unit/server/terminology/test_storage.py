"""Concept tables: import idempotence and replacement, the provider (cache, lazy and loaded
code systems), the store supplement."""
from __future__ import annotations

import orjson
from sqlalchemy import func, select

from server.db import schema as S
from server.terminology.importer import build_supplement, import_codesystem, used_codes
from server.terminology.provider import SqlCodeSystemData
from terminologies.model import Concept

from .conftest import LOINC, SCT, SCT_META, condition, params_of, post, sct_concepts


def _counts(store):
    with store.engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(t)).scalar_one()
                     for t in (S.term_codesystem, S.term_concept, S.term_parent))


def _versions(store, res_id):
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(S.resource).where(
            S.resource.c.res_type == "CodeSystem", S.resource.c.res_id == res_id)).scalar_one()


def test_import_is_idempotent_and_replaces(store, client):
    first = _counts(store)
    assert first == (1, 7, 7)                      # 7 concepts, 7 is-a edges (one has two parents)
    again = import_codesystem(store, SCT_META, sct_concepts(), progress=False)
    assert _counts(store) == first
    assert again.concepts == 7 and again.edges == 7
    assert _versions(store, again.res_id) == 1     # same resource: no new version
    body = client.get(f"/fhir/CodeSystem/{again.res_id}").get_json()
    assert body["content"] == "not-present" and body["count"] == 7 and "concept" not in body
    assert any(t["code"] == "concept-tables" for t in body["meta"]["tag"])

    # A new release of the same url+version replaces the rows (one concept gone, one new).
    fewer = [c for c in sct_concepts([("999", "New", ("404684003",))]) if c.code != "38341003"]
    import_codesystem(store, SCT_META, fewer, progress=False)
    assert _counts(store) == (1, 7, 7)
    cs = store.terminology.refresh().code_system(SCT)
    assert cs.get("38341003") is None and cs.get("999").display == "New"
    assert _versions(store, again.res_id) == 1     # count unchanged: metadata identical

    # Another version is another code system row; the latest is served by default.
    import_codesystem(store, dict(SCT_META, version=SCT_META["version"][:-8] + "20250101"),
                      sct_concepts(), progress=False)
    assert _counts(store)[0] == 2
    assert store.terminology.refresh().code_system(SCT).version.endswith("20250101")
    assert store.terminology.code_system(SCT, SCT_META["version"]).get("999") is not None


def test_duplicate_codes_in_a_stream_keep_the_last(store):
    meta = {"url": "http://example.org/dup", "name": "Dup"}
    import_codesystem(store, meta, [Concept("a", "A1"), Concept("b", "B", ("a",)), Concept("a", "A2")],
                      progress=False)
    cs = store.terminology.refresh().code_system("http://example.org/dup")
    assert len(cs) == 2 and cs.get("a").display == "A2" and cs.ancestors("b") == {"a"}


def test_provider_hierarchy(store, app):
    cs = store.terminology.refresh().code_system(SCT)
    lazy = store.terminology.full_load_max == 0
    assert isinstance(cs, SqlCodeSystemData) == lazy
    assert cs.get("44054006").display == "Diabetes mellitus type 2"
    assert cs.get("44054006").designations[0].value.endswith("(disorder)")
    assert cs.get("44054006").properties == (("effectiveTime", "20200131"),)
    assert cs.descendants("73211009") == {"44054006", "46635009", "90781000119102"}
    assert cs.ancestors("90781000119102") == {"44054006", "73211009", "90708001", "404684003"}
    assert cs.subsumes("73211009", "90781000119102") == "subsumes"
    assert cs.subsumes("90781000119102", "90708001") == "subsumed-by"
    assert cs.subsumes("46635009", "44054006") == "not-subsumed"
    assert set(cs.children("73211009")) == {"44054006", "46635009"}
    assert cs.roots() == ["404684003"]
    assert cs.order_of({"38341003", "73211009", "404684003"}) == ["404684003", "73211009", "38341003"]
    assert list(cs)[:2] == ["404684003", "73211009"] and len(list(cs.concepts())) == 7
    assert "nope" not in cs and cs.content == "fragment"


def test_cache_follows_writes_through_rest(store, client):
    prov = store.terminology
    url = "http://example.org/cs"
    cs_body = {"resourceType": "CodeSystem", "url": url, "status": "active", "content": "complete",
               "concept": [{"code": "a", "display": "A"}]}
    assert prov.refresh().code_system(url) is None
    r = post(client, "CodeSystem", cs_body)
    assert r.status_code == 201
    rid = r.get_json()["id"]
    assert prov.refresh().code_system(url).get("a").display == "A"
    cs_body.update(id=rid, concept=[{"code": "a", "display": "A2"}])
    assert client.put(f"/fhir/CodeSystem/{rid}", data=orjson.dumps(cs_body),
                      content_type="application/fhir+json").status_code == 200
    assert prov.refresh().code_system(url).get("a").display == "A2"
    assert client.delete(f"/fhir/CodeSystem/{rid}").status_code == 204
    assert prov.refresh().code_system(url) is None


def test_supplement_of_used_codes(store, client):
    assert post(client, "Condition", condition("44054006", display="Type 2 diabetes")).status_code == 201
    assert post(client, "Condition", condition("12345", system="http://example.org/local",
                                                display="Local thing")).status_code == 201
    obs = {"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": LOINC, "code": "2339-0", "display": "Glucose"}]},
           "valueQuantity": {"value": 5.4, "unit": "mmol/L", "system": "http://unitsofmeasure.org",
                             "code": "mmol/L"}}
    assert post(client, "Observation", obs).status_code == 201
    pat = {"resourceType": "Patient", "identifier": [{"system": "http://example.org/mrn", "value": "MRN-1"}],
           "telecom": [{"system": "phone", "value": "555"}]}
    assert post(client, "Patient", pat).status_code == 201

    used = used_codes(store)
    assert used[LOINC] == {"2339-0": "Glucose"}
    assert used["http://unitsofmeasure.org"] == {"mmol/L": "mmol/L"}
    assert "http://example.org/mrn" not in used          # identifiers never become codes
    assert not any("MRN-1" in codes for codes in used.values())
    report = {s: (n, how) for s, n, how in build_supplement(store)}
    assert report[LOINC] == (1, "created") and report[SCT] == (1, "created")
    assert {how for _, _, how in build_supplement(store)} == {"unchanged"}   # re-runnable

    # $lookup answers from the supplement for a system that was never imported ...
    r = client.get("/fhir/CodeSystem/$lookup", query_string={"system": LOINC, "code": "2339-0"})
    assert r.status_code == 200, r.data
    assert params_of(r.get_json())["display"] == "Glucose"
    r = client.get("/fhir/CodeSystem/$lookup", query_string={"system": "http://example.org/local",
                                                             "code": "12345"})
    assert params_of(r.get_json())["display"] == "Local thing"
    # ... and adds the store's display to an imported one as a designation.
    r = client.get("/fhir/CodeSystem/$lookup", query_string={"system": SCT, "code": "44054006"})
    out = r.get_json()
    assert params_of(out)["display"] == "Diabetes mellitus type 2"
    values = [pp.get("valueString") for p in out["parameter"] if p["name"] == "designation"
              for pp in p["part"]]
    assert "Type 2 diabetes" in values
