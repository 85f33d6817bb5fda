"""Importer: UCUM units as a CodeSystem fragment (http://unitsofmeasure.org)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from defusedxml import ElementTree as SafeET

from ..errors import InvalidRequest
from ..model import Concept
from . import drop_none as _drop_none

URL = "http://unitsofmeasure.org"

# Common clinical units (code, display) used when no ucum-essence.xml is given:
# vital signs, anthropometry and the usual chemistry/haematology units.
COMMON_UNITS: tuple[tuple[str, str], ...] = (
    ("1", "unity"), ("%", "percent"), ("/min", "per minute"), ("{beats}/min", "beats per minute"),
    ("{breaths}/min", "breaths per minute"), ("kg", "kilogram"), ("g", "gram"), ("mg", "milligram"),
    ("ug", "microgram"), ("ng", "nanogram"), ("pg", "picogram"), ("[lb_av]", "pound (avoirdupois)"),
    ("[oz_av]", "ounce (avoirdupois)"), ("m", "meter"), ("cm", "centimeter"), ("mm", "millimeter"),
    ("[in_i]", "inch (international)"), ("[ft_i]", "foot (international)"), ("kg/m2", "kilogram per square meter"),
    ("m2", "square meter"), ("mm[Hg]", "millimeter of mercury"), ("Cel", "degree Celsius"),
    ("[degF]", "degree Fahrenheit"), ("K", "kelvin"), ("L", "liter"), ("dL", "deciliter"), ("mL", "milliliter"),
    ("uL", "microliter"), ("fL", "femtoliter"), ("mg/dL", "milligram per deciliter"), ("g/dL", "gram per deciliter"),
    ("g/L", "gram per liter"), ("mg/L", "milligram per liter"), ("ug/L", "microgram per liter"),
    ("ng/mL", "nanogram per milliliter"), ("mmol/L", "millimole per liter"), ("umol/L", "micromole per liter"),
    ("mmol/mol", "millimole per mole"), ("meq/L", "milliequivalent per liter"), ("10*3/uL", "thousand per microliter"),
    ("10*6/uL", "million per microliter"), ("10*9/L", "billion per liter"), ("10*12/L", "trillion per liter"),
    ("U/L", "enzyme unit per liter"), ("[IU]/L", "international unit per liter"), ("m[IU]/L", "milli international unit per liter"),
    ("mL/min", "milliliter per minute"), ("mL/min/{1.73_m2}", "milliliter per minute per 1.73 square meter"),
    ("s", "second"), ("min", "minute"), ("h", "hour"), ("d", "day"), ("wk", "week"), ("mo", "month"), ("a", "year"),
    ("kPa", "kilopascal"), ("mosm/kg", "milliosmole per kilogram"), ("[pH]", "pH"), ("{score}", "score"),
)


def read(path: str | Path | None = None) -> tuple[dict, Iterator[Concept]]:
    """UCUM units as concepts (``content=fragment``: UCUM is a grammar, its codes are
    unbounded). From ``ucum-essence.xml`` when ``path`` is given (every base unit and
    unit atom, with properties ``property``, ``class``, ``isMetric``, ``isArbitrary``),
    else from ``COMMON_UNITS``."""
    meta = {
        "resourceType": "CodeSystem", "url": URL, "name": "UCUM", "title": "Unified Code for Units of Measure",
        "status": "active", "content": "fragment", "caseSensitive": True,
        "property": [
            {"code": "property", "type": "string", "description": "the kind of quantity (UCUM essence)"},
            {"code": "class", "type": "string"}, {"code": "isMetric", "type": "boolean"},
            {"code": "isArbitrary", "type": "boolean"},
        ],
    }
    if path is None:
        meta["version"] = None
        return _drop_none(meta), iter([Concept(code, display) for code, display in COMMON_UNITS])
    path = Path(path)
    try:
        root = SafeET.parse(str(path)).getroot()
    except SafeET.ParseError as exc:
        raise InvalidRequest(f"{path} is not well-formed XML: {exc}") from None
    except Exception as exc:
        raise InvalidRequest(f"{path} was refused by the safe XML parser: {exc.__class__.__name__}") from None
    if root.tag != "root":
        raise InvalidRequest(f"{path} is not a ucum-essence.xml (root element {root.tag!r})")
    meta["version"] = root.get("version")
    return _drop_none(meta), _essence(root)


def _essence(root) -> Iterator[Concept]:
    for el in root:
        if el.tag not in ("base-unit", "unit"):
            continue
        code = el.get("Code")
        if not code:
            continue
        name = el.findtext("name")
        props: list[tuple[str, object]] = []
        if el.findtext("property"):
            props.append(("property", el.findtext("property")))
        if el.get("class"):
            props.append(("class", el.get("class")))
        props.append(("isMetric", el.get("isMetric", "yes" if el.tag == "base-unit" else "no") == "yes"))
        props.append(("isArbitrary", el.get("isArbitrary") == "yes"))
        yield Concept(code, name, properties=tuple(props))
