"""``server.fhir.validation``: the element cache changes speed only, never the verdict."""
from __future__ import annotations

import copy
import uuid

import pytest

from server.errors import InvalidResource
from server.fhir import validation as V

pytestmark = pytest.mark.skipif(not V.ELEMENT_CACHE, reason="fhir_core without FhirBase.fhir_model_validator")


def _obs(code: dict, **extra) -> dict:
    return {"resourceType": "Observation", "status": "final", "code": code,
            "subject": {"reference": "Patient/p1"}, **extra}


def _code(system: str = "http://loinc.org", code: str = "8867-4") -> dict:
    return {"coding": [{"system": system, "code": code, "display": "Heart rate"}], "text": "HR"}


def _error(body: dict) -> InvalidResource:
    with pytest.raises(InvalidResource) as info:
        V.validate(body)
    return info.value


def _uncached(monkeypatch):
    monkeypatch.setattr(V._ELEMENTS, "validate", lambda orig, cls, value, mk: orig(cls, value, mk))


@pytest.fixture()
def fresh_cache(monkeypatch):
    cache = V._ElementCache()
    monkeypatch.setattr(V, "_ELEMENTS", cache)
    return cache


def _stats(cache, name: str) -> list[int]:
    memo = next(v for k, v in cache.models.items() if k.__name__ == name)
    return [memo.lookups, memo.hits]


def test_repeated_elements_hit_the_cache(fresh_cache):
    V.validate(_obs(_code()))
    V.validate(_obs(_code()))
    lookups, hits = _stats(fresh_cache, "CodeableConcept")
    assert (lookups, hits) == (2, 1)


@pytest.mark.parametrize("bad, where", [
    ({"coding": [{"system": "http://loinc.org", "code": 12}]}, "Observation.code.coding[0].code"),
    ({"coding": [None]}, "Observation.code.coding"),
    ({"coding": [{"system": "http://loinc.org", "cod": "1"}]}, "Observation.code.coding[0].cod"),
    ({"text": ["not", "a", "string"]}, "Observation.code.text"),
])
def test_invalid_elements_fail_with_the_same_message_cached_or_not(fresh_cache, monkeypatch, bad, where):
    V.validate(_obs(_code()))          # the valid neighbour is cached
    cached = _error(_obs(copy.deepcopy(bad)))
    cached_again = _error(_obs(copy.deepcopy(bad)))   # failures are never stored
    _uncached(monkeypatch)
    plain = _error(_obs(copy.deepcopy(bad)))
    assert cached.message == cached_again.message == plain.message
    assert cached.expression == plain.expression == [where]
    assert cached.issues == plain.issues


def test_valid_element_then_an_invalid_one_of_the_same_shape(fresh_cache):
    V.validate(_obs({"coding": [{"system": "http://loinc.org", "code": "1"}]}))
    err = _error(_obs({"coding": [{"system": "http://loinc.org", "code": 1}]}))
    assert err.expression == ["Observation.code.coding[0].code"]


def _outcome(body: dict) -> str:
    try:
        V.validate(body)
    except InvalidResource as exc:
        return exc.message
    return "valid"


_COD = {"system": "http://loinc.org", "code": "1"}
_UID = uuid.UUID(int=7)


@pytest.mark.parametrize("element, model, plain, odd", [
    ("valueQuantity", "Quantity", {"value": None, "unit": "x"}, {"value": float("nan"), "unit": "x"}),
    ("code", "CodeableConcept", {"coding": [_COD]}, {"coding": (_COD,)}),
    ("subject", "Reference", {"reference": str(_UID)}, {"reference": _UID}),
])
def test_look_alikes_of_a_cached_value_are_validated(fresh_cache, monkeypatch, element, model, plain, odd):
    """orjson writes NaN as null, a tuple as a list, a UUID as a string: such a value has the
    key of a cached one but is not that JSON, so it is validated, with the usual verdict."""
    import orjson

    assert orjson.dumps(plain) == orjson.dumps(odd)
    V.validate({**_obs(_code()), element: copy.deepcopy(plain)})
    hits = _stats(fresh_cache, model)[1]
    cached = _outcome({**_obs(_code()), element: odd})
    assert _stats(fresh_cache, model)[1] == hits
    _uncached(monkeypatch)
    assert cached == _outcome({**_obs(_code()), element: odd})


def test_rarely_repeating_elements_stop_being_cached(fresh_cache, monkeypatch):
    monkeypatch.setattr(fresh_cache, "PROBE", 20)
    for i in range(30):
        V.validate(_obs(_code(code=f"c{i}")))
    off = {k.__name__: m for k, m in fresh_cache.models.items() if m.off}
    assert "CodeableConcept" in off
    assert not any(m.entries for m in off.values())


def test_no_cache_outside_validate(fresh_cache):
    """Models built elsewhere are never shared instances from the cache."""
    model = V.model_class("Observation")
    V.validate(_obs(_code()))
    lookups = _stats(fresh_cache, "CodeableConcept")[0]
    a = model.model_validate(_obs(_code()))
    b = model.model_validate(_obs(_code()))
    assert a.code is not b.code
    assert _stats(fresh_cache, "CodeableConcept")[0] == lookups


def test_validate_returns_the_body_unchanged(fresh_cache):
    body = _obs(_code(), valueQuantity={"value": 72, "unit": "/min"})
    before = copy.deepcopy(body)
    assert V.validate(body) is body
    assert V.validate(body) == before


@pytest.mark.parametrize("body, where", [
    ({"resourceType": "Patient", "name": [{"family": "a\x00b"}]}, "Patient.name[0].family"),
    ({"resourceType": "Patient", "identifier": [{"system": "s", "value": "a\x1f"}]},
     "Patient.identifier[0].value"),
    ({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
      "note": [{"text": "bell \x07"}]}, "Observation.note[0].text"),
])
def test_a_control_character_in_a_string_is_refused(body, where):
    """FHIR R4 datatypes §2.24.0.1: no code point below U+0020 but tab, CR and LF (a NUL
    reached PostgreSQL's search index and failed there with a 500)."""
    with pytest.raises(InvalidResource, match="control character") as info:
        V.validate(body)
    assert where in str(info.value.message)


def test_tab_cr_and_lf_are_allowed_in_strings():
    V.validate({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                "note": [{"text": "line 1\r\nline 2\tend"}]})


@pytest.mark.parametrize("text", ["C:\\\\base\\\\file", "a\\\\b", "\\\\u0000 is how JSON writes NUL", "\\\\\\\\f"])
def test_backslashes_before_b_f_or_u0000_are_text_not_control_characters(text):
    """The check searches orjson's escapes: an escaped backslash followed by b, f or
    u0000 is text (an even run of backslashes before the letter)."""
    V.validate({"resourceType": "Observation", "status": "final", "code": {"text": text}})
    with pytest.raises(InvalidResource, match="control character"):
        V.validate({"resourceType": "Observation", "status": "final", "code": {"text": text + "\x0c"}})
