"""End-to-end: `synthport serve` with ``auth = required``, driven by real clients.

SMART Backend Services (a client assertion signed with the client's own key, then
fhirpy with the token), a patient-bound token (OWASP API1), DIMSE peers known by
their calling AE title (pynetdicom as the peer), and `synthport audit verify` before
and after an audit row is edited in SQL.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.e2e.server import free_port, run_server, synthport_command

pytestmark = pytest.mark.e2e

REFUSED_NOT_AUTHORIZED = 0x0124


def cli(data_dir, db_url, *args, check=True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHPORT_")}
    if db_url:
        env["SYNTHPORT_DATABASE_URL"] = db_url
    out = subprocess.run(synthport_command() + [*args, "--data-dir", str(data_dir)],
                         capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture
def secured(tmp_path, db_url):
    dport = free_port()
    env = {"SYNTHPORT_AUTH": "required", "SYNTHPORT_DIMSE_PORT": str(dport),
           "SYNTHPORT_DIMSE_HOST": "127.0.0.1"}
    with run_server(tmp_path, db_url, extra_env=env) as base:
        yield base, tmp_path / "synthport-data", dport


def backend_token(base: str, data_dir, db_url, tmp_path) -> str:
    from joserfc import jwt
    from joserfc.jwk import ECKey, KeySet

    key = ECKey.generate_key("P-384", parameters={"alg": "ES384"}, private=True)
    key.ensure_kid()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(KeySet([key]).as_dict(private=False)))
    cli(data_dir, db_url, "client", "add", "backend", "--jwks", str(jwks), "--scope", "system/*.cruds")
    root = base.removesuffix("/fhir")
    conf = requests.get(root + "/.well-known/smart-configuration", timeout=30).json()
    assert "client-confidential-asymmetric" in conf["capabilities"]
    token_url = conf["token_endpoint"]
    assertion = jwt.encode({"alg": "ES384", "kid": key.kid, "typ": "JWT"},
                           {"iss": "backend", "sub": "backend", "aud": token_url,
                            "exp": int(time.time()) + 240, "jti": uuid.uuid4().hex},
                           key, algorithms=["ES384"])
    form = {"grant_type": "client_credentials", "scope": "system/*.cruds",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}
    r = requests.post(token_url, data=form, timeout=30)
    assert r.status_code == 200, r.text
    again = requests.post(token_url, data=form, timeout=30)       # same jti: a replay
    assert again.status_code in (400, 401) and again.json()["error"] == "invalid_client"
    return r.json()["access_token"]


def test_backend_services_fhirpy_and_patient_compartment(secured, db_url, tmp_path):
    from fhirpy import SyncFHIRClient

    base, data_dir, _ = secured
    assert requests.get(base + "/Patient", timeout=30).status_code == 401
    assert requests.get(base + "/metadata", timeout=30).status_code == 200
    token = backend_token(base, data_dir, db_url, tmp_path)
    c = SyncFHIRClient(base, authorization=f"Bearer {token}")
    a = c.resource("Patient", name=[{"family": "Alpha"}])
    a.save()
    b = c.resource("Patient", name=[{"family": "Beta"}])
    b.save()
    c.resource("Observation", status="final", code={"text": "x"},
               subject={"reference": f"Patient/{b.id}"}).save()
    assert {p.id for p in c.resources("Patient").fetch_all()} >= {a.id, b.id}

    mine = cli(data_dir, db_url, "token", "--scope", "patient/*.rs", "--patient", a.id).stdout.strip()
    h = {"Authorization": f"Bearer {mine}"}
    assert requests.get(f"{base}/Patient/{a.id}", headers=h, timeout=30).status_code == 200
    assert requests.get(f"{base}/Patient/{b.id}", headers=h, timeout=30).status_code == 404
    bundle = requests.get(f"{base}/Observation", headers=h, timeout=30).json()
    assert not bundle.get("entry")
    assert requests.get(f"{base}/Patient/{b.id}/$everything", headers=h, timeout=30).status_code == 404
    assert requests.post(f"{base}/Patient", json={"resourceType": "Patient"}, headers=h,
                         timeout=30).status_code == 403


def test_dimse_peer_needs_a_registered_ae_title(secured, db_url, tmp_path):
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

    _, data_dir, dport = secured

    def find(aet: str) -> list[int]:
        ae = AE(ae_title=aet)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", dport, ae_title="SYNTHPORT")
        assert assoc.is_established
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        statuses = [s.Status for s, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
                    if s is not None and "Status" in s]
        assoc.release()
        return statuses

    assert find("STRANGER") == [REFUSED_NOT_AUTHORIZED]
    cli(data_dir, db_url, "client", "add", "ct-room", "--ae-title", "CTROOM",
        "--scope", "system/ImagingStudy.cruds")
    ae = AE(ae_title="CTROOM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", dport, ae_title="SYNTHPORT")
    assert assoc.is_established
    status = assoc.send_c_store(dcmread(get_testdata_file("CT_small.dcm")))
    assoc.release()
    assert status.Status == 0x0000
    statuses = find("CTROOM")
    assert statuses[-1] == 0x0000 and 0xFF00 in statuses


def test_audit_verify_catches_an_edited_row(secured, db_url, tmp_path):
    base, data_dir, _ = secured
    tok = cli(data_dir, db_url, "token", "--scope", "system/*.rs").stdout.strip()
    for _ in range(3):
        requests.get(base + "/Patient", headers={"Authorization": f"Bearer {tok}"}, timeout=30)
    requests.get(base + "/Patient", headers={"Authorization": "Bearer forged"}, timeout=30)
    ok = cli(data_dir, db_url, "audit", "verify")
    assert "OK" in ok.stdout or "ok" in ok.stdout.lower()
    url = db_url or f"sqlite:///{data_dir / 'synthport.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        row = conn.execute(text("SELECT seq, entry FROM audit_entry ORDER BY seq LIMIT 1 OFFSET 2")).first()
        edited = bytes(row.entry).replace(b'"outcome":"', b'"outcome":"1', 1)
        assert edited != bytes(row.entry)
        conn.execute(text("UPDATE audit_entry SET entry = :e WHERE seq = :s"), {"e": edited, "s": row.seq})
    engine.dispose()
    bad = cli(data_dir, db_url, "audit", "verify", check=False)
    assert bad.returncode != 0
    assert str(row.seq) in (bad.stdout + bad.stderr)


def test_read_entries_reach_the_log_without_anyone_reading_it(secured, db_url, tmp_path):
    """SQLite: reads are spooled and `synthport serve`'s merger process moves them into the
    log on its own; PostgreSQL: they are written before the answer."""
    base, data_dir, _ = secured
    tok = cli(data_dir, db_url, "token", "--scope", "system/*.rs").stdout.strip()
    url = db_url or f"sqlite:///{data_dir / 'synthport.db'}"
    engine = create_engine(url)

    def logged() -> int:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM audit_entry WHERE subtype = 'search-type'")
                                ).scalar_one()

    before = logged()
    for _ in range(5):
        r = requests.get(base + "/Patient", headers={"Authorization": f"Bearer {tok}"}, timeout=30)
        assert r.status_code == 200
    # within 4 s: the merger process merges every 0.2 s; the workers' own fallback thread
    # (should that process be gone) only every 5 s
    deadline = time.monotonic() + 4
    while logged() < before + 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logged() == before + 5
    engine.dispose()
    if url.startswith("sqlite"):
        spool = Path(url.split("///", 1)[1] + "-audit-spool")
        assert spool.is_dir()
        mergers = []
        for p in Path("/proc").glob("[0-9]*"):
            try:
                args = (p / "cmdline").read_bytes().split(b"\0")
                env = (p / "environ").read_bytes()
            except OSError:
                continue
            if b"merge" in args and b"--every" in args and str(tmp_path).encode() in env:
                mergers.append(p.name)
        assert len(mergers) == 1, "synthport serve runs one audit merger process"
        assert "entries merged" in cli(data_dir, db_url, "audit", "merge").stdout
