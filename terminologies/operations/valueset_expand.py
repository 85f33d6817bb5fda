"""ValueSet/$expand (FHIR R4 §4.9.18.1)."""
from __future__ import annotations

import datetime as _dt
import json
import threading
import uuid
from collections import OrderedDict

from ..errors import InvalidRequest, TooCostly
from ..provider import TerminologyProvider
from ._compose import Entry, Expander, resolve_value_set
from .parameters import as_bool, as_int

_CACHE_MAX = 128
_lock = threading.Lock()
# key -> [provider, vs, entries | None, versions | None, codes | None]; the provider is
# kept alive so its id() is not reused by another object while the entry lives.
_cache: "OrderedDict[tuple, list]" = OrderedDict()


def clear_cache() -> None:
    """Drop every cached expansion."""
    with _lock:
        _cache.clear()


def _cache_key(provider: TerminologyProvider, vs: dict | None, url: str | None, version: str | None) -> tuple:
    rev = getattr(provider, "revision", None)
    if vs is None:
        return (id(provider), rev, "url", url, version)
    # An inline value set is keyed by its content: the same url may be edited.
    return (id(provider), rev, "inline", json.dumps(vs, sort_keys=False, default=str))


def _slot(provider: TerminologyProvider, valueset: dict | None, url: str | None,
          version: str | None) -> list:
    """The cache slot of a value set (created, with the resolved ValueSet, on a miss)."""
    if valueset is None:
        if not url:
            raise InvalidRequest("$expand needs a valueSet or a url")
        url, _, v = url.partition("|")
        version = version or v or None
    key = _cache_key(provider, valueset, url, version)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    vs = valueset if valueset is not None else resolve_value_set(provider, url, version)
    if not isinstance(vs, dict) or vs.get("resourceType") != "ValueSet":
        raise InvalidRequest("expected a ValueSet resource")
    slot = [provider, vs, None, None, None]
    with _lock:
        slot = _cache.setdefault(key, slot)
        while len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)
    return slot


def _evaluate(provider: TerminologyProvider, valueset: dict | None, url: str | None,
              version: str | None) -> tuple[dict, list[Entry], list[str]]:
    slot = _slot(provider, valueset, url, version)
    if slot[2] is None:
        vs = slot[1]
        ex = Expander(provider)
        top = vs.get("url")
        entries = ex.entries(vs, (top,) if top else ())
        slot[3] = sorted({f"{cs.url}|{cs.version}" for cs in ex.used_systems.values()
                          if cs is not None and cs.version})
        slot[2] = entries
    return slot[1], slot[2], slot[3]


def expand_codes(provider: TerminologyProvider, valueset_or_url: dict | str) -> set[tuple[str, str]]:
    """Every ``(system, code)`` of a value set (no paging, no limit), cached.

    The cache key is the value set's url + version (``url|version`` accepted) and
    ``provider.revision`` when present; an inline value set is keyed by its content.
    Used by the search modifiers ``:in`` / ``:not-in``. Do not mutate the result.
    Computed without ordering or building expansion entries (hierarchy filters are
    set operations on the cached closures).
    """
    if isinstance(valueset_or_url, str):
        slot = _slot(provider, None, valueset_or_url, None)
    else:
        slot = _slot(provider, valueset_or_url, None, None)
    codes = slot[4]
    if codes is None:
        if slot[2] is not None:
            codes = {e[:2] for e in slot[2]}
        else:
            vs = slot[1]
            top = vs.get("url")
            codes = Expander(provider).code_set(vs, (top,) if top else ())
        slot[4] = codes
    return codes


def _display_in(concept, language: str) -> str | None:
    lang = language.lower()
    primary = lang.split("-")[0]
    fallback = None
    for d in concept.designations:
        if d.language:
            dl = d.language.lower()
            if dl == lang:
                return d.value
            if fallback is None and (dl.split("-")[0] == primary):
                fallback = d.value
    return fallback


def _matches_text(e: Entry, words: list[str]) -> bool:
    texts = [e.code.casefold()]
    if e.display:
        texts.append(e.display.casefold())
    if e.concept is not None:
        texts.extend(d.value.casefold() for d in e.concept.designations)
    return all(any(w in t for t in texts) for w in words)


def expand(provider: TerminologyProvider, valueset: dict | None = None, url: str | None = None,
           version: str | None = None, filter: str | None = None, count: int | None = None,
           offset: int = 0, active_only: bool = False, include_designations: bool = False,
           max_size: int = 100_000, display_language: str | None = None) -> dict:
    """Expand a value set (given inline or by url) into a ValueSet with ``expansion``.

    Supports compose.include/exclude by system (+version) with a concept list, with
    filters (``=``, ``is-a``, ``descendent-of``, ``is-not-a``, ``regex``, ``in``,
    ``not-in``, ``generalizes``, ``exists``) and by ``valueSet`` import; text
    ``filter`` (case-insensitive, every word must occur in the display, a designation
    or the code); ``count``/``offset`` paging (``expansion.total`` is the full size);
    ``activeOnly``; ``includeDesignations``; ``displayLanguage`` (a designation in that
    language, or its primary subtag, becomes the display). A value set without compose but with an
    expansion (pre-expanded) is paged and filtered as stored.

    Raises:
        InvalidRequest, UnknownValueSet, UnknownSystem,
        TooCostly: the page to return holds more than ``max_size`` codes.
    """
    offset = as_int(offset or 0, "offset")
    count = None if count is None else as_int(count, "count")
    active_only = as_bool(active_only, "activeOnly")
    include_designations = as_bool(include_designations, "includeDesignations")
    vs, entries, versions = _evaluate(provider, valueset, url, version)
    if active_only:
        entries = [e for e in entries if not e.inactive]
    if filter:
        words = filter.casefold().split()
        entries = [e for e in entries if _matches_text(e, words)]
    total = len(entries)
    end = total if count is None else min(total, offset + count)
    page = entries[offset:end]
    if len(page) > max_size:
        raise TooCostly(f"The expansion of ValueSet {vs.get('url') or '(inline)'} has {total} codes, "
                        f"more than the limit of {max_size}; use count/offset or a text filter")
    contains = []
    for e in page:
        item: dict = {"system": e.system}
        if e.version:
            item["version"] = e.version
        if e.inactive:
            item["inactive"] = True
        item["code"] = e.code
        display = e.display
        if display_language and e.concept is not None:
            display = _display_in(e.concept, display_language) or display
        if display is not None:
            item["display"] = display
        if include_designations and e.concept is not None and e.concept.designations:
            item["designation"] = [d.to_json() for d in e.concept.designations]
        contains.append(item)
    params: list[dict] = []
    if filter:
        params.append({"name": "filter", "valueString": filter})
    if count is not None:
        params.append({"name": "count", "valueInteger": count})
    if offset:
        params.append({"name": "offset", "valueInteger": offset})
    if active_only:
        params.append({"name": "activeOnly", "valueBoolean": True})
    if include_designations:
        params.append({"name": "includeDesignations", "valueBoolean": True})
    if display_language:
        params.append({"name": "displayLanguage", "valueCode": display_language})
    params.extend({"name": "version", "valueUri": v} for v in versions)
    expansion: dict = {
        "identifier": f"urn:uuid:{uuid.uuid4()}",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "total": total,
        "offset": offset,
    }
    if params:
        expansion["parameter"] = params
    if contains:
        expansion["contains"] = contains
    out = {k: v for k, v in vs.items() if k != "expansion"}
    out["resourceType"] = "ValueSet"
    out["expansion"] = expansion
    return out
