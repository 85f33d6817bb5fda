"""ValueSet/$validate-code."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest, UnknownValueSet
from terminologies.operations.valueset_validate_code import validate_code

from ._data import ICD, SCT, params

DM = "http://example.org/vs/diabetes"


def test_member_by_filter(provider):
    out = params(validate_code(provider, url=DM, system=SCT, code="44054006"))
    assert out["result"] == [True] and out["display"] == ["Diabetes mellitus type 2"]


def test_not_member(provider):
    out = params(validate_code(provider, url=DM, system=SCT, code="38341003"))
    assert out["result"] == [False] and DM in out["message"][0]
    out = params(validate_code(provider, url=DM, system=SCT, code="000"))
    assert out["result"] == [False] and "Unknown code" in out["message"][0]
    out = params(validate_code(provider, url=DM, system=ICD, code="E11"))
    assert out["result"] == [False]


def test_exclude_and_import(provider):
    url = "http://example.org/vs/endocrine-no-t1"
    assert params(validate_code(provider, url=url, system=SCT, code="46635009"))["result"] == [False]
    assert params(validate_code(provider, url=url, system=SCT, code="44054006"))["result"] == [True]
    assert params(validate_code(provider, url=url, system=SCT, code="362969004"))["result"] == [False]  # descendent-of
    mixed = "http://example.org/vs/mixed"
    out = params(validate_code(provider, url=mixed, system=ICD, code="E10"))
    assert out["result"] == [True] and out["display"] == ["Type 1 DM"]
    assert params(validate_code(provider, url=mixed, system=SCT, code="8801005"))["result"] == [True]
    assert params(validate_code(provider, url=mixed, system=ICD, code="E14"))["result"] == [False]


def test_agrees_with_expansion_for_every_code(provider):
    from terminologies.operations.valueset_expand import expand_codes

    for url in (DM, "http://example.org/vs/endocrine-no-t1", "http://example.org/vs/mixed"):
        members = expand_codes(provider, url)
        for system, codes in ((SCT, list(provider.code_system(SCT))), (ICD, ["E10", "E11", "E14", "E10-E14"])):
            for code in codes:
                got = params(validate_code(provider, url=url, system=system, code=code))["result"][0]
                assert got == ((system, code) in members), (url, system, code)


def test_display(provider):
    assert params(validate_code(provider, url=DM, system=SCT, code="44054006",
                                display="Diabetes mellitus type 2"))["result"] == [True]
    out = params(validate_code(provider, url=DM, system=SCT, code="44054006", display="Wrong"))
    assert out["result"] == [False] and "Wrong" in out["message"][0]


def test_coding_codeable_concept_and_inline(provider):
    assert params(validate_code(provider, url=DM, coding={"system": SCT, "code": "8801005"}))["result"] == [True]
    cc = {"coding": [{"system": ICD, "code": "E11"}, {"system": SCT, "code": "46635009"}]}
    assert params(validate_code(provider, url=DM, codeable_concept=cc))["result"] == [True]
    inline = {"resourceType": "ValueSet", "compose": {"include": [{"system": ICD, "concept": [{"code": "E11"}]}]}}
    assert params(validate_code(provider, valueset=inline, system=ICD, code="E11"))["result"] == [True]
    assert params(validate_code(provider, valueset=inline, system=ICD, code="E10"))["result"] == [False]


def test_inactive_handling(provider):
    all_sct = {"resourceType": "ValueSet", "compose": {"include": [{"system": SCT}]}}
    out = params(validate_code(provider, valueset=all_sct, system=SCT, code="11530004"))
    assert out["result"] == [True] and "inactive" in out["message"][0]
    active = {"resourceType": "ValueSet", "compose": {"inactive": False, "include": [{"system": SCT}]}}
    assert params(validate_code(provider, valueset=active, system=SCT, code="11530004"))["result"] == [False]


def test_unknown_system_in_definition_gives_false(provider):
    vs = {"resourceType": "ValueSet", "compose": {"include": [{"system": "http://nope"}]}}
    out = params(validate_code(provider, valueset=vs, system="http://nope", code="1"))
    assert out["result"] == [False] and "http://nope" in out["message"][0]


def test_errors(provider):
    with pytest.raises(UnknownValueSet):
        validate_code(provider, url="http://example.org/vs/missing", system=SCT, code="1")
    with pytest.raises(InvalidRequest):
        validate_code(provider, system=SCT, code="1")
    with pytest.raises(InvalidRequest):
        validate_code(provider, url=DM)
    with pytest.raises(InvalidRequest):
        validate_code(provider, url=DM, code="44054006")
    with pytest.raises(InvalidRequest):
        validate_code(provider, valueset={"resourceType": "CodeSystem"}, system=SCT, code="1")
