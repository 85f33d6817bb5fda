"""Flask application factory: one blueprint per interface, errors as OperationOutcome."""
from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from server.access import security_layer
from server.config import load_config
from server.dicom.store import DicomStore
from server.errors import (HTTP_ISSUE_CODES, InvalidRequest, SynthportError, Unauthorized,
                           describe, operation_outcome, outcome_for)
from server.http.dicomweb import (error_response, http_error_response, is_dicomweb_path,
                                  make_dicomweb_blueprint)
from server.http.fhir_api import check_accept, make_fhir_blueprint
from server.store import SqlStore

log = logging.getLogger("synthport")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Create the WSGI app.

    Args:
        config: setting overrides (see :mod:`server.config`); env vars and the TOML
            file fill in the rest.
    """
    cfg = load_config(config)
    app = Flask("synthport")
    app.config["SYNTHPORT"] = cfg
    app.config["MAX_CONTENT_LENGTH"] = int(cfg["max_body_bytes"])
    store = SqlStore.from_url(cfg.resolved_database_url, cfg, auto_migrate=bool(cfg["auto_migrate"]))
    dicom = DicomStore(store, cfg)
    sec = security_layer(cfg, store, dicom)
    app.extensions["synthport"] = {"store": store, "dicom": dicom, **sec}

    # Routes see the guarded sources only (server/access.py): scopes, consent, audit.
    app.register_blueprint(make_fhir_blueprint("fhir", "/fhir", lambda: sec["fhir"]))
    app.register_blueprint(make_dicomweb_blueprint("dicomweb", "/dicomweb", lambda: sec["dicomweb"]))
    _register_security_blueprints(app, sec)
    # Synthetic cohorts (docs/synthetic.md): /synthetic/<cohort>/fhir|dicomweb, /admin.
    from server.http.admin import make_admin_blueprint
    from server.http.synthetic import register_synthetic

    register_synthetic(app)
    app.register_blueprint(make_admin_blueprint())

    @app.before_request
    def _accept():
        _refuse_nul()
        if request.path.startswith("/fhir"):
            check_accept()

    @app.errorhandler(SynthportError)
    def _synthport_error(err: SynthportError):
        if is_dicomweb_path(request.path):
            resp = error_response(describe(err).dicomweb_status, err.message)
        else:
            status, oo = outcome_for(err)
            if status >= 500:
                log.error("request failed: %s", err.message)
            resp = _oo_response(oo, status)
        if isinstance(err, Unauthorized):
            # RFC 6750 §3: say how to authenticate.
            resp.headers["WWW-Authenticate"] = 'Bearer realm="synthport", error="invalid_token"' \
                if request.headers.get("Authorization") else 'Bearer realm="synthport"'
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        if is_dicomweb_path(request.path):
            return http_error_response(err)
        status = err.code or 500
        msg = err.description or err.name
        if status == 413:
            msg = f"Request body larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes"
        return _oo_response(operation_outcome(msg, HTTP_ISSUE_CODES.get(status, "exception")), status,
                            err.get_headers() if status == 405 else None)

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        if is_dicomweb_path(request.path):
            return error_response(500, f"Internal error: {type(err).__name__}")
        return _oo_response(operation_outcome(f"Internal error: {type(err).__name__}", "exception"), 500)

    @app.get("/")
    def _root():
        return Response(orjson.dumps({"name": "synthport", "fhir": "/fhir",
                                      "metadata": "/fhir/metadata", "dicomweb": "/dicomweb"}),
                        content_type="application/json")

    return app


def _refuse_nul() -> None:
    """A NUL (``%00``) in the path, the query or a posted form is refused up front: no
    FHIR string or DICOM value may hold one (FHIR R4 datatypes §2.24.0.1, PS3.5 §6.1),
    and PostgreSQL text cannot, so a search that bound it failed with a 500 there."""
    def has_nul(pairs) -> bool:
        return any("\x00" in k or "\x00" in v for k, v in pairs)

    if "\x00" in request.path or has_nul(request.args.items(multi=True)) or (
            request.mimetype == "application/x-www-form-urlencoded"
            and has_nul(request.form.items(multi=True))):
        raise InvalidRequest("The request holds a NUL character (%00), which no FHIR string "
                             "or DICOM value may hold")


def _register_security_blueprints(app: Flask, sec: dict) -> None:
    """Token endpoints and the audit log's proofs. Tree heads and proofs hold hashes only
    and are public (RFC 9162 §4); an entry names patients and needs AuditEvent read."""
    from server.http.audit import make_audit_blueprint
    from server.http.auth import make_auth_blueprint
    from server.http.fhir_api import build_context

    app.register_blueprint(make_auth_blueprint(lambda: sec["tokens"]))
    audit_bp = make_audit_blueprint(lambda: sec["audit"])

    @audit_bp.before_request
    def _auditors_only():
        if request.path.startswith("/audit/entry") and sec["policy"].enforce:
            sec["policy"].check(build_context({}), "AuditEvent", "r")
        return None

    app.register_blueprint(audit_bp)


def _oo_response(oo: dict, status: int, headers=None) -> Response:
    resp = Response(orjson.dumps(oo), status=status, content_type="application/fhir+json; charset=utf-8")
    for k, v in (headers or []):
        if k.lower() == "allow":
            resp.headers[k] = v
    return resp


__all__ = ["create_app", "describe"]
