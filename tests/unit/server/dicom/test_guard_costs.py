"""The cheaper paths of the DICOM access guard (server/access.py) keep its rules: the
patients a search is audited with come from the store's rows, and a DIMSE calling AE
title's client is looked up at most once per AE_CLIENT_TTL seconds."""
from __future__ import annotations

import pytest

import server.access as access
from server.app import create_app
from server.auth.clients import Client
from server.errors import Unauthorized
from server.source import RequestContext
from tests.unit.server.dicom.factory import multipart, series_of


@pytest.fixture
def app(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path), "auth": "required"})
    yield app
    app.extensions["synthport"]["store"].engine.dispose()


def bearer(app, scope: str) -> dict:
    return {"Authorization": "Bearer " + app.extensions["synthport"]["tokens"].mint(scope)}


def audit_entries(app, client, **params) -> list[dict]:
    r = client.get("/fhir/AuditEvent", query_string={"_count": "200", **params},
                   headers=bearer(app, "system/AuditEvent.rs"))
    assert r.status_code == 200, r.data
    return [e["resource"] for e in r.get_json().get("entry", [])]


def test_search_is_audited_with_the_linked_patients(app):
    client = app.test_client()
    admin = bearer(app, "system/*.cruds")
    for pid in ("MRN-1", "MRN-2"):
        _, _, files = series_of(1, PatientID=pid)
        ctype, body = multipart(files)
        r = client.post("/dicomweb/studies", data=body, content_type=ctype,
                        headers={"Accept": "application/dicom+json", **admin})
        assert r.status_code == 200, r.data
    fhir_ids = {}
    for pid in ("MRN-1", "MRN-2"):
        found = client.get("/fhir/Patient", query_string={"identifier": pid}, headers=admin)
        fhir_ids[pid] = found.get_json()["entry"][0]["resource"]["id"]
    r = client.get("/dicomweb/studies", query_string={"PatientID": "MRN-2"},
                   headers={"Accept": "application/dicom+json", **admin})
    assert r.status_code == 200 and len(r.get_json()) == 1
    searches = [e for e in audit_entries(app, client, patient=fhir_ids["MRN-2"])
                if e["subtype"][0]["code"] == "dicomweb-search"]
    assert searches and searches[0]["outcome"] == "0"
    # only the patient whose study matched
    assert not [e for e in audit_entries(app, client, patient=fhir_ids["MRN-1"])
                if e["subtype"][0]["code"] == "dicomweb-search"]


def test_dimse_client_lookup_is_cached_for_a_few_seconds(app, monkeypatch):
    ext = app.extensions["synthport"]
    guard, clients = ext["dicomweb"], ext["clients"]
    clients.add(Client(client_id="ct-room", ae_titles=["CTROOM"], scopes="system/ImagingStudy.rs"))
    calls = []
    real = clients.by_ae_title
    monkeypatch.setattr(clients, "by_ae_title", lambda aet: calls.append(aet) or real(aet))
    now = [1000.0]
    monkeypatch.setattr(access.time, "monotonic", lambda: now[0])
    ctx = RequestContext(caller="CTROOM", channel="dimse")
    for _ in range(5):
        assert guard.find(ctx, "STUDY", {}) == []
    assert calls == ["CTROOM"]                       # one registry query for five requests
    clients.remove("ct-room")
    now[0] += access.AE_CLIENT_TTL / 2
    assert guard.find(ctx, "STUDY", {}) == []        # still remembered
    now[0] += access.AE_CLIENT_TTL
    with pytest.raises(Unauthorized):                # then the removal applies
        guard.find(ctx, "STUDY", {})
    assert calls == ["CTROOM", "CTROOM"]
