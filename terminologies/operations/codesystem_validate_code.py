"""CodeSystem/$validate-code (FHIR R4 §4.8.15.3)."""
from __future__ import annotations

from ..provider import TerminologyProvider


def validate_code(provider: TerminologyProvider, url: str | None = None, code: str | None = None,
                  version: str | None = None, display: str | None = None, coding: dict | None = None,
                  codeable_concept: dict | None = None) -> dict:
    """Whether a code (or a Coding, or any coding of a CodeableConcept) is in the system.

    Returns:
        Parameters with ``result`` (boolean), ``message`` when false or inactive,
        ``display`` (the preferred display) when the code is known.

    Raises:
        InvalidRequest: no code/coding/codeableConcept, or a coding of another system.
        UnknownSystem: the system is unknown.
    """
    raise NotImplementedError
