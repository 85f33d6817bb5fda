"""CodeSystem/$validate-code."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest, UnknownSystem
from terminologies.operations.codesystem_validate_code import validate_code

from ._data import ICD, SCT, params


def test_valid_code(provider):
    out = params(validate_code(provider, url=SCT, code="44054006"))
    assert out["result"] == [True] and out["display"] == ["Diabetes mellitus type 2"]
    assert "message" not in out


def test_unknown_code(provider):
    out = params(validate_code(provider, url=SCT, code="999"))
    assert out["result"] == [False] and "999" in out["message"][0]


def test_display_checked(provider):
    assert params(validate_code(provider, url=SCT, code="44054006", display="diabetes  MELLITUS type 2"))["result"] == [True]
    assert params(validate_code(provider, url=SCT, code="44054006",
                                display="Diabetes mellitus type 2 (disorder)"))["result"] == [True]  # a designation
    out = params(validate_code(provider, url=SCT, code="44054006", display="Type 1"))
    assert out["result"] == [False] and "Type 1" in out["message"][0]
    assert out["display"] == ["Diabetes mellitus type 2"]


def test_inactive_is_valid_with_message(provider):
    out = params(validate_code(provider, url=SCT, code="11530004"))
    assert out["result"] == [True] and "inactive" in out["message"][0]


def test_coding_and_codeable_concept(provider):
    assert params(validate_code(provider, coding={"system": SCT, "code": "73211009"}))["result"] == [True]
    cc = {"coding": [{"system": ICD, "code": "E11"}, {"system": SCT, "code": "bad"}, {"system": SCT, "code": "46635009"}]}
    out = params(validate_code(provider, url=SCT, codeable_concept=cc))
    assert out["result"] == [True] and out["display"] == ["Diabetes mellitus type 1"]
    out = params(validate_code(provider, url=SCT, codeable_concept={"coding": [{"system": ICD, "code": "E11"}]}))
    assert out["result"] == [False]


def test_errors(provider):
    with pytest.raises(InvalidRequest):
        validate_code(provider, url=SCT)
    with pytest.raises(InvalidRequest):
        validate_code(provider, code="1")
    with pytest.raises(InvalidRequest):
        validate_code(provider, url=SCT, coding={"system": ICD, "code": "E11"})
    with pytest.raises(UnknownSystem):
        validate_code(provider, url="http://nope", code="1")
