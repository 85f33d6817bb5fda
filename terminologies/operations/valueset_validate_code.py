"""ValueSet/$validate-code (FHIR R4 §4.9.18.2)."""
from __future__ import annotations

from ..provider import TerminologyProvider


def validate_code(provider: TerminologyProvider, valueset: dict | None = None, url: str | None = None,
                  system: str | None = None, code: str | None = None, display: str | None = None,
                  coding: dict | None = None, codeable_concept: dict | None = None,
                  value_set_version: str | None = None, system_version: str | None = None) -> dict:
    """Whether a code is in a value set (membership is tested rule by rule, without
    expanding the whole value set).

    Returns:
        Parameters with ``result``, ``message`` (when false), ``display``.

    Raises:
        InvalidRequest: missing input. UnknownValueSet: the value set is unknown.
    """
    raise NotImplementedError
