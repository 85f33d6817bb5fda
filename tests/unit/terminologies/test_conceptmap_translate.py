"""ConceptMap/$translate."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest, UnknownConceptMap
from terminologies.operations.conceptmap_translate import translate

from ._data import CM_SCT_ICD, ICD, SCT, params

CM = "http://example.org/cm/sct-icd"


def _matches(out):
    return [(m["equivalence"][0], m.get("concept", [{}])[0].get("code")) for m in params(out).get("match", [])]


def test_forward(provider):
    out = translate(provider, url=CM, system=SCT, code="46635009")
    p = params(out)
    assert p["result"] == [True]
    m = p["match"][0]
    assert m["equivalence"] == ["equivalent"]
    assert m["concept"] == [{"system": ICD, "version": "2019", "code": "E10", "display": "Insulin-dependent diabetes mellitus"}]
    assert m["source"] == [CM]


def test_several_targets(provider):
    assert _matches(translate(provider, url=CM, system=SCT, code="73211009")) == [("narrower", "E14"), ("subsumes", "E10-E14")]


def test_unmatched_gives_false(provider):
    out = translate(provider, url=CM, system=SCT, code="38341003")
    assert params(out)["result"] == [False] and _matches(out) == [("unmatched", None)]
    assert "38341003" in params(out)["message"][0]


def test_unmapped_fixed_and_provided(provider):
    assert _matches(translate(provider, url=CM, system=SCT, code="8801005")) == [("inexact", "E14")]
    cm = {**CM_SCT_ICD, "group": [{**CM_SCT_ICD["group"][0], "unmapped": {"mode": "provided"}}]}
    assert _matches(translate(provider, conceptmap=cm, system=SCT, code="8801005")) == [("equal", "8801005")]
    cm = {**CM_SCT_ICD, "group": [{k: v for k, v in CM_SCT_ICD["group"][0].items() if k != "unmapped"}]}
    out = translate(provider, conceptmap=cm, system=SCT, code="8801005")
    assert params(out)["result"] == [False] and _matches(out) == []


def test_unmapped_other_map(provider):
    provider.add({"resourceType": "ConceptMap", "url": "http://example.org/cm/fallback", "group": [
        {"source": SCT, "target": ICD, "element": [{"code": "8801005", "target": [{"code": "E13", "equivalence": "equivalent"}]}]}]})
    cm = {**CM_SCT_ICD, "url": "http://example.org/cm/x",
          "group": [{**CM_SCT_ICD["group"][0], "unmapped": {"mode": "other-map", "url": "http://example.org/cm/fallback"}}]}
    assert _matches(translate(provider, conceptmap=cm, system=SCT, code="8801005")) == [("equivalent", "E13")]


def test_reverse(provider):
    out = translate(provider, url=CM, system=ICD, code="E11", reverse=True)
    assert params(out)["result"] == [True]
    assert _matches(out) == [("narrower", "44054006")]   # E11 is wider than 44054006
    assert _matches(translate(provider, url=CM, system=ICD, code="E10-E14", reverse="true")) == [("specializes", "73211009")]
    m = params(translate(provider, url=CM, system=ICD, code="E10", reverse=True))["match"][0]
    assert m["concept"] == [{"system": SCT, "code": "46635009", "display": "Diabetes mellitus type 1"}]
    assert params(translate(provider, url=CM, system=ICD, code="Z99", reverse=True))["result"] == [False]


def test_coding_codeable_concept_and_target_system(provider):
    assert _matches(translate(provider, url=CM, coding={"system": SCT, "code": "44054006"})) == [("wider", "E11")]
    cc = {"coding": [{"system": SCT, "code": "46635009"}, {"system": SCT, "code": "44054006"}]}
    assert _matches(translate(provider, url=CM, codeable_concept=cc)) == [("equivalent", "E10"), ("wider", "E11")]
    assert _matches(translate(provider, url=CM, system=SCT, code="44054006", targetsystem="http://other")) == []


def test_maps_found_by_source_target_or_all(provider):
    assert _matches(translate(provider, system=SCT, code="44054006")) == [("wider", "E11")]
    assert _matches(translate(provider, system=SCT, code="44054006", source="http://example.org/vs/diabetes")) == [("wider", "E11")]
    assert _matches(translate(provider, system=SCT, code="44054006", source="http://example.org/vs/other")) == []
    assert _matches(translate(provider, system=ICD, code="E11", reverse=True,
                              source="http://example.org/vs/icd")) == [("narrower", "44054006")]


def test_errors(provider):
    with pytest.raises(UnknownConceptMap):
        translate(provider, url="http://example.org/cm/missing", system=SCT, code="1")
    with pytest.raises(UnknownConceptMap):
        translate(provider, url=CM, conceptmap_version="9", system=SCT, code="1")
    with pytest.raises(InvalidRequest):
        translate(provider, url=CM)
    with pytest.raises(InvalidRequest):
        translate(provider, url=CM, code="44054006")
    with pytest.raises(InvalidRequest):
        translate(provider, conceptmap={"resourceType": "ValueSet"}, system=SCT, code="1")
    with pytest.raises(InvalidRequest):
        translate(provider, url=CM, system=SCT, code="1", reverse="sometimes")


def test_depends_on(provider):
    cm = {"resourceType": "ConceptMap", "url": "http://example.org/cm/dep", "group": [{
        "source": SCT, "target": ICD, "element": [{"code": "73211009", "target": [
            {"code": "E10", "equivalence": "narrower",
             "dependsOn": [{"property": "http://example.org/insulin", "value": "yes"}]},
            {"code": "E11", "equivalence": "narrower",
             "dependsOn": [{"property": "http://example.org/insulin", "value": "no"}]}]}]}]}
    assert _matches(translate(provider, conceptmap=cm, system=SCT, code="73211009")) == [
        ("narrower", "E10"), ("narrower", "E11")]
    dep = [{"element": ["http://example.org/insulin"], "concept": [{"coding": [{"code": "no"}]}]}]
    assert _matches(translate(provider, conceptmap=cm, system=SCT, code="73211009", dependency=dep)) == [
        ("narrower", "E11")]
