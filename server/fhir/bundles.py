"""Bundle rendering (searchset, history) straight from stored JSON bytes.

Stored bodies are already the JSON a client should see, so a page is assembled by
concatenating bytes; bodies are parsed only when ``_elements``/``_summary`` ask for
a subset (FHIR R4 search §3.1.1.5.7, §3.1.1.5.8).
"""
from __future__ import annotations

import uuid
from urllib.parse import urlencode

import orjson

from server.fhir.timeutil import instant, now
from server.source import RequestContext, SearchResult, StoredResource

# Elements kept by _summary=true beyond the mandatory ones (subset: isSummary elements of
# common types would need the StructureDefinitions; we keep ids, meta, status, codes,
# subjects and identifiers, documented in docs/fhir.md).
_SUMMARY_KEEP = {"resourceType", "id", "meta", "implicitRules", "identifier", "status", "code",
                 "subject", "patient", "name", "gender", "birthDate", "active", "category",
                 "effectiveDateTime", "issued", "period", "class", "type", "clinicalStatus",
                 "verificationStatus", "onsetDateTime", "recordedDate", "intent", "medicationCodeableConcept",
                 "modality", "started", "url", "version", "title", "date", "deceasedBoolean",
                 "deceasedDateTime", "telecom", "address", "managingOrganization", "link",
                 "vaccineCode", "occurrenceDateTime", "performedDateTime", "performedPeriod",
                 "authoredOn", "encounter", "series", "numberOfSeries", "numberOfInstances"}
_MANDATORY = {"resourceType", "id", "meta"}
_SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


def subset(body: dict, summary: str | None, elements: list[str] | None) -> dict:
    """Apply _summary / _elements to one resource, tagging it SUBSETTED."""
    if elements:
        keep = _MANDATORY | {e.split(".", 1)[0] for e in elements}
        out = {k: v for k, v in body.items() if k in keep}
    elif summary == "true":
        out = {k: v for k, v in body.items() if k in _SUMMARY_KEEP}
    elif summary == "data":
        out = {k: v for k, v in body.items() if k != "text"}
    elif summary == "text":
        out = {k: v for k, v in body.items() if k in _MANDATORY | {"text"}}
    else:
        return body
    meta = dict(out.get("meta") or {})
    meta["tag"] = list(meta.get("tag") or []) + [_SUBSETTED]
    out["meta"] = meta
    return out


def render_body(stored: StoredResource, summary: str | None = None,
                elements: list[str] | None = None) -> bytes:
    if stored.body is None:
        return b"null"
    if not summary and not elements or summary == "false":
        return stored.body
    return orjson.dumps(subset(orjson.loads(stored.body), summary, elements))


def link(ctx: RequestContext, path: str, params: list[tuple[str, str]] | None) -> str:
    q = urlencode(params or [])
    return f"{ctx.base_url}/{path}".rstrip("/") + (f"?{q}" if q else "")


def page_links(ctx: RequestContext, path: str, result: SearchResult) -> list[dict]:
    """self / next / previous links (FHIR R4 http §3.1.0.1.7: absolute, as the client called)."""
    links = [{"relation": "self", "url": link(ctx, path, result.self_params)}]
    if result.next_params is not None:
        links.append({"relation": "next", "url": link(ctx, path, result.next_params)})
    if result.prev_params is not None:
        links.append({"relation": "previous", "url": link(ctx, path, result.prev_params)})
    return links


def _assemble(head: dict, entries: list[bytes]) -> bytes:
    """Serialise a Bundle whose entries are pre-rendered JSON fragments."""
    head_bytes = orjson.dumps(head)
    if not entries:
        return head_bytes
    return head_bytes[:-1] + b',"entry":[' + b",".join(entries) + b"]}"


def search_bundle_bytes(ctx: RequestContext, res_type: str | None, result: SearchResult,
                        path: str | None = None) -> bytes:
    """A searchset Bundle (FHIR R4 search §3.1.1.2) as JSON bytes."""
    path = path if path is not None else (res_type or "")
    head: dict = {"resourceType": "Bundle", "id": str(uuid.uuid4()),
                  "meta": {"lastUpdated": instant(now())}, "type": "searchset"}
    if result.total is not None:
        head["total"] = result.total
    head["link"] = page_links(ctx, path, result)
    entries: list[bytes] = []
    if not result.summary_count:
        for mode, group in (("match", result.matches), ("include", result.includes)):
            for s in group:
                full = f"{ctx.base_url}/{s.res_type}/{s.res_id}".encode()
                entries.append(b'{"fullUrl":"' + full + b'","resource":'
                               + render_body(s, result.summary, result.elements)
                               + b',"search":{"mode":"' + mode.encode() + b'"}}')
    if result.warnings:
        oo = {"resourceType": "OperationOutcome",
              "issue": [{"severity": "warning", "code": "not-supported", "diagnostics": w}
                        for w in result.warnings]}
        entries.append(orjson.dumps({"resource": oo, "search": {"mode": "outcome"}}))
    return _assemble(head, entries)


def search_bundle(ctx: RequestContext, res_type: str | None, result: SearchResult) -> dict:
    return orjson.loads(search_bundle_bytes(ctx, res_type, result))


def history_bundle_bytes(ctx: RequestContext, path: str, result: SearchResult) -> bytes:
    """A history Bundle (FHIR R4 http §3.1.0.11): deletions appear as request DELETE entries."""
    head: dict = {"resourceType": "Bundle", "id": str(uuid.uuid4()),
                  "meta": {"lastUpdated": instant(now())}, "type": "history",
                  "total": result.total}
    head["link"] = page_links(ctx, path, result)
    entries = []
    for s in result.matches:
        full = f"{ctx.base_url}/{s.res_type}/{s.res_id}"
        if s.deleted:
            request = {"method": "DELETE", "url": f"{s.res_type}/{s.res_id}"}
            response = {"status": "204 No Content", "lastModified": instant(s.last_updated)}
            entries.append(orjson.dumps({"fullUrl": full, "request": request, "response": response}))
            continue
        method = "POST" if s.version == 1 else "PUT"
        url = s.res_type if method == "POST" else f"{s.res_type}/{s.res_id}"
        status = "201 Created" if s.version == 1 else "200 OK"
        tail = orjson.dumps({"request": {"method": method, "url": url},
                             "response": {"status": status, "etag": s.etag,
                                          "lastModified": instant(s.last_updated)}})
        entries.append(b'{"fullUrl":"' + full.encode() + b'","resource":' + s.body + b"," + tail[1:])
    return _assemble(head, entries)
