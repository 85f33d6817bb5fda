"""SMART v2 scopes: parsing, v1 mapping, granular filters, grants."""
import pytest

from server.auth.scopes import Scope, ScopeError, ScopeSet, grant, parse_scope, parse_scopes

LAB = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"


@pytest.mark.parametrize("text, expected", [
    ("patient/Observation.rs", Scope("patient", "Observation", "rs")),
    ("user/*.cruds", Scope("user", "*", "cruds")),
    ("system/Patient.s", Scope("system", "Patient", "s")),
    ("system/*.cud", Scope("system", "*", "cud")),
])
def test_v2_scopes_parse(text, expected):
    assert parse_scope(text) == expected
    assert str(parse_scope(text)) == text


@pytest.mark.parametrize("v1, v2", [
    ("patient/Observation.read", "patient/Observation.rs"),
    ("user/*.write", "user/*.cud"),
    ("system/*.*", "system/*.cruds"),
])
def test_v1_scopes_map_to_v2(v1, v2):
    assert str(parse_scope(v1)) == v2
    assert grant(v1, "system/*.cruds") == v2


@pytest.mark.parametrize("bad", [
    "patient/Observation.dus",   # out of order
    "patient/Observation.rr",    # repeated
    "patient/Observation.x",     # unknown permission
    "patient/Observation.",      # empty
    "clinic/Observation.rs",     # unknown context
    "patient/Obs-ervation.rs",
    "nonsense",
    "patient/Observation.rs?category=",   # blank value would widen the scope
    "patient/Observation.rs?category",
    "patient/Observation.rs?",
    "patient/Observation.rs?=x",
])
def test_malformed_scopes_are_refused(bad):
    with pytest.raises(ScopeError):
        parse_scope(bad)
    with pytest.raises(ScopeError):
        grant(bad, "system/*.cruds")


def test_non_resource_scopes_carry_no_permission():
    assert parse_scopes("openid fhirUser launch/patient offline_access patient/*.rs") == [
        Scope("patient", "*", "rs")]


def test_granular_scope_round_trips_and_encodes():
    s = parse_scope(f"patient/Observation.rs?category={LAB}")
    assert s.params == (("category", LAB),)
    assert str(s) == f"patient/Observation.rs?category={LAB}"
    odd = parse_scope("patient/Observation.rs?code=a%26b%3Dc")
    assert odd.params == (("code", "a&b=c"),)
    assert parse_scope(str(odd)) == odd


def test_grant_keeps_what_is_covered():
    assert grant("system/Patient.rs system/Observation.r", "system/*.rs") == \
        "system/Patient.rs system/Observation.r"
    # system allowance covers narrower contexts
    assert grant("patient/*.rs", "system/*.rs") == "patient/*.rs"


def test_grant_downgrades_to_the_allowed_part():
    assert grant("system/*.cruds", "system/*.rs") == "system/*.rs"
    assert grant("system/*.rs", "system/Patient.rs system/Observation.s") == \
        "system/Patient.rs system/Observation.s"
    # a broad request meets a granular allowance: the granular part is granted
    assert grant("patient/*.rs", f"patient/Observation.rs?category={LAB}") == \
        f"patient/Observation.rs?category={LAB}"
    # both filters apply when both are granular
    assert grant("patient/Observation.rs?code=1234-5", f"patient/Observation.rs?category={LAB}") == \
        f"patient/Observation.rs?category={LAB}&code=1234-5"


def test_grant_refuses_what_is_not_allowed():
    assert grant("system/*.cud", "system/*.rs") == ""
    assert grant("system/*.rs", "patient/*.rs") == ""          # wider context
    assert grant("user/Patient.rs", "patient/Patient.rs") == ""
    assert grant("system/Observation.rs", "system/Patient.rs") == ""


def test_grant_passes_non_resource_scopes_only_when_allowed():
    assert grant("system/*.rs openid", "system/*.rs") == "system/*.rs"
    assert grant("system/*.rs openid", "system/*.rs openid") == "system/*.rs openid"


def test_scope_set_questions():
    ss = ScopeSet(f"patient/Observation.rs?category={LAB} patient/Patient.r system/Encounter.cruds")
    assert ss.permits("Observation", "s") and not ss.permits("Observation", "c")
    assert ss.filters("Observation", "r") == [(("category", LAB),)]
    assert ss.filters("Patient", "r") is None
    assert ss.filters("Patient", "s") == []
    assert ss.contexts("Encounter", "d") == {"system"}
    assert not ScopeSet("openid")
