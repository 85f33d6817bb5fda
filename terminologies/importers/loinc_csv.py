"""Importer: LOINC table Loinc.csv (file, folder or zip)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..model import Concept


def read(path: str | Path) -> tuple[dict, Iterator[Concept]]:
    """Read LOINC table Loinc.csv (file, folder or zip).

    Returns:
        (CodeSystem metadata dict, iterator of Concept).
    """
    raise NotImplementedError
