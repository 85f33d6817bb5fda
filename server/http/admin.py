"""Admin API for synthetic cohorts and models.

* ``POST /admin/cohorts`` with ``{"name", "model", "size", "seed"[, "model_version"]}``:
  register a cohort and build its index (synchronously); 201 with the cohort.
* ``GET /admin/cohorts``: the cohorts; ``GET /admin/cohorts/<name>``: one.
* ``GET /admin/models``: the registered models (settings, timings, evaluation).
* ``GET /admin/models/<name>/evaluation`` (``?version=V``, default the newest): the
  report of ``synthport evaluate`` as JSON; ``.../evaluation.html``: the same as a page.

Errors are OperationOutcomes like the FHIR API's (400 bad input, 404 unknown model,
409 a name that exists). Access control hooks in with the rest of the server's.
"""
from __future__ import annotations

import orjson
from flask import Blueprint, Response, request

from server.errors import InvalidRequest
from server.http.synthetic import registry
from server.synthetic.cohort import create_cohort
from server.synthetic.evaluation import stored_evaluation, stored_evaluation_html


def _json(body, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def _version_arg() -> int | None:
    v = request.args.get("version")
    if v is None:
        return None
    if not (v.isascii() and v.isdigit()):
        raise InvalidRequest("version must be a positive integer")
    return int(v)


def make_admin_blueprint() -> Blueprint:
    bp = Blueprint("admin", __name__, url_prefix="/admin")

    @bp.post("/cohorts")
    def create():
        try:
            body = orjson.loads(request.get_data(cache=False) or b"null")
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"Body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidRequest('expected a JSON object {"name", "model", "size", "seed"}')
        missing = [k for k in ("name", "model", "size") if k not in body]
        if missing:
            raise InvalidRequest(f"missing {', '.join(missing)}")
        mv = body.get("model_version")
        if mv is not None and (not isinstance(mv, int) or isinstance(mv, bool)):
            raise InvalidRequest("model_version must be an integer")
        info = create_cohort(registry(), body["name"], str(body["model"]), body["size"],
                             body.get("seed", 0), body.get("model_version"))
        out = info.to_json()
        out["fhir"] = f"/synthetic/{info.name}/fhir"
        out["dicomweb"] = f"/synthetic/{info.name}/dicomweb"
        return _json(out, 201)

    @bp.get("/cohorts")
    def list_cohorts():
        return _json([dict(c.to_json(), fhir=f"/synthetic/{c.name}/fhir",
                           dicomweb=f"/synthetic/{c.name}/dicomweb") for c in registry().cohorts()])

    @bp.get("/cohorts/<name>")
    def one_cohort(name: str):
        return _json(registry().cohort(name).to_json())

    @bp.get("/models")
    def list_models():
        return _json([m.to_json() for m in registry().models()])

    @bp.get("/models/<name>/evaluation")
    def model_evaluation(name: str):
        return _json(stored_evaluation(registry(), name, _version_arg()))

    @bp.get("/models/<name>/evaluation.html")
    def model_evaluation_html(name: str):
        return Response(stored_evaluation_html(registry(), name, _version_arg()),
                        content_type="text/html; charset=utf-8")

    return bp
