"""Importer: UCUM units as a CodeSystem fragment (http://unitsofmeasure.org)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..model import Concept


def read(path: str | Path | None = None) -> tuple[dict, Iterator[Concept]]:
    """UCUM atoms as concepts (``content=fragment``: UCUM is a grammar, its codes are
    unbounded). From a ``ucum-essence.xml`` when ``path`` is given, else from the
    common clinical units that ``terminologies.ucum`` knows."""
    raise NotImplementedError
