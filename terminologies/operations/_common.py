"""Helpers shared by the operations (not public API)."""
from __future__ import annotations

import threading
from collections import OrderedDict

from ..errors import InvalidRequest, UnknownSystem
from ..model import CodeSystemData
from ..provider import TerminologyProvider, split_canonical

_lock = threading.Lock()
# (id(base), ids of supplements) -> (base, supplements, merged); the tuple keeps the
# objects alive so their ids stay valid while cached.
_merged: "OrderedDict[tuple, tuple]" = OrderedDict()
_MERGED_MAX = 32


def code_system_or_none(provider: TerminologyProvider, url: str, version: str | None = None) -> CodeSystemData | None:
    """The code system with its supplements applied (FHIR R4 §4.8.2), or None."""
    base = provider.code_system(url, version)
    sups = [s for s in provider.supplements(url) if _supplement_applies(s, base)]
    if not sups:
        return base
    if base is None:
        base = CodeSystemData(url, {}, version=version, content="not-present")
    key = (id(base), tuple(id(s) for s in sups))
    with _lock:
        hit = _merged.get(key)
        if hit is not None:
            _merged.move_to_end(key)
            return hit[2]
    merged = base
    for s in sups:
        merged = merged.apply_supplement(s)
    with _lock:
        _merged[key] = (base, sups, merged)
        while len(_merged) > _MERGED_MAX:
            _merged.popitem(last=False)
    return merged


def _supplement_applies(sup: CodeSystemData, base: CodeSystemData | None) -> bool:
    _, v = split_canonical(sup.supplements or "")
    return v is None or base is None or base.version == v


def code_system(provider: TerminologyProvider, url: str, version: str | None = None) -> CodeSystemData:
    """Like ``code_system_or_none`` but raises ``UnknownSystem``."""
    cs = code_system_or_none(provider, url, version)
    if cs is None:
        v = f" version {version}" if version else ""
        raise UnknownSystem(f"A definition for CodeSystem {url}{v} could not be found")
    return cs


def clear_merged_cache() -> None:
    """Forget base+supplement merges."""
    with _lock:
        _merged.clear()


def coding_parts(coding: dict, name: str = "coding") -> tuple[str | None, str | None, str | None, str | None]:
    """``(system, version, code, display)`` of a Coding dict."""
    if not isinstance(coding, dict):
        raise InvalidRequest(f"{name} must be a Coding")
    return coding.get("system"), coding.get("version"), coding.get("code"), coding.get("display")


def candidate_codings(first: tuple | None, coding: dict | None, codeable_concept: dict | None,
                      operation: str) -> list[tuple[str | None, str | None, str | None, str | None]]:
    """The (system, version, code, display) tuples a ``$validate-code`` checks: the plain
    code (``first``, already a tuple), the Coding, then each Coding of the CodeableConcept.

    Raises:
        InvalidRequest: none given, or a malformed Coding/CodeableConcept.
    """
    candidates = [first] if first is not None else []
    if coding is not None:
        candidates.append(coding_parts(coding))
    if codeable_concept is not None:
        if not isinstance(codeable_concept, dict):
            raise InvalidRequest("codeableConcept must be a CodeableConcept")
        candidates.extend(coding_parts(c) for c in codeable_concept.get("coding") or ())
    if not candidates:
        raise InvalidRequest(f"{operation} needs code, coding or codeableConcept")
    return candidates


def norm_display(text: str | None) -> str:
    """Display comparison key: whitespace collapsed, case folded."""
    return " ".join((text or "").split()).casefold()


def display_matches(cs_concept, display: str) -> bool:
    """True when ``display`` equals the concept's display or one of its designations."""
    key = norm_display(display)
    if norm_display(cs_concept.display) == key:
        return True
    return any(norm_display(d.value) == key for d in cs_concept.designations)


def coding_json(system: str | None, code: str, display: str | None = None, version: str | None = None) -> dict:
    """A Coding dict without empty fields."""
    out: dict = {}
    if system:
        out["system"] = system
    if version:
        out["version"] = version
    out["code"] = code
    if display:
        out["display"] = display
    return out
