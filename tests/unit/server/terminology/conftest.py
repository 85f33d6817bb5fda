"""Fixtures of the server-side terminology tests: an app on SQLite and PostgreSQL with a
small is-a hierarchy imported into the concept tables."""
from __future__ import annotations

import orjson
import pytest

from server.app import create_app
from server.terminology.importer import import_codesystem
from terminologies.model import Concept, Designation

JSON = "application/fhir+json"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"

# A SNOMED-shaped fragment: diabetes subtypes under 73211009, a polyhierarchy (type 2 with
# nephropathy under both diabetes type 2 and kidney disease).
HIERARCHY = [
    ("404684003", "Clinical finding", ()),
    ("73211009", "Diabetes mellitus", ("404684003",)),
    ("44054006", "Diabetes mellitus type 2", ("73211009",)),
    ("46635009", "Diabetes mellitus type 1", ("73211009",)),
    ("90781000119102", "Microalbuminuria due to type 2 diabetes mellitus", ("44054006", "90708001")),
    ("90708001", "Kidney disease", ("404684003",)),
    ("38341003", "Hypertensive disorder", ("404684003",)),
]


def sct_concepts(extra=()):
    for code, display, parents in list(HIERARCHY) + list(extra):
        yield Concept(code, display, parents,
                      designations=(Designation("en", None, display + " (disorder)"),),
                      properties=(("effectiveTime", "20200131"),))


SCT_META = {"url": SCT, "version": "http://snomed.info/sct/900000000000207008/version/20240101",
            "name": "SNOMED_CT", "title": "SNOMED CT fragment", "content": "fragment"}


@pytest.fixture(params=["lazy", "loaded"])
def app(request, db_url, tmp_path):
    """The app with the fragment imported; runs with concepts read from SQL on demand
    (``lazy``) and fully loaded into memory (``loaded``)."""
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path)})
    store = app.extensions["synthport"]["store"]
    store.terminology.full_load_max = 0 if request.param == "lazy" else 10**6
    import_codesystem(store, SCT_META, sct_concepts(), progress=False)
    yield app
    store.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def store(app):
    return app.extensions["synthport"]["store"]


def post(client, path, body, **headers):
    return client.post(f"/fhir/{path}", data=orjson.dumps(body), content_type=JSON, headers=headers)


def condition(code, system=SCT, display=None, pid="p1"):
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"resourceType": "Condition", "subject": {"reference": f"Patient/{pid}"},
            "code": {"coding": [coding]}}


def params_of(body: dict) -> dict:
    """Parameters -> {name: first value or parts}."""
    out = {}
    for p in body.get("parameter", []):
        val = next((v for k, v in p.items() if k.startswith("value")), p.get("part"))
        out.setdefault(p["name"], val)
    return out


def assert_oo(resp, status, code=None):
    assert resp.status_code == status, resp.data
    body = resp.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"][0]["severity"] == "error"
    if code:
        assert body["issue"][0]["code"] == code, body
    return body
