"""CodeSystem/$subsumes (FHIR R4 §4.8.15.4)."""
from __future__ import annotations

from ..provider import TerminologyProvider


def subsumes(provider: TerminologyProvider, system: str | None = None, code_a: str | None = None,
             code_b: str | None = None, coding_a: dict | None = None, coding_b: dict | None = None,
             version: str | None = None) -> dict:
    """Parameters with ``outcome``: equivalent | subsumes | subsumed-by | not-subsumed.

    Raises:
        InvalidRequest: missing input or codings of different systems.
        UnknownSystem, UnknownCode.
    """
    raise NotImplementedError
