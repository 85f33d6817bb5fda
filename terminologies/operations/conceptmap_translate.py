"""ConceptMap/$translate (FHIR R4 §4.10.14.1)."""
from __future__ import annotations

from ..provider import TerminologyProvider


def translate(provider: TerminologyProvider, conceptmap: dict | None = None, url: str | None = None,
              system: str | None = None, code: str | None = None, coding: dict | None = None,
              codeable_concept: dict | None = None, source: str | None = None, target: str | None = None,
              targetsystem: str | None = None, reverse: bool = False, version: str | None = None,
              conceptmap_version: str | None = None) -> dict:
    """Translate a code with one concept map (given, or by url) or every matching map.

    Forward: ``group.source`` = system, ``element.code`` = code -> each target.
    Reverse: targets with that code -> their elements, equivalence inverted
    (wider <-> narrower, subsumes <-> specializes). ``group.unmapped`` modes
    ``provided`` (same code, equivalence ``equal``), ``fixed`` (the fixed code,
    equivalence ``inexact``) and ``other-map`` apply when no element matches.

    Returns:
        Parameters with ``result`` (true when a match is neither unmatched nor
        disjoint), ``message``, and ``match`` parts (equivalence, concept, source).

    Raises:
        InvalidRequest, UnknownConceptMap (url given but unknown).
    """
    raise NotImplementedError
