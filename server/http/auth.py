"""HTTP face of the token service (SMART App Launch v2, SMART Backend Services).

* ``GET /.well-known/smart-configuration`` and ``/fhir/.well-known/smart-configuration``:
  the SMART configuration (SMART App Launch v2 §"Conformance").
* ``POST /auth/token``: client credentials with ``private_key_jwt`` (RFC 6749 §4.4,
  RFC 7523 §2.2); errors are RFC 6749 §5.2 JSON, never OperationOutcomes.
* ``POST /auth/introspect``: RFC 7662; the caller presents a valid access token itself.
* ``GET /auth/jwks``: the public key that signs access tokens (RFC 7517 §5).
"""
from __future__ import annotations

from typing import Callable

import orjson
from flask import Blueprint, Response, current_app, request

from server.auth.keys import server_jwks
from server.auth.tokens import OAuthError, TokenService
from server.errors import Unauthorized
from server.http.fhir_api import _base_url

FORM = "application/x-www-form-urlencoded"
CAPABILITIES = ["permission-v2", "permission-v1", "client-confidential-asymmetric"]
SCOPES_SUPPORTED = ["system/*.cruds", "system/*.rs", "user/*.cruds", "user/*.rs",
                    "patient/*.cruds", "patient/*.rs"]
# RFC 6749 §5.1: token responses (and errors) must not be cached.
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _json(body, status: int = 200, headers: dict | None = None) -> Response:
    resp = Response(orjson.dumps(body), status=status, content_type="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _oauth_error(error: str, description: str, status: int, headers: dict | None = None) -> Response:
    return _json({"error": error, "error_description": description}, status,
                 {**_NO_STORE, **(headers or {})})


def server_root() -> str:
    """Absolute URL of the server root: ``public_base_url`` or the request's host."""
    cfg = current_app.config.get("SYNTHPORT") or {}
    return _base_url(cfg.get("public_base_url") or request.host_url, "")


def _form() -> dict[str, str]:
    """The request's form parameters; RFC 6749 §3.2: form-encoded, none repeated."""
    if request.mimetype != FORM:
        raise OAuthError("invalid_request", f"the request body must be {FORM}")
    out: dict[str, str] = {}
    for k, values in request.form.lists():
        if len(values) > 1:
            raise OAuthError("invalid_request", f"parameter '{k}' is repeated")
        out[k] = values[0]
    return out


def make_auth_blueprint(get_service: Callable[[], TokenService]) -> Blueprint:
    """Build the blueprint (no url_prefix); ``get_service`` returns the TokenService."""
    bp = Blueprint("auth", __name__)

    @bp.get("/.well-known/smart-configuration")
    @bp.get("/fhir/.well-known/smart-configuration")
    def smart_configuration():
        root = server_root()
        return _json({
            "token_endpoint": f"{root}/auth/token",
            "introspection_endpoint": f"{root}/auth/introspect",
            "jwks_uri": f"{root}/auth/jwks",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": SCOPES_SUPPORTED,
            "capabilities": CAPABILITIES,
        })

    @bp.post("/auth/token")
    def token():
        try:
            out = get_service().token(_form(), f"{server_root()}/auth/token")
        except OAuthError as err:
            return _oauth_error(err.error, err.message, err.status)
        return _json(out, 200, _NO_STORE)

    @bp.post("/auth/introspect")
    def introspect():
        service = get_service()
        # RFC 7662 §2.1: the endpoint itself requires authorization (a bearer token here).
        scheme, _, caller = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not caller.strip():
                raise Unauthorized("A bearer access token is required")
            service.verify(caller.strip())
        except Unauthorized as err:
            # RFC 6750 §3: challenge with the Bearer scheme.
            return _oauth_error("invalid_token", err.message, 401,
                                {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        try:
            form = _form()
        except OAuthError as err:
            return _oauth_error(err.error, err.message, err.status)
        if not form.get("token"):
            return _oauth_error("invalid_request", "the token parameter is required", 400)
        return _json(service.introspect(form["token"]), 200, _NO_STORE)

    @bp.get("/auth/jwks")
    def jwks():
        cfg = get_service().cfg
        return _json(server_jwks(cfg), 200, {"Cache-Control": "public, max-age=300"})

    return bp
