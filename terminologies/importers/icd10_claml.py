"""Importer: WHO ICD-10 ClaML XML."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..model import Concept


def read(path: str | Path) -> tuple[dict, Iterator[Concept]]:
    """Read WHO ICD-10 ClaML XML.

    Returns:
        (CodeSystem metadata dict, iterator of Concept).
    """
    raise NotImplementedError
