"""Mapping specification files: loading and validation errors that name the field."""
from __future__ import annotations

import json
import tomllib

import pytest

from mappings.errors import SpecError
from mappings.paths import compile_first, compile_path, first, parse_path
from mappings.spec import SPEC_DIR, load_spec, parse_spec


def _default() -> dict:
    return tomllib.loads((SPEC_DIR / "default.toml").read_text())


def test_default_spec_loads():
    spec = load_spec()
    assert spec.name == "default"
    kinds = {e.kind for e in spec.events}
    assert {"encounter", "condition_onset", "condition_abatement", "observation", "procedure",
            "medication", "immunization", "diagnostic_report", "imaging_study"} <= kinds
    assert spec.vocabulary.settings("observation") == (40, 5)
    assert spec.vocabulary.settings("condition") == (50, 5)
    assert spec.units.loinc["8310-5"] == "Cel"


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["vocabulary"].__setitem__("top_k", -1), "vocabulary.top_k"),
    (lambda d: d["vocabulary"].__setitem__("min_count", 0), "vocabulary.min_count"),
    (lambda d: d["events"][0].__setitem__("kind", "visit"), "events.0.kind"),
    (lambda d: d["events"][1].__setitem__("resource", "Conditon"), "events.1.resource"),
    (lambda d: d["events"][2].__setitem__("time", ["abatement..x"]), "events.2.time"),
    (lambda d: d["events"][3].__setitem__("colour", "red"), "events.3.colour"),
    (lambda d: d["events"][3].__setitem__("time", []), "events.3.time"),
    (lambda d: d["demographics"].__setitem__("sex", ["gender("]), "demographics.sex"),
    (lambda d: d["units"].__setitem__("default", "first"), "units.default"),
    (lambda d: d["events"][0].__setitem__("components", "component"), "components"),
])
def test_invalid_field_is_named(mutate, field):
    d = _default()
    mutate(d)
    with pytest.raises(SpecError) as exc:
        parse_spec(d, "test.toml")
    assert field in str(exc.value)
    assert "test.toml" in str(exc.value)


def test_json_spec_and_missing_file(tmp_path):
    d = _default()
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(d, default=str))
    assert load_spec(p).name == "default"
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(SpecError, match="cannot be parsed"):
        load_spec(bad)


def test_with_vocabulary_validates():
    spec = load_spec().with_vocabulary(top_k=3, min_count=2)
    assert spec.vocabulary.settings("condition") == (3, 2)
    with pytest.raises(Exception):
        load_spec().with_vocabulary(top_k=-5)


def test_paths():
    obj = {"identifier": [{"system": "a", "value": "1"}, {"system": "urn:dicom:uid", "value": "2"}],
           "code": {"coding": [{"code": "x"}, {"code": "y"}]}}
    assert compile_path("identifier.where(system='urn:dicom:uid').value")(obj) == ["2"]
    assert compile_path("code.coding.code")(obj) == ["x", "y"]
    assert compile_path("missing.x")(obj) == []
    assert parse_path("a.where(b='c.d').e") == [("a", None), ("b", "c.d"), ("e", None)]
    with pytest.raises(ValueError):
        parse_path("a b")
    assert compile_first("code.coding.code")(obj) == "x"
    assert compile_first("identifier")(obj) == obj["identifier"][0]
    assert compile_first("nothing")(obj) is None
    assert compile_first("identifier.where(system='nope').value")(obj) is None
    assert first(["missing", "identifier.where(system='a').value"], obj) == "1"
