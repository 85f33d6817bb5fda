"""A synthetic cohort's FHIR API fuzzed in-process (schemathesis over WSGI) from the OpenAPI
document it serves, on SQLite and PostgreSQL: no 5xx, every 4xx an OperationOutcome."""
from __future__ import annotations

import orjson
import pytest
import schemathesis

from tests.e2e.fuzz import fuzz
from tests.unit.server.synthetic.conftest import COHORT

BASE = f"/synthetic/{COHORT}/fhir"


def test_batch_of_reads_on_a_cohort(cohort_env):
    """Was a 500: the batch code read the store's settings, which a cohort does not have."""
    client = cohort_env.app().test_client()
    pid = client.get(f"{BASE}/Patient?_count=1").get_json(force=True)["entry"][0]["resource"]["id"]
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        {"request": {"method": "PUT", "url": "Patient/x"}, "resource": {"resourceType": "Patient", "id": "x"}}]}
    r = client.post(BASE, data=orjson.dumps(batch), content_type="application/fhir+json")
    assert r.status_code == 200, r.data[:300]
    statuses = [e["response"]["status"] for e in r.get_json(force=True)["entry"]]
    assert statuses[0].startswith("200") and statuses[1].startswith("405")
    r = client.post(BASE, data=orjson.dumps({"resourceType": "Bundle", "type": "batch"}),
                    content_type="application/fhir+json")
    assert r.status_code == 200 and r.get_json(force=True)["entry"] == []
    batch["type"] = "transaction"
    assert client.post(BASE, data=orjson.dumps(batch), content_type="application/fhir+json").status_code == 405


def test_fuzz_cohort_api(cohort_env):
    app = cohort_env.app()
    client = app.test_client()
    pid = client.get(f"{BASE}/Patient?_count=1").get_json(force=True)["entry"][0]["resource"]["id"]
    schema = schemathesis.openapi.from_wsgi(f"{BASE}/openapi.json", app)
    types = {"Patient", "Observation", "ImagingStudy"}
    report = fuzz(schema, max_examples=3, fixed_ids={"Patient": pid},
                  select=lambda op: op.path.strip("/").split("/")[0] in types or op.path == "/")
    print(report.summary())
    assert report.operations >= 15 and not report.failures, report.summary()
    assert report.statuses[200] > 0 and not report.not_served(), report.summary()


def test_openapi_describes_what_the_cohort_declares(cohort_env):
    """Not the real source's document: no writes, no terminology operations (those were 501)."""
    client = cohort_env.app().test_client()
    doc = client.get(f"{BASE}/openapi.json").get_json()
    assert doc["servers"][0]["url"].endswith(BASE)
    cs = client.get(f"{BASE}/metadata").get_json(force=True)
    declared = {r["type"] for r in cs["rest"][0]["resource"]}
    described = {p.strip("/").split("/")[0] for p in doc["paths"]} - {"", "metadata", "_search"}
    assert described == declared
    assert "/CodeSystem/$lookup" not in doc["paths"] and "/ValueSet/$expand" not in doc["paths"]
    assert not {m for item in doc["paths"].values() for m in item} & {"put", "patch", "delete"}


@pytest.mark.filterwarnings("ignore::UserWarning")     # pydicom on the hostile values
def test_fuzz_cohort_dicomweb(cohort_env):
    """Generated DICOMweb requests (tests/unit/server/dicom/fuzz.py) around one virtual
    instance: no 5xx, every 4xx says why; STOW-RS is refused (the cohort is read-only)."""
    from tests.unit.server.dicom.factory import dataset, part10
    from tests.unit.server.dicom.fuzz import flask_client, request_cases, run_requests

    client = cohort_env.app().test_client()
    base = f"/synthetic/{COHORT}/dicomweb"
    inst = client.get(f"{base}/instances?limit=1", headers={"Accept": "application/dicom+json"})
    assert inst.status_code == 200, inst.data[:300]
    first = inst.get_json(force=True)[0]
    uids = [first[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018")]

    _, _, send = flask_client(client, base)
    report = run_requests(request_cases(5, 300, *uids, [part10(dataset())]), send)
    assert not report.findings, report.summary()
    assert report.statuses.get("GET 200") and not report.statuses.get("POST 200"), report.summary()


@pytest.mark.filterwarnings("ignore::UserWarning")     # pydicom on the hostile values
def test_fuzz_cohort_c_find(cohort_env):
    """Generated C-FIND identifiers (tests/unit/server/dicom/fuzz.py) to the cohort's AE
    title: every status a named one, and the listener keeps answering."""
    from server.config import load_config
    from server.dicom.store import DicomStore
    from server.dimse.server import start_dimse
    from server.store import SqlStore
    from server.synthetic.dicom import dimse_sources
    from tests.unit.server.dicom.fuzz import run_cfind

    cfg = load_config({**cohort_env.config, "ae_title": "SYNTHPORT", "dimse_host": "127.0.0.1",
                       "dimse_timeout": 20}, environ={})
    sql = SqlStore.from_url(cohort_env.db_url, cfg)
    server = start_dimse(cfg, dimse_sources(cfg, sql, DicomStore(sql, cfg)), port=0)
    try:
        report = run_cfind(3, 200, "127.0.0.1", server.server_address[1], COHORT.upper())
    finally:
        server.shutdown()
        sql.engine.dispose()
    assert not report.findings, report.summary()
    assert report.statuses.get("C-FIND 0") and report.statuses.get("C-FIND 43264"), report.summary()
