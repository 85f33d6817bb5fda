"""terminologies.ucum over ucumvert."""
from __future__ import annotations

import pytest

from terminologies import ucum
from terminologies.errors import TerminologyError

CLINICAL = ["[pH]", "mg/dL", "mmol/L", "kg", "g", "[lb_av]", "cm", "[in_i]", "m", "kg/m2", "mm[Hg]", "/min", "{beats}/min",
            "%", "Cel", "[degF]", "10*3/uL", "fL", "pg", "g/dL", "mL/min/{1.73_m2}", "U/L", "[IU]/L"]


@pytest.mark.parametrize("unit", CLINICAL)
def test_clinical_units_valid(unit):
    assert ucum.is_valid(unit)


@pytest.mark.parametrize("unit", ["", "bogus", "mg /dL", " kg", "mg//dL", None])
def test_invalid_units(unit):
    assert not ucum.is_valid(unit)


@pytest.mark.parametrize("value,src,dst,expected", [
    (1, "[lb_av]", "kg", 0.45359237),
    (1, "[in_i]", "cm", 2.54),
    (100, "mg/dL", "g/L", 1.0),
    (14, "g/dL", "g/L", 140),
    (37, "Cel", "[degF]", 98.6),
    (98.6, "[degF]", "Cel", 37),
    (0, "Cel", "K", 273.15),
    (5, "10*3/uL", "10*9/L", 5),
    (120, "mm[Hg]", "kPa", 15.99868648),
    (60, "{beats}/min", "/s", 1),
    (72, "{beats}/min", "/min", 72),
    (50, "%", "1", 0.5),
    (90, "fL", "um3", 90),
    (1000, "[IU]/L", "[IU]/mL", 1),
    (60, "mL/min/{1.73_m2}", "mL/s", 1),
    (2, "kg/m2", "g/cm2", 0.2),
    (30, "pg", "ng", 0.03),
])
def test_convert(value, src, dst, expected):
    assert ucum.convert(value, src, dst) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("src,dst", [
    ("mg/dL", "mmol/L"),      # needs a molar mass
    ("kg", "m"),
    ("[IU]/L", "/L"),         # arbitrary units only with themselves
    ("[IU]/L", "U/L"),
    ("U/L", "mmol/L"),
    ("Cel", "kg"),
    ("bogus", "kg"),
    ("[pH]", "1"),
    ("mol/L", "[pH]"),
])
def test_incommensurable(src, dst):
    with pytest.raises(ucum.UnitError) as e:
        ucum.convert(1, src, dst)
    assert isinstance(e.value, TerminologyError) and e.value.issue_code == "invalid"


@pytest.mark.parametrize("value,unit,expected", [
    (1, "[lb_av]", (453.59237, "g")),
    (100, "mg/dL", (1000.0, "g.m-3")),
    (37, "Cel", (310.15, "K")),
    (50, "%", (0.5, "1")),
    (3, "[IU]/L", (3000.0, "[IU].m-3")),
    (1, "mm[Hg]", (133322.387415, "g.m-1.s-2")),
    (7.4, "[pH]", (7.4, "[pH]")),
])
def test_canonical(value, unit, expected):
    v, u = ucum.canonical(value, unit)
    assert u == expected[1] and v == pytest.approx(expected[0])
    assert ucum.is_valid(u)
    assert ucum.convert(v, u, unit) == pytest.approx(value)


def test_same_dimension_same_canonical():
    assert ucum.canonical(1, "kg")[1] == ucum.canonical(1, "[lb_av]")[1] == "g"
    assert ucum.canonical(1, "mmol/L")[1] != ucum.canonical(1, "mg/dL")[1]


def test_special_unit_to_itself():
    assert ucum.convert(7.4, "[pH]", "[pH]") == 7.4
