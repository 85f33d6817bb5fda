"""BALP-shaped AuditEvents: valid FHIR R4 and the codes IHE BALP and DICOM prescribe."""
from __future__ import annotations

import base64

import pytest

from server.audit import balp
from server.fhir.validation import validate

T = 1_700_000_000.123


def ev(**kw):
    args = dict(action="R", subtype="read", outcome="0", agent="app-1", patients=["42"],
                query=None, what=["Patient/42"], source="real", recorded=T)
    args.update(kw)
    return balp.audit_event(**args)


def codes(event, role_code):
    return [e for e in event.get("entity", []) if e.get("role", {}).get("code") == role_code]


def test_patient_read_is_valid_balp():
    e = ev(network="10.1.2.3", request_id="req-7")
    validate(e, "AuditEvent")
    assert e["type"] == {"system": balp.AUDIT_EVENT_TYPE, "code": "rest",
                         "display": "Restful Operation"}
    assert e["subtype"] == [{"system": balp.RESTFUL_INTERACTION, "code": "read"}]
    assert e["action"] == "R" and e["outcome"] == "0"
    assert e["recorded"] == "2023-11-14T22:13:20.123Z"
    client, server = e["agent"]
    assert client["requestor"] is True and server["requestor"] is False
    assert client["type"]["coding"][0]["code"] == "110153"   # Source Role ID (client)
    assert server["type"]["coding"][0]["code"] == "110152"   # Destination Role ID (server)
    assert client["who"]["identifier"]["value"] == "app-1"
    assert client["network"] == {"address": "10.1.2.3", "type": "2"}
    assert e["source"]["observer"]["identifier"]["value"] == "real"
    patient = codes(e, "1")
    assert [p["what"]["reference"] for p in patient] == ["Patient/42"]
    assert patient[0]["type"]["code"] == "1"                 # Person
    data = codes(e, "4")
    assert [d["what"]["reference"] for d in data] == ["Patient/42"]
    assert e["meta"]["profile"] == [balp.BALP_PROFILE + "IHE.BasicAudit.PatientRead"]
    assert any(x.get("type", {}).get("code") == "XrequestId" and
               x["what"]["identifier"]["value"] == "req-7" for x in e["entity"])


def test_search_has_query_entity_base64():
    q = "Observation?patient=Patient/1&code=http://loinc.org|8867-4"
    e = ev(action="E", subtype="search-type", patients=["Patient/1", "1", "2"], query=q,
           what=["Observation/a", "Observation/b"], network="host.example")
    validate(e, "AuditEvent")
    (query,) = codes(e, "24")
    assert query["type"]["code"] == "2"
    assert base64.b64decode(query["query"]).decode() == q
    assert [p["what"]["reference"] for p in codes(e, "1")] == ["Patient/1", "Patient/2"]
    assert len(codes(e, "4")) == 2
    assert e["agent"][0]["network"]["type"] == "1"          # a machine name
    # Two patients: the plain Query profile, not PatientQuery (one patient slice).
    assert e["meta"]["profile"] == [balp.BALP_PROFILE + "IHE.BasicAudit.Query"]


@pytest.mark.parametrize("subtype,code", [
    ("dicomweb-search", "110112"), ("dimse-find", "110112"),
    ("dicomweb-retrieve", "110106"), ("dimse-get", "110106"), ("dimse-move", "110106"),
    ("dicomweb-store", "110107"), ("dimse-store", "110107"),
    ("token", "110114"), ("auth-failure", "110114"),
])
def test_dicom_and_auth_types(subtype, code):
    e = ev(subtype=subtype, patients=[], what=["1.2.840.113619.2.1"], query="StudyDate=2020")
    validate(e, "AuditEvent")
    assert e["type"]["system"] == balp.DCM and e["type"]["code"] == code
    assert e["subtype"] == [{"system": balp.SYNTHPORT_SUBTYPE, "code": subtype}]
    assert codes(e, "4")[0]["what"]["identifier"]["value"] == "urn:oid:1.2.840.113619.2.1"
    assert "meta" not in e  # no BALP RESTful profile is claimed


def test_failure_has_description_and_no_profile():
    e = ev(outcome="4", description="Patient/9 is not known", what=["Patient/9"], patients=["9"])
    validate(e, "AuditEvent")
    assert e["outcomeDesc"] == "Patient/9 is not known"
    assert "meta" not in e


def test_minimal_event_without_entities():
    e = ev(action="E", subtype="capabilities", patients=[], what=[], query=None)
    validate(e, "AuditEvent")
    assert "entity" not in e


@pytest.mark.parametrize("bad", [dict(action="X"), dict(outcome="1"), dict(subtype="")])
def test_bad_codes_raise(bad):
    with pytest.raises(ValueError):
        ev(**bad)
