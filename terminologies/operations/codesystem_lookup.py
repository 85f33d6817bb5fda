"""CodeSystem/$lookup (FHIR R4 §4.8.15.1)."""
from __future__ import annotations

from ..errors import InvalidRequest, UnknownCode
from ..model import CHILD, INACTIVE, PARENT
from ..provider import TerminologyProvider
from ._common import code_system, coding_parts
from .parameters import to_parameters, value_element


def _pick_display(concept, language: str | None) -> str | None:
    if language:
        lang = language.lower()
        for d in concept.designations:
            if d.language and (d.language.lower() == lang or d.language.lower().split("-")[0] == lang):
                return d.value
    return concept.display


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
    if coding is not None:
        c_system, c_version, c_code, _ = coding_parts(coding)
        if code is not None and c_code != code or system is not None and c_system != system:
            raise InvalidRequest("$lookup: coding disagrees with system/code")
        system, code, version = c_system, c_code, version or c_version
    if not system or not code:
        raise InvalidRequest("$lookup needs system and code (or coding)")
    cs = code_system(provider, system, version)
    concept = cs.get(code)
    if concept is None:
        raise UnknownCode(f"Unknown code {code!r} in the CodeSystem {system}"
                          + (f" version {cs.version}" if cs.version else ""))
    wanted = set(properties) if properties else None
    items: list[tuple[str, object]] = [("name", cs.title or cs.name or system)]
    if cs.version:
        items.append(("version", cs.version))
    display = _pick_display(concept, display_language)
    items.append(("display", display if display is not None else code))
    for d in concept.designations:
        parts: list[tuple[str, object]] = []
        if d.language:
            parts.append(("language", {"valueCode": d.language}))
        if d.use:
            parts.append(("use", {"valueCoding": d.use}))
        parts.append(("value", d.value))
        items.append(("designation", parts))

    types = {p.get("code"): p.get("type") for p in cs.property_defs}

    def prop(pcode: str, value: dict) -> None:
        if wanted is None or pcode in wanted:
            items.append(("property", [("code", {"valueCode": pcode}), ("value", value)]))

    if wanted is None or PARENT in wanted:
        for p in concept.parents:
            prop(PARENT, {"valueCode": p})
    if wanted is None or CHILD in wanted:
        for c in cs.children(code):
            prop(CHILD, {"valueCode": c})
    if wanted is None or INACTIVE in wanted:
        prop(INACTIVE, {"valueBoolean": concept.inactive})
    for k, v in concept.properties:
        prop(k, value_element(v, types.get(k)))
    return to_parameters(items)
