"""An OpenAPI 3.0.3 description of a FHIR source, derived from its CapabilityStatement.

The document says no more than the CapabilityStatement (FHIR R4 §2.40) does: every path
comes from a declared interaction, operation or search parameter, so the two cannot
drift apart. It exists for generic HTTP tooling (API fuzzers such as schemathesis,
client generators, gateways); FHIR clients should keep reading ``/metadata``.

Schemas are deliberately permissive (an object with a ``resourceType``): the FHIR
StructureDefinitions, not this document, define resource content.
"""
from __future__ import annotations

from typing import Any

from server.fhir.terminology_ops import OPERATIONS as _TERMINOLOGY_OPERATIONS

FHIR_JSON = "application/fhir+json"
JSON_PATCH = "application/json-patch+json"
FORM = "application/x-www-form-urlencoded"

# Search result parameters (FHIR R4 search §3.1.1.5.x), accepted by every search.
_RESULT_PARAMS = ("_count", "_sort", "_include", "_revinclude", "_summary", "_elements", "_total")
# Patient/$everything input parameters (FHIR R4 OperationDefinition Patient-everything).
_EVERYTHING_PARAMS = ("start", "end", "_since", "_type", "_count")
# History parameters (FHIR R4 http §3.1.0.11).
_HISTORY_PARAMS = ("_count", "_since", "_at")
_REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": _REF + name}


def _query(name: str, description: str | None = None) -> dict:
    p = {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
    if description:
        p["description"] = description
    return p


def _header(name: str, description: str) -> dict:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string"}}


def _resource_schema(res_type: str | None) -> dict:
    """An object naming its resourceType; any other content is left to FHIR validation."""
    rt: dict[str, Any] = {"type": "string"}
    if res_type:
        rt["enum"] = [res_type]
    return {"type": "object", "required": ["resourceType"],
            "properties": {"resourceType": rt}, "additionalProperties": True}


def _body(schema: dict, media_type: str = FHIR_JSON, required: bool = True) -> dict:
    return {"required": required, "content": {media_type: {"schema": schema}}}


def _fhir(description: str, schema: dict | None = None, headers: bool = False) -> dict:
    r: dict[str, Any] = {"description": description,
                         "content": {FHIR_JSON: {"schema": schema or _ref("Resource")}}}
    if headers:
        r["headers"] = {"ETag": {"schema": {"type": "string"}},
                        "Last-Modified": {"schema": {"type": "string"}}}
    return r


def _errors(responses: dict) -> dict:
    """Every 4xx answer is an OperationOutcome (FHIR R4 http §3.1.0.4)."""
    responses["4XX"] = {"$ref": "#/components/responses/Error"}
    return responses


def _op(op_id: str, summary: str, tags: list[str], responses: dict, parameters=None,
        body: dict | None = None, public: bool = False) -> dict:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": tags,
                          "responses": _errors(responses)}
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = body
    if public:
        op["security"] = []
    return op


def _no_content(description: str) -> dict:
    return {"description": description}


def openapi_document(capability: dict, base_url: str) -> dict:
    """Describe the REST interface declared by ``capability`` as OpenAPI 3.0.3.

    Args:
        capability: a CapabilityStatement as built by
            :func:`server.fhir.capability.capability_statement` (``rest[0]`` is read).
        base_url: the FHIR base the paths are relative to (``servers[0].url``).

    Returns:
        The OpenAPI document as a dict (JSON-serialisable).
    """
    rest = (capability.get("rest") or [{}])[0]
    paths: dict[str, dict] = {}
    tags = []

    def add(path: str, method: str, op: dict) -> None:
        paths.setdefault(path, {})[method] = op

    # --- system level (FHIR R4 http §3.1.0.1) --------------------------------------
    add("/metadata", "get", _op("metadata", "CapabilityStatement of this server", ["system"],
                                {"200": _fhir("CapabilityStatement", _resource_schema("CapabilityStatement"))},
                                [_query("mode", "full | normative | terminology")], public=True))
    system = {i["code"] for i in rest.get("interaction", [])}
    common = [_query(sp["name"], sp.get("documentation")) for sp in rest.get("searchParam", [])]
    if system & {"transaction", "batch"}:
        kinds = sorted(system & {"transaction", "batch"})
        add("/", "post", _op("transaction-batch", f"Process a {' or '.join(kinds)} Bundle", ["system"],
                            {"200": _fhir("transaction-response or batch-response Bundle", _ref("Bundle"))},
                            [_header("Prefer", "return=minimal|representation|OperationOutcome")],
                            _body(_ref("TransactionBundle"))))
    if "search-system" in system:
        params = common + [_query(p) for p in _RESULT_PARAMS] + [_query("_type")]
        add("/", "get", _op("search-system", "Search all resource types", ["system"],
                           {"200": _fhir("searchset Bundle", _ref("Bundle"))}, params))
        add("/_search", "post", _op("search-system-post", "Search all resource types (form)", ["system"],
                                    {"200": _fhir("searchset Bundle", _ref("Bundle"))}, None,
                                    _form(params, required=False)))
    if "history-system" in system:
        add("/_history", "get", _op("history-system", "History of all resources", ["system"],
                                    {"200": _fhir("history Bundle", _ref("Bundle"))},
                                    [_query(p) for p in _HISTORY_PARAMS]))

    for o in rest.get("operation", []):
        # System-level operations: POST [base]/$name with a resource (FHIR R4 operations §2.1.0.3).
        add(f"/${o['name']}", "post", _op(f"system-{o['name']}", f"${o['name']}", ["system"],
                                          {"200": _fhir("Operation result")}, None, _body(_ref("Resource"))))

    for res in rest.get("resource", []):
        t = res["type"]
        tags.append({"name": t})
        inter = {i["code"] for i in res.get("interaction", [])}
        search = [_query(sp["name"], sp.get("documentation")) for sp in res.get("searchParam", [])]
        search += [_query(p) for p in _RESULT_PARAMS if p not in {sp["name"] for sp in search}]
        ops = {o["name"] for o in res.get("operation", [])}
        schema = _resource_schema(t)
        id_p, vid_p = _ref_param("id"), _ref_param("vid")
        prefer = _ref_param("Prefer")
        if_match = _header("If-Match", 'Version-aware update: W/"<versionId>" (FHIR R4 http §3.1.0.5)')

        if "search-type" in inter:
            add(f"/{t}", "get", _op(f"{t}-search-type", f"Search {t}", [t],
                                    {"200": _fhir("searchset Bundle", _ref("Bundle"))}, search))
            add(f"/{t}/_search", "post", _op(f"{t}-search-type-post", f"Search {t} (form)", [t],
                                             {"200": _fhir("searchset Bundle", _ref("Bundle"))}, None,
                                             _form(search, required=False)))
        if "create" in inter:
            params = [prefer]
            if res.get("conditionalCreate"):
                params.append(_header("If-None-Exist", "Conditional create: a search query "
                                                       "(FHIR R4 http §3.1.0.8.1)"))
            add(f"/{t}", "post", _op(f"{t}-create", f"Create a {t}", [t], {
                "201": _fhir("Created", schema, headers=True),
                "200": _fhir("Conditional create matched an existing resource", schema, headers=True)},
                params, _body(schema)))
        if res.get("conditionalUpdate") and "update" in inter:
            add(f"/{t}", "put", _op(f"{t}-conditional-update", f"Conditional update of a {t}", [t], {
                "200": _fhir("Updated", schema, headers=True), "201": _fhir("Created", schema, headers=True)},
                search + [prefer], _body(schema)))
        if res.get("conditionalDelete") in ("single", "multiple") and "delete" in inter:
            add(f"/{t}", "delete", _op(f"{t}-conditional-delete", f"Conditional delete of a {t}", [t], {
                "200": _no_content("Deleted"), "204": _no_content("Deleted, or nothing matched")}, search))
        if "history-type" in inter:
            add(f"/{t}/_history", "get", _op(f"{t}-history-type", f"History of all {t} resources", [t],
                                             {"200": _fhir("history Bundle", _ref("Bundle"))},
                                             [_query(p) for p in _HISTORY_PARAMS]))
        if "read" in inter:
            params = [id_p]
            if res.get("conditionalRead") not in (None, "not-supported"):
                params += [_header("If-None-Match", 'W/"<versionId>" (FHIR R4 http §3.1.0.2)'),
                           _header("If-Modified-Since", "HTTP-date (RFC 9110 §13.1.3)")]
            add(f"/{t}/{{id}}", "get", _op(f"{t}-read", f"Read a {t}", [t], {
                "200": _fhir(t, schema, headers=True), "304": _no_content("Not modified")}, params))
        if "update" in inter:
            add(f"/{t}/{{id}}", "put", _op(f"{t}-update", f"Update (or create) a {t}", [t], {
                "200": _fhir("Updated", schema, headers=True), "201": _fhir("Created", schema, headers=True)},
                [id_p, if_match, prefer], _body(schema)))
        if "patch" in inter:
            add(f"/{t}/{{id}}", "patch", _op(f"{t}-patch", f"JSON Patch (RFC 6902) a {t}", [t], {
                "200": _fhir("Patched", schema, headers=True)},
                [id_p, if_match, prefer], _body(_ref("JsonPatch"), JSON_PATCH)))
        if "delete" in inter:
            add(f"/{t}/{{id}}", "delete", _op(f"{t}-delete", f"Delete a {t}", [t], {
                "200": _no_content("Deleted"), "204": _no_content("Deleted")}, [id_p]))
        if "history-instance" in inter:
            add(f"/{t}/{{id}}/_history", "get", _op(
                f"{t}-history-instance", f"History of one {t}", [t],
                {"200": _fhir("history Bundle", _ref("Bundle"))}, [id_p] + [_query(p) for p in _HISTORY_PARAMS]))
        if "vread" in inter:
            add(f"/{t}/{{id}}/_history/{{vid}}", "get", _op(
                f"{t}-vread", f"Read one version of a {t}", [t],
                {"200": _fhir(t, schema, headers=True)}, [id_p, vid_p]))

        for name in sorted(ops):
            if name == "everything" and t == "Patient":
                params = [id_p] + [_query(p) for p in _EVERYTHING_PARAMS]
                ok = {"200": _fhir("searchset Bundle", _ref("Bundle"))}
                add(f"/{t}/{{id}}/$everything", "get", _op("Patient-everything", "Patient/$everything",
                                                           [t], ok, params))
                add(f"/{t}/{{id}}/$everything", "post", _op("Patient-everything-post", "Patient/$everything",
                                                            [t], dict(ok), [id_p], _form(params[1:], False)))
            elif name == "validate":
                ok = {"200": _fhir("OperationOutcome", _ref("OperationOutcome"))}
                body = _body({"oneOf": [schema, _ref("Parameters")]})
                add(f"/{t}/$validate", "post", _op(f"{t}-validate", f"Validate a {t}", [t], ok, None, body))
                add(f"/{t}/{{id}}/$validate", "post", _op(f"{t}-validate-instance", f"Validate a {t}", [t],
                                                          dict(ok), [id_p], body))
            elif (t, name) in _TERMINOLOGY_OPERATIONS:
                qp = [_query(p) for p in _TERMINOLOGY_OPERATIONS[(t, name)].params]
                ok = {"200": _fhir("Parameters or the result resource")}
                for level, path, extra in (("", f"/{t}/${name}", []),
                                           ("-instance", f"/{t}/{{id}}/${name}", [id_p])):
                    add(path, "get", _op(f"{t}-{name}{level}", f"{t}/${name}", [t], dict(ok), extra + qp))
                    add(path, "post", _op(f"{t}-{name}{level}-post", f"{t}/${name}", [t], dict(ok),
                                          extra or None, _body(_ref("Parameters"))))
            else:
                # Another declared operation: invoked on an instance, by GET or by POST with
                # an optional Parameters body (FHIR R4 operations §2.1.0.4, §2.1.0.5).
                path, ok = f"/{t}/{{id}}/${name}", {"200": _fhir("Operation result")}
                add(path, "get", _op(f"{t}-{name}-instance", f"{t}/[id]/${name}", [t], ok, [id_p]))
                add(path, "post", _op(f"{t}-{name}-instance-post", f"{t}/[id]/${name}", [t], dict(ok),
                                      [id_p], _body(_ref("Parameters"), required=False)))

    return {
        "openapi": "3.0.3",
        "info": {
            "title": capability.get("title") or "FHIR R4 server",
            "version": str(capability.get("version") or "0"),
            "description": "Generated from this server's CapabilityStatement "
                           f"({capability.get('url', base_url + '/metadata')}); FHIR R4 "
                           f"{capability.get('fhirVersion', '4.0.1')}, JSON only.",
        },
        "servers": [{"url": base_url}],
        "security": [{"bearer": []}],
        "tags": [{"name": "system"}] + tags,
        "paths": paths,
        "components": _components(),
    }


def _ref_param(name: str) -> dict:
    return {"$ref": "#/components/parameters/" + name}


def _form(params: list[dict], required: bool) -> dict:
    """Search parameters sent as a form body (FHIR R4 http §3.1.0.9, POST _search)."""
    props = {}
    for p in params:
        if "$ref" not in p and p["in"] == "query":
            props[p["name"]] = {"type": "string"}
    return _body({"type": "object", "properties": props, "additionalProperties": False}, FORM, required)


def _components() -> dict:
    any_resource = _resource_schema(None)
    return {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                       "description": "SMART App Launch v2 access token with scopes such as "
                                      "system/*.cruds; not needed when the server runs with auth=off"},
        },
        "parameters": {
            "id": {"name": "id", "in": "path", "required": True, "description": "Logical id (FHIR R4 id type)",
                   "schema": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"}},
            "vid": {"name": "vid", "in": "path", "required": True, "description": "versionId",
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"}},
            "Prefer": {"name": "Prefer", "in": "header", "required": False,
                       "description": "return=minimal|representation|OperationOutcome; handling=strict|lenient",
                       "schema": {"type": "string"}},
        },
        "schemas": {
            "Resource": any_resource,
            "OperationOutcome": {
                "type": "object", "required": ["resourceType", "issue"],
                "properties": {"resourceType": {"type": "string", "enum": ["OperationOutcome"]},
                               "issue": {"type": "array", "minItems": 1, "items": {
                                   "type": "object", "required": ["severity", "code"],
                                   "properties": {"severity": {"type": "string"},
                                                  "code": {"type": "string"},
                                                  "diagnostics": {"type": "string"}}}}}},
            "Bundle": _resource_schema("Bundle"),
            "Parameters": {**_resource_schema("Parameters"),
                           "properties": {"resourceType": {"type": "string", "enum": ["Parameters"]},
                                          "parameter": {"type": "array", "items": {
                                              "type": "object", "required": ["name"],
                                              "properties": {"name": {"type": "string"}}}}}},
            "TransactionBundle": {
                "type": "object", "required": ["resourceType", "type"],
                "properties": {
                    "resourceType": {"type": "string", "enum": ["Bundle"]},
                    "type": {"type": "string", "enum": ["transaction", "batch"]},
                    "entry": {"type": "array", "items": {"type": "object", "properties": {
                        "fullUrl": {"type": "string"},
                        "resource": any_resource,
                        "request": {"type": "object", "required": ["method", "url"], "properties": {
                            "method": {"type": "string", "enum": ["GET", "HEAD", "POST", "PUT",
                                                                  "PATCH", "DELETE"]},
                            "url": {"type": "string"}}}}}}},
                "additionalProperties": True},
            "JsonPatch": {"type": "array", "items": {
                "type": "object", "required": ["op", "path"],
                "properties": {"op": {"type": "string", "enum": ["add", "remove", "replace", "move",
                                                                 "copy", "test"]},
                               "path": {"type": "string"}, "from": {"type": "string"}, "value": {}}}},
        },
        "responses": {
            "Error": {"description": "Refused or failed: OperationOutcome",
                      "content": {FHIR_JSON: {"schema": _ref("OperationOutcome")}}},
        },
    }
