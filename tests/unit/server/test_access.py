"""Access control on the real source (server/access.py) through the HTTP app with
``auth = required``: tokens, scopes, the patient compartment (OWASP API1), granular
scopes, research consent, batches and transactions, DICOMweb and DIMSE callers."""
from __future__ import annotations

import io

import orjson
import pydicom
import pytest

from server.app import create_app
from server.errors import Forbidden, Unauthorized
from server.source import RequestContext
from tests.unit.server.dicom.factory import multipart, series_of

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"


@pytest.fixture
def app(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path), "auth": "required"})
    yield app
    app.extensions["synthport"]["store"].engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


def bearer(app, scope: str, patient: str | None = None, **kw) -> dict:
    token = app.extensions["synthport"]["tokens"].mint(scope, patient=patient, **kw)
    return {"Authorization": f"Bearer {token}"}


def obs(pid: str, category: str, code: str = "8867-4") -> dict:
    cat_system, cat_code = "http://terminology.hl7.org/CodeSystem/observation-category", category
    return {"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": cat_system, "code": cat_code}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 70}}


@pytest.fixture
def world(app, client):
    """Patients a and b, their observations, a practitioner; b denies research use."""
    admin = bearer(app, "system/*.cruds")

    def put(body):
        r = client.put(f"/fhir/{body['resourceType']}/{body['id']}", json=body, headers=admin)
        assert r.status_code in (200, 201), r.data

    put({"resourceType": "Patient", "id": "a", "name": [{"family": "Alpha"}]})
    put({"resourceType": "Patient", "id": "b", "name": [{"family": "Beta"}]})
    put({"resourceType": "Practitioner", "id": "doc", "name": [{"family": "Doc"}]})
    put(dict(obs("a", "laboratory"), id="a-lab"))
    put(dict(obs("a", "vital-signs"), id="a-vital", performer=[{"reference": "Practitioner/doc"}]))
    put(dict(obs("b", "laboratory"), id="b-lab"))
    put({"resourceType": "Consent", "id": "b-optout", "status": "active",
         "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "research"}]},
         "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
         "patient": {"reference": "Patient/b"},
         "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                    "code": "OPTOUT"}]},
         "provision": {"type": "deny"}})
    return admin


def ids(resp) -> set[str]:
    assert resp.status_code == 200, resp.data
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in resp.get_json().get("entry", [])}


# ------------------------------------------------------------------ authentication
def test_no_token_401_with_challenge_metadata_public(client, world):
    r = client.get("/fhir/Patient/a")
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.get_json()["issue"][0]["code"] == "login"
    assert client.get("/fhir/metadata").status_code == 200
    assert client.get("/dicomweb/studies").status_code == 401


def test_forged_expired_and_malformed_tokens_401(app, client, world, tmp_path):
    other = create_app({"database_url": app.config["SYNTHPORT"]["database_url"],
                        "data_dir": str(tmp_path / "other"), "auth": "required"})
    forged = bearer(other, "system/*.cruds")          # signed by another server key
    r = client.get("/fhir/Patient/a", headers=forged)
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    tokens = app.extensions["synthport"]["tokens"]
    expired = bearer(app, "system/*.rs", lifetime=60)
    real_clock = tokens.clock
    tokens.clock = lambda: real_clock() + 3600
    try:
        assert client.get("/fhir/Patient/a", headers=expired).status_code == 401
    finally:
        tokens.clock = real_clock
    assert client.get("/fhir/Patient/a", headers=expired).status_code == 200
    assert client.get("/fhir/Patient/a", headers={"Authorization": "Basic Zm9vOmJhcg=="}).status_code == 401
    token = bearer(app, "system/*.rs")["Authorization"]
    tampered = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    assert client.get("/fhir/Patient/a", headers={"Authorization": tampered}).status_code == 401
    other.extensions["synthport"]["store"].engine.dispose()


def test_insufficient_scope_403(app, client, world):
    h = bearer(app, "system/Patient.rs")
    assert client.get("/fhir/Patient/a", headers=h).status_code == 200
    r = client.get("/fhir/Observation/a-lab", headers=h)
    assert r.status_code == 403 and r.get_json()["issue"][0]["code"] == "forbidden"
    assert client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=h).status_code == 403
    assert client.delete("/fhir/Patient/a", headers=h).status_code == 403
    # search needs 's', read needs 'r'
    h_read = bearer(app, "system/Patient.r")
    assert client.get("/fhir/Patient/a", headers=h_read).status_code == 200
    assert client.get("/fhir/Patient", headers=h_read).status_code == 403
    # v1 scopes map onto v2
    h_v1 = bearer(app, "system/Observation.read")
    assert client.get("/fhir/Observation", headers=h_v1).status_code == 200
    assert client.post("/fhir/Observation", json=obs("a", "laboratory"), headers=h_v1).status_code == 403


# ------------------------------------------------------------------ patient compartment
def test_patient_token_sees_only_its_patient(app, client, world):
    h = bearer(app, "patient/*.rs", patient="a")
    assert client.get("/fhir/Patient/a", headers=h).status_code == 200
    assert client.get("/fhir/Patient/b", headers=h).status_code == 404
    assert client.get("/fhir/Observation/b-lab", headers=h).status_code == 404
    assert client.get("/fhir/Observation/b-lab/_history/1", headers=h).status_code == 404
    assert client.get("/fhir/Patient/b/_history", headers=h).status_code == 404
    assert ids(client.get("/fhir/Observation", headers=h)) == {"Observation/a-lab", "Observation/a-vital"}
    assert ids(client.get("/fhir/Observation?subject=Patient/b", headers=h)) == set()
    assert ids(client.get("/fhir/Patient", headers=h)) == {"Patient/a"}
    assert ids(client.get("/fhir/Observation?subject.family=Beta", headers=h)) == set()
    got = ids(client.get("/fhir/Observation?_include=Observation:subject", headers=h))
    assert "Patient/b" not in got and "Patient/a" in got
    got = ids(client.get("/fhir/Patient?_revinclude=Observation:subject", headers=h))
    assert got == {"Patient/a", "Observation/a-lab", "Observation/a-vital"}
    r = client.get("/fhir/Patient/a/$everything", headers=h)
    assert "Observation/b-lab" not in ids(r) and "Observation/a-lab" in ids(r)
    assert client.get("/fhir/Patient/b/$everything", headers=h).status_code == 404
    hist = ids(client.get("/fhir/_history", headers=h))
    assert hist and not any(x in hist for x in ("Patient/b", "Observation/b-lab", "Consent/b-optout"))
    assert client.get("/fhir/Practitioner/doc", headers=h).status_code == 200
    assert client.get("/fhir/Practitioner?_has:Observation:performer:subject=Patient/b",
                      headers=h).status_code == 403


def test_patient_token_writes_only_its_patient(app, client, world):
    h = bearer(app, "patient/Observation.cruds", patient="a")
    assert client.post("/fhir/Observation", json=obs("b", "laboratory"), headers=h).status_code == 403
    assert client.post("/fhir/Observation", json=obs("a", "laboratory"), headers=h).status_code == 201
    assert client.delete("/fhir/Observation/b-lab", headers=h).status_code == 404
    assert client.put("/fhir/Observation/b-lab", json=dict(obs("a", "laboratory"), id="b-lab"),
                      headers=h).status_code == 404
    assert client.get("/fhir/Observation/b-lab", headers=world).status_code == 200


def test_patient_scopes_need_a_patient_bound_token(app, client, world):
    assert client.get("/fhir/Patient/a", headers=bearer(app, "patient/*.rs")).status_code == 403


# ------------------------------------------------------------------ granular scopes
def test_granular_scope_limits_to_matching_resources(app, client, world):
    h = bearer(app, f"system/Observation.rs?category={LAB}")
    assert ids(client.get("/fhir/Observation", headers=h)) == {"Observation/a-lab", "Observation/b-lab"}
    assert client.get("/fhir/Observation/a-lab", headers=h).status_code == 200
    assert client.get("/fhir/Observation/a-vital", headers=h).status_code == 404


# ------------------------------------------------------------------ bundles
def test_batch_entries_checked_one_by_one(app, client, world):
    h = bearer(app, "patient/*.cruds", patient="a")
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/a"}},
        {"request": {"method": "GET", "url": "Patient/b"}},
        {"request": {"method": "GET", "url": "Observation"}},
        {"request": {"method": "POST", "url": "Observation"}, "resource": obs("b", "laboratory")},
        {"request": {"method": "POST", "url": "Observation"}, "resource": obs("a", "laboratory")},
    ]}
    r = client.post("/fhir", json=batch, headers=h)
    assert r.status_code == 200, r.data
    statuses = [e["response"]["status"].split()[0] for e in r.get_json()["entry"]]
    assert statuses == ["200", "404", "200", "403", "201"]
    inner = r.get_json()["entry"][2]["resource"]
    assert all(e["resource"]["subject"]["reference"] == "Patient/a" for e in inner["entry"])


def test_transaction_with_a_forbidden_entry_writes_nothing(app, client, world):
    h = bearer(app, "patient/*.cruds", patient="a")
    before = client.get("/fhir/Observation?_summary=count", headers=world).get_json()["total"]
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation"}, "resource": obs("a", "laboratory")},
        {"request": {"method": "POST", "url": "Observation"}, "resource": obs("b", "laboratory")},
    ]}
    r = client.post("/fhir", json=tx, headers=h)
    assert r.status_code == 403 and "entry[1]" in r.get_json()["issue"][0]["diagnostics"]
    after = client.get("/fhir/Observation?_summary=count", headers=world).get_json()["total"]
    assert after == before


# ------------------------------------------------------------------ consent
def test_research_purpose_honours_opt_out(app, client, world):
    h = bearer(app, "system/*.rs", purpose="research")
    assert client.get("/fhir/Patient/a", headers=h).status_code == 200
    assert client.get("/fhir/Patient/b", headers=h).status_code == 404
    assert client.get("/fhir/Observation/b-lab", headers=h).status_code == 404
    assert ids(client.get("/fhir/Patient", headers=h)) == {"Patient/a"}
    assert "Observation/b-lab" not in ids(client.get("/fhir/Observation", headers=h))
    assert client.get("/fhir/Patient/b/$everything", headers=h).status_code == 404
    # care (no research purpose) still sees b
    assert client.get("/fhir/Patient/b", headers=bearer(app, "system/*.rs")).status_code == 200


def test_consent_policy_opt_in(app, world):
    from server.consent import ConsentPolicy

    store = app.extensions["synthport"]["store"]
    assert ConsentPolicy(store, "opt-out").allowed("a")
    assert not ConsentPolicy(store, "opt-out").allowed("b")
    opt_in = ConsentPolicy(store, "opt-in")
    assert not opt_in.allowed("a") and not opt_in.allowed("b")


# ------------------------------------------------------------------ DICOMweb and DIMSE
def _stow(client, headers, **attrs):
    study, _, files = series_of(1, **attrs)
    ctype, body = multipart(files)
    r = client.post("/dicomweb/studies", data=body, content_type=ctype,
                    headers={"Accept": "application/dicom+json", **headers})
    return study, r


def test_dicomweb_needs_imagingstudy_scope_and_compartment(app, client, world):
    admin = bearer(app, "system/*.cruds")
    study, r = _stow(client, bearer(app, "system/Patient.rs"), PatientID="MRN-7")
    assert r.status_code == 403
    study, r = _stow(client, admin, PatientID="MRN-7", PatientName="Seven^Pat")
    assert r.status_code == 200, r.data
    linked = client.get("/fhir/Patient?identifier=MRN-7", headers=admin).get_json()["entry"][0]
    pid = linked["resource"]["id"]
    own = bearer(app, "patient/*.rs", patient=pid)
    other = bearer(app, "patient/*.rs", patient="a")
    studies = client.get("/dicomweb/studies", headers=own).get_json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [study]
    assert client.get("/dicomweb/studies", headers=other).status_code in (200, 204)
    assert not (client.get("/dicomweb/studies", headers=other).get_json(silent=True) or [])
    assert client.get(f"/dicomweb/studies/{study}/metadata", headers=other).status_code == 404
    assert client.get(f"/dicomweb/studies/{study}", headers=other).status_code == 404
    assert client.get(f"/dicomweb/studies/{study}/metadata", headers=own).status_code == 200
    assert client.get("/dicomweb/studies", headers=bearer(app, "system/Patient.rs")).status_code == 403


def test_dimse_calling_ae_acts_as_its_client(app, world):
    from server.auth.clients import Client
    ext = app.extensions["synthport"]
    guard = ext["dicomweb"]
    ctx = RequestContext(caller="STRANGER", channel="dimse")
    with pytest.raises(Unauthorized):
        guard.find(ctx, "STUDY", {})
    jwks = _a_jwks()
    ext["clients"].add(Client(client_id="modality", name="CT room", jwks=jwks, jwks_url=None,
                              scopes="system/ImagingStudy.cruds", ae_titles=["CTROOM"], purpose="",
                              deidentified=False, active=True))
    assert guard.find(RequestContext(caller="CTROOM", channel="dimse"), "STUDY", {}) == []
    # a DIMSE-only client: known by its AE title, no keys, no tokens
    ext["clients"].add(Client(client_id="viewer", name="viewer", jwks=None, jwks_url=None,
                              scopes="system/Patient.rs", ae_titles=["VIEWER"], purpose="",
                              deidentified=False, active=True))
    with pytest.raises(Forbidden):
        guard.find(RequestContext(caller="VIEWER", channel="dimse"), "STUDY", {})


def _a_jwks() -> dict:
    from joserfc.jwk import ECKey

    key = ECKey.generate_key("P-384", parameters={"alg": "ES384", "use": "sig"}, private=True)
    key.ensure_kid()
    return {"keys": [key.as_dict(private=False)]}


def test_pydicom_roundtrip_of_stored_instance(app, client, world):
    """The WADO-RS bytes a permitted caller gets are the stored instance."""
    admin = bearer(app, "system/*.cruds")
    study, r = _stow(client, admin, PatientID="MRN-8")
    assert r.status_code == 200
    meta = client.get(f"/dicomweb/studies/{study}/metadata", headers=admin).get_json()
    series = meta[0]["0020000E"]["Value"][0]
    sop = meta[0]["00080018"]["Value"][0]
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
                   headers={"Accept": 'multipart/related; type="application/dicom"', **admin})
    assert r.status_code == 200
    body = r.get_data()
    start = body.index(b"DICM") - 128
    ds = pydicom.dcmread(io.BytesIO(body[start:]), force=True)
    assert ds.SOPInstanceUID == sop
    assert orjson.loads(orjson.dumps({"ok": True}))["ok"]


# ------------------------------------------------------------------ audit
def audit_entries(app, client, **params) -> list[dict]:
    h = bearer(app, "system/AuditEvent.rs")
    r = client.get("/fhir/AuditEvent", query_string={"_count": "200", **params}, headers=h)
    assert r.status_code == 200, r.data
    return [e["resource"] for e in r.get_json().get("entry", [])]


def subtype(ev: dict) -> str:
    return ev["subtype"][0]["code"]


def test_every_interaction_is_audited_and_searchable_by_auditors(app, client, world):
    h = bearer(app, "patient/*.rs", patient="a")
    assert client.get("/fhir/Patient/a", headers=h).status_code == 200
    assert client.get("/fhir/Patient/b", headers=h).status_code == 404
    events = audit_entries(app, client, patient="a")
    reads = [e for e in events if subtype(e) == "read"]
    assert reads and reads[0]["outcome"] == "0"
    assert any(ent.get("what", {}).get("reference") == "Patient/a" for ent in reads[0]["entity"])
    # the refused read of b is there too, as a minor failure
    assert any(subtype(e) == "read" and e["outcome"] == "4" for e in audit_entries(app, client))
    # writes of the fixture, failed auth
    assert client.get("/fhir/Patient/a", headers={"Authorization": "Bearer nonsense"}).status_code == 401
    kinds = {subtype(e) for e in audit_entries(app, client)}
    assert {"update", "read", "auth-failure", "search-type"} <= kinds


def test_audit_events_are_not_writable_and_need_a_scope(app, client, world):
    admin = bearer(app, "system/*.cruds")
    ev = audit_entries(app, client)[0]
    r = client.post("/fhir/AuditEvent", json=ev, headers=admin)
    assert r.status_code == 405
    assert client.put(f"/fhir/AuditEvent/{ev['id']}", json=ev, headers=admin).status_code == 405
    assert client.delete(f"/fhir/AuditEvent/{ev['id']}", headers=admin).status_code == 405
    assert client.get("/fhir/AuditEvent", headers=bearer(app, "system/Patient.rs")).status_code == 403
    assert client.get(f"/fhir/AuditEvent/{ev['id']}", headers=admin).get_json()["id"] == ev["id"]
    assert client.get(f"/audit/entry/{ev['id']}", headers=bearer(app, "system/Patient.rs")).status_code == 403
    assert client.get("/audit/sth").status_code == 200


def test_write_fails_when_its_audit_entry_cannot_be_written(app, client, world, monkeypatch):
    admin = bearer(app, "system/*.cruds")
    log = app.extensions["synthport"]["audit"]

    def broken(event, conn=None):
        raise RuntimeError("disk full")

    monkeypatch.setattr(log, "append", broken)
    r = client.post("/fhir/Patient", json={"resourceType": "Patient", "id": "x",
                                           "name": [{"family": "Lost"}]}, headers=admin)
    assert r.status_code == 500
    r = client.get("/fhir/Patient/a", headers=admin)
    assert r.status_code == 500          # a read whose entry cannot be written gives nothing
    monkeypatch.undo()
    found = client.get("/fhir/Patient?family=Lost", headers=admin).get_json()
    assert found.get("total", len(found.get("entry", []))) == 0


def test_audit_verify_after_traffic(app, client, world):
    log = app.extensions["synthport"]["audit"]
    client.get("/fhir/Patient/a", headers=bearer(app, "system/*.rs"))
    report = log.verify()
    assert report.ok and report.checked > 5


def test_deidentified_access_gets_annex_e_dicom(db_url, tmp_path):
    import base64
    import os as _os

    key = tmp_path / "deid.key"
    key.write_text(base64.b64encode(_os.urandom(64)).decode())
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path / "d"), "auth": "required",
                      "dicom_deid_key_file": str(key)})
    client = app.test_client()
    admin = bearer(app, "system/*.cruds")
    study, r = _stow(client, admin, PatientID="MRN-9", PatientName="Nine^Secret")
    assert r.status_code == 200, r.data
    deid = bearer(app, "system/ImagingStudy.rs", deidentified=True)
    found = client.get(f"/dicomweb/studies?StudyInstanceUID={study}", headers=deid).get_json()
    assert found and "Secret" not in orjson.dumps(found).decode()
    meta = client.get(f"/dicomweb/studies/{study}/metadata", headers=deid).get_json()
    assert "Secret" not in orjson.dumps(meta).decode() and "MRN-9" not in orjson.dumps(meta).decode()
    series, sop = meta[0]["0020000E"]["Value"][0], meta[0]["00080018"]["Value"][0]
    assert meta[0]["00120062"]["Value"] == ["YES"]
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}",
                   headers={"Accept": 'multipart/related; type="application/dicom"', **deid})
    assert r.status_code == 200
    body = r.get_data()
    ds = pydicom.dcmread(io.BytesIO(body[body.index(b"DICM") - 128:]), force=True)
    assert ds.PatientIdentityRemoved == "YES" and "Secret" not in str(ds.PatientName)
    assert ds.SOPInstanceUID == sop            # Retain UIDs: the viewer can navigate
    # the same caller without the flag sees the real header
    plain = client.get(f"/dicomweb/studies/{study}/metadata", headers=admin).get_json()
    assert "Secret" in orjson.dumps(plain).decode()
    _c_get_as(app, "RESEARCH", study, sop, deidentified=True, expect_secret=False)
    _c_get_as(app, "RADIOLOGY", study, sop, deidentified=False, expect_secret=True)
    app.extensions["synthport"]["store"].engine.dispose()


def _c_get_as(app, ae_title: str, study: str, sop: str, *, deidentified: bool,
              expect_secret: bool) -> None:
    """C-GET a study over a real association as the DIMSE-only client ``ae_title``."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    from server.auth.clients import Client
    from server.dimse.server import start_dimse

    ext = app.extensions["synthport"]
    ext["clients"].add(Client(client_id=ae_title.lower(), name=ae_title, jwks=None, jwks_url=None,
                              scopes="system/ImagingStudy.rs", ae_titles=[ae_title], purpose="",
                              deidentified=deidentified, active=True))
    cfg = dict(app.config["SYNTHPORT"], dimse_host="127.0.0.1")
    server = start_dimse(cfg, ext["dicomweb"], port=0)
    got: dict[str, pydicom.Dataset] = {}

    def on_store(event):
        got[event.request.AffectedSOPInstanceUID] = event.dataset
        return 0x0000

    try:
        ae = AE(ae_title=ae_title)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title=cfg["ae_title"],
                             ext_neg=[build_role(CTImageStorage, scp_role=True)],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        q = pydicom.Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study
        statuses = [st.Status for st, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
        assoc.release()
    finally:
        server.shutdown()
    assert statuses[-1] == 0x0000 and list(got) == [sop]
    ds = got[sop]
    assert ("Secret" in str(ds.PatientName)) is expect_secret
    assert (ds.PatientID == "MRN-9") is expect_secret
    # PS3.15 E.1.1: the de-identified copy says so; the plain one carries no such mark
    assert (ds.get("PatientIdentityRemoved") == "YES") is not expect_secret
    assert ds.SOPInstanceUID == sop


# ------------------------------------------------------------------ $deidentify
def test_deidentify_operation_exports_only_consented_visible_data(app, client, world, tmp_path):
    from server.deid.pseudonym import new_key_file

    key = tmp_path / "psn.key"
    new_key_file(str(key))
    app.config["SYNTHPORT"]["pseudonym_key_file"] = str(key)
    admin = bearer(app, "system/*.cruds")
    client.put("/fhir/Patient/a", headers=admin, json={
        "resourceType": "Patient", "id": "a", "name": [{"family": "Alpha", "given": ["Ann"]}],
        "birthDate": "1980-04-02", "telecom": [{"system": "phone", "value": "+34 600 111 222"}]})
    r = client.get("/fhir/Patient/a/$deidentify", headers=admin)
    assert r.status_code == 200, r.data
    out = r.get_json()
    text = orjson.dumps(out).decode()
    assert out["type"] == "collection" and "Alpha" not in text and "600 111 222" not in text
    types = {e["resource"]["resourceType"] for e in out["entry"]}
    assert {"Patient", "Observation"} <= types
    ids_out = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in out["entry"]}
    for e in out["entry"]:
        ref = (e["resource"].get("subject") or {}).get("reference")
        assert ref is None or ref in ids_out          # references still resolve
    # b opted out of research use: nothing of b leaves, whoever asks
    assert client.get("/fhir/Patient/b/$deidentify", headers=admin).status_code == 403
    # a patient-bound token cannot export another patient
    assert client.get("/fhir/Patient/a/$deidentify",
                      headers=bearer(app, "patient/*.rs", patient="c")).status_code == 404
    assert client.get("/fhir/Patient/a/$deidentify").status_code == 401
    posted = client.post("/fhir/$deidentify", headers=admin, json={
        "resourceType": "Patient", "id": "z", "name": [{"family": "Zed"}]})
    assert posted.status_code == 200 and "Zed" not in posted.get_data(as_text=True)
    assert any(e["subtype"][0]["code"] == "operation" and e["outcome"] == "4"
               for e in audit_entries(app, client))


def test_validate_needs_a_caller_and_capabilities_tell_the_truth(app, client, world):
    body = {"resourceType": "Patient", "name": [{"family": "V"}]}
    assert client.post("/fhir/Patient/$validate", json=body).status_code == 401
    assert client.post("/fhir/Patient/$validate", json=body,
                       headers=bearer(app, "system/Patient.rs")).status_code == 200
    cs = client.get("/fhir/metadata").get_json()
    audit = next(r for r in cs["rest"][0]["resource"] if r["type"] == "AuditEvent")
    assert {i["code"] for i in audit["interaction"]} == {"read", "search-type"}
    assert {o["name"] for o in cs["rest"][0]["operation"]} == {"deidentify"}


# ------------------------------------------------------------------ patients of a stored body
def _stored(body: dict, raw: bytes | None = None):
    from server.source import StoredResource

    return StoredResource(body["resourceType"], body.get("id", "x"), 1, 0.0, False,
                          raw if raw is not None else orjson.dumps(body), "PUT")


@pytest.mark.parametrize("body", [
    {"resourceType": "Patient", "id": "p1", "link": [{"other": {"reference": "Patient/p2"}}]},
    {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/a"},
     "performer": [{"reference": "http://h/fhir/Patient/b/_history/3"}, {"reference": "Practitioner/z"}],
     "text": {"div": "<div>\"reference\": \"Patient/fake\"\n</div>"}},
    {"resourceType": "Encounter", "id": "e", "subject": {"reference": "Patient/"},
     "contained": [{"resourceType": "Group", "member": [{"entity": {"reference": "Patient/c"}}]}]},
    {"resourceType": "Observation", "id": "q", "subject": {"reference": "Patient/a\"b"}},
    {"resourceType": "Observation", "id": "n", "subject": {"display": "no reference"}},
])
def test_patients_of_stored_bytes_are_those_of_the_parsed_body(body):
    from server.access import patient_refs, stored_patient_refs

    assert stored_patient_refs(_stored(body)) == patient_refs(body)
    spaced = orjson.dumps(body, option=orjson.OPT_INDENT_2)      # another writer's spacing
    assert stored_patient_refs(_stored(body, spaced)) == patient_refs(body)


def test_patients_of_stored_bytes_agree_on_synthea(shared_data):
    import bz2

    from server.access import patient_refs, stored_patient_refs

    files = sorted((shared_data / "synthea-us-120").glob("*.json.bz2"))[:3]
    n = 0
    for f in files:
        for e in orjson.loads(bz2.decompress(f.read_bytes()))["entry"]:
            r = e["resource"]
            assert stored_patient_refs(_stored(r)) == patient_refs(r), r.get("id")
            n += 1
    assert n > 100


@pytest.mark.parametrize("body", [
    {"resourceType": "Patient", "id": "p1", "link": [{"other": {"reference": "Patient/p2"}}]},
    {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/a"},
     "meta": {"extension": [{"url": "http://x", "valueReference": {"reference": "Patient/m"}}]}},
    {"resourceType": "Observation", "id": "q", "subject": {"reference": "Patient/a\"b"}},
    {"resourceType": "Observation", "id": "n", "subject": {"display": "no reference"}},
])
def test_prepared_write_knows_its_patients_only_for_a_hook(body):
    """PendingWrite.prepare finds a version's patients before the write lock, as the
    audit hook would from the stored bytes; None asks the hook to scan (an escape)."""
    from server.access import patient_refs
    from server.store import WRITE_HOOK, PendingWrite

    assert PendingWrite(body["resourceType"], body["id"], dict(body), "PUT").prepare().patients is None
    token = WRITE_HOOK.set(lambda *a: None)
    try:
        item = PendingWrite(body["resourceType"], body["id"], dict(body), "PUT").prepare()
    finally:
        WRITE_HOOK.reset(token)
    if "\\" in orjson.dumps(body).decode():
        assert item.patients is None
    else:
        assert item.patients == patient_refs(body)


def test_transaction_audit_names_the_patients_of_every_entry(app, client, world):
    admin = bearer(app, "system/*.cruds")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
         "resource": {"resourceType": "Patient", "name": [{"family": "Tx"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final",
                      "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs("a", "vital-signs"), "request": {"method": "POST", "url": "Observation"}}]}
    r = client.post("/fhir", json=bundle, headers=admin)
    assert r.status_code == 200, r.data
    new_pid = r.get_json()["entry"][0]["response"]["location"].split("/")[1]
    entry = [e for e in audit_entries(app, client)
             if e["subtype"][0]["code"] == "transaction"][-1]
    named = {ent["what"]["reference"] for ent in entry["entity"]
             if ent.get("role", {}).get("code") == "1"}          # BALP: role Patient
    assert {f"Patient/{new_pid}", "Patient/a"} <= named
