"""Synthetic cohort endpoints: FHIR at ``/synthetic/<cohort>/fhir`` and DICOMweb at
``/synthetic/<cohort>/dicomweb``, the same blueprints as the real source.

The ``cohort`` URL value is taken off the route (``url_value_preprocessor``) and the
cohort's sources are resolved from the registry; an unknown cohort answers 404 (an
OperationOutcome on FHIR, a DICOMweb error body on DICOMweb).
"""
from __future__ import annotations

import time

import orjson
from flask import Flask, Response, current_app, g, request

from server.access import GuardedDicomSource, GuardedSource, synthetic_policy
from server.fhir.openapi import openapi_document
from server.http.dicomweb import make_dicomweb_blueprint
from server.http.fhir_api import build_context, check_accept, fhir_response, make_fhir_blueprint
from server.synthetic.cohort import load_cohort
from server.synthetic.dicom import SyntheticDicomSource
from server.synthetic.registry import Registry
from server.synthetic.source import SyntheticSource

# A cohort is looked up in the registry at most this often per process (a created or
# re-created cohort is seen within this many seconds by every worker).
LOOKUP_TTL_S = 2.0


def registry(app: Flask | None = None) -> Registry:
    app = app or current_app
    ext = app.extensions["synthport"]
    reg = ext.get("registry")
    if reg is None:
        reg = ext["registry"] = Registry(ext["store"].engine, app.config["SYNTHPORT"]["data_dir"])
    return reg


def _sources(name: str) -> tuple[SyntheticSource, SyntheticDicomSource]:
    ext = current_app.extensions["synthport"]
    cache = ext.setdefault("synthetic_sources", {})
    hit = cache.get(name)
    now = time.monotonic()
    if hit is not None and now - hit[0] < LOOKUP_TTL_S:
        return hit[1], hit[2]
    cfg = current_app.config["SYNTHPORT"]
    cohort = load_cohort(registry(), name, int(cfg.get("synthetic_cache_patients") or 1000))
    if hit is not None and hit[1].cohort is cohort:
        fhir, dicom = hit[1], hit[2]
    else:
        # Guarded like the real source (server/access.py): open by default, audited.
        policy = synthetic_policy(cfg, name, ext.get("audit"), ext.get("clients"))
        fhir = GuardedSource(SyntheticSource(cohort, cfg), policy)
        dicom = GuardedDicomSource(SyntheticDicomSource(
            cohort, scan_budget=int(cfg.get("synthetic_scan_budget") or 200)), policy)
    cache[name] = (now, fhir, dicom)
    return fhir, dicom


def register_synthetic(app: Flask) -> None:
    """Mount the cohort FHIR and DICOMweb blueprints on ``app``."""
    fhir_bp = make_fhir_blueprint("synthetic_fhir", "/synthetic/<cohort>/fhir",
                                  lambda: _sources(g.synthetic_cohort)[0])
    dicom_bp = make_dicomweb_blueprint("synthetic_dicomweb", "/synthetic/<cohort>/dicomweb",
                                       lambda: _sources(g.synthetic_cohort)[1])

    for bp in (fhir_bp, dicom_bp):
        @bp.url_value_preprocessor
        def _pop_cohort(endpoint, values):
            name = (values or {}).pop("cohort", None)
            g.synthetic_cohort = name
            g.url_prefix_values = {"cohort": name}

    @fhir_bp.before_request
    def _fhir_checks():
        check_accept()
        _sources(g.synthetic_cohort)   # 404 for an unknown cohort, before any route
        if request.method == "GET" and request.path.rstrip("/").endswith("/fhir/metadata"):
            src = _sources(g.synthetic_cohort)[0]
            return fhir_response(src.capabilities(build_context({}).base_url))
        if request.method == "GET" and request.path.endswith("/fhir/openapi.json"):
            # The OpenAPI description of what this cohort's CapabilityStatement declares.
            base = build_context({}).base_url
            doc = openapi_document(_sources(g.synthetic_cohort)[0].capabilities(base), base)
            return Response(orjson.dumps(doc), content_type="application/json")
        return None

    @dicom_bp.before_request
    def _dicom_checks():
        if request.method != "OPTIONS":
            _sources(g.synthetic_cohort)
        return None

    app.register_blueprint(fhir_bp)
    app.register_blueprint(dicom_bp)
