"""Parse FHIR ``Parameters`` (or query-string pairs) into plain Python values."""
from __future__ import annotations

from typing import Any, Iterable

from ..errors import InvalidRequest


def parse_parameters(params: dict | Iterable[tuple[str, Any]]) -> dict[str, list]:
    """Parse operation input.

    Args:
        params: a FHIR ``Parameters`` resource, or ``(name, value)`` pairs (query string).

    Returns:
        ``name -> [values]``. ``valueX`` is unwrapped (a Coding or CodeableConcept stays
        a dict, a ValueSet/ConceptMap ``resource`` is returned as the resource dict,
        parameters with ``part`` become a dict of their parsed parts).
    """
    raise NotImplementedError


def to_parameters(items: Iterable[tuple[str, Any]]) -> dict:
    """Build a FHIR ``Parameters`` resource from ``(name, value)`` pairs.

    A value is a ready-made parameter element (dict with ``value[x]``/``part``/
    ``resource``) when its keys start with ``value``, ``part`` or ``resource``;
    otherwise the type is inferred (bool -> valueBoolean, int -> valueInteger, str ->
    valueString).
    """
    raise NotImplementedError
