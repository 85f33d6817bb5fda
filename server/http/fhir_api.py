"""FHIR R4 REST blueprint (FHIR R4 http §3.1.0). Routes parse, call a source, serialise.

The same blueprint factory serves the real source at ``/fhir`` and, later, synthetic
cohorts at ``/synthetic/<cohort>/fhir``: routes only see the :class:`Source` protocol.
"""
from __future__ import annotations

import functools
import re
from typing import Callable

import orjson
from flask import Blueprint, Response, current_app, g, request

from server.errors import (InvalidRequest, NotAcceptable, NotFound, TooLarge, UnsupportedMediaType)
from server.fhir import bundles
from server.fhir.capability import capability_statement
from server.fhir.openapi import openapi_document
from server.fhir.terminology_ops import OPERATION_NAMES
from server.fhir.timeutil import http_date, instant, parse_http_date
from server.fhir.validation import validate
from server.http.security import with_claims
from server.source import RequestContext, Source, StoredResource, WriteResult

FHIR_JSON = "application/fhir+json"
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "text/json")
_SAFE_BASE = re.compile(r"^[A-Za-z0-9+.\-]+://[A-Za-z0-9.\-_:\[\]]+(/[A-Za-z0-9._~\-/]*)?$")


def make_fhir_blueprint(name: str, url_prefix: str,
                        get_source: Callable[[], Source]) -> Blueprint:
    """Build the FHIR REST blueprint for one source."""
    bp = Blueprint(name, __name__, url_prefix=url_prefix)

    def ctx() -> RequestContext:
        return build_context(request.view_args or {})

    # --- system level -----------------------------------------------------------
    @bp.get("/metadata")
    def metadata():
        src = get_source()
        return fhir_response(capability_statement(ctx().base_url, src.writable, src.name))

    @bp.get("/openapi.json")
    def openapi():
        src = get_source()
        return Response(_openapi_bytes(ctx().base_url, src.writable, src.name),
                        content_type="application/json")

    @bp.post("")
    @bp.post("/")
    def system_bundle():
        return fhir_response(get_source().bundle(ctx(), read_body()))

    @bp.get("")
    @bp.get("/")
    def system_search():
        c = ctx()
        result = get_source().search(c, None, query_params())
        return raw_response(bundles.search_bundle_bytes(c, None, result, ""))

    @bp.post("/_search")
    def system_search_post():
        c = ctx()
        result = get_source().search(c, None, query_params() + form_params())
        return raw_response(bundles.search_bundle_bytes(c, None, result, ""))

    @bp.get("/_history")
    def system_history():
        c = ctx()
        result = get_source().history(c, None, None, query_params())
        return raw_response(bundles.history_bundle_bytes(c, "_history", result))

    # --- type level -------------------------------------------------------------
    @bp.get("/<res_type>")
    def search(res_type: str):
        c = ctx()
        result = get_source().search(c, res_type, query_params())
        return raw_response(bundles.search_bundle_bytes(c, res_type, result))

    @bp.post("/<res_type>/_search")
    def search_post(res_type: str):
        c = ctx()
        result = get_source().search(c, res_type, query_params() + form_params())
        return raw_response(bundles.search_bundle_bytes(c, res_type, result))

    @bp.post("/<res_type>")
    def create(res_type: str):
        c = ctx()
        r = get_source().create(c, res_type, read_body(), request.headers.get("If-None-Exist"))
        return write_response(c, r)

    @bp.put("/<res_type>")
    def conditional_update(res_type: str):
        c = ctx()
        return write_response(c, get_source().conditional_update(c, res_type, query_params(), read_body()))

    @bp.delete("/<res_type>")
    def conditional_delete(res_type: str):
        c = ctx()
        return write_response(c, get_source().conditional_delete(c, res_type, query_params()))

    @bp.get("/<res_type>/_history")
    def type_history(res_type: str):
        c = ctx()
        result = get_source().history(c, res_type, None, query_params())
        return raw_response(bundles.history_bundle_bytes(c, f"{res_type}/_history", result))

    @bp.post("/<res_type>/$validate")
    @bp.post("/<res_type>/<res_id>/$validate")
    def validate_op(res_type: str, res_id: str | None = None):
        get_source().authenticate(ctx())          # no stored data, but only for callers
        body = read_body()
        if isinstance(body, dict) and body.get("resourceType") == "Parameters":
            parameters = body.get("parameter")
            body = next((p.get("resource") for p in parameters if isinstance(p, dict)
                         and p.get("name") == "resource"), None) if isinstance(parameters, list) else None
        validate(body, res_type)
        return fhir_response({"resourceType": "OperationOutcome", "issue": [
            {"severity": "information", "code": "informational", "diagnostics": "Validation successful"}]})

    # --- terminology operations (FHIR R4 §4.8.15, §4.9.18, §4.10.14) --------------
    def terminology_op(res_type: str, name: str, res_id: str | None = None):
        c = ctx()
        if request.method == "POST":
            params = form_params()
            if not params:
                body = read_body()
                if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
                    raise InvalidRequest(f"The body of ${name} must be a Parameters resource")
                # Query parameters of a POST count as well (as HAPI accepts them).
                extra = [{"name": k, "valueString": v} for k, v in query_params()]
                params = dict(body, parameter=list(body.get("parameter") or ()) + extra) if extra else body
            else:
                params = query_params() + params
        else:
            params = query_params()
        return fhir_response(get_source().operation(c, res_type, res_id, name, params))

    for _type, _names in OPERATION_NAMES.items():
        for _name in _names:
            bp.add_url_rule(f"/{_type}/${_name}", f"op_{_type}_{_name}", functools.partial(
                terminology_op, _type, _name), methods=["GET", "POST"])
            bp.add_url_rule(f"/{_type}/<res_id>/${_name}", f"op_{_type}_{_name}_instance",
                            functools.partial(terminology_op, _type, _name), methods=["GET", "POST"])

    # --- instance level ---------------------------------------------------------
    @bp.get("/<res_type>/<res_id>")
    def read(res_type: str, res_id: str):
        stored = get_source().read(ctx(), res_type, res_id)
        return not_modified(stored) or resource_response(stored)

    @bp.put("/<res_type>/<res_id>")
    def update(res_type: str, res_id: str):
        c = ctx()
        r = get_source().update(c, res_type, res_id, read_body(), request.headers.get("If-Match"))
        return write_response(c, r)

    @bp.patch("/<res_type>/<res_id>")
    def patch(res_type: str, res_id: str):
        c = ctx()
        r = get_source().patch(c, res_type, res_id, read_body(patch=True), request.headers.get("If-Match"))
        return write_response(c, r)

    @bp.delete("/<res_type>/<res_id>")
    def delete(res_type: str, res_id: str):
        c = ctx()
        return write_response(c, get_source().delete(c, res_type, res_id))

    @bp.get("/<res_type>/<res_id>/_history")
    def instance_history(res_type: str, res_id: str):
        c = ctx()
        result = get_source().history(c, res_type, res_id, query_params())
        return raw_response(bundles.history_bundle_bytes(c, f"{res_type}/{res_id}/_history", result))

    @bp.get("/<res_type>/<res_id>/_history/<version>")
    def vread(res_type: str, res_id: str, version: str):
        if not (version.isascii() and version.isdigit()):   # "9²".isdigit() is true
            raise NotFound(f"Version '{version}' is not known")
        return resource_response(get_source().vread(ctx(), res_type, res_id, int(version)))

    # --- $deidentify (docs/deidentification.md): an export, through the guard ---------
    @bp.route("/Patient/<res_id>/$deidentify", methods=["GET", "POST"])
    def deidentify_patient(res_id: str):
        return fhir_response(get_source().deidentify_patient(
            ctx(), res_id, deid_engine(), query_params() + form_params()))

    @bp.post("/$deidentify")
    def deidentify_body():
        return fhir_response(get_source().deidentify_body(ctx(), read_body(), deid_engine()))

    @bp.route("/Patient/<res_id>/$everything", methods=["GET", "POST"])
    def everything(res_id: str):
        c = ctx()
        result = get_source().everything(c, res_id, query_params() + form_params())
        result.self_params = query_params()
        return raw_response(bundles.search_bundle_bytes(c, "Patient", result, f"Patient/{res_id}/$everything"))

    return bp


# ------------------------------------------------------------------------ helpers
def build_context(view_args: dict) -> RequestContext:
    """Request context: base URL as the client called it, Prefer, handling."""
    cfg = current_app.config["SYNTHPORT"]
    prefix = request.blueprint and current_app.blueprints[request.blueprint].url_prefix or ""
    # URL values a blueprint took off the route (``/synthetic/<cohort>/fhir``) still name the base.
    view_args = {**g.get("url_prefix_values", {}), **view_args}
    for k, v in view_args.items():
        if f"<{k}>" in prefix:
            prefix = prefix.replace(f"<{k}>", str(v))
    base = _base_url(cfg.get("public_base_url") or request.host_url, prefix)
    prefer = request.headers.get("Prefer")
    ret, handling = "representation", cfg.get("search_handling", "lenient")
    if prefer:
        for part in prefer.replace(";", ",").split(","):
            k, _, v = part.strip().partition("=")
            if k == "return" and v in ("minimal", "representation", "OperationOutcome"):
                ret = v
            elif k == "handling" and v in ("strict", "lenient"):
                handling = v
    ctx = RequestContext(base_url=base, handling=handling, prefer_return=ret,
                         request_id=request.headers.get("X-Request-Id", ""))
    return with_claims(ctx, "dicomweb" if "dicomweb" in prefix else "fhir")


@functools.lru_cache(maxsize=256)
def _base_url(host_url: str, prefix: str) -> str:
    """Absolute base for links (FHIR R4 http §3.1.0.1.7); a Host header that is not a
    plain host[:port] is refused, since it ends up in every link we write."""
    base = host_url.rstrip("/") + prefix
    if not _SAFE_BASE.match(base):
        raise InvalidRequest("Invalid Host header")
    return base


@functools.lru_cache(maxsize=4)
def _openapi_bytes(base_url: str, writable: bool, name: str) -> bytes:
    """The OpenAPI description of a source (2-3 MB, built once per base URL)."""
    return orjson.dumps(openapi_document(capability_statement(base_url, writable, name), base_url))


def deid_engine():
    """The FHIR de-identification engine of this worker, built once from the settings
    (set ``pseudonym_key_file`` so hashes and date shifts agree across workers)."""
    ext = current_app.extensions["synthport"]
    if ext.get("deid_engine") is None:
        from server.fhir.deidentify import engine_from_settings

        ext["deid_engine"] = engine_from_settings(current_app.config["SYNTHPORT"])
    return ext["deid_engine"]


def check_accept() -> None:
    """FHIR R4 http §3.1.0.1.8: JSON only; XML-only Accept gets 406."""
    fmt = request.args.get("_format")
    if fmt and not any(x in fmt for x in ("json",)):
        raise NotAcceptable(f"_format '{fmt}' is not supported; this server speaks JSON")
    accept = request.headers.get("Accept")
    if not accept or fmt:
        return
    if any(t in accept for t in ("json", "*/*", "application/*")):
        return
    raise NotAcceptable(f"Cannot produce '{accept}'; this server produces {FHIR_JSON}")


def read_body(patch: bool = False):
    ctype = (request.mimetype or "").lower()
    if patch:
        if ctype not in ("application/json-patch+json",) + _JSON_TYPES:
            raise UnsupportedMediaType(f"PATCH body type '{ctype}' not supported; "
                                       "use application/json-patch+json")
    elif ctype and ctype not in _JSON_TYPES:
        raise UnsupportedMediaType(f"Content-Type '{ctype}' is not supported; send {FHIR_JSON} "
                                   "(XML is not accepted)")
    data = request.get_data(cache=False)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    # Without Content-Length (chunked, RFC 9112 §7.1) Werkzeug stops reading at the limit
    # without an error: one byte more on the wire means the body was too large.
    if limit is not None and request.content_length is None and len(data) >= limit \
            and request.environ["wsgi.input"].read(1):
        raise TooLarge(f"Request body larger than the limit of {limit} bytes")
    if not data:
        raise InvalidRequest("Request body is empty")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Body is not valid JSON: {exc}") from None


def query_params() -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.args.items(multi=True) if k not in ("_format", "_pretty")]


def form_params() -> list[tuple[str, str]]:
    if request.mimetype == "application/x-www-form-urlencoded":
        return [(k, v) for k, v in request.form.items(multi=True)]
    return []


def fhir_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return raw_response(orjson.dumps(body), status, headers)


def raw_response(data: bytes, status: int = 200, headers: dict | None = None) -> Response:
    resp = Response(data, status=status, content_type=f"{FHIR_JSON}; charset=utf-8")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _version_headers(stored: StoredResource) -> dict:
    return {"ETag": stored.etag, "Last-Modified": http_date(stored.last_updated)}


def resource_response(stored: StoredResource, status: int = 200) -> Response:
    return raw_response(stored.body or b"", status, _version_headers(stored))


def not_modified(stored: StoredResource) -> Response | None:
    """If-None-Match / If-Modified-Since (FHIR R4 http §3.1.0.2, conditional read)."""
    inm = request.headers.get("If-None-Match")
    if inm:
        tags = {t.strip().removeprefix("W/").strip('"') for t in inm.split(",")}
        if str(stored.version) in tags or "*" in tags:
            return Response(status=304, headers=_version_headers(stored))
        return None
    ims = request.headers.get("If-Modified-Since")
    if ims:
        since = parse_http_date(ims)
        if since is not None and int(stored.last_updated) <= since:
            return Response(status=304, headers=_version_headers(stored))
    return None


def write_response(ctx: RequestContext, result: WriteResult) -> Response:
    """Honour Prefer: return=minimal|representation|OperationOutcome (FHIR R4 http §3.1.0.8)."""
    s = result.resource
    headers = {}
    if s is not None and not s.deleted:
        headers = _version_headers(s)
        if result.status == 201 or request.method in ("PUT", "PATCH", "POST"):
            headers["Location"] = f"{ctx.base_url}/{s.res_type}/{s.res_id}/_history/{s.version}"
    if result.status == 204 or (s is not None and s.deleted):
        return Response(status=204 if result.status == 204 else result.status, headers=headers)
    if ctx.prefer_return == "minimal" or s is None:
        return Response(status=result.status, headers=headers)
    if ctx.prefer_return == "OperationOutcome":
        oo = result.outcome or {"resourceType": "OperationOutcome", "issue": [
            {"severity": "information", "code": "informational",
             "diagnostics": f"{request.method} {s.res_type}/{s.res_id} version {s.version} "
                            f"at {instant(s.last_updated)}"}]}
        return fhir_response(oo, result.status, headers)
    return raw_response(s.body, result.status, headers)
