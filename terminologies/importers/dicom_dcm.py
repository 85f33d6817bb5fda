"""Importer: the DICOM Controlled Terminology (DCM) code system from pydicom's bundled tables."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..model import Concept


def read(path: str | Path | None = None) -> tuple[dict, Iterator[Concept]]:
    """The DCM code system (http://dicom.nema.org/resources/ontology/DCM, PS3.16 Annex D).

    Built from ``pydicom.sr._concepts_dict`` (codes, meanings, keywords and the CIDs
    each code belongs to); ``path`` is unused (accepted for a uniform importer API).
    """
    raise NotImplementedError
