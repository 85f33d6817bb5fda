"""CodeSystem/$subsumes (FHIR R4 §4.8.15.4)."""
from __future__ import annotations

from ..errors import InvalidRequest, UnknownCode
from ..provider import TerminologyProvider
from ._common import code_system, coding_parts
from .parameters import to_parameters


def subsumes(provider: TerminologyProvider, system: str | None = None, code_a: str | None = None,
             code_b: str | None = None, coding_a: dict | None = None, coding_b: dict | None = None,
             version: str | None = None) -> dict:
    """Parameters with ``outcome``: equivalent | subsumes | subsumed-by | not-subsumed.

    Raises:
        InvalidRequest: missing input or codings of different systems.
        UnknownSystem, UnknownCode.
    """
    systems = set()
    if coding_a is not None:
        if code_a is not None:
            raise InvalidRequest("give codeA or codingA, not both")
        s, v, code_a, _ = coding_parts(coding_a, "codingA")
        systems.add(s)
        version = version or v
    if coding_b is not None:
        if code_b is not None:
            raise InvalidRequest("give codeB or codingB, not both")
        s, v, code_b, _ = coding_parts(coding_b, "codingB")
        systems.add(s)
        version = version or v
    systems.discard(None)
    if system:
        systems.add(system)
    if len(systems) > 1:
        raise InvalidRequest(f"$subsumes compares codes of one system, got {', '.join(sorted(systems))}")
    if not systems:
        raise InvalidRequest("$subsumes needs a system (or codings with a system)")
    if not code_a or not code_b:
        raise InvalidRequest("$subsumes needs codeA and codeB (or codingA and codingB)")
    (url,) = systems
    cs = code_system(provider, url, version)
    for c in (code_a, code_b):
        if c not in cs:
            raise UnknownCode(f"Unknown code {c!r} in the CodeSystem {url}")
    return to_parameters([("outcome", {"valueCode": cs.subsumes(code_a, code_b)})])
