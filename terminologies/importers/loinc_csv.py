"""Importer: the LOINC table ``Loinc.csv`` (file, release folder or zip).

Each row becomes a concept: code ``LOINC_NUM``, display ``LONG_COMMON_NAME``; the
parts and attributes become properties named after the column as in the LOINC FHIR
CodeSystem (``COMPONENT``, ``PROPERTY``, ``TIME_ASPCT``, ``SYSTEM``, ``SCALE_TYP``,
``METHOD_TYP``, ``CLASS``, ``CLASSTYPE``, ``STATUS``, ``ORDER_OBS``,
``EXAMPLE_UCUM_UNITS``, ``EXAMPLE_UNITS``, ``SHORTNAME``, ``CONSUMER_NAME``, ...);
``SHORTNAME`` and ``DisplayName`` are also designations. ``STATUS = DEPRECATED``
marks a concept inactive. Concepts come in file order.

``Loinc.csv`` carries no hierarchy. When the release (folder or zip) also holds the
multiaxial hierarchy (``AccessoryFiles/MultiAxialHierarchy/MultiAxialHierarchy.csv``:
``PATH_TO_ROOT, SEQUENCE, IMMEDIATE_PARENT, CODE, CODE_TEXT``), each code's
``IMMEDIATE_PARENT`` values become its is-a parents and the LP part codes of the
hierarchy are added after the LOINC terms (display ``CODE_TEXT``), so ``is-a`` filters
and ``:below`` work on LOINC groups.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterator

from ..errors import InvalidRequest
from ..model import Concept, Designation
from . import drop_none as _drop_none
from ._files import Release

URL = "http://loinc.org"
# Columns kept as properties (when present); empty cells are skipped.
PROPERTY_COLUMNS = (
    "COMPONENT", "PROPERTY", "TIME_ASPCT", "SYSTEM", "SCALE_TYP", "METHOD_TYP", "CLASS", "CLASSTYPE",
    "STATUS", "ORDER_OBS", "EXAMPLE_UNITS", "EXAMPLE_UCUM_UNITS", "SHORTNAME", "CONSUMER_NAME",
    "VersionFirstReleased", "VersionLastChanged", "COMMON_TEST_RANK", "COMMON_ORDER_RANK",
)
_INT_COLUMNS = {"CLASSTYPE", "COMMON_TEST_RANK", "COMMON_ORDER_RANK"}
_REQUIRED = ("LOINC_NUM", "LONG_COMMON_NAME")
_SHORTNAME_USE = {"system": "http://loinc.org", "code": "SHORTNAME", "display": "Short name"}
_DISPLAYNAME_USE = {"system": "http://loinc.org", "code": "DisplayName", "display": "Display name"}


def _find(release: Release) -> str:
    names = release.find(r"Loinc\.csv") or (release.names() if release.path.is_file() else [])
    if not names:
        raise InvalidRequest(f"no Loinc.csv in {release.path}")
    return names[0]


def read(path: str | Path, version: str | None = None,
         hierarchy: bool | None = None) -> tuple[dict, Iterator[Concept]]:
    """Read ``Loinc.csv``.

    Args:
        path: ``Loinc.csv``, the release folder, or the release zip.
        version: the LOINC version (default: from a ``Loinc_2.77``-like path
            component, else None; the file itself does not state it).
        hierarchy: False to ignore a MultiAxialHierarchy.csv in the release (default:
            use it when present).

    Returns:
        (CodeSystem metadata, iterator of Concept in file order).

    Raises:
        InvalidRequest: no Loinc.csv, or required columns missing.
    """
    release = Release(path)
    name = _find(release)
    with release.open_text(name) as f:
        header = next(csv.reader(f), [])
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise InvalidRequest(f"{name} is not a LOINC table: missing column(s) {', '.join(missing)}")
    if version is None:
        m = re.search(r"(?i)loinc[_ -]?v?(\d+\.\d+)", str(release.path))
        version = m.group(1) if m else None
    props = [{"code": c, "type": "integer" if c in _INT_COLUMNS else "string"}
             for c in PROPERTY_COLUMNS if c in header]
    props.insert(0, {"code": "inactive", "uri": "http://hl7.org/fhir/concept-properties#inactive", "type": "boolean"})
    meta = {
        "resourceType": "CodeSystem", "url": URL, "version": version, "name": "LOINC", "title": "LOINC",
        "status": "active", "content": "complete", "caseSensitive": False, "property": props,
        "copyright": "This material contains content from LOINC (http://loinc.org). LOINC is copyright "
                     "Regenstrief Institute, Inc. and the LOINC Committee and is available at no cost "
                     "under the license at http://loinc.org/license.",
    }
    hierarchy = _hierarchy(release) if hierarchy is not False else None
    if hierarchy is not None:
        meta["hierarchyMeaning"] = "is-a"
        props.insert(0, {"code": "parent", "uri": "http://hl7.org/fhir/concept-properties#parent", "type": "code"})
    return _drop_none(meta), _concepts(release, name, [c for c in PROPERTY_COLUMNS if c in header], hierarchy)


def _hierarchy(release: Release) -> tuple[dict[str, list[str]], dict[str, str]] | None:
    """``(code -> parents, LP part code -> text)`` from MultiAxialHierarchy.csv, or None."""
    names = release.find(r"MultiAxialHierarchy\.csv")
    if not names:
        return None
    parents: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    with release.open_text(names[0]) as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("IMMEDIATE_PARENT", "CODE", "CODE_TEXT") if c not in (reader.fieldnames or ())]
        if missing:
            raise InvalidRequest(f"{names[0]}: missing column(s) {', '.join(missing)}")
        for row in reader:
            code = (row.get("CODE") or "").strip()
            if not code:
                continue
            parent = (row.get("IMMEDIATE_PARENT") or "").strip()
            got = parents.setdefault(code, [])
            if parent and parent not in got:
                got.append(parent)
            if code.startswith("LP") and code not in texts:
                texts[code] = (row.get("CODE_TEXT") or "").strip()
    return parents, texts


def _concepts(release: Release, name: str, columns: list[str],
              hierarchy: tuple[dict[str, list[str]], dict[str, str]] | None) -> Iterator[Concept]:
    parents, texts = hierarchy if hierarchy is not None else ({}, {})
    seen: set[str] = set()
    with release.open_text(name) as f:
        for row in csv.DictReader(f):
            code = (row.get("LOINC_NUM") or "").strip()
            if not code:
                continue
            props = []
            for c in columns:
                v = (row.get(c) or "").strip()
                if not v:
                    continue
                if c in _INT_COLUMNS:
                    try:
                        props.append((c, int(v)))
                    except ValueError:
                        props.append((c, v))
                else:
                    props.append((c, v))
            designations = []
            if (row.get("SHORTNAME") or "").strip():
                designations.append(Designation("en-US", _SHORTNAME_USE, row["SHORTNAME"].strip()))
            if (row.get("DisplayName") or "").strip():
                designations.append(Designation("en-US", _DISPLAYNAME_USE, row["DisplayName"].strip()))
            seen.add(code)
            yield Concept(
                code=code,
                display=(row.get("LONG_COMMON_NAME") or "").strip() or None,
                parents=tuple(parents.get(code, ())),
                designations=tuple(designations),
                properties=tuple(props),
                inactive=(row.get("STATUS") or "").strip().upper() == "DEPRECATED",
            )
    for code, text in texts.items():
        if code not in seen:
            yield Concept(code, text or None, tuple(parents.get(code, ())))
