"""CodeSystem/$subsumes."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest, UnknownCode, UnknownSystem
from terminologies.operations.codesystem_subsumes import subsumes

from ._data import ICD, SCT, params


@pytest.mark.parametrize("a,b,outcome", [
    ("73211009", "44054006", "subsumes"),
    ("44054006", "73211009", "subsumed-by"),
    ("44054006", "44054006", "equivalent"),
    ("44054006", "46635009", "not-subsumed"),
])
def test_outcomes(provider, a, b, outcome):
    assert params(subsumes(provider, SCT, a, b))["outcome"] == [outcome]


def test_codings(provider):
    out = subsumes(provider, coding_a={"system": SCT, "code": "64572001"}, coding_b={"system": SCT, "code": "8801005"})
    assert params(out)["outcome"] == ["subsumes"]
    assert params(subsumes(provider, ICD, "E10-E14", "E11"))["outcome"] == ["subsumes"]


def test_errors(provider):
    with pytest.raises(InvalidRequest, match="one system"):
        subsumes(provider, coding_a={"system": SCT, "code": "1"}, coding_b={"system": ICD, "code": "E11"})
    with pytest.raises(InvalidRequest):
        subsumes(provider, code_a="1", code_b="2")
    with pytest.raises(InvalidRequest):
        subsumes(provider, SCT, "73211009", None)
    with pytest.raises(InvalidRequest):
        subsumes(provider, SCT, "73211009", "44054006", coding_a={"system": SCT, "code": "1"})
    with pytest.raises(UnknownCode):
        subsumes(provider, SCT, "73211009", "999")
    with pytest.raises(UnknownSystem):
        subsumes(provider, "http://nope", "1", "2")
