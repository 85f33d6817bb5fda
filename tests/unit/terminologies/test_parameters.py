"""parse_parameters / to_parameters."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest
from terminologies.operations.parameters import as_bool, as_int, parse_parameters, to_parameters


def test_parse_parameters_resource():
    vs = {"resourceType": "ValueSet", "url": "http://x"}
    parsed = parse_parameters({"resourceType": "Parameters", "parameter": [
        {"name": "code", "valueCode": "a"},
        {"name": "property", "valueCode": "parent"},
        {"name": "property", "valueCode": "child"},
        {"name": "coding", "valueCoding": {"system": "http://x", "code": "a"}},
        {"name": "count", "valueInteger": 3},
        {"name": "valueSet", "resource": vs},
        {"name": "dependency", "part": [{"name": "element", "valueUri": "http://e"}]},
    ]})
    assert parsed["code"] == ["a"]
    assert parsed["property"] == ["parent", "child"]
    assert parsed["coding"] == [{"system": "http://x", "code": "a"}]
    assert parsed["count"] == [3]
    assert parsed["valueSet"] == [vs]
    assert parsed["dependency"] == [{"element": ["http://e"]}]


def test_parse_query_pairs():
    assert parse_parameters([("code", "a"), ("property", "x"), ("property", "y")]) == {
        "code": ["a"], "property": ["x", "y"]}


@pytest.mark.parametrize("bad", [{"resourceType": "Bundle"}, {"resourceType": "Parameters", "parameter": [{}]}])
def test_parse_rejects(bad):
    with pytest.raises(InvalidRequest):
        parse_parameters(bad)


def test_to_parameters_types():
    out = to_parameters([("result", True), ("n", 2), ("x", 1.5), ("s", "t"), ("none", None),
                         ("c", {"valueCode": "a"}), ("p", [("code", {"valueCode": "k"})])])
    assert out["parameter"] == [
        {"name": "result", "valueBoolean": True}, {"name": "n", "valueInteger": 2},
        {"name": "x", "valueDecimal": 1.5}, {"name": "s", "valueString": "t"},
        {"name": "c", "valueCode": "a"}, {"name": "p", "part": [{"name": "code", "valueCode": "k"}]}]


def test_as_bool_and_int():
    assert as_bool("true") is True and as_bool(False) is False
    assert as_int("5") == 5
    with pytest.raises(InvalidRequest):
        as_bool("yes")
    with pytest.raises(InvalidRequest):
        as_int("-1")
    with pytest.raises(InvalidRequest):
        as_int("x")
