"""The CapabilityStatement: exactly what the real FHIR source implements (FHIR R4 §2.40)."""
from __future__ import annotations

import functools

import server
from server.fhir.searchparams import RESOURCE_TYPES, registry
from server.fhir.terminology_ops import DEFINITIONS as _TERMINOLOGY_OPS

_INTERACTIONS_RW = ["read", "vread", "update", "patch", "delete", "history-instance",
                    "history-type", "create", "search-type"]
_INTERACTIONS_RO = ["read", "vread", "history-instance", "history-type", "search-type"]
_COMMON = {
    "_id": ("token", "Logical id of the resource"),
    "_lastUpdated": ("date", "When the resource version last changed"),
}
_OPS = [
    {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"},
]
# $deidentify is synthport's own (docs/deidentification.md): no HL7 definition exists.
_DEID = "urn:synthport:OperationDefinition:deidentify"
_PATIENT_OPS = [
    {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
    {"name": "deidentify", "definition": _DEID},
]


@functools.cache
def _resources(writable: bool) -> tuple:
    reg = registry()
    out = []
    for t in sorted(RESOURCE_TYPES):
        if t in ("Parameters",):
            continue
        params = reg.for_type(t)
        sps = [{"name": code, "definition": sp.url, "type": sp.type,
                **({"documentation": sp.description} if sp.description else {})}
               for code, sp in sorted(params.items()) if code not in _COMMON]
        sps = [{"name": k, "type": v[0], "documentation": v[1]} for k, v in _COMMON.items()] + sps
        refs = sorted(code for code, sp in params.items() if sp.type == "reference")
        inter = _INTERACTIONS_RW if writable else _INTERACTIONS_RO
        if t == "AuditEvent":
            # Written by the server only (the audit log; docs/audit.md): read and search.
            inter = ["read", "search-type"]
        entry = {
            "type": t,
            "interaction": [{"code": c} for c in inter],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": writable,
            "conditionalCreate": writable,
            "conditionalRead": "full-support",
            "conditionalUpdate": writable,
            "conditionalDelete": "single" if writable else "not-supported",
            "searchInclude": ["*"] + [f"{t}:{r}" for r in refs],
            "searchRevInclude": ["*"],
            "searchParam": sps,
            "operation": (_PATIENT_OPS if t == "Patient" else [])
            + [{"name": n, "definition": d} for (rt, n), d in _TERMINOLOGY_OPS.items() if rt == t] + _OPS,
        }
        out.append(entry)
    return tuple(out)


def capability_statement(base_url: str, writable: bool = True, name: str = "real",
                         date: str = "2026-11-23") -> dict:
    """Build the CapabilityStatement for a source served at ``base_url``."""
    system = [{"code": "history-system"}, {"code": "search-system"}]
    if writable:
        system = [{"code": "transaction"}, {"code": "batch"}] + system
    else:
        system = [{"code": "batch"}] + system
    return {
        "resourceType": "CapabilityStatement",
        "id": f"synthport-{name}",
        "url": f"{base_url}/metadata",
        "version": server.__version__ if hasattr(server, "__version__") else "0.1.0",
        "name": "SynthportCapabilityStatement",
        "title": f"synthport FHIR R4 server ({name} source)",
        "status": "active",
        "experimental": False,
        "date": date,
        "publisher": "synthport",
        "kind": "instance",
        "software": {"name": "synthport", "version": "0.1.0"},
        "implementation": {"description": f"synthport {name} source", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "documentation": "FHIR R4 REST; JSON only. See docs/fhir.md for the details.",
            "resource": [dict(r) for r in _resources(writable)],
            "interaction": system,
            "searchParam": [{"name": k, "type": v[0], "documentation": v[1]} for k, v in _COMMON.items()],
            "operation": [{"name": "deidentify", "definition": _DEID}],
            **({"security": _security(base_url)} if writable else {}),
        }],
    }


def _security(base_url: str) -> dict:
    """rest.security of the real source: SMART on FHIR, with the OAuth endpoints in the
    oauth-uris extension (SMART App Launch; /.well-known/smart-configuration says more)."""
    root = base_url.removesuffix("/fhir")
    return {
        "cors": True,
        "service": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR"}], "text": "OAuth2 using SMART-on-FHIR profile"}],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": f"{root}/auth/token"},
                          {"url": "introspect", "valueUri": f"{root}/auth/introspect"}]}],
        "description": "SMART Backend Services: client credentials with private_key_jwt; "
                       "see docs/security.md.",
    }
