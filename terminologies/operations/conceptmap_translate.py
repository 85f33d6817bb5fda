"""ConceptMap/$translate (FHIR R4 §4.10.14.1)."""
from __future__ import annotations

from ..errors import InvalidRequest, UnknownConceptMap
from ..provider import TerminologyProvider, split_canonical
from ._common import coding_json, coding_parts
from .parameters import as_bool, to_parameters

# R4 ConceptMap.group.element.target.equivalence read from the other side
# (concept-map-equivalence: "wider" = the target is wider than the source).
_REVERSED = {"wider": "narrower", "narrower": "wider", "subsumes": "specializes", "specializes": "subsumes"}
# R4: result is true only if a match has an equivalence other than these.
_NO_MATCH = ("unmatched", "disjoint")


def _maps(provider: TerminologyProvider, conceptmap: dict | None, url: str | None, version: str | None,
          source: str | None, target: str | None, reverse: bool) -> list[dict]:
    if conceptmap is not None:
        if not isinstance(conceptmap, dict) or conceptmap.get("resourceType") != "ConceptMap":
            raise InvalidRequest("expected a ConceptMap resource")
        return [conceptmap]
    if url:
        u, v = split_canonical(url)
        v = version or v
        maps = provider.concept_maps(url=f"{u}|{v}" if v else u)
        if not maps:
            raise UnknownConceptMap(f"A definition for ConceptMap {u}" + (f" version {v}" if v else "")
                                    + " could not be found")
        return maps
    if reverse:
        source, target = target, source
    return provider.concept_maps(source=source, target=target)


def _match(equivalence: str, coding: dict | None, source_url: str | None, products: list | None = None) -> list:
    parts: list[tuple[str, object]] = [("equivalence", {"valueCode": equivalence})]
    if coding is not None:
        parts.append(("concept", {"valueCoding": coding}))
    for p in products or ():
        pparts: list[tuple[str, object]] = [("element", {"valueUri": p.get("property")})]
        pparts.append(("concept", {"valueCoding": coding_json(p.get("system"), p.get("value"), p.get("display"))}))
        parts.append(("product", pparts))
    if source_url:
        parts.append(("source", {"valueUri": source_url}))
    return parts


def _dependencies_hold(target: dict, dependency: list[dict] | None) -> bool:
    """R4 ConceptMap.group.element.target.dependsOn: a mapping holds only if every
    dependency it names is given with that value. Without ``dependency`` input the
    condition cannot be checked and the mapping is returned (the client sees it)."""
    if not dependency or not target.get("dependsOn"):
        return True
    given: dict[str, set[str]] = {}
    for dep in dependency:
        element = (dep.get("element") or [None])[0] if isinstance(dep.get("element"), list) else dep.get("element")
        concept = dep.get("concept")
        concept = concept[0] if isinstance(concept, list) and concept else concept
        codes = set()
        if isinstance(concept, dict):
            codes.update(c.get("code") for c in concept.get("coding") or () if c.get("code"))
            if concept.get("code"):
                codes.add(concept["code"])
        given.setdefault(element, set()).update(codes)
    return all(d.get("value") in given.get(d.get("property"), ()) for d in target["dependsOn"])


def _forward(provider, cmap: dict, system: str, version: str | None, code: str, targetsystem: str | None,
             seen: tuple, dependency: list[dict] | None = None) -> list[tuple[str, list]]:
    out = []
    for g in cmap.get("group") or ():
        if g.get("source") != system or version and g.get("sourceVersion") not in (None, version):
            continue
        tsys = g.get("target")
        if targetsystem and tsys != targetsystem:
            continue
        elements = [e for e in g.get("element") or () if e.get("code") == code]
        for e in elements:
            for t in e.get("target") or ():
                if not _dependencies_hold(t, dependency):
                    continue
                eq = t.get("equivalence") or "equivalent"
                coding = coding_json(tsys, t["code"], t.get("display"), g.get("targetVersion")) if t.get("code") else None
                out.append((eq, _match(eq, coding, cmap.get("url"), t.get("product"))))
        if elements:
            continue
        unmapped = g.get("unmapped")
        if not unmapped:
            continue
        mode = unmapped.get("mode")
        if mode == "provided":
            out.append(("equal", _match("equal", coding_json(tsys, code, None, g.get("targetVersion")), cmap.get("url"))))
        elif mode == "fixed":
            coding = coding_json(tsys, unmapped.get("code"), unmapped.get("display"), g.get("targetVersion"))
            out.append(("inexact", _match("inexact", coding, cmap.get("url"))))
        elif mode == "other-map" and unmapped.get("url"):
            ref = unmapped["url"]
            if ref in seen:
                raise InvalidRequest(f"ConceptMap unmapped other-map cycle through {ref}")
            for other in provider.concept_maps(url=ref):
                out.extend(_forward(provider, other, system, version, code, targetsystem, seen + (ref,), dependency))
    return out


def _reverse(cmap: dict, system: str | None, code: str, targetsystem: str | None) -> list[tuple[str, list]]:
    out = []
    for g in cmap.get("group") or ():
        if system and g.get("target") != system:
            continue
        ssys = g.get("source")
        if targetsystem and ssys != targetsystem:
            continue
        for e in g.get("element") or ():
            for t in e.get("target") or ():
                if t.get("code") != code:
                    continue
                eq = t.get("equivalence") or "equivalent"
                eq = _REVERSED.get(eq, eq)
                coding = coding_json(ssys, e["code"], e.get("display"), g.get("sourceVersion")) if e.get("code") else None
                out.append((eq, _match(eq, coding, cmap.get("url"))))
    return out


def translate(provider: TerminologyProvider, conceptmap: dict | None = None, url: str | None = None,
              system: str | None = None, code: str | None = None, coding: dict | None = None,
              codeable_concept: dict | None = None, source: str | None = None, target: str | None = None,
              targetsystem: str | None = None, reverse: bool = False, version: str | None = None,
              conceptmap_version: str | None = None, dependency: list[dict] | None = None) -> dict:
    """Translate a code with one concept map (given, or by url) or every matching map.

    Forward: ``group.source`` = system, ``element.code`` = code -> each target.
    Reverse: targets with that code -> their elements, equivalence inverted
    (wider <-> narrower, subsumes <-> specializes). ``group.unmapped`` modes
    ``provided`` (same code, equivalence ``equal``), ``fixed`` (the fixed code,
    equivalence ``inexact``) and ``other-map`` apply when no element matches.
    ``dependency`` (the parsed ``dependency`` parameters: dicts with ``element`` and
    ``concept``) filters forward targets that have ``dependsOn``.
    Without a map or url, every map whose source/target value sets match ``source``/
    ``target`` (all maps when neither is given) is used.

    Returns:
        Parameters with ``result`` (true when a match is neither unmatched nor
        disjoint), ``message``, and ``match`` parts (equivalence, concept, source).

    Raises:
        InvalidRequest, UnknownConceptMap (url given but unknown).
    """
    reverse = as_bool(reverse, "reverse")
    codings: list[tuple] = []
    if code is not None:
        if not system and not reverse:
            raise InvalidRequest("$translate with a code needs its system")
        codings.append((system, version, code, None))
    if coding is not None:
        codings.append(coding_parts(coding))
    if codeable_concept is not None:
        if not isinstance(codeable_concept, dict):
            raise InvalidRequest("codeableConcept must be a CodeableConcept")
        codings.extend(coding_parts(c) for c in codeable_concept.get("coding") or ())
    if not codings:
        raise InvalidRequest("$translate needs system+code, coding or codeableConcept")
    maps = _maps(provider, conceptmap, url, conceptmap_version, source, target, reverse)
    matches: list[tuple[str, list]] = []
    for s, v, c, _ in codings:
        if not c:
            continue
        for m in maps:
            if reverse:
                matches.extend(_reverse(m, s, c, targetsystem))
            else:
                if not s:
                    continue
                matches.extend(_forward(provider, m, s, v, c, targetsystem, (m.get("url"),), dependency))
    result = any(eq not in _NO_MATCH for eq, _ in matches)
    items: list[tuple[str, object]] = [("result", result)]
    if not result:
        what = ", ".join(f"{s}|{c}" if s else str(c) for s, _, c, _ in codings)
        items.append(("message", f"No mappings could be found for {what}"
                      + (" (reverse)" if reverse else "")))
    items.extend(("match", parts) for _, parts in matches)
    return to_parameters(items)
