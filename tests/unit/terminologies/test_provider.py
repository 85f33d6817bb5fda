"""InMemoryProvider."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest
from terminologies.provider import InMemoryProvider, TerminologyProvider, split_canonical

from ._data import CM_SCT_ICD, SCT, diabetes_cs


def test_is_a_terminology_provider(provider):
    assert isinstance(provider, TerminologyProvider)


def test_latest_version_is_numeric_aware():
    p = InMemoryProvider(diabetes_cs("2.9"), diabetes_cs("2.10"))
    assert p.code_system(SCT).version == "2.10"
    assert p.code_system(SCT, "2.9").version == "2.9"
    assert p.code_system(SCT, "3") is None
    assert p.code_system("http://nope") is None


def test_value_sets_and_maps(provider):
    assert provider.value_set("http://example.org/vs/diabetes")["version"] == "1"
    assert provider.value_set("http://example.org/vs/diabetes", "2") is None
    assert provider.concept_maps(url="http://example.org/cm/sct-icd") == [CM_SCT_ICD]
    assert provider.concept_maps(url="http://example.org/cm/sct-icd|1") == [CM_SCT_ICD]
    assert provider.concept_maps(url="http://example.org/cm/sct-icd|2") == []
    assert provider.concept_maps(source="http://example.org/vs/diabetes") == [CM_SCT_ICD]
    assert provider.concept_maps(target="http://example.org/vs/other") == []


def test_supplements_and_revision():
    p = InMemoryProvider(diabetes_cs())
    rev = p.revision
    p.add({"resourceType": "CodeSystem", "url": "http://example.org/sup", "content": "supplement",
           "supplements": f"{SCT}|20240101", "concept": [{"code": "73211009", "display": "DM"}]})
    assert p.revision != rev
    assert [s.url for s in p.supplements(SCT)] == ["http://example.org/sup"]
    assert p.supplements("http://other") == []


@pytest.mark.parametrize("bad", [{"resourceType": "Patient"}, {"resourceType": "ValueSet"}, "text"])
def test_add_rejects(bad):
    with pytest.raises(InvalidRequest):
        InMemoryProvider().add(bad)


def test_split_canonical():
    assert split_canonical("http://x|1.0") == ("http://x", "1.0")
    assert split_canonical("http://x") == ("http://x", None)
