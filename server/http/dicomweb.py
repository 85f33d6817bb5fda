"""DICOMweb blueprint (DICOM PS3.18): STOW-RS, QIDO-RS, WADO-RS over a DicomSource.

Routes only read the request and write the response; the transactions themselves are
in :mod:`server.dicom.web`. The same factory serves the real store at ``/dicomweb``
and, later, synthetic cohorts at ``/synthetic/<cohort>/dicomweb``.

Errors: a :class:`server.errors.SynthportError` answers
``ERROR_TABLE[...].dicomweb_status`` with ``{"errors": [{"status": .., "message": ..}]}``
(``application/json``; DICOMweb defines no error body, FHIR's OperationOutcome would be
out of place). CORS headers follow the ``dicomweb_cors_origins`` setting.
"""
from __future__ import annotations

import logging
from typing import Callable

import orjson
from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import HTTPException

from server.dicom import web
from server.dicom.source import DicomSource
from server.errors import SynthportError, describe
from server.http.fhir_api import build_context

log = logging.getLogger("synthport.dicomweb")

CORS_METHODS = "GET, HEAD, POST, OPTIONS"
CORS_HEADERS = "Accept, Content-Type, Authorization, Range, X-Request-Id"
CORS_EXPOSE = "Content-Type, Content-Length, Content-Location, Location, Warning"
CORS_MAX_AGE = "86400"


def make_dicomweb_blueprint(name: str, url_prefix: str,
                            get_source: Callable[[], DicomSource]) -> Blueprint:
    """Build the DICOMweb blueprint for one source.

    Args:
        name: blueprint name.
        url_prefix: mount point (``/dicomweb``).
        get_source: returns the :class:`DicomSource` to serve.
    """
    bp = Blueprint(name, __name__, url_prefix=url_prefix)

    def ctx():
        return build_context(request.view_args or {})

    def accept() -> str | None:
        return request.headers.get("Accept")

    def max_results() -> int:
        return int(current_app.config["SYNTHPORT"].get("max_count", 1000))

    # ------------------------------------------------------------ CORS, errors
    @bp.before_request
    def _preflight():
        if request.method == "OPTIONS":
            return preflight_response()
        return None

    @bp.after_request
    def _cors(resp: Response) -> Response:
        return add_cors(resp)

    @bp.errorhandler(SynthportError)
    def _error(err: SynthportError):
        return error_response(describe(err).dicomweb_status, err.message)

    @bp.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        return http_error_response(err)

    # ------------------------------------------------------------ STOW-RS (PS3.18 §10.5)
    @bp.post("/studies")
    @bp.post("/studies/<study>")
    def store(study: str | None = None):
        return send(web.stow(get_source(), ctx(), request.headers.get("Content-Type"),
                             request.get_data(cache=False), accept(), study))

    # ------------------------------------------------------------ QIDO-RS (PS3.18 §10.6)
    @bp.get("/studies")
    def search_studies():
        return send(web.qido(get_source(), ctx(), "STUDY", request.args.items(multi=True), accept(),
                             max_results=max_results()))

    @bp.get("/series")
    @bp.get("/studies/<study>/series")
    def search_series(study: str | None = None):
        return send(web.qido(get_source(), ctx(), "SERIES", request.args.items(multi=True), accept(),
                             study=study, max_results=max_results()))

    @bp.get("/instances")
    @bp.get("/studies/<study>/instances")
    @bp.get("/studies/<study>/series/<series>/instances")
    def search_instances(study: str | None = None, series: str | None = None):
        return send(web.qido(get_source(), ctx(), "IMAGE", request.args.items(multi=True), accept(),
                             study=study, series=series, max_results=max_results()))

    # ------------------------------------------------------------ WADO-RS (PS3.18 §10.4)
    @bp.get("/studies/<study>")
    @bp.get("/studies/<study>/series/<series>")
    @bp.get("/studies/<study>/series/<series>/instances/<sop>")
    def retrieve(study: str, series: str | None = None, sop: str | None = None):
        return send(web.retrieve(get_source(), ctx(), accept(), study, series, sop))

    @bp.get("/studies/<study>/metadata")
    @bp.get("/studies/<study>/series/<series>/metadata")
    @bp.get("/studies/<study>/series/<series>/instances/<sop>/metadata")
    def metadata(study: str, series: str | None = None, sop: str | None = None):
        return send(web.metadata(get_source(), ctx(), accept(), study, series, sop))

    @bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<frame_list>")
    def frames(study: str, series: str, sop: str, frame_list: str):
        return send(web.frames(get_source(), ctx(), accept(), study, series, sop, frame_list))

    @bp.get("/studies/<study>/series/<series>/instances/<sop>/bulkdata/<path:path>")
    def bulkdata(study: str, series: str, sop: str, path: str):
        return send(web.bulkdata(get_source(), ctx(), accept(), study, series, sop, path))

    @bp.get("/studies/<study>/series/<series>/instances/<sop>/rendered")
    @bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<frame_list>/rendered")
    def rendered(study: str, series: str, sop: str, frame_list: str | None = None):
        return send(web.rendered(get_source(), ctx(), accept(), request.args, study, series, sop,
                                 frame_list))

    @bp.get("/studies/<study>/thumbnail")
    @bp.get("/studies/<study>/series/<series>/thumbnail")
    @bp.get("/studies/<study>/series/<series>/instances/<sop>/thumbnail")
    @bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<frame_list>/thumbnail")
    def thumbnail(study: str, series: str | None = None, sop: str | None = None,
                  frame_list: str | None = None):
        return send(web.rendered(get_source(), ctx(), accept(), request.args, study, series, sop,
                                 frame_list, thumbnail=True))

    return bp


# ------------------------------------------------------------------------ helpers
def send(result: web.WebResponse) -> Response:
    """A :class:`server.dicom.web.WebResponse` as a Flask response."""
    resp = Response(result.body, status=result.status, content_type=result.content_type)
    for k, v in result.headers:
        resp.headers.add(k, v)
    return resp


def error_response(status: int, message: str) -> Response:
    """``{"errors": [{"status": .., "message": ..}]}`` with CORS headers."""
    body = orjson.dumps({"errors": [{"status": status, "message": message}]})
    return add_cors(Response(body, status=status, content_type="application/json"))


def http_error_response(err: HTTPException) -> Response:
    """A framework error (404 route, 405, 413) on a DICOMweb path."""
    status = err.code or 500
    msg = err.description or err.name
    if status == 413:
        msg = f"Request body larger than the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes"
    resp = error_response(status, msg)
    if status == 405:
        allow = dict(err.get_headers()).get("Allow")
        if allow:
            resp.headers["Allow"] = allow
    return resp


def _allowed_origin() -> str | None:
    setting = str(current_app.config["SYNTHPORT"].get("dicomweb_cors_origins", "*") or "").strip()
    if not setting:
        return None
    if setting == "*":
        return "*"
    origin = request.headers.get("Origin")
    allowed = {o.strip().rstrip("/") for o in setting.split(",") if o.strip()}
    return origin if origin and origin.rstrip("/") in allowed else None


def add_cors(resp: Response) -> Response:
    """CORS headers for DICOMweb responses (browser viewers such as OHIF), and
    ``Cross-Origin-Resource-Policy: cross-origin`` so a cross-origin-isolated page
    (OHIF with SharedArrayBuffer) may load them."""
    origin = _allowed_origin()
    if origin is None:
        return resp
    resp.headers["Access-Control-Allow-Origin"] = origin
    if origin != "*":
        resp.headers.add("Vary", "Origin")
    resp.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
    resp.headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    return resp


def preflight_response() -> Response:
    """OPTIONS: 204 with the allowed methods and headers (Fetch standard CORS preflight)."""
    resp = Response(status=204)
    resp.headers["Allow"] = CORS_METHODS
    if _allowed_origin() is not None:
        resp.headers["Access-Control-Allow-Methods"] = CORS_METHODS
        resp.headers["Access-Control-Allow-Headers"] = (
            request.headers.get("Access-Control-Request-Headers") or CORS_HEADERS)
        resp.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
    return resp


def is_dicomweb_path(path: str) -> bool:
    """Whether a request path is under a DICOMweb base (real or synthetic)."""
    return path.startswith("/dicomweb") or "/dicomweb/" in path or path.endswith("/dicomweb")
