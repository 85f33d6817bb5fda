"""Parsing of FHIR R4 search queries (server.fhir.search.parse): no database."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from server.errors import InvalidRequest, NotImplementedYet
from server.fhir.search import (Chain, CompositeValue, DateValue, Has, IncludeSpec, Leaf,
                                QuantityValue, ReferenceValue, SortKey, StringValue, TokenValue,
                                TypeFilter, UriValue, ValueSetRef, date_search_range, parse)


def ts(*args, tz=timezone.utc) -> float:
    return datetime(*args, tzinfo=tz).timestamp()


def leaf(res_type, name, value, **kw) -> Leaf:
    ps = parse(res_type, [(name, value)], handling="strict", **kw)
    assert len(ps.criteria) == 1
    node = ps.criteria[0].node
    assert isinstance(node, Leaf), node
    return node


# --------------------------------------------------------------------------- token


def test_token_forms():
    assert leaf("Observation", "code", "8480-6").values == [TokenValue(code="8480-6")]
    assert leaf("Observation", "code", "http://loinc.org|8480-6").values == [
        TokenValue(system="http://loinc.org", code="8480-6")]
    assert leaf("Observation", "code", "|8480-6").values == [TokenValue(code="8480-6", no_system=True)]
    assert leaf("Observation", "code", "http://loinc.org|").values == [TokenValue(system="http://loinc.org")]


def test_token_or_values_and_repeated_params_and():
    ps = parse("Observation", [("code", "a,b"), ("code", "c")])
    assert [len(c.node.values) for c in ps.criteria] == [2, 1]
    assert [v.code for v in ps.criteria[0].node.values] == ["a", "b"]


def test_token_modifiers():
    n = leaf("Observation", "status:not", "final")
    assert n.modifier == "not" and n.values == [TokenValue(code="final")]
    n = leaf("Observation", "code:text", "Blood pressure")
    assert n.modifier == "text" and n.values == [TokenValue(text="Blood pressure")]
    n = leaf("Patient", "identifier:of-type", "http://terminology.hl7.org/CodeSystem/v2-0203|MR|446053")
    assert n.values == [TokenValue(code="446053", type_system="http://terminology.hl7.org/CodeSystem/v2-0203",
                                   type_code="MR")]
    with pytest.raises(InvalidRequest):
        leaf("Patient", "identifier:of-type", "MR|446053")


def test_token_terminology_and_invalid_modifiers():
    # Parsed here, resolved at execution by the terminology service (server/terminology).
    assert leaf("Observation", "code:in", "http://vs|2").values == [ValueSetRef("http://vs|2")]
    assert leaf("Observation", "code:not-in", "ValueSet/x").modifier == "not-in"
    assert leaf("Condition", "code:below", "http://snomed.info/sct|73211009").values == [
        TokenValue(system="http://snomed.info/sct", code="73211009")]
    for mod in ("above", "below"):
        with pytest.raises(InvalidRequest):
            parse("Observation", [(f"code:{mod}", "x")])      # system|code needed
    with pytest.raises(InvalidRequest):
        parse("Observation", [("code:exact", "x")])          # a string modifier
    with pytest.raises(InvalidRequest):
        parse("Observation", [("code:bogus", "x")])
    with pytest.raises(InvalidRequest):
        parse("Observation", [("code", "a|b|c")])           # one '|' too many


def test_missing():
    n = leaf("Patient", "birthdate:missing", "true")
    assert n.missing is True and n.values == []
    assert leaf("Patient", "gender:missing", "false").missing is False
    with pytest.raises(InvalidRequest):
        parse("Patient", [("gender:missing", "maybe")])


# --------------------------------------------------------------------------- escaping (§3.1.1.4.19)


def test_escaping():
    n = leaf("Observation", "code", r"a\,b,c")
    assert [v.code for v in n.values] == ["a,b", "c"]
    n = leaf("Observation", "code", r"http://x\|y|z")
    assert n.values == [TokenValue(system="http://x|y", code="z")]
    n = leaf("Patient", "family", r"a\\b")
    assert n.values == [StringValue("a\\b")]
    n = leaf("Observation", "code-value-string", r"http://loinc.org|1$a\$b")
    assert n.values[0].parts[1] == StringValue("a$b")


# --------------------------------------------------------------------------- string / uri


def test_string_and_modifiers():
    assert leaf("Patient", "name", "Eve").values == [StringValue("Eve")]
    assert leaf("Patient", "name:exact", "Eve").modifier == "exact"
    assert leaf("Patient", "name:contains", "eve").modifier == "contains"
    with pytest.raises(InvalidRequest):
        parse("Patient", [("name:not", "x")])


def test_uri():
    assert leaf("ValueSet", "url", "http://acme.org/fhir/ValueSet/123").values == [
        UriValue("http://acme.org/fhir/ValueSet/123")]
    assert leaf("ValueSet", "url:below", "http://acme.org/fhir/").modifier == "below"
    assert leaf("ValueSet", "url:above", "http://acme.org/fhir/ValueSet/123").modifier == "above"


# --------------------------------------------------------------------------- date (§3.1.1.4.7)


@pytest.mark.parametrize("text,low,high", [
    ("2013", ts(2013, 1, 1), ts(2014, 1, 1)),
    ("2013-12", ts(2013, 12, 1), ts(2014, 1, 1)),
    ("2013-01-14", ts(2013, 1, 14), ts(2013, 1, 15)),
    ("2013-01-14T10:00", ts(2013, 1, 14, 10), ts(2013, 1, 14, 10, 1)),
    ("2013-01-14T10:00:05Z", ts(2013, 1, 14, 10, 0, 5), ts(2013, 1, 14, 10, 0, 6)),
    ("2013-01-14T10:00:05.25Z", ts(2013, 1, 14, 10, 0, 5) + 0.25, ts(2013, 1, 14, 10, 0, 5) + 0.26),
    ("2013-01-14T10:00:00+02:00", ts(2013, 1, 14, 8), ts(2013, 1, 14, 8, 0, 1)),
    ("2013-01-14T10:00:00-05:00", ts(2013, 1, 14, 15), ts(2013, 1, 14, 15, 0, 1)),
    ("2013-01-14T10:00:00 02:00", ts(2013, 1, 14, 8), ts(2013, 1, 14, 8, 0, 1)),   # '+' decoded as ' '
])
def test_date_ranges(text, low, high):
    lo, hi = date_search_range(text)
    assert lo == pytest.approx(low) and hi == pytest.approx(high)


@pytest.mark.parametrize("prefix", ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"])
def test_date_prefixes(prefix):
    n = leaf("Observation", "date", f"{prefix}2013-01-14")
    assert n.values == [DateValue(prefix, ts(2013, 1, 14), ts(2013, 1, 15))]


@pytest.mark.parametrize("bad", ["2013-13", "13-01-2013", "2013-02-30", "yesterday", "gt", "2013-01-14T25:00"])
def test_bad_dates(bad):
    with pytest.raises(InvalidRequest):
        parse("Observation", [("date", bad)], handling="lenient")


def test_last_updated():
    n = leaf("Patient", "_lastUpdated", "gt2010-10-01")
    assert n.kind == "_lastUpdated" and n.values[0].prefix == "gt"


# --------------------------------------------------------------------------- number / quantity


def test_number_precision():
    (v,) = leaf("RiskAssessment", "probability", "100").values
    assert (v.prefix, v.value, v.low, v.high) == ("eq", 100.0, 99.5, 100.5)
    (v,) = leaf("RiskAssessment", "probability", "100.00").values
    assert v.low == pytest.approx(99.995) and v.high == pytest.approx(100.005)
    (v,) = leaf("RiskAssessment", "probability", "gt8e-1").values
    assert v.prefix == "gt" and v.value == pytest.approx(0.8)
    (v,) = leaf("RiskAssessment", "probability", "-1.5").values
    assert v.value == -1.5 and v.low == pytest.approx(-1.55)
    with pytest.raises(InvalidRequest):
        parse("RiskAssessment", [("probability", "abc")])
    with pytest.raises(InvalidRequest):
        parse("RiskAssessment", [("probability", "NaN")])


def test_quantity_forms():
    (v,) = leaf("Observation", "value-quantity", "5.4|http://unitsofmeasure.org|mg").values
    assert isinstance(v, QuantityValue)
    assert (v.prefix, v.value, v.system, v.code, v.unit_or_code) == \
        ("eq", 5.4, "http://unitsofmeasure.org", "mg", False)
    assert v.low == pytest.approx(5.35) and v.high == pytest.approx(5.45)
    (v,) = leaf("Observation", "value-quantity", "le5.4||mg").values
    assert (v.prefix, v.system, v.code, v.unit_or_code) == ("le", None, "mg", True)
    (v,) = leaf("Observation", "value-quantity", "ap5.4").values
    assert (v.prefix, v.system, v.code) == ("ap", None, None)
    with pytest.raises(InvalidRequest):
        parse("Observation", [("value-quantity", "5.4|mg")])


# --------------------------------------------------------------------------- reference (§3.1.1.4.12)


def test_reference_forms():
    assert leaf("Observation", "subject", "123").values == [ReferenceValue(id="123")]
    assert leaf("Observation", "subject", "Patient/123").values == [ReferenceValue(type="Patient", id="123")]
    assert leaf("Observation", "subject", "Patient/123/_history/2").values == [ReferenceValue(type="Patient", id="123")]
    assert leaf("Observation", "subject", "http://x/fhir/Patient/123").values == [
        ReferenceValue(type="Patient", id="123", url="http://x/fhir/Patient/123")]
    assert leaf("Observation", "subject", "urn:uuid:abc").values == [ReferenceValue(url="urn:uuid:abc")]
    n = leaf("Observation", "subject:Patient", "123")
    assert n.values == [ReferenceValue(type="Patient", id="123")]
    n = leaf("Observation", "subject:identifier", "http://acme.org/mrn|42")
    assert n.values == [ReferenceValue(ident_system="http://acme.org/mrn", ident_value="42")]
    with pytest.raises(InvalidRequest):
        parse("Observation", [("subject:Patient", "Group/1")])
    with pytest.raises(InvalidRequest):
        parse("Observation", [("patient:Group", "1")])       # not a target of 'patient'
    with pytest.raises(InvalidRequest):
        parse("Observation", [("subject", "Nope/1")])
    with pytest.raises(NotImplementedYet):
        parse("Procedure", [("location:below", "42")])


# --------------------------------------------------------------------------- composite


def test_composite():
    n = leaf("Observation", "code-value-quantity", "http://loinc.org|8480-6$gt100")
    assert n.components == ("token", "quantity")
    (v,) = n.values
    assert isinstance(v, CompositeValue)
    assert v.parts[0] == TokenValue(system="http://loinc.org", code="8480-6")
    assert v.parts[1].prefix == "gt" and v.parts[1].value == 100
    n = leaf("Observation", "code-value-concept", "8480-6$http://snomed.info/sct|1,x$y")
    assert len(n.values) == 2
    with pytest.raises(InvalidRequest):
        parse("Observation", [("code-value-quantity", "8480-6")])


# --------------------------------------------------------------------------- chains / _has


def test_chain_explicit_type():
    ps = parse("Observation", [("subject:Patient.name", "peter")], handling="strict")
    node = ps.criteria[0].node
    assert isinstance(node, Chain) and node.code == "subject" and list(node.targets) == ["Patient"]
    assert node.targets["Patient"].code == "name"


def test_chain_implicit_targets():
    node = parse("Observation", [("patient.name", "peter")]).criteria[0].node
    assert list(node.targets) == ["Patient"]
    # subject targets several types; 'name' exists on some of them only
    node = parse("Observation", [("subject.name", "x")]).criteria[0].node
    assert "Patient" in node.targets and "Device" not in node.targets
    node = parse("Observation", [("subject.identifier", "sys|1")]).criteria[0].node
    assert node.targets["Patient"].kind == "token"


def test_chain_multi_level_and_errors():
    node = parse("Encounter", [("subject:Patient.organization.name", "Acme")]).criteria[0].node
    inner = node.targets["Patient"]
    assert isinstance(inner, Chain) and inner.code == "organization"
    assert inner.targets["Organization"].code == "name"
    with pytest.raises(InvalidRequest):
        parse("Observation", [("code.name", "x")])            # not a reference
    with pytest.raises(InvalidRequest):
        parse("Observation", [("subject.nonexistent", "x")])
    with pytest.raises(InvalidRequest):
        parse("Observation", [("subject:Medication.name", "x")])   # not a target


def test_has():
    node = parse("Patient", [("_has:Observation:patient:code", "1234-5")]).criteria[0].node
    assert isinstance(node, Has) and (node.src_type, node.code) == ("Observation", "patient")
    assert node.inner.code == "code"
    node = parse("Patient", [("_has:Observation:patient:_has:AuditEvent:entity:agent", "x")]).criteria[0].node
    assert isinstance(node.inner, Has) and node.inner.src_type == "AuditEvent"
    with pytest.raises(InvalidRequest):
        parse("Patient", [("_has:Observation:code:status", "final")])   # not a reference
    with pytest.raises(InvalidRequest):
        parse("Patient", [("_has:Observation", "x")])
    with pytest.raises(InvalidRequest):
        parse("Patient", [("_has:Nope:patient:code", "x")])


# --------------------------------------------------------------------------- result parameters


def test_count_offset_snapshot():
    ps = parse("Patient", [])
    assert (ps.count, ps.offset, ps.snapshot) == (50, 0, None)
    ps = parse("Patient", [("_count", "10"), ("_offset", "20"), ("_snapshot", "99")])
    assert (ps.count, ps.offset, ps.snapshot) == (10, 20, 99)
    assert ("_count", "10") in ps.self_params
    assert all(n not in ("_offset", "_snapshot") for n, _ in ps.self_params)
    ps = parse("Patient", [("_count", "5000")])
    assert ps.count == 1000 and any("5000" in w for w in ps.warnings)
    assert ("_count", "1000") in ps.self_params
    assert parse("Patient", [("_count", "0")]).count == 0
    assert parse("Patient", [], default_count=20, max_count=10).count == 10
    for bad in ("-1", "x"):
        with pytest.raises(InvalidRequest):
            parse("Patient", [("_count", bad)])


def test_sort():
    ps = parse("Observation", [("_sort", "status,-date,_id,-_lastUpdated")])
    assert ps.sort == [SortKey("status", "token"), SortKey("date", "date", True),
                       SortKey("_id", "_id"), SortKey("_lastUpdated", "_lastUpdated", True)]
    with pytest.raises(InvalidRequest):
        parse("Observation", [("_sort", "code-value-quantity")])
    with pytest.raises(InvalidRequest):
        parse("Observation", [("_sort", "nope")], handling="strict")
    ps = parse("Observation", [("_sort", "nope")])
    assert ps.sort == [] and ps.warnings


def test_include_specs():
    ps = parse("Observation", [("_include", "Observation:patient"),
                               ("_include:iterate", "Patient:organization"),
                               ("_include:recurse", "Observation:subject:Patient"),
                               ("_revinclude", "Provenance:target"),
                               ("_include", "*")])
    assert ps.includes == [IncludeSpec("Observation", "patient"),
                           IncludeSpec("Patient", "organization", None, True),
                           IncludeSpec("Observation", "subject", "Patient", True),
                           IncludeSpec(None, None)]
    assert ps.revincludes == [IncludeSpec("Provenance", "target", reverse=True)]
    for bad in ("Observation", "Observation:code", "Nope:x", "Observation:subject:Nope",
                "Observation:patient:Group"):
        with pytest.raises(InvalidRequest):
            parse("Observation", [("_include", bad)])
    with pytest.raises(InvalidRequest):
        parse("Observation", [("_include:bogus", "Observation:patient")])


def test_summary_elements_total_and_silent_params():
    ps = parse("Patient", [("_summary", "count"), ("_elements", "id, name"), ("_total", "accurate"),
                           ("_totalMethod", "count"), ("_format", "json"), ("_pretty", "true")],
               handling="strict")
    assert (ps.summary, ps.elements, ps.total, ps.warnings) == ("count", ["id", "name"], "accurate", [])
    with pytest.raises(InvalidRequest):
        parse("Patient", [("_summary", "maybe")])
    with pytest.raises(InvalidRequest):
        parse("Patient", [("_total", "lots")])


def test_unknown_params_lenient_vs_strict():
    ps = parse("Patient", [("foo", "1"), ("name", "x")])
    assert len(ps.criteria) == 1 and any("foo" in w for w in ps.warnings)
    assert ("foo", "1") not in ps.self_params and ("name", "x") in ps.self_params
    with pytest.raises(InvalidRequest):
        parse("Patient", [("foo", "1")], handling="strict")


def test_not_implemented_params():
    for name in ("_text", "_content", "_list", "_query", "_filter"):
        ps = parse("Patient", [(name, "x")])
        assert ps.criteria == [] and ps.warnings
        with pytest.raises(NotImplementedYet):
            parse("Patient", [(name, "x")], handling="strict")


def test_empty_values_are_ignored():
    ps = parse("Patient", [("name", ""), ("gender", ","), ("_sort", "")], handling="strict")
    assert ps.criteria == [] and ps.sort == []


def test_unknown_type():
    with pytest.raises(InvalidRequest):
        parse("Nope", [])


# --------------------------------------------------------------------------- system-level search


def test_system_search_common_params_only():
    ps = parse(None, [("_id", "a,b"), ("_lastUpdated", "ge2020"), ("_tag", "x")], handling="strict")
    assert [c.node.kind for c in ps.criteria] == ["_id", "_lastUpdated", "token"]
    assert ps.criteria[0].node.types is None
    with pytest.raises(InvalidRequest):
        parse(None, [("name", "x")], handling="strict")
    ps = parse(None, [("name", "x")])
    assert ps.criteria == [] and ps.warnings


def test_system_search_with_type():
    ps = parse(None, [("_type", "Patient,Practitioner"), ("name", "x")], handling="strict")
    assert ps.types == ("Patient", "Practitioner")
    assert ps.criteria[0].node.types == ("Patient", "Practitioner")
    with pytest.raises(InvalidRequest):
        parse(None, [("_type", "Patient,Observation"), ("name", "x")], handling="strict")
    with pytest.raises(InvalidRequest):
        parse(None, [("_type", "Nope")])
    ps = parse("Patient", [("_type", "Patient")])
    assert isinstance(ps.criteria[0].node, TypeFilter)
