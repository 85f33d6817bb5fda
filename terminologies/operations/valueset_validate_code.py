"""ValueSet/$validate-code (FHIR R4 §4.9.18.2)."""
from __future__ import annotations

from ..errors import InvalidRequest
from ..provider import TerminologyProvider
from ._common import candidate_codings, code_system_or_none, display_matches, norm_display
from ._compose import Expander, resolve_value_set
from .parameters import to_parameters


def validate_code(provider: TerminologyProvider, valueset: dict | None = None, url: str | None = None,
                  system: str | None = None, code: str | None = None, display: str | None = None,
                  coding: dict | None = None, codeable_concept: dict | None = None,
                  value_set_version: str | None = None, system_version: str | None = None) -> dict:
    """Whether a code is in a value set (membership is tested rule by rule, without
    expanding the whole value set).

    A CodeableConcept is valid when one of its codings is. A wrong ``display`` makes
    the result false (the message says which display was expected).

    Returns:
        Parameters with ``result``, ``message`` (when false), ``display``.

    Raises:
        InvalidRequest: missing input. UnknownValueSet: the value set is unknown.
    """
    if valueset is None:
        if not url:
            raise InvalidRequest("ValueSet/$validate-code needs a valueSet or a url")
        valueset = resolve_value_set(provider, url, value_set_version)
    elif not isinstance(valueset, dict) or valueset.get("resourceType") != "ValueSet":
        raise InvalidRequest("expected a ValueSet resource")
    if code is not None and not system:
        raise InvalidRequest("ValueSet/$validate-code with a code needs its system")
    candidates = candidate_codings((system, system_version, code, display) if code is not None else None,
                                   coding, codeable_concept, "ValueSet/$validate-code")
    ex = Expander(provider)
    top = valueset.get("url")
    vs_name = top or "(inline)"
    messages: list[str] = []
    best_display = None
    for s, v, c, d in candidates:
        if not s or not c:
            messages.append("a coding needs a system and a code")
            continue
        found, entry, problem = ex.member(valueset, s, c, (top,) if top else ())
        if not found:
            cs = code_system_or_none(provider, s, v)
            if problem:
                messages.append(problem)
            elif cs is not None and cs.content == "complete" and c not in cs:
                messages.append(f"Unknown code {c!r} in the CodeSystem {s}")
            else:
                messages.append(f"The code {s}|{c} is not in the ValueSet {vs_name}")
            continue
        best_display = entry.display
        if d is not None:
            ok = display_matches(entry.concept, d) if entry.concept is not None else \
                norm_display(entry.display) == norm_display(d)
            if not ok:
                messages.append(f"The display {d!r} is not a valid display for the code {s}|{c} "
                                f"(expected {entry.display!r})")
                continue
        items: list[tuple[str, object]] = [("result", True)]
        if entry.inactive:
            items.append(("message", f"The code {s}|{c} is valid but inactive"))
        items.append(("display", entry.display))
        return to_parameters(items)
    return to_parameters([("result", False), ("message", "; ".join(messages)), ("display", best_display)])
