"""End-to-end: the real `synthport serve` (gunicorn, 2 workers) driven by real FHIR clients."""
from __future__ import annotations

import concurrent.futures as cf

import pytest
import requests

from tests.e2e.server import run_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def base(tmp_path, db_url):
    with run_server(tmp_path, db_url) as url:
        yield url


def test_fhirclient_parses_capability_statement_and_crud(base):
    from fhirclient import client
    from fhirclient.models.humanname import HumanName
    from fhirclient.models.patient import Patient

    smart = client.FHIRClient(settings={"app_id": "synthport-test", "api_base": base})
    smart.prepare()
    cs = smart.server.capabilityStatement       # strict R4 4.0.1 parse (raises on any error)
    assert cs.fhirVersion == "4.0.1"
    assert any(r.type == "Patient" for r in cs.rest[0].resource)

    p = Patient({"gender": "female"})
    name = HumanName()
    name.family, name.given = "Fhirclient", ["Ada"]
    p.name = [name]
    created = p.create(smart.server)
    assert created["resourceType"] == "Patient"
    pid = created["id"]
    again = Patient.read(pid, smart.server)
    assert again.name[0].family == "Fhirclient"
    found = list(Patient.where(struct={"family": "fhirclient"}).perform_resources_iter(smart.server))
    assert [x.id for x in found] == [pid]


def test_fhirpy_paging_count_refresh(base):
    from fhirpy import SyncFHIRClient

    c = SyncFHIRClient(base)
    for i in range(7):
        c.resource("Patient", name=[{"family": "Paging", "given": [f"P{i}"]}], gender="male").save()
    search = c.resources("Patient").search(family="paging")
    assert search.count() == 7                        # _count=0&_totalMethod=count
    all_ = search.limit(3).fetch_all()                 # follows next links
    assert len(all_) == 7 and len({p.id for p in all_}) == 7
    pat = all_[0]
    pat.refresh()                                      # If-None-Match -> 304 keeps it
    assert pat["name"][0]["family"] == "Paging"
    r = requests.get(f"{base}/Patient/{pat.id}", headers={"If-None-Match": 'W/"1"'})
    assert r.status_code == 304


def _cond_create(base: str, n: int) -> int:
    body = {"resourceType": "Patient", "identifier": [{"system": "urn:race", "value": "same"}]}
    r = requests.post(f"{base}/Patient", json=body,
                      headers={"If-None-Exist": "identifier=urn:race|same",
                               "Content-Type": "application/fhir+json"})
    return r.status_code


def test_parallel_conditional_creates_make_one_resource(base):
    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda n: _cond_create(base, n), range(8)))
    assert codes.count(201) == 1, codes
    assert all(c in (200, 201, 412) for c in codes), codes
    total = requests.get(f"{base}/Patient?identifier=urn:race|same").json()["total"]
    assert total == 1


def test_errors_are_operation_outcomes_over_http(base):
    r = requests.get(f"{base}/Patient/does-not-exist")
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"
    r = requests.post(f"{base}/Patient", data=b"[1,", headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"


def test_large_upload_gets_connection_close_small_requests_keep_alive(base):
    # server/http/balance.py: a body of http_close_after_bytes (256 KiB) or more ends the
    # keep-alive connection, so the client's next bundle goes to the least busy worker.
    entries = [{"resource": {"resourceType": "Basic", "code": {"text": "x" * 200}},
                "request": {"method": "POST", "url": "Basic"}} for _ in range(1500)]
    body = {"resourceType": "Bundle", "type": "batch", "entry": entries}
    with requests.Session() as s:
        small = s.get(f"{base}/metadata")
        assert small.status_code == 200
        assert small.headers.get("Connection", "keep-alive").lower() != "close"
        r = s.post(base, json=body, headers={"Content-Type": "application/fhir+json",
                                             "Prefer": "return=minimal"})
        assert len(r.request.body) >= 256 * 1024
        assert r.status_code == 200, r.text[:300]
        assert r.headers.get("Connection", "").lower() == "close"
        assert len(r.json()["entry"]) == 1500
        assert s.get(f"{base}/metadata").status_code == 200      # the client reconnects
