"""FHIR over a synthetic cohort: determinism, ids, read-only, search, paging, $everything."""
from __future__ import annotations

import orjson
import pytest

from tests.unit.server.synthetic.conftest import COHORT, SIZE

BASE = f"/synthetic/{COHORT}/fhir"


def _clear_process_caches(app) -> None:
    """Forget every loaded cohort, as a new worker or a restart would."""
    from server.synthetic import cohort as cohort_mod

    cohort_mod._COHORTS.clear()
    app.extensions["synthport"].pop("synthetic_sources", None)


def _all_pages(client, url: str) -> list[dict]:
    out = []
    while url:
        r = client.get(url)
        assert r.status_code == 200, r.data
        b = r.get_json()
        out += [e["resource"] for e in b.get("entry", []) if e.get("search", {}).get("mode") == "match"]
        url = next((link["url"] for link in b["link"] if link["relation"] == "next"), None)
        if url:
            url = url.split("://", 1)[1].split("/", 1)[1]
            url = "/" + url
    return out


def test_reads_are_byte_identical_across_apps_and_restarts(cohort_env):
    app1 = cohort_env.app()
    c1 = app1.test_client()
    first = c1.get(f"{BASE}/Patient/{COHORT}-5")
    assert first.status_code == 200
    everything = c1.get(f"{BASE}/Patient/{COHORT}-5/$everything").get_json()
    others = [e["resource"] for e in everything["entry"]][1:]
    assert others, "the virtual patient has a record"
    other = others[0]
    other_bytes = c1.get(f"{BASE}/{other['resourceType']}/{other['id']}").data
    _clear_process_caches(app1)
    app2 = cohort_env.app()          # a second worker: own process caches, same database
    c2 = app2.test_client()
    # the other resource first this time (cold generation of the whole record)
    assert c2.get(f"{BASE}/{other['resourceType']}/{other['id']}").data == other_bytes
    assert c2.get(f"{BASE}/Patient/{COHORT}-5").data == first.data
    assert first.headers["ETag"] == 'W/"1"'
    body = orjson.loads(first.data)
    assert body["id"] == f"{COHORT}-5" and body["meta"]["versionId"] == "1"
    assert first.data == orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def test_ids_encode_the_index_and_unknown_ids_404(cohort_env):
    c = cohort_env.app().test_client()
    b = c.get(f"{BASE}/Patient/{COHORT}-7/$everything").get_json()
    for e in b["entry"]:
        rid = e["resource"]["id"]
        assert rid == f"{COHORT}-7" or rid.startswith(f"{COHORT}-7-"), rid
    for bad in (f"{COHORT}-{SIZE}", f"{COHORT}-07", "other-1", f"{COHORT}-x"):
        r = c.get(f"{BASE}/Patient/{bad}")
        assert r.status_code == 404 and r.get_json()["resourceType"] == "OperationOutcome"
    assert c.get(f"{BASE}/Patient/{COHORT}-7/_history/1").status_code == 200
    assert c.get(f"{BASE}/Patient/{COHORT}-7/_history/2").status_code == 404
    h = c.get(f"{BASE}/Patient/{COHORT}-7/_history").get_json()
    assert h["type"] == "history" and len(h["entry"]) == 1
    r = c.get("/synthetic/nosuch/fhir/Patient/nosuch-1")
    assert r.status_code == 404 and "nosuch" in r.get_json()["issue"][0]["diagnostics"]


@pytest.mark.parametrize("method,path,body", [
    ("post", "/Patient", {"resourceType": "Patient"}),
    ("put", f"/Patient/{COHORT}-1", {"resourceType": "Patient", "id": f"{COHORT}-1"}),
    ("delete", f"/Patient/{COHORT}-1", None),
    ("post", "", {"resourceType": "Bundle", "type": "transaction", "entry": []}),
])
def test_writes_answer_405_with_operation_outcome(cohort_env, method, path, body):
    c = cohort_env.app().test_client()
    r = getattr(c, method)(BASE + path, json=body) if body is not None else getattr(c, method)(BASE + path)
    assert r.status_code == 405
    oo = r.get_json()
    assert oo["resourceType"] == "OperationOutcome"
    assert "read-only" in oo["issue"][0]["diagnostics"]
    r = c.patch(f"{BASE}/Patient/{COHORT}-1", data=b"[]",
                content_type="application/json-patch+json")
    assert r.status_code == 405


def test_capability_statement_is_read_only(cohort_env):
    cs = cohort_env.app().test_client().get(f"{BASE}/metadata").get_json()
    rest = cs["rest"][0]
    assert cs["url"].endswith(f"/synthetic/{COHORT}/fhir/metadata")
    types = {r["type"]: r for r in rest["resource"]}
    assert {"Patient", "Condition", "ImagingStudy"} <= set(types)
    for r in types.values():
        codes = {i["code"] for i in r["interaction"]}
        assert not codes & {"create", "update", "delete", "patch"}
    assert {"everything"} == {o["name"] for o in types["Patient"]["operation"]}


def test_patient_search_and_paging(cohort_env):
    c = cohort_env.app().test_client()
    everyone = _all_pages(c, f"{BASE}/Patient?_count=7")
    assert len(everyone) == SIZE
    assert [p["id"] for p in everyone] == [f"{COHORT}-{i}" for i in range(SIZE)]
    b = c.get(f"{BASE}/Patient?_count=7").get_json()
    assert b["total"] == SIZE
    # gender / birthdate / name / identifier evaluated against the resources themselves
    females = _all_pages(c, f"{BASE}/Patient?gender=female&_count=10")
    assert females == [p for p in everyone if p.get("gender") == "female"]
    year = everyone[3]["birthDate"][:4]
    got = _all_pages(c, f"{BASE}/Patient?birthdate={year}&_count=50")
    assert got and all(p["birthDate"].startswith(year) for p in got)
    assert {p["id"] for p in got} == {p["id"] for p in everyone if p["birthDate"].startswith(year)}
    older = _all_pages(c, f"{BASE}/Patient?birthdate=lt{year}-01-01&_count=50")
    assert {p["id"] for p in older} == {p["id"] for p in everyone if p["birthDate"] < f"{year}-01-01"}
    fam = everyone[4]["name"][0]["family"]
    byname = _all_pages(c, f"{BASE}/Patient?family={fam[:3].lower()}&_count=50")
    assert {p["id"] for p in byname} == {p["id"] for p in everyone if p["name"][0]["family"].startswith(fam[:3])}
    one = _all_pages(c, f"{BASE}/Patient?identifier=urn:synthport:synthetic-patient|{COHORT}-9")
    assert [p["id"] for p in one] == [f"{COHORT}-9"]


def test_clinical_search_by_patient_and_code(cohort_env):
    c = cohort_env.app().test_client()
    rec = c.get(f"{BASE}/Patient/{COHORT}-2/$everything").get_json()
    conds = [e["resource"] for e in rec["entry"] if e["resource"]["resourceType"] == "Condition"]
    got = _all_pages(c, f"{BASE}/Condition?patient=Patient/{COHORT}-2")
    assert [r["id"] for r in got] == [r["id"] for r in conds]
    # by code, across the cohort: equal to brute force over every generated record
    every = []
    for i in range(SIZE):
        b = c.get(f"{BASE}/Patient/{COHORT}-{i}/$everything?_type=Condition").get_json()
        every += [e["resource"] for e in b.get("entry", [])]
    codes = sorted({r["code"]["coding"][0]["code"] for r in every if r["resourceType"] == "Condition"})
    assert codes, "the tiny model generates conditions"
    for code in codes:   # index candidates (condition flags, "other") lose no match
        want = [r["id"] for r in every if r["resourceType"] == "Condition"
                and r["code"]["coding"][0]["code"] == code]
        found = _all_pages(c, f"{BASE}/Condition?code={code}&_count=3")
        assert [r["id"] for r in found] == want, code
    # a date parameter evaluated on the generated resources
    onset = sorted(r["onsetDateTime"][:4] for r in every if r.get("onsetDateTime"))[0]
    got = _all_pages(c, f"{BASE}/Condition?onset-date=ge{onset}-01-01&patient={COHORT}-2")
    assert [r["id"] for r in got] == [r["id"] for r in conds if r.get("onsetDateTime", "") >= onset]
    none = c.get(f"{BASE}/Condition?code=http://snomed.info/sct|000000&_count=3").get_json()
    assert not [e for e in none.get("entry", []) if e["search"]["mode"] == "match"]


def test_everything_references_resolve(cohort_env):
    c = cohort_env.app().test_client()
    for i in (0, 1, 2):
        b = c.get(f"{BASE}/Patient/{COHORT}-{i}/$everything").get_json()
        have = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in b["entry"]}
        assert b["total"] == len(b["entry"])

        def refs(x):
            if isinstance(x, dict):
                for k, v in x.items():
                    if k == "reference" and isinstance(v, str):
                        yield v
                    else:
                        yield from refs(v)
            elif isinstance(x, list):
                for v in x:
                    yield from refs(v)

        for e in b["entry"]:
            for ref in refs(e["resource"]):
                assert ref in have, ref
        page = c.get(f"{BASE}/Patient/{COHORT}-{i}/$everything?_count=2").get_json()
        assert len(page["entry"]) == min(2, len(have))
