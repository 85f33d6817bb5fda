"""CodeSystem/$lookup (FHIR R4 §4.8.15.1)."""
from __future__ import annotations

from ..provider import TerminologyProvider


def lookup(provider: TerminologyProvider, system: str | None = None, code: str | None = None,
           version: str | None = None, display_language: str | None = None,
           properties: list[str] | None = None, coding: dict | None = None) -> dict:
    """Details of one code: name, version, display, designation, property.

    Supplements of the system are applied. Properties returned: ``parent`` and
    ``child`` (direct), ``inactive``, and every concept property; ``properties`` (the
    ``property`` input parameter) restricts them.

    Raises:
        InvalidRequest: no system/code.
        UnknownSystem: system unknown (and no supplement for it).
        UnknownCode: the code is not in the system.
    """
    raise NotImplementedError
