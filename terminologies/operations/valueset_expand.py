"""ValueSet/$expand (FHIR R4 §4.9.18.1)."""
from __future__ import annotations

from ..provider import TerminologyProvider


def expand(provider: TerminologyProvider, valueset: dict | None = None, url: str | None = None,
           version: str | None = None, filter: str | None = None, count: int | None = None,
           offset: int = 0, active_only: bool = False, include_designations: bool = False,
           max_size: int = 100_000) -> dict:
    """Expand a value set (given inline or by url) into a ValueSet with ``expansion``.

    Supports compose.include/exclude by system (+version) with a concept list, with
    filters (``=``, ``is-a``, ``descendent-of``, ``is-not-a``, ``regex``, ``in``,
    ``not-in``, ``generalizes``, ``exists``) and by ``valueSet`` import; text
    ``filter`` (case-insensitive, every word must occur in the display, a designation
    or the code); ``count``/``offset`` paging (``expansion.total`` is the full size);
    ``activeOnly``; ``includeDesignations``.

    Raises:
        InvalidRequest, UnknownValueSet, UnknownSystem,
        TooCostly: the page to return holds more than ``max_size`` codes.
    """
    raise NotImplementedError


def expand_codes(provider: TerminologyProvider, valueset_or_url: dict | str) -> set[tuple[str, str]]:
    """Every ``(system, code)`` of a value set (no paging, no limit), cached.

    The cache key is the value set's url + version (``url|version`` accepted) and
    ``provider.revision`` when present; an inline value set without url is not cached.
    Used by the search modifiers ``:in`` / ``:not-in``. Do not mutate the result.
    """
    raise NotImplementedError


def clear_cache() -> None:
    """Drop every cached expansion."""
    raise NotImplementedError
