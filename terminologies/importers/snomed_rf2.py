"""Importer: SNOMED CT RF2 snapshot (folder or zip).

Reads (SNOMED CT Release File Specifications, RF2):

* ``sct2_Concept_Snapshot*``: ``id effectiveTime active moduleId definitionStatusId``;
* ``sct2_Description_Snapshot-*``: ``id effectiveTime active moduleId conceptId
  languageCode typeId term caseSignificanceId``; FSN ``900000000000003001``, synonym
  ``900000000000013009``; descriptions of every language file are read;
* ``sct2_Relationship_Snapshot*``: active rows with ``typeId = 116680003 |Is a|`` give
  the parents (inferred relationships; the stated file is not read);
* ``der2_cRefset_LanguageSnapshot-*`` (optional): the preferred synonym
  (acceptability ``900000000000548007``) in the language refset chosen (US English
  ``900000000000509007`` by default, else the first refset present) becomes the
  display; without it the first active synonym (lowest description id) does.

Concepts come in ascending SCTID order (deterministic). The concept file is streamed;
descriptions, relationships and the language refset are held in memory per concept.
"""
from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

from ..errors import InvalidRequest
from ..model import Concept, Designation
from . import drop_none as _drop_none
from ._files import Release

URL = "http://snomed.info/sct"
FSN = "900000000000003001"
SYNONYM = "900000000000013009"
IS_A = "116680003"
PREFERRED = "900000000000548007"
ACCEPTABLE = "900000000000549004"
US_ENGLISH = "900000000000509007"
INT_CORE_MODULE = "900000000000207008"
DEFINED = "900000000000073002"  # definitionStatusId |Defined| (sufficiently defined)

_USE = {
    FSN: {"system": URL, "code": FSN, "display": "Fully specified name"},
    SYNONYM: {"system": URL, "code": SYNONYM, "display": "Synonym"},
}

PROPERTIES = [
    {"code": "parent", "uri": "http://hl7.org/fhir/concept-properties#parent", "type": "code"},
    {"code": "inactive", "uri": "http://hl7.org/fhir/concept-properties#inactive", "type": "boolean"},
    {"code": "moduleId", "uri": "http://snomed.info/id/900000000000443000", "type": "code"},
    {"code": "effectiveTime", "type": "string"},
    {"code": "sufficientlyDefined", "type": "boolean"},
]

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _rows(release: Release, name: str) -> Iterator[list[str]]:
    with release.open_text(name) as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if row:
                yield row


def _one(release: Release, pattern: str, what: str, required: bool = True) -> list[str]:
    names = release.find(pattern)
    if not names and required:
        raise InvalidRequest(f"no {what} file ({pattern}) in {release.path}: an RF2 Snapshot is required")
    return names


def read(path: str | Path, language_refset: str | None = None,
         module: str | None = None) -> tuple[dict, Iterator[Concept]]:
    """Read an RF2 snapshot.

    Args:
        path: the release folder (any depth) or zip.
        language_refset: the language refset id that picks displays (default US English
            when present, else the first one found).
        module: the edition module for the version URI (default: the International
            core module for ``_INT_`` files, else the most frequent other module).

    Returns:
        (CodeSystem metadata, iterator of Concept in SCTID order).

    Raises:
        InvalidRequest: no snapshot concept file.
    """
    release = Release(path)
    concept_files = _one(release, r"sct2_Concept_Snapshot.*\.txt", "concept")
    if len(concept_files) > 1:
        raise InvalidRequest(f"several RF2 concept snapshot files: {', '.join(concept_files)}")
    concept_file = concept_files[0]
    base = concept_file.rsplit("/", 1)[-1]
    # sct2_Concept_Snapshot_INT_20240101.txt -> namespace INT, date 20240101
    stem = base[: -len(".txt")].split("_")
    date = stem[-1] if stem and stem[-1].isdigit() else None
    edition = stem[-2] if len(stem) >= 2 else ""
    if module is None:
        if edition == "INT":
            module = INT_CORE_MODULE
        else:
            counts = Counter(r[3] for r in _rows(release, concept_file))
            counts.pop(INT_CORE_MODULE, None)
            module = counts.most_common(1)[0][0] if counts else INT_CORE_MODULE
    version = f"{URL}/{module}/version/{date}" if date else None
    meta = {
        "resourceType": "CodeSystem", "url": URL, "version": version, "name": "SNOMED_CT",
        "title": "SNOMED CT", "status": "active", "content": "complete", "hierarchyMeaning": "is-a",
        "caseSensitive": False, "valueSet": f"{URL}?fhir_vs", "property": PROPERTIES,
    }
    return _drop_none(meta), _concepts(release, concept_file, language_refset)


def _concepts(release: Release, concept_file: str, language_refset: str | None) -> Iterator[Concept]:
    parents: dict[str, set[str]] = {}
    for name in _one(release, r"sct2_Relationship_Snapshot.*\.txt", "relationship", required=False):
        for r in _rows(release, name):
            # id effectiveTime active moduleId sourceId destinationId relationshipGroup typeId ...
            if r[2] == "1" and r[7] == IS_A:
                parents.setdefault(r[4], set()).add(r[5])

    # Only what is needed is kept (a full release has millions of refset rows): the
    # preferred description ids of each language refset, as ints.
    preferred_by_refset: dict[str, set[int]] = {}
    for name in _one(release, r"der2_cRefset_LanguageSnapshot.*\.txt", "language refset", required=False):
        for r in _rows(release, name):
            # id effectiveTime active moduleId refsetId referencedComponentId acceptabilityId
            if r[2] == "1":
                ids = preferred_by_refset.setdefault(r[4], set())
                if r[6] == PREFERRED:
                    ids.add(int(r[5]))
    refset = language_refset or (US_ENGLISH if US_ENGLISH in preferred_by_refset else
                                 next(iter(sorted(preferred_by_refset)), None))
    preferred = preferred_by_refset.get(refset or "", set())
    preferred_by_refset.clear()

    intern = sys.intern
    descriptions: dict[str, list[tuple[int, str, str, str]]] = {}
    for name in _one(release, r"sct2_Description_Snapshot.*\.txt", "description", required=False):
        for r in _rows(release, name):
            # id effectiveTime active moduleId conceptId languageCode typeId term caseSignificanceId
            if r[2] == "1":
                descriptions.setdefault(r[4], []).append((int(r[0]), intern(r[5]), intern(r[6]), r[7]))

    rows = list(_rows(release, concept_file))
    rows.sort(key=lambda r: int(r[0]))
    for r in rows:
        cid, eff, active, module_id, status = r[0], r[1], r[2], r[3], r[4]
        descs = sorted(descriptions.get(cid, ()))
        display = None
        first_synonym = None
        designations = []
        for did, lang, typ, term in descs:
            designations.append(Designation(lang, _USE.get(typ), term))
            if typ == SYNONYM:
                if first_synonym is None:
                    first_synonym = term
                if display is None and did in preferred:
                    display = term
        if display is None:
            display = first_synonym or next((d.value for d in designations), None)
        yield Concept(
            code=cid,
            display=display,
            parents=tuple(sorted(parents.get(cid, ()), key=int)) if active == "1" else (),
            designations=tuple(designations),
            properties=(("moduleId", module_id), ("effectiveTime", eff), ("sufficientlyDefined", status == DEFINED)),
            inactive=active != "1",
        )
