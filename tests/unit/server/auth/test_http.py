"""The auth blueprint on a small Flask app: SMART configuration, token, introspection, JWKS."""
from __future__ import annotations

from urllib.parse import urlencode

import pytest
from flask import Flask
from joserfc import jwt
from joserfc.jwk import KeySet

from server.http.auth import make_auth_blueprint
from tests.unit.server.auth.conftest import assertion, token_form

BASE = "http://fhir.test"


@pytest.fixture
def http(env):
    app = Flask("auth-test")
    app.config["SYNTHPORT"] = env.cfg
    app.register_blueprint(make_auth_blueprint(lambda: env.service))
    env.add()
    app.config["SERVER_NAME"] = "fhir.test"  # the test client's Host
    return app.test_client()


@pytest.mark.parametrize("path", ["/.well-known/smart-configuration",
                                  "/fhir/.well-known/smart-configuration"])
def test_smart_configuration(http, path):
    r = http.get(path)
    assert r.status_code == 200 and r.mimetype == "application/json"
    c = r.get_json()
    assert c["token_endpoint"] == f"{BASE}/auth/token"
    assert c["introspection_endpoint"] == f"{BASE}/auth/introspect"
    assert c["jwks_uri"] == f"{BASE}/auth/jwks"
    assert c["grant_types_supported"] == ["client_credentials"]
    assert c["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert c["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert {"permission-v2", "permission-v1", "client-confidential-asymmetric"} <= set(c["capabilities"])
    assert "system/*.rs" in c["scopes_supported"]


def test_public_base_url_wins(env, http):
    env.cfg["public_base_url"] = "https://fhir.example.org"
    assert http.get("/.well-known/smart-configuration").get_json()["token_endpoint"] == \
        "https://fhir.example.org/auth/token"


def test_token_endpoint(http, env):
    r = http.post("/auth/token", data=token_form(assertion(env.ec, aud=f"{BASE}/auth/token")))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["Cache-Control"] == "no-store"
    body = r.get_json()
    assert body["token_type"] == "bearer" and body["scope"] == "system/*.rs"
    # the JWKS endpoint publishes the key that verifies it
    keys = KeySet.import_key_set(http.get("/auth/jwks").get_json())
    assert jwt.decode(body["access_token"], keys, algorithms=["ES384"]).claims["sub"] == "backend-1"
    assert all("d" not in k for k in http.get("/auth/jwks").get_json()["keys"])


def test_token_endpoint_errors(http, env):
    # aud must be this server's token URL
    r = http.post("/auth/token", data=token_form(assertion(env.ec, aud="http://elsewhere/auth/token")))
    assert r.status_code == 401 and r.get_json()["error"] == "invalid_client"
    assert "error_description" in r.get_json() and r.headers["Cache-Control"] == "no-store"
    r = http.post("/auth/token", json=token_form(assertion(env.ec, aud=f"{BASE}/auth/token")))
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_request"
    form = token_form(assertion(env.ec, aud=f"{BASE}/auth/token"))
    r = http.post("/auth/token", data=form | {"scope": "system/*.cud"})
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_scope"
    r = http.post("/auth/token", data=urlencode(list(form.items()) + [("scope", "system/Patient.rs")]),
                  content_type="application/x-www-form-urlencoded")
    assert r.status_code == 400 and "repeated" in r.get_json()["error_description"]


def test_introspect_endpoint(http, env):
    subject = env.service.mint("system/Patient.rs")
    r = http.post("/auth/introspect", data={"token": subject})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    r = http.post("/auth/introspect", data={"token": subject},
                  headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    caller = {"Authorization": f"Bearer {env.service.mint('system/*.rs')}"}
    r = http.post("/auth/introspect", data={"token": subject}, headers=caller)
    assert r.status_code == 200
    info = r.get_json()
    assert info["active"] is True and info["scope"] == "system/Patient.rs"
    r = http.post("/auth/introspect", data={"token": "junk"}, headers=caller)
    assert r.get_json() == {"active": False}
    r = http.post("/auth/introspect", data={}, headers=caller)
    assert r.status_code == 400 and r.get_json()["error"] == "invalid_request"
