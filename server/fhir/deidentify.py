"""``$deidentify``: de-identified copies of what a source holds, or of a posted resource.

- ``Patient/{id}/$deidentify``: the patient's ``$everything`` (all pages) as a
  de-identified ``collection`` Bundle (:func:`deidentify_patient`);
- ``$deidentify`` with a body: a resource, a Bundle, or Parameters with ``resource``
  parameter(s) (:func:`deidentify_body`).

The engine is :class:`server.deid.fhir.DeidEngine`; :func:`engine_from_settings` builds it
from the ``deid_config`` and ``pseudonym_key_file`` settings (keys from files, never from
the database). Routing and access control live in the HTTP layer.
"""
from __future__ import annotations

import json
from typing import Mapping

from server.deid.fhir import DeidConfig, DeidEngine
from server.deid.pseudonym import load_key
from server.errors import InvalidRequest
from server.source import RequestContext, Source


def engine_from_settings(settings: Mapping) -> DeidEngine:
    """A DeidEngine for the configured ``deid_config`` (empty: the shipped default) and
    ``pseudonym_key_file`` (empty: no pseudonyms; hash and date keys then random per
    engine, so build the engine once and keep it)."""
    key_file = settings.get("pseudonym_key_file") or ""
    key = load_key(key_file) if key_file else None
    return DeidEngine(DeidConfig.load(settings.get("deid_config") or None), pseudonym_key=key)


def deidentify_patient(source: Source, ctx: RequestContext, patient_id: str,
                       engine: DeidEngine, params: list[tuple[str, str]] | None = None) -> dict:
    """The de-identified ``Patient/{id}/$everything`` as one ``collection`` Bundle.

    Every page of the source's ``everything`` is read (``next_params`` until None). All
    dates of the record are shifted by the offset of this patient (``Patient/{id}``), so
    intervals within the record are kept whatever the dateShiftScope.

    Args:
        params: ``$everything`` parameters (``_type``, ``_since``, ``_count`` ...).

    Raises:
        NotFound / Gone: from the source, for an unknown or deleted patient.
    """
    page: list[tuple[str, str]] | None = list(params or [])
    seen: set[tuple[str, str]] = set()
    resources: list[dict] = []
    pages = 0
    while page is not None:
        res = source.everything(ctx, patient_id, page)
        for stored in list(res.matches) + list(res.includes):
            if stored.deleted or stored.body is None:
                continue
            key = (stored.res_type, stored.res_id)
            if key not in seen:
                seen.add(key)
                resources.append(json.loads(stored.body))
        page = res.next_params
        pages += 1
        if pages > 100_000:   # a source whose next links never end
            raise InvalidRequest("$everything did not end")
    base = (ctx.base_url or "").rstrip("/")
    entries = []
    for r in resources:
        e: dict = {"resource": r}
        if base:
            e = {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r}
        entries.append(e)
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    return engine.apply_bundle(bundle, date_shift_prefix=f"Patient/{patient_id}")


def deidentify_body(body: dict, engine: DeidEngine) -> dict:
    """De-identify a posted resource or Bundle, or the ``resource`` parameter(s) of a
    Parameters body (one: that resource comes back; several: Parameters with each)."""
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise InvalidRequest("$deidentify takes a FHIR resource, a Bundle, or Parameters with "
                             "a 'resource' parameter")
    if body["resourceType"] == "Parameters":
        found = [p.get("resource") for p in body.get("parameter") or []
                 if isinstance(p, dict) and p.get("name") == "resource"]
        if not found or not all(isinstance(r, dict) for r in found):
            raise InvalidRequest("Parameters for $deidentify need a 'resource' parameter "
                                 "holding a resource")
        done = [_one(r, engine) for r in found]
        if len(done) == 1:
            return done[0]
        return {"resourceType": "Parameters",
                "parameter": [{"name": "resource", "resource": r} for r in done]}
    return _one(body, engine)


def _one(resource: dict, engine: DeidEngine) -> dict:
    if resource.get("resourceType") == "Bundle":
        return engine.apply_bundle(resource)
    return engine.apply(resource)
