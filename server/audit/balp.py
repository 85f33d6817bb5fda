"""FHIR R4 AuditEvents in the shape of IHE Basic Audit Log Patterns (BALP, ITI
supplement, FHIR IG ``https://profiles.ihe.net/ITI/BALP``).

One event per interaction: who (the client agent, the requestor, and the server),
what patient(s), what query, which resources, and the outcome. RESTful FHIR
interactions use ``audit-event-type#rest`` with a ``restful-interaction`` subtype, as
the BALP RESTful profiles do; DICOMweb and DIMSE interactions use the DICOM audit event
IDs (PS3.15 Annex A.5, DCM 110112 Query / 110106 Export / 110107 Import) with a subtype
of synthport's own code system; token issuance and failed authentication use DCM 110114
(User Authentication).
"""
from __future__ import annotations

import base64
import ipaddress

from server.fhir.timeutil import instant

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
BALP_PROFILE = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"

#: synthport's code system for subtypes that are not FHIR RESTful interactions.
SYNTHPORT_SUBTYPE = "urn:synthport:audit-subtype"
#: Identifier systems of the agents: the client id (token ``sub``/``client_id``) and the
#: server-side source (``real``, ``synthetic/<cohort>``) that was accessed.
CLIENT_SYSTEM = "urn:synthport:client"
SOURCE_SYSTEM = "urn:synthport:source"
#: DICOM UIDs named in ``what`` without a resource type (PS3.15 A.5 ParticipantObjectID).
DICOM_UID_SYSTEM = "urn:dicom:uid"

#: The codes of http://hl7.org/fhir/restful-interaction (FHIR R4).
RESTFUL = frozenset({"read", "vread", "update", "patch", "delete", "history",
                     "history-instance", "history-type", "history-system", "create", "search",
                     "search-type", "search-system", "capabilities", "transaction", "batch",
                     "operation"})

_DCM_QUERY = {"system": DCM, "code": "110112", "display": "Query"}
_DCM_EXPORT = {"system": DCM, "code": "110106", "display": "Export"}
_DCM_IMPORT = {"system": DCM, "code": "110107", "display": "Import"}
_DCM_AUTH = {"system": DCM, "code": "110114", "display": "User Authentication"}
_REST = {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "Restful Operation"}

#: Event type of each non-RESTful subtype; anything else (e.g. ``dicomweb-delete``) is
#: typed ``rest``.
SUBTYPE_TYPES: dict[str, dict] = {
    "dicomweb-search": _DCM_QUERY, "dimse-find": _DCM_QUERY,
    "dicomweb-retrieve": _DCM_EXPORT, "dimse-get": _DCM_EXPORT, "dimse-move": _DCM_EXPORT,
    "dicomweb-store": _DCM_IMPORT, "dimse-store": _DCM_IMPORT,
    "token": _DCM_AUTH, "auth-failure": _DCM_AUTH,
}

ACTIONS = frozenset("CRUDE")
OUTCOMES = frozenset({"0", "4", "8", "12"})  # success, minor, serious, major failure

# BALP profile per RESTful subtype (Create/Read/Update/Delete/Query); claimed only when
# the event carries the entity the profile requires.
_PROFILES = {"create": "Create", "read": "Read", "vread": "Read", "update": "Update",
             "patch": "Update", "delete": "Delete", "search-type": "Query",
             "search-system": "Query"}


def _coding(system: str, code: str, display: str | None = None) -> dict:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def _patient_ref(p: str) -> str:
    return p if p.startswith("Patient/") else f"Patient/{p}"


def what_reference(ref: str) -> dict:
    """``Type/id`` (or an absolute URL) as a Reference; anything else (a DICOM UID) as an
    identifier."""
    if "/" in ref or ":" in ref and not ref.startswith("urn:oid:"):
        return {"reference": ref}
    value = ref if ref.startswith("urn:oid:") else f"urn:oid:{ref}"
    return {"identifier": {"system": DICOM_UID_SYSTEM, "value": value}}


def _network(address: str) -> dict:
    try:
        ipaddress.ip_address(address)
        kind = "2"  # IP address (network-type)
    except ValueError:
        kind = "1"  # machine name
    return {"address": address, "type": kind}


def event_type(subtype: str) -> dict:
    """The AuditEvent.type coding for a subtype (see :data:`SUBTYPE_TYPES`)."""
    return dict(SUBTYPE_TYPES.get(subtype, _REST))


def audit_event(*, action: str, subtype: str, outcome: str, agent: str, patients: list[str],
                query: str | None, what: list[str], source: str, recorded: float,
                description: str = "", network: str = "", request_id: str = "") -> dict:
    """One AuditEvent (FHIR R4) in BALP shape.

    Args:
        action: ``C`` create, ``R`` read, ``U`` update, ``D`` delete, ``E`` execute
            (search, query, operation).
        subtype: a FHIR ``restful-interaction`` code (``read``, ``search-type``,
            ``transaction``...) or one of synthport's (``dicomweb-search``,
            ``dicomweb-retrieve``, ``dicomweb-store``, ``dimse-find``, ``dimse-get``,
            ``dimse-move``, ``dimse-store``, ``token``, ``auth-failure``...).
        outcome: ``0`` success, ``4`` minor failure (e.g. 4xx), ``8`` serious failure
            (e.g. 5xx), ``12`` major failure.
        agent: the client's id (``anonymous`` when auth is off).
        patients: ids (``123`` or ``Patient/123``) of the patients whose data was touched.
        query: the query as received (``Observation?patient=1``, a C-FIND identifier in
            text form), or None.
        what: other resources touched: ``Type/id`` references or DICOM UIDs.
        source: the source accessed (``real``, ``synthetic/<cohort>``).
        recorded: epoch seconds when the interaction happened.
        description: free text, put in ``outcomeDesc`` (e.g. the error message).
        network: client address (IP or host name).
        request_id: the ``X-Request-Id`` of the HTTP request, if any (BALP transaction
            entity).

    Raises:
        ValueError: an action or outcome outside the R4 value sets, or an empty subtype.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of C R U D E, got {action!r}")
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of 0 4 8 12, got {outcome!r}")
    if not subtype:
        raise ValueError("subtype is required")
    restful = subtype in RESTFUL
    sub_system = RESTFUL_INTERACTION if restful else SYNTHPORT_SUBTYPE
    client = {
        "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
        "who": {"identifier": {"system": CLIENT_SYSTEM, "value": agent}, "display": agent},
        "requestor": True,
    }
    if network:
        client["network"] = _network(network)
    server_who = {"identifier": {"system": SOURCE_SYSTEM, "value": source},
                  "display": f"synthport {source}"}
    server = {"type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
              "who": server_who, "requestor": False}
    entities: list[dict] = []
    seen: set[str] = set()
    for p in patients:
        ref = _patient_ref(p)
        if ref in seen:
            continue
        seen.add(ref)
        entities.append({"what": {"reference": ref},
                         "type": _coding(ENTITY_TYPE, "1", "Person"),
                         "role": _coding(OBJECT_ROLE, "1", "Patient")})
    if query is not None:
        entities.append({"type": _coding(ENTITY_TYPE, "2", "System Object"),
                         "role": _coding(OBJECT_ROLE, "24", "Query"),
                         "query": base64.b64encode(query.encode()).decode("ascii")})
    # A Patient read names Patient/1 as patient and as data, as BALP PatientRead does.
    data: set[str] = set()
    for ref in what:
        if ref in data:
            continue
        data.add(ref)
        entities.append({"what": what_reference(ref),
                         "type": _coding(ENTITY_TYPE, "2", "System Object"),
                         "role": _coding(OBJECT_ROLE, "4", "Domain Resource")})
    if request_id:
        entities.append({"what": {"identifier": {"value": request_id}},
                         "type": _coding(BALP_ENTITY_TYPE, "XrequestId", "X-Request-Id")})
    event: dict = {
        "resourceType": "AuditEvent",
        "type": event_type(subtype),
        "subtype": [_coding(sub_system, subtype)],
        "action": action,
        "recorded": instant(recorded),
        "outcome": outcome,
        "agent": [client, server],
        "source": {"observer": dict(server_who),
                   "type": [_coding(SOURCE_TYPE, "4", "Application Server")]},
    }
    if description:
        event["outcomeDesc"] = description
    if entities:
        event["entity"] = entities
    profile = _profile(subtype, len(seen), query is not None, len(data)) if outcome == "0" else None
    if profile:
        event["meta"] = {"profile": [BALP_PROFILE + profile]}
    return event


def _profile(subtype: str, patients: int, has_query: bool, data: int) -> str | None:
    """The BALP profile the event conforms to, if its entities fit the profile's slices
    (one query entity for Query, one data entity otherwise, one patient for Patient*)."""
    kind = _PROFILES.get(subtype)
    if kind is None or (kind == "Query" and not has_query) or (kind != "Query" and data != 1):
        return None
    return f"IHE.BasicAudit.{'Patient' if patients == 1 else ''}{kind}"
