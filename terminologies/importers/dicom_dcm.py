"""Importer: the DICOM Controlled Terminology (DCM) code system from pydicom's bundled tables."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..model import Concept
from . import drop_none as _drop_none

URL = "http://dicom.nema.org/resources/ontology/DCM"
# DICOM's own FHIR ValueSets for context groups use this canonical form (PS3.16).
CID_URL = "http://dicom.nema.org/medical/dicom/current/output/chtml/part16/sect_CID_{cid}.html"


def _sort_key(code: str) -> tuple:
    return (0, int(code), "") if code.isdigit() else (1, 0, code)


def _table() -> dict[str, tuple[str, str, list[int]]]:
    from pydicom.sr._concepts_dict import concepts

    out: dict[str, tuple[str, str, list[int]]] = {}
    for keyword, codes in concepts.get("DCM", {}).items():
        for code, (meaning, cids) in codes.items():
            if code in out:
                out[code][2].extend(c for c in cids if c not in out[code][2])
            else:
                out[code] = (meaning, keyword, list(cids))
    return out


def read(path: str | Path | None = None) -> tuple[dict, Iterator[Concept]]:
    """The DCM code system (http://dicom.nema.org/resources/ontology/DCM, PS3.16 Annex D).

    Built from ``pydicom.sr._concepts_dict`` (codes, meanings, keywords and the CIDs
    each code belongs to); ``path`` is unused (accepted for a uniform importer API).
    pydicom ships the DCM codes used by context groups, not all of Annex D, hence
    ``content = fragment``. No hierarchy (DCM is flat).
    """
    import pydicom

    meta = {
        "resourceType": "CodeSystem", "url": URL, "name": "DCM",
        "title": "DICOM Controlled Terminology", "status": "active", "content": "fragment",
        "caseSensitive": True,
        "description": f"DCM codes bundled with pydicom {pydicom.__version__} (PS3.16 Annex D)",
        "property": [
            {"code": "keyword", "type": "string", "description": "pydicom keyword of the code"},
            {"code": "cid", "type": "integer", "description": "a DICOM context group (CID) containing the code"},
        ],
    }
    return _drop_none(meta), _concepts()


def _concepts() -> Iterator[Concept]:
    table = _table()
    for code in sorted(table, key=_sort_key):
        meaning, keyword, cids = table[code]
        props: list[tuple[str, object]] = [("keyword", keyword)]
        props.extend(("cid", int(c)) for c in sorted(cids))
        yield Concept(code, meaning, properties=tuple(props))


def cid_value_sets(cids: list[int] | None = None) -> Iterator[dict]:
    """FHIR ValueSets for DICOM context groups (CIDs) from pydicom's tables.

    Args:
        cids: the CIDs wanted (default every CID pydicom knows).

    Yields:
        ValueSet JSON with ``compose.include`` per coding scheme (DCM, SCT, LN, ...;
        schemes other than DCM/SCT/LN/UCUM keep the DICOM designator as system).
    """
    from pydicom.sr._cid_dict import cid_concepts, name_for_cid
    from pydicom.sr._concepts_dict import concepts

    systems = {"DCM": URL, "SCT": "http://snomed.info/sct", "LN": "http://loinc.org",
               "UCUM": "http://unitsofmeasure.org"}
    for cid in sorted(cids if cids is not None else cid_concepts):
        if cid not in cid_concepts:
            continue
        includes = []
        for scheme, keywords in sorted(cid_concepts[cid].items()):
            codes = []
            for kw in keywords:
                for code, (meaning, _) in concepts.get(scheme, {}).get(kw, {}).items():
                    codes.append({"code": code, "display": meaning})
            if codes:
                includes.append({"system": systems.get(scheme, scheme), "concept": codes})
        yield {
            "resourceType": "ValueSet", "url": CID_URL.format(cid=cid), "name": name_for_cid.get(cid, f"CID{cid}"),
            "title": f"CID {cid} {name_for_cid.get(cid, '')}".strip(), "status": "active",
            "compose": {"include": includes},
        }
