"""CodeSystemData: construction, hierarchy, FHIR round trip, supplements."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest
from terminologies.model import CodeSystemData, Concept, Designation

from ._data import SCT, diabetes_cs


def test_container_protocol_and_order():
    cs = diabetes_cs()
    assert len(cs) == 10
    assert "73211009" in cs and "nope" not in cs
    assert list(cs)[:2] == ["404684003", "64572001"]
    assert cs.get("73211009").display == "Diabetes mellitus"
    assert cs.get("nope") is None


def test_ancestors_follow_every_parent():
    cs = diabetes_cs()
    assert cs.ancestors("44054006") == {"73211009", "362969004", "126877002", "64572001", "404684003"}
    assert cs.ancestors("404684003") == frozenset()
    assert cs.ancestors("unknown") == frozenset()


def test_descendants_and_children():
    cs = diabetes_cs()
    assert cs.descendants("73211009") == {"46635009", "44054006", "8801005"}
    assert cs.descendants("64572001") == {"362969004", "126877002", "73211009", "46635009", "44054006",
                                          "8801005", "38341003"}
    assert set(cs.children("64572001")) == {"362969004", "126877002", "38341003"}
    assert cs.descendants("44054006") == frozenset()


def test_closures_are_cached():
    cs = diabetes_cs()
    assert cs.ancestors("44054006") is cs.ancestors("44054006")
    assert cs.descendants("64572001") is cs.descendants("64572001")


@pytest.mark.parametrize("a,b,outcome", [
    ("73211009", "73211009", "equivalent"),
    ("73211009", "44054006", "subsumes"),
    ("44054006", "64572001", "subsumed-by"),
    ("46635009", "44054006", "not-subsumed"),
    ("126877002", "46635009", "subsumes"),   # through the second parent
])
def test_subsumes(a, b, outcome):
    assert diabetes_cs().subsumes(a, b) == outcome


def test_cycle_in_bad_data_terminates():
    cs = CodeSystemData.from_concepts("http://x", [Concept("a", parents=("b",)), Concept("b", parents=("a",))])
    assert cs.ancestors("a") == {"b"}
    assert cs.descendants("a") == {"b"}


def test_from_resource_nested_and_parent_properties():
    cs = CodeSystemData.from_resource({
        "resourceType": "CodeSystem", "url": "http://x", "version": "2", "content": "complete",
        "property": [{"code": "color", "type": "code"}],
        "concept": [
            {"code": "root", "display": "Root", "concept": [{"code": "a", "display": "A"}]},
            {"code": "b", "property": [{"code": "parent", "valueCode": "root"},
                                       {"code": "subsumedBy", "valueCode": "a"},
                                       {"code": "color", "valueCode": "red"},
                                       {"code": "status", "valueCode": "retired"}]},
            {"code": "c", "property": [{"code": "child", "valueCode": "b"},
                                       {"code": "inactive", "valueBoolean": True}]},
        ],
    })
    assert cs.get("a").parents == ("root",)
    assert set(cs.get("b").parents) == {"root", "a", "c"}
    assert cs.get("b").inactive and cs.get("c").inactive
    assert ("color", "red") in cs.get("b").properties
    assert cs.version == "2"


@pytest.mark.parametrize("bad", [
    {"resourceType": "ValueSet", "url": "http://x"},
    {"resourceType": "CodeSystem", "content": "complete"},
    {"resourceType": "CodeSystem", "url": "http://x", "content": "everything"},
    {"resourceType": "CodeSystem", "url": "http://x", "content": "complete", "concept": [{"display": "no code"}]},
])
def test_from_resource_rejects_bad_input(bad):
    with pytest.raises(InvalidRequest):
        CodeSystemData.from_resource(bad)


def test_to_resource_round_trip():
    cs = diabetes_cs()
    res = cs.to_resource()
    assert res["resourceType"] == "CodeSystem" and res["url"] == SCT and res["count"] == 10
    assert res["hierarchyMeaning"] == "is-a"
    dm = next(c for c in res["concept"] if c["code"] == "73211009")
    assert [p["valueCode"] for p in dm["property"] if p["code"] == "parent"] == ["362969004", "126877002"]
    back = CodeSystemData.from_resource(res)
    assert list(back) == list(cs)
    for code in cs:
        assert back.get(code) == cs.get(code)
    assert "concept" not in cs.to_resource(include_concepts=False)


def test_apply_supplement_adds_designations_not_meaning():
    base = diabetes_cs()
    sup = CodeSystemData.from_concepts(
        "http://example.org/sup", [Concept("73211009", "Zuckerkrankheit"), Concept("999", "Not in base")],
        content="supplement", supplements=SCT, meta={"language": "de"})
    merged = base.apply_supplement(sup)
    dm = merged.get("73211009")
    assert dm.display == "Diabetes mellitus"
    assert Designation("de", None, "Zuckerkrankheit") in dm.designations
    assert "999" not in merged          # base is complete
    assert base.get("73211009").designations != dm.designations  # base untouched


def test_apply_supplement_to_not_present_base_adds_codes():
    base = CodeSystemData.from_concepts(SCT, [], content="not-present")
    sup = CodeSystemData.from_concepts("http://example.org/sup", [Concept("73211009", "Diabetes mellitus")],
                                       content="supplement", supplements=SCT)
    merged = base.apply_supplement(sup)
    assert merged.get("73211009").display == "Diabetes mellitus"
    assert merged.content == "fragment"


def test_ordered_closures():
    cs = CodeSystemData.from_concepts("http://x", [
        Concept("r"), Concept("a", parents=("r",)), Concept("b", parents=("r",)),
        Concept("c", parents=("a", "b")), Concept("d", parents=("c",))])
    assert cs.descendants_in_order("r") == ["a", "c", "d", "b"]      # depth first, each code once
    assert cs.descendants_in_order("d") == []
    order = cs.ancestors_in_order("d")
    assert order[0] == "r" and order[-1] == "c" and set(order) == {"r", "a", "b", "c"}
    assert cs.ancestors_in_order("nope") == []


def test_subclass_with_own_hierarchy_storage_is_used_through_its_methods():
    """A subclass that overrides children/_descendants (as the server's SQL-backed code
    system does) must not need the in-memory children index."""

    class External(CodeSystemData):
        def children(self, code):
            return {"r": ("a",), "a": ("b",)}.get(code, ())

        def _descendants(self, code):
            return frozenset({"r": {"a", "b"}, "a": {"b"}}.get(code, set()))

    cs = External("http://x", {"r": Concept("r"), "a": Concept("a", parents=("r",)),
                               "b": Concept("b", parents=("a",))})
    assert cs.descendants_in_order("r") == ["a", "b"]
    assert cs._children is None
    from terminologies.operations.valueset_expand import expand
    from terminologies.provider import InMemoryProvider

    vs = {"resourceType": "ValueSet", "compose": {"include": [
        {"system": "http://x", "filter": [{"property": "concept", "op": "is-a", "value": "r"}]}]}}
    assert [c["code"] for c in expand(InMemoryProvider(cs), vs)["expansion"]["contains"]] == ["r", "a", "b"]
