"""The /audit blueprint on a small Flask app: JSON answers that verify, 400 on bad input."""
from __future__ import annotations

import base64

import orjson
import pytest
from flask import Flask, Response

from server.audit import merkle
from server.errors import SynthportError, outcome_for
from server.http.audit import make_audit_blueprint
from tests.unit.server.audit.conftest import fill


@pytest.fixture
def client(audit_log):
    app = Flask(__name__)
    app.register_blueprint(make_audit_blueprint(lambda: audit_log))

    @app.errorhandler(SynthportError)
    def _err(err):
        status, oo = outcome_for(err)
        return Response(orjson.dumps(oo), status=status, content_type="application/fhir+json")

    fill(audit_log, 11)
    return app.test_client()


def b64(s):
    return base64.b64decode(s)


def test_sth_and_proofs(client, audit_log):
    r = client.get("/audit/sth")
    assert r.status_code == 200 and r.content_type == "application/json"
    sth = r.get_json()
    assert sth["tree_size"] == 11 and audit_log.check_sth(sth)
    root = b64(sth["sha256_root_hash"])

    entry = client.get("/audit/entry/4")
    assert entry.status_code == 200 and orjson.loads(entry.data)["id"] == "4"
    leaf = merkle.leaf_hash(entry.data)  # the bytes served are the bytes hashed
    p = client.get("/audit/proof/inclusion?index=4&tree_size=11").get_json()
    assert merkle.verify_inclusion(4, 11, leaf, [b64(h) for h in p["inclusion_path"]], root)

    old = sth
    fill(audit_log, 5, 11)
    new = client.get("/audit/sth").get_json()
    assert new["tree_size"] == 16
    c = client.get("/audit/proof/consistency?first=11&second=16").get_json()
    assert merkle.verify_consistency(11, 16, b64(old["sha256_root_hash"]),
                                     b64(new["sha256_root_hash"]),
                                     [b64(h) for h in c["consistency_path"]])


@pytest.mark.parametrize("url,status", [
    ("/audit/proof/inclusion?index=4", 400),
    ("/audit/proof/inclusion?index=-1&tree_size=5", 400),
    ("/audit/proof/inclusion?index=x&tree_size=5", 400),
    ("/audit/proof/inclusion?index=11&tree_size=11", 400),
    ("/audit/proof/inclusion?index=0&tree_size=12", 400),
    ("/audit/proof/consistency?first=5", 400),
    ("/audit/proof/consistency?first=6&second=5", 400),
    ("/audit/entry/abc", 400),
    ("/audit/entry/99", 404),
])
def test_bad_parameters(client, url, status):
    r = client.get(url)
    assert r.status_code == status
    assert r.get_json()["resourceType"] == "OperationOutcome"


def test_nothing_is_writable(client):
    assert client.post("/audit/sth").status_code == 405
    assert client.put("/audit/entry/1", data=b"{}").status_code == 405
    assert client.delete("/audit/entry/1").status_code == 405
