"""ValueSet/$expand and expand_codes."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest, TooCostly, UnknownSystem, UnknownValueSet
from terminologies.operations.valueset_expand import expand, expand_codes

from ._data import ICD, SCT


def _codes(vs):
    return [c["code"] for c in vs["expansion"].get("contains", [])]


def _inline(*include, exclude=(), **compose):
    return {"resourceType": "ValueSet", "status": "active",
            "compose": {"include": list(include), **({"exclude": list(exclude)} if exclude else {}), **compose}}


def test_is_a_by_url(provider):
    vs = expand(provider, url="http://example.org/vs/diabetes")
    assert _codes(vs) == ["73211009", "46635009", "44054006", "8801005"]
    exp = vs["expansion"]
    assert exp["total"] == 4 and exp["offset"] == 0 and exp["timestamp"]
    assert {"name": "version", "valueUri": f"{SCT}|20240101"} in exp["parameter"]
    first = exp["contains"][0]
    assert first == {"system": SCT, "version": "20240101", "code": "73211009", "display": "Diabetes mellitus"}
    assert vs["url"] == "http://example.org/vs/diabetes" and "compose" in vs


def test_url_with_version(provider):
    assert len(_codes(expand(provider, url="http://example.org/vs/diabetes|1"))) == 4
    with pytest.raises(UnknownValueSet):
        expand(provider, url="http://example.org/vs/diabetes|2")


def test_descendent_of_with_exclude(provider):
    assert _codes(expand(provider, url="http://example.org/vs/endocrine-no-t1")) == ["73211009", "44054006", "8801005"]


def test_concept_list_and_valueset_import(provider):
    vs = expand(provider, url="http://example.org/vs/mixed")
    contains = vs["expansion"]["contains"]
    assert [(c["system"], c["code"]) for c in contains[:2]] == [(ICD, "E11"), (ICD, "E10")]
    assert contains[1]["display"] == "Type 1 DM"     # the value set's display wins
    assert _codes(vs)[2:] == ["73211009", "46635009", "44054006", "8801005"]


def test_include_intersects_with_imported_valueset(provider):
    vs = _inline({"system": SCT, "filter": [{"property": "concept", "op": "descendent-of", "value": "64572001"}],
                  "valueSet": ["http://example.org/vs/diabetes"]})
    assert _codes(expand(provider, vs)) == ["73211009", "46635009", "44054006", "8801005"]
    vs = _inline({"valueSet": ["http://example.org/vs/diabetes", "http://example.org/vs/endocrine-no-t1"]})
    assert _codes(expand(provider, vs)) == ["73211009", "44054006", "8801005"]


def test_whole_system_and_active_only(provider):
    vs = _inline({"system": SCT})
    assert len(_codes(expand(provider, vs))) == 10
    assert "11530004" not in _codes(expand(provider, vs, active_only=True))
    inactive = next(c for c in expand(provider, vs)["expansion"]["contains"] if c["code"] == "11530004")
    assert inactive["inactive"] is True
    assert "11530004" not in _codes(expand(provider, _inline({"system": SCT}, inactive=False)))


@pytest.mark.parametrize("flt,expected", [
    ({"property": "concept", "op": "is-a", "value": "126877002"}, ["126877002", "73211009", "46635009", "44054006", "8801005"]),
    ({"property": "concept", "op": "descendent-of", "value": "126877002"}, ["73211009", "46635009", "44054006", "8801005"]),
    ({"property": "concept", "op": "is-not-a", "value": "64572001"}, ["404684003", "11530004"]),
    ({"property": "concept", "op": "generalizes", "value": "362969004"}, ["404684003", "64572001", "362969004"]),
    ({"property": "concept", "op": "in", "value": "44054006, 46635009,nope"}, ["44054006", "46635009"]),
    ({"property": "concept", "op": "=", "value": "8801005"}, ["8801005"]),
    ({"property": "code", "op": "regex", "value": "4[0-9]+"}, ["404684003", "46635009", "44054006"]),
    ({"property": "display", "op": "regex", "value": "Diabetes mellitus type [0-9]"}, ["46635009", "44054006"]),
    ({"property": "sufficientlyDefined", "op": "=", "value": "true"}, ["8801005"]),
    ({"property": "parent", "op": "=", "value": "73211009"}, ["46635009", "44054006", "8801005"]),
    ({"property": "parent", "op": "in", "value": "362969004,126877002"}, ["73211009"]),
    ({"property": "moduleId", "op": "not-in", "value": "900000000000207008"}, []),
    ({"property": "inactive", "op": "=", "value": "true"}, ["11530004"]),
    ({"property": "sufficientlyDefined", "op": "exists", "value": "true"}, None),
])
def test_filters(provider, flt, expected):
    got = _codes(expand(provider, _inline({"system": SCT, "filter": [flt]})))
    if expected is None:
        assert len(got) == 10
    else:
        assert got == expected


def test_filters_are_anded(provider):
    vs = _inline({"system": SCT, "filter": [{"property": "concept", "op": "is-a", "value": "73211009"},
                                             {"property": "display", "op": "regex", "value": ".*type 2"}]})
    assert _codes(expand(provider, vs)) == ["44054006"]


def test_text_filter_matches_display_designation_and_code(provider):
    url = "http://example.org/vs/diabetes"
    assert _codes(expand(provider, url=url, filter="TYPE 2")) == ["44054006"]
    assert _codes(expand(provider, url=url, filter="trastorno")) == ["73211009"]
    assert _codes(expand(provider, url=url, filter="secondary mellitus")) == ["8801005"]
    assert _codes(expand(provider, url=url, filter="8801005")) == ["8801005"]
    vs = expand(provider, url=url, filter="zzz")
    assert vs["expansion"]["total"] == 0 and "contains" not in vs["expansion"]


def test_paging(provider):
    url = "http://example.org/vs/diabetes"
    full = _codes(expand(provider, url=url))
    page = expand(provider, url=url, count=2, offset=1)
    assert _codes(page) == full[1:3]
    assert page["expansion"]["total"] == 4 and page["expansion"]["offset"] == 1
    names = {p["name"] for p in page["expansion"]["parameter"]}
    assert {"count", "offset"} <= names
    assert _codes(expand(provider, url=url, count=2, offset=3)) == full[3:]
    assert _codes(expand(provider, url=url, count="0")) == []
    assert _codes(expand(provider, url=url, offset=10)) == []


def test_include_designations(provider):
    vs = expand(provider, url="http://example.org/vs/diabetes", include_designations=True, count=1)
    assert {d["value"] for d in vs["expansion"]["contains"][0]["designation"]} == {
        "Diabetes mellitus (disorder)", "diabetes mellitus (trastorno)"}
    assert "designation" not in expand(provider, url="http://example.org/vs/diabetes")["expansion"]["contains"][0]


def test_pre_expanded_valueset(provider):
    vs = {"resourceType": "ValueSet", "url": "http://example.org/vs/pre", "expansion": {"contains": [
        {"system": "http://x", "code": "a", "display": "A", "contains": [{"system": "http://x", "code": "b"}]}]}}
    assert _codes(expand(provider, vs)) == ["a", "b"]


def test_unknown_codes_of_complete_system_are_dropped_but_kept_for_unknown_system(provider):
    vs = _inline({"system": SCT, "concept": [{"code": "73211009"}, {"code": "000"}]},
                 {"system": "http://example.org/local", "concept": [{"code": "x", "display": "X"}]})
    out = expand(provider, vs)
    assert _codes(out) == ["73211009", "x"]
    assert out["expansion"]["contains"][1]["display"] == "X"


def test_too_costly(provider):
    with pytest.raises(TooCostly) as e:
        expand(provider, _inline({"system": SCT}), max_size=5)
    assert e.value.issue_code == "too-costly"
    assert len(_codes(expand(provider, _inline({"system": SCT}), count=5, max_size=5))) == 5


@pytest.mark.parametrize("vs,exc", [
    (_inline({"system": "http://nope"}), UnknownSystem),
    (_inline({"system": SCT, "filter": [{"property": "concept", "op": "is-a", "value": "73211009"}],
              "valueSet": ["http://example.org/vs/missing"]}), UnknownValueSet),
    (_inline({"system": SCT, "filter": [{"property": "concept", "op": "sounds-like", "value": "x"}]}), InvalidRequest),
    (_inline({"system": SCT, "filter": [{"property": "concept", "op": "is-a"}]}), InvalidRequest),
    (_inline({"system": SCT, "filter": [{"property": "display", "op": "is-a", "value": "x"}]}), InvalidRequest),
    (_inline({"system": SCT, "filter": [{"property": "code", "op": "regex", "value": "("}]}), InvalidRequest),
    (_inline({"system": SCT, "concept": [{"code": "1"}], "filter": [{"property": "concept", "op": "=", "value": "1"}]}),
     InvalidRequest),
    (_inline({"concept": [{"code": "1"}]}), InvalidRequest),
    ({"resourceType": "ValueSet"}, InvalidRequest),
    ({"resourceType": "CodeSystem"}, InvalidRequest),
])
def test_errors(provider, vs, exc):
    with pytest.raises(exc):
        expand(provider, vs)


def test_missing_input_and_bad_paging(provider):
    with pytest.raises(InvalidRequest):
        expand(provider)
    with pytest.raises(InvalidRequest):
        expand(provider, url="http://example.org/vs/diabetes", count=-1)
    with pytest.raises(InvalidRequest):
        expand(provider, url="http://example.org/vs/diabetes", active_only="maybe")


def test_import_cycle_detected(provider):
    provider.add({"resourceType": "ValueSet", "url": "http://example.org/vs/a", "compose": {"include": [{"valueSet": ["http://example.org/vs/b"]}]}})
    provider.add({"resourceType": "ValueSet", "url": "http://example.org/vs/b", "compose": {"include": [{"valueSet": ["http://example.org/vs/a"]}]}})
    with pytest.raises(InvalidRequest, match="cycle"):
        expand(provider, url="http://example.org/vs/a")


def test_expand_codes_cached_and_invalidated_by_revision(provider):
    codes = expand_codes(provider, "http://example.org/vs/diabetes")
    assert codes == {(SCT, "73211009"), (SCT, "46635009"), (SCT, "44054006"), (SCT, "8801005")}
    assert expand_codes(provider, "http://example.org/vs/diabetes|1") == codes
    assert expand_codes(provider, "http://example.org/vs/diabetes") is codes
    provider.add({**provider.value_set("http://example.org/vs/diabetes"),
                  "compose": {"include": [{"system": SCT, "concept": [{"code": "44054006"}]}]}})
    assert expand_codes(provider, "http://example.org/vs/diabetes") == {(SCT, "44054006")}


def test_expand_codes_inline_keyed_by_content(provider):
    a = _inline({"system": SCT, "concept": [{"code": "44054006"}]})
    b = _inline({"system": SCT, "concept": [{"code": "46635009"}]})
    assert expand_codes(provider, a) == {(SCT, "44054006")}
    assert expand_codes(provider, b) == {(SCT, "46635009")}


_CONSISTENCY = [
    "http://example.org/vs/diabetes", "http://example.org/vs/endocrine-no-t1", "http://example.org/vs/mixed",
    _inline({"system": SCT}, inactive=False),
    _inline({"system": SCT, "filter": [{"property": "concept", "op": "generalizes", "value": "44054006"}]},
            exclude=[{"system": SCT, "filter": [{"property": "concept", "op": "is-a", "value": "362969004"}]}]),
    _inline({"system": SCT, "filter": [{"property": "concept", "op": "is-not-a", "value": "73211009"},
                                        {"property": "inactive", "op": "=", "value": "false"}]},
            {"system": ICD}),
    _inline({"system": SCT, "filter": [{"property": "concept", "op": "descendent-of", "value": "64572001"}],
             "valueSet": ["http://example.org/vs/endocrine-no-t1"]}),
]


@pytest.mark.parametrize("vs", _CONSISTENCY)
def test_expand_codes_agrees_with_expand(provider, vs):
    """expand_codes takes a set-only path; it must give exactly the codes of $expand."""
    if isinstance(vs, str):
        listed = expand(provider, url=vs)
    else:
        listed = expand(provider, vs)
    want = {(c["system"], c["code"]) for c in listed["expansion"].get("contains", [])}
    from terminologies.operations.valueset_expand import clear_cache

    clear_cache()
    assert expand_codes(provider, vs) == want
    assert want


def test_expand_codes_errors(provider):
    with pytest.raises(UnknownSystem):
        expand_codes(provider, _inline({"system": "http://nope", "filter": [
            {"property": "concept", "op": "is-a", "value": "1"}]}))
    with pytest.raises(UnknownValueSet):
        expand_codes(provider, "http://example.org/vs/missing")


def test_display_language(provider):
    vs = expand(provider, url="http://example.org/vs/diabetes", display_language="es-ES", count=2)
    contains = vs["expansion"]["contains"]
    assert contains[0]["display"] == "diabetes mellitus (trastorno)"      # primary subtag match
    assert contains[1]["display"] == "Diabetes mellitus type 1"           # no Spanish designation
    assert {"name": "displayLanguage", "valueCode": "es-ES"} in vs["expansion"]["parameter"]
