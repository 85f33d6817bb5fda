"""Importer: WHO ICD-10 in ClaML (Classification Markup Language, ISO 13120).

``Class`` elements give the codes (``kind`` chapter | block | category), their
``SuperClass`` the is-a parent, the ``Rubric kind="preferred"`` label the display;
other rubrics (inclusion, exclusion, preferredLong, note, coding-hint, definition, ...)
become string properties named after the rubric kind, and ``inclusion`` and
``preferredLong`` labels are also designations. Labels keep their text content
(``Reference``/``Fragment`` children flattened).

Parsed with ``defusedxml`` (the ClaML DOCTYPE is allowed; entity expansion and
external resources are refused), streaming one ``Class`` at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from defusedxml import ElementTree as SafeET

from ..errors import InvalidRequest
from ..model import Concept, Designation
from ._files import Release

URL = "http://hl7.org/fhir/sid/icd-10"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_DESIGNATION_KINDS = ("preferredLong", "inclusion")


def _find(release: Release) -> str:
    names = release.find(r".*\.xml")
    if not names:
        raise InvalidRequest(f"no ClaML .xml file in {release.path}")
    return names[0]


def _text(el) -> str:
    return " ".join("".join(el.itertext()).split())


def _iter(release: Release, name: str, events=("start", "end")):
    with release.open_binary(name) as f:
        try:
            yield from SafeET.iterparse(f, events=events)
        except SafeET.ParseError as exc:
            raise InvalidRequest(f"{name} is not well-formed XML: {exc}") from None
        except Exception as exc:  # defusedxml's DTDForbidden/EntitiesForbidden/ExternalReferenceForbidden
            raise InvalidRequest(f"{name} was refused by the safe XML parser: {exc.__class__.__name__}") from None


def read(path: str | Path, url: str = URL) -> tuple[dict, Iterator[Concept]]:
    """Read a ClaML file (or a folder/zip holding one).

    Args:
        path: the ClaML XML, or a folder/zip with it.
        url: the code system url (default the WHO ICD-10 ``http://hl7.org/fhir/sid/icd-10``;
            a national modification has its own).

    Returns:
        (CodeSystem metadata, iterator of Concept in document order).

    Raises:
        InvalidRequest: not ClaML, malformed or unsafe XML.
    """
    release = Release(path)
    name = _find(release)
    title, version = None, None
    root_seen = False
    for event, el in _iter(release, name):
        if event == "start" and not root_seen:
            root_seen = True
            if el.tag != "ClaML":
                raise InvalidRequest(f"{name} is not ClaML (root element {el.tag!r})")
        if event == "end" and el.tag == "Title":
            title = _text(el) or el.get("name")
            version = el.get("version")
        if event == "start" and el.tag == "Class":
            break
    meta = {
        "resourceType": "CodeSystem", "url": url, "version": version, "name": "ICD10",
        "title": title or "ICD-10", "status": "active", "content": "complete", "hierarchyMeaning": "is-a",
        "caseSensitive": True,
        "property": [
            {"code": "parent", "uri": "http://hl7.org/fhir/concept-properties#parent", "type": "code"},
            {"code": "kind", "type": "code", "description": "ClaML class kind: chapter, block or category"},
        ],
    }
    return meta, _concepts(release, name)


def _concepts(release: Release, name: str) -> Iterator[Concept]:
    depth = 0
    for event, el in _iter(release, name):
        if el.tag != "Class":
            continue
        if event == "start":
            depth += 1
            continue
        depth -= 1
        code = el.get("code")
        if not code:
            raise InvalidRequest(f"{name}: a Class without code")
        parents = tuple(dict.fromkeys(s.get("code") for s in el.findall("SuperClass") if s.get("code")))
        display = None
        props: list[tuple[str, object]] = [("kind", el.get("kind") or "category")]
        designations = []
        for rubric in el.findall("Rubric"):
            kind = rubric.get("kind")
            for label in rubric.findall("Label"):
                text = _text(label)
                if not text:
                    continue
                if kind == "preferred" and display is None:
                    display = text
                    continue
                props.append((kind or "rubric", text))
                if kind in _DESIGNATION_KINDS:
                    designations.append(Designation(label.get(XML_LANG), None, text))
        yield Concept(code, display, parents, tuple(designations), tuple(props))
        el.clear()
