"""CodeSystem/$lookup."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest, UnknownCode, UnknownSystem
from terminologies.operations.codesystem_lookup import lookup

from ._data import SCT, params


def _props(out):
    return [(p["code"][0], p["value"][0]) for p in params(out).get("property", [])]


def test_lookup_basic(provider):
    out = params(lookup(provider, SCT, "73211009"))
    assert out["name"] == ["SNOMED CT"]
    assert out["version"] == ["20240101"]
    assert out["display"] == ["Diabetes mellitus"]
    values = {d["value"][0] for d in out["designation"]}
    assert values == {"Diabetes mellitus (disorder)", "diabetes mellitus (trastorno)"}
    fsn = next(d for d in out["designation"] if d.get("use"))
    assert fsn["use"][0]["code"] == "900000000000003001" and fsn["language"] == ["en"]


def test_lookup_properties(provider):
    props = _props(lookup(provider, SCT, "73211009"))
    assert ("parent", "362969004") in props and ("parent", "126877002") in props
    assert {v for k, v in props if k == "child"} == {"46635009", "44054006", "8801005"}
    assert ("inactive", False) in props
    assert ("sufficientlyDefined", False) in props


def test_lookup_property_filter_and_inactive(provider):
    props = _props(lookup(provider, SCT, "11530004", properties=["inactive"]))
    assert props == [("inactive", True)]


def test_lookup_display_language_and_coding(provider):
    out = params(lookup(provider, coding={"system": SCT, "code": "73211009"}, display_language="es"))
    assert out["display"] == ["diabetes mellitus (trastorno)"]


def test_lookup_consults_supplements(provider):
    provider.add({"resourceType": "CodeSystem", "url": "http://example.org/sup", "content": "supplement",
                  "supplements": SCT, "language": "de",
                  "concept": [{"code": "44054006", "designation": [{"language": "de", "value": "Typ-2-Diabetes"}]}]})
    out = params(lookup(provider, SCT, "44054006", display_language="de"))
    assert out["display"] == ["Typ-2-Diabetes"]


def test_lookup_supplement_only_system():
    from terminologies.provider import InMemoryProvider

    p = InMemoryProvider({"resourceType": "CodeSystem", "url": "http://example.org/used", "content": "supplement",
                          "supplements": "http://loinc.org", "concept": [{"code": "2345-7", "display": "Glucose"}]})
    assert params(lookup(p, "http://loinc.org", "2345-7"))["display"] == ["Glucose"]
    with pytest.raises(UnknownCode):
        lookup(p, "http://loinc.org", "1-8")


def test_lookup_errors(provider):
    with pytest.raises(UnknownSystem, match="http://nope"):
        lookup(provider, "http://nope", "1")
    with pytest.raises(UnknownCode, match="'123'") as e:
        lookup(provider, SCT, "123")
    assert e.value.issue_code == "code-invalid"
    with pytest.raises(InvalidRequest):
        lookup(provider, SCT, None)
    with pytest.raises(InvalidRequest):
        lookup(provider, SCT, "1", coding={"system": SCT, "code": "2"})
    with pytest.raises(UnknownSystem):
        lookup(provider, SCT, "73211009", version="19990101")
