"""Token search modifiers :below, :above, :in, :not-in (FHIR R4 search §3.1.1.4.10) with the
hierarchy in the concept tables and value sets in the store."""
from __future__ import annotations

import pytest

from server.terminology import search as term_search

from .conftest import SCT, assert_oo, condition, post

VS = {"resourceType": "ValueSet", "url": "http://example.org/vs/diabetes", "version": "2", "status": "active",
      "compose": {"include": [{"system": SCT, "filter": [
          {"property": "concept", "op": "is-a", "value": "73211009"}]}]}}
KIDNEY_HTN = {"resourceType": "ValueSet", "url": "http://example.org/vs/kidney-htn", "status": "active",
              "compose": {"include": [{"system": SCT, "concept": [{"code": "90708001"}, {"code": "38341003"}]}]}}


@pytest.fixture
def world(client):
    """One Condition per code, each for its own patient; returns code -> patient id."""
    codes = {"73211009": "dm", "44054006": "dm2", "46635009": "dm1", "90781000119102": "dm2neph",
             "38341003": "htn", "404684003": "finding"}
    for code, pid in codes.items():
        assert post(client, "Condition", condition(code, pid=pid)).status_code == 201
    assert post(client, "Condition", condition("44054006", system="http://example.org/other",
                                                pid="other")).status_code == 201
    assert post(client, "ValueSet", VS).status_code == 201
    r = post(client, "ValueSet", KIDNEY_HTN)
    return {"vs_id": r.get_json()["id"]}


def subjects(client, **query):
    r = client.get("/fhir/Condition", query_string={**query, "_count": "100"})
    assert r.status_code == 200, r.data
    return {e["resource"]["subject"]["reference"].split("/")[1] for e in r.get_json().get("entry", [])}


def test_below_finds_every_subtype(client, world):
    assert subjects(client, **{"code:below": f"{SCT}|73211009"}) == {"dm", "dm1", "dm2", "dm2neph"}
    assert subjects(client, **{"code:below": f"{SCT}|44054006"}) == {"dm2", "dm2neph"}
    assert subjects(client, **{"code:below": f"{SCT}|90708001"}) == {"dm2neph"}   # second parent
    # comma = OR
    assert subjects(client, **{"code:below": f"{SCT}|46635009,{SCT}|38341003"}) == {"dm1", "htn"}


def test_above(client, world):
    assert subjects(client, **{"code:above": f"{SCT}|90781000119102"}) == {
        "dm2neph", "dm2", "dm", "finding"}
    assert subjects(client, **{"code:above": f"{SCT}|38341003"}) == {"htn", "finding"}


def test_in_and_not_in(client, world):
    assert subjects(client, **{"code:in": VS["url"]}) == {"dm", "dm1", "dm2", "dm2neph"}
    assert subjects(client, **{"code:in": VS["url"] + "|2"}) == {"dm", "dm1", "dm2", "dm2neph"}
    assert subjects(client, **{"code:in": f"ValueSet/{world['vs_id']}"}) == {"htn"}
    # :not-in: every Condition without a code in the set (incl. the other system's)
    assert subjects(client, **{"code:not-in": VS["url"]}) == {"htn", "finding", "other"}
    # combined with another criterion (AND) and with :below
    assert subjects(client, **{"code:in": VS["url"], "code:not-in": f"ValueSet/{world['vs_id']}",
                               "code:below": f"{SCT}|44054006"}) == {"dm2", "dm2neph"}


def test_in_chains_and_has(client, world):
    post(client, "Patient", {"resourceType": "Patient", "id": "x"})
    for pid in ("dm1", "htn"):
        r = client.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid},
                       content_type="application/fhir+json")
        assert r.status_code in (200, 201)
    r = client.get("/fhir/Patient", query_string={"_has:Condition:subject:code:below": f"{SCT}|73211009"})
    assert {e["resource"]["id"] for e in r.get_json().get("entry", [])} == {"dm1"}


def test_large_sets_are_narrowed_to_the_codes_in_the_store(client, world, monkeypatch):
    monkeypatch.setattr(term_search, "LARGE", 1)
    assert subjects(client, **{"code:below": f"{SCT}|404684003"}) == {
        "dm", "dm1", "dm2", "dm2neph", "htn", "finding"}
    assert subjects(client, **{"code:not-in": VS["url"]}) == {"htn", "finding", "other"}


def test_long_code_lists_are_inlined_safely(client, world, monkeypatch):
    """Lists longer than the bind-parameter chunk are rendered as literals: quoting must hold."""
    import server.fhir.search as fsearch

    monkeypatch.setattr(fsearch, "_IN_CHUNK", 1)
    local = "http://example.org/local"
    for code, pid in (("a'b", "q1"), ("c\\d", "q2"), ("x", "q3")):
        assert post(client, "Condition", condition(code, system=local, pid=pid)).status_code == 201
    vs = {"resourceType": "ValueSet", "url": "http://example.org/vs/quotes", "status": "active",
          "compose": {"include": [{"system": local, "concept": [{"code": "a'b"}, {"code": "c\\d"}]}]}}
    assert post(client, "ValueSet", vs).status_code == 201
    assert subjects(client, **{"code:in": vs["url"]}) == {"q1", "q2"}
    assert subjects(client, **{"code:below": f"{SCT}|73211009"}) == {"dm", "dm1", "dm2", "dm2neph"}


def test_errors(client, world):
    assert_oo(client.get("/fhir/Condition", query_string={"code:below": "73211009"}), 400, "invalid")
    assert_oo(client.get("/fhir/Condition", query_string={"code:below": "http://nope|1"}), 400, "invalid")
    assert_oo(client.get("/fhir/Condition", query_string={"code:in": "http://example.org/vs/none"}), 400)
    assert_oo(client.get("/fhir/Condition", query_string={"code:in": "ValueSet/none"}), 400)
    # without a hierarchy, a system known only from the store's supplement matches the code itself
    from server.terminology.importer import build_supplement

    build_supplement(client.application.extensions["synthport"]["store"])
    assert subjects(client, **{"code:below": "http://example.org/other|44054006"}) == {"other"}
