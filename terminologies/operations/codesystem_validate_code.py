"""CodeSystem/$validate-code (FHIR R4 §4.8.15.3)."""
from __future__ import annotations

from ..errors import InvalidRequest
from ..provider import TerminologyProvider
from ._common import candidate_codings, code_system, display_matches
from .parameters import to_parameters


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
    candidates = candidate_codings((url, version, code, display) if code is not None else None,
                                   coding, codeable_concept, "$validate-code")
    if code is None and coding is not None and url is None:
        url = coding.get("system")
    if url is None:
        url = next((s for s, *_ in candidates if s), None)
    if not url:
        raise InvalidRequest("$validate-code needs the code system url")
    if codeable_concept is None:
        for s, *_ in candidates:
            if s and s != url:
                raise InvalidRequest(f"coding system {s} is not the CodeSystem {url}")
    # A CodeableConcept is valid when one of its codings of this system is (R4 §4.8.15.3).
    candidates = [c for c in candidates if (c[0] or url) == url]
    cs = code_system(provider, url, version or next((v for _, v, *_ in candidates if v), None))
    messages: list[str] = []
    best_display = None
    for _, _, c, d in candidates:
        if not c:
            messages.append("a coding has no code")
            continue
        concept = cs.get(c)
        if concept is None:
            messages.append(f"Unknown code {c!r} in the CodeSystem {url}"
                            + (f" version {cs.version}" if cs.version else ""))
            continue
        best_display = concept.display
        if d is not None and not display_matches(concept, d):
            messages.append(f"The display {d!r} is not a valid display for the code {c!r} "
                            f"(expected {concept.display!r})")
            continue
        items: list[tuple[str, object]] = [("result", True)]
        if concept.inactive:
            items.append(("message", f"The code {c!r} is valid but inactive"))
        items.append(("display", concept.display))
        return to_parameters(items)
    if not candidates:
        messages.append(f"no coding of the CodeSystem {url}")
    return to_parameters([("result", False), ("message", "; ".join(messages)), ("display", best_display)])
