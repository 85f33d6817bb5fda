"""ValueSet.compose evaluation shared by $expand and ValueSet/$validate-code (FHIR R4 §4.9.5).

Semantics: the value set is the union of its ``include`` items minus the union of its
``exclude`` items. Within one item, the ``concept`` list or the ``filter`` list (all
filters must hold) or, with neither, the whole system selects codes of ``system``;
each ``valueSet`` of the item intersects that selection (or, without ``system``, the
item is the intersection of its value sets).
"""
from __future__ import annotations

import re
from operator import itemgetter
from typing import Callable, Iterable

from ..errors import InvalidRequest, UnknownSystem, UnknownValueSet
from ..model import CodeSystemData, Concept
from ..provider import TerminologyProvider, split_canonical
from ._common import code_system_or_none

FILTER_OPS = ("=", "is-a", "descendent-of", "is-not-a", "regex", "in", "not-in", "generalizes", "exists")
_CODE_PROPS = ("concept", "code")
_MAX_DEPTH = 32


class Entry(tuple):
    """One code of an expansion: ``(system, code, display, version, inactive, concept)``.

    A tuple subclass so that hundreds of thousands of entries are built at C speed
    (``Entry((system, code, display, version, inactive, concept))``).
    """

    __slots__ = ()
    system = property(itemgetter(0))
    code = property(itemgetter(1))
    display = property(itemgetter(2))
    version = property(itemgetter(3))
    inactive = property(itemgetter(4))
    concept = property(itemgetter(5))


def entry(system: str, code: str, display: str | None, version: str | None = None,
          inactive: bool = False, concept: Concept | None = None) -> Entry:
    """Build an Entry."""
    return Entry((system, code, display, version, inactive, concept))


def resolve_value_set(provider: TerminologyProvider, ref: str, version: str | None = None) -> dict:
    """The ValueSet for ``url`` or ``url|version``; raises UnknownValueSet."""
    url, v = split_canonical(ref)
    version = version or v
    vs = provider.value_set(url, version)
    if vs is None:
        raise UnknownValueSet(f"A definition for ValueSet {url}" + (f" version {version}" if version else "")
                              + " could not be found")
    return vs


# ------------------------------------------------------------------ property access


def _prop_strings(c: Concept, prop: str) -> list[str]:
    """String forms of a concept's property values (a Coding compares by its code)."""
    if prop in _CODE_PROPS:
        return [c.code]
    if prop == "display":
        return [c.display] if c.display is not None else []
    if prop == "parent":
        return list(c.parents)
    if prop == "inactive":
        return ["true" if c.inactive else "false"]
    out = []
    for k, v in c.properties:
        if k == prop:
            if isinstance(v, bool):
                out.append("true" if v else "false")
            elif isinstance(v, dict):
                out.append(str(v.get("code")))
            else:
                out.append(str(v))
    return out


def _check_filter(f: dict) -> tuple[str, str, str]:
    prop, op, value = f.get("property"), f.get("op"), f.get("value")
    if op not in FILTER_OPS:
        raise InvalidRequest(f"unsupported ValueSet filter operator {op!r} (supported: {', '.join(FILTER_OPS)})")
    if not isinstance(prop, str) or not prop or not isinstance(value, str):
        raise InvalidRequest("a ValueSet filter needs property, op and value")
    return prop, op, value


def _regex(value: str):
    try:
        return re.compile(value)
    except re.error as exc:
        raise InvalidRequest(f"invalid regex {value!r} in a ValueSet filter: {exc}") from None


def predicate(cs: CodeSystemData, f: dict) -> Callable[[Concept], bool]:
    """A per-concept test for one filter (used for membership and property filters)."""
    prop, op, value = _check_filter(f)
    hier = prop in _CODE_PROPS or prop == "parent" and op in ("is-a", "descendent-of", "is-not-a", "generalizes")
    if op in ("is-a", "descendent-of", "is-not-a", "generalizes"):
        if not hier:
            raise InvalidRequest(f"filter op {op!r} applies to the property 'concept', not {prop!r}")
        if op == "is-a":
            return lambda c: c.code == value or value in cs.ancestors(c.code)
        if op == "descendent-of":
            return lambda c: value in cs.ancestors(c.code)
        if op == "is-not-a":
            return lambda c: not (c.code == value or value in cs.ancestors(c.code))
        return lambda c: c.code == value or c.code in cs.ancestors(value)
    if op == "=":
        return lambda c: value in _prop_strings(c, prop)
    if op == "regex":
        rx = _regex(value)
        return lambda c: any(rx.fullmatch(s) for s in _prop_strings(c, prop))
    if op in ("in", "not-in"):
        allowed = {v.strip() for v in value.split(",") if v.strip()}
        if op == "in":
            return lambda c: any(s in allowed for s in _prop_strings(c, prop))
        return lambda c: not any(s in allowed for s in _prop_strings(c, prop))
    # exists
    want = value.lower() == "true"
    return lambda c: bool(_prop_strings(c, prop)) == want


def filter_codes(cs: CodeSystemData, f: dict) -> list[str]:
    """The codes of ``cs`` that satisfy one filter, in a deterministic order: hierarchy
    filters in depth-first order below (or root-first above) the value, everything else
    in code-system order. Hierarchy filters cost the size of the subtree, not of ``cs``."""
    prop, op, value = _check_filter(f)
    if prop in _CODE_PROPS:
        if op == "is-a":
            return [value, *cs.descendants_in_order(value)] if value in cs else []
        if op == "descendent-of":
            return cs.descendants_in_order(value)
        if op == "generalizes":
            return [*cs.ancestors_in_order(value), value] if value in cs else []
        if op == "is-not-a":
            excluded = cs.descendants(value) | {value}
            return [c for c in cs if c not in excluded]
        if op == "=":
            return [value] if value in cs else []
        if op == "in":
            return [v for v in dict.fromkeys(v.strip() for v in value.split(",")) if v in cs]
    test = predicate(cs, f)
    return [c.code for c in cs.concepts() if test(c)]


def filter_code_set(cs: CodeSystemData, f: dict) -> set[str] | frozenset[str]:
    """Like ``filter_codes`` but unordered; hierarchy filters reuse the cached closures."""
    prop, op, value = _check_filter(f)
    if prop in _CODE_PROPS:
        if op == "is-a":
            return cs.descendants(value) | {value} if value in cs else frozenset()
        if op == "descendent-of":
            return cs.descendants(value)
        if op == "generalizes":
            return cs.ancestors(value) | {value} if value in cs else frozenset()
    return set(filter_codes(cs, f))


# ------------------------------------------------------------------ expansion


class Expander:
    """Evaluates value sets against one provider (memoises code systems per run)."""

    def __init__(self, provider: TerminologyProvider) -> None:
        self.provider = provider
        self.used_systems: dict[tuple[str, str | None], CodeSystemData | None] = {}

    def cs(self, url: str, version: str | None) -> CodeSystemData | None:
        key = (url, version)
        if key not in self.used_systems:
            self.used_systems[key] = code_system_or_none(self.provider, url, version)
        return self.used_systems[key]

    def entries(self, vs: dict, stack: tuple[str, ...] = ()) -> list[Entry]:
        """Every code of ``vs``, in definition order, without duplicates."""
        if len(stack) > _MAX_DEPTH:
            raise InvalidRequest("ValueSet imports nest too deeply")
        compose = vs.get("compose")
        if not compose:
            if vs.get("expansion"):
                return list(_flatten_contains(vs["expansion"].get("contains") or ()))
            raise InvalidRequest(f"ValueSet {vs.get('url') or ''} has neither compose nor expansion".replace("  ", " "))
        includes = compose.get("include") or ()
        if len(includes) == 1:  # one item yields each code once
            items = list(self._item(includes[0], stack))
        else:
            out: dict[tuple[str, str], Entry] = {}
            for inc in includes:
                for e in self._item(inc, stack):
                    out.setdefault(e[:2], e)
            items = list(out.values())
        excluded: set[tuple[str, str]] = set()
        for exc in compose.get("exclude") or ():
            excluded.update(e[:2] for e in self._item(exc, stack))
        if excluded:
            items = [e for e in items if e[:2] not in excluded]
        if compose.get("inactive") is False:
            items = [e for e in items if not e.inactive]
        return items

    def code_set(self, vs: dict, stack: tuple[str, ...] = ()) -> set[tuple[str, str]]:
        """Every ``(system, code)`` of ``vs``, unordered: the cheap path for membership
        sets (search ``:in``). Hierarchy filters use the cached closures and no Entry is
        built; anything unusual falls back to ``entries``."""
        if len(stack) > _MAX_DEPTH:
            raise InvalidRequest("ValueSet imports nest too deeply")
        compose = vs.get("compose")
        if not compose or compose.get("inactive") is False:
            return {e[:2] for e in self.entries(vs, stack)}
        out: set[tuple[str, str]] = set()
        for inc in compose.get("include") or ():
            out |= self._item_set(inc, stack)
        for exc in compose.get("exclude") or ():
            out -= self._item_set(exc, stack)
        return out

    def _item_set(self, item: dict, stack: tuple[str, ...]) -> set[tuple[str, str]]:
        system = item.get("system")
        if not system or item.get("concept"):
            return {e[:2] for e in self._item(item, stack)}
        imported = []
        for ref in item.get("valueSet") or ():
            url = split_canonical(ref)[0]
            if url in stack:
                raise InvalidRequest(f"ValueSet {url} imports itself (cycle: {' -> '.join(stack + (url,))})")
            imported.append(self.code_set(resolve_value_set(self.provider, ref), stack + (url,)))
        version = item.get("version")
        cs = self.cs(system, version)
        if cs is None:
            raise UnknownSystem(f"A definition for CodeSystem {system}"
                                + (f" version {version}" if version else "") + " could not be found")
        filters = item.get("filter")
        if filters:
            codes = set(filter_code_set(cs, filters[0]))
            for f in filters[1:]:
                codes &= filter_code_set(cs, f)
            out = {(system, c) for c in codes}
        else:
            out = {(system, c) for c in cs}
        for s in imported:
            out &= s
        return out

    def _imports(self, item: dict, stack: tuple[str, ...]) -> list[list[Entry]]:
        sets = []
        for ref in item.get("valueSet") or ():
            url = split_canonical(ref)[0]
            if url in stack:
                raise InvalidRequest(f"ValueSet {url} imports itself (cycle: {' -> '.join(stack + (url,))})")
            sets.append(self.entries(resolve_value_set(self.provider, ref), stack + (url,)))
        return sets

    def _item(self, item: dict, stack: tuple[str, ...]) -> Iterable[Entry]:
        imported = self._imports(item, stack)
        system = item.get("system")
        if not system:
            if not imported:
                raise InvalidRequest("a ValueSet include/exclude needs a system or a valueSet")
            if item.get("concept") or item.get("filter"):
                raise InvalidRequest("a ValueSet include/exclude with concept or filter needs a system")
            first, *rest = imported
            keep = set.intersection(*({e[:2] for e in s} for s in rest)) if rest else None
            return [e for e in first if keep is None or e[:2] in keep]
        version = item.get("version")
        cs = self.cs(system, version)
        concepts = item.get("concept")
        filters = item.get("filter")
        if concepts and filters:
            raise InvalidRequest("a ValueSet include/exclude has either concept or filter, not both")
        entries: list[Entry] = []
        if concepts:
            for ref in concepts:
                code = ref.get("code")
                if not code:
                    raise InvalidRequest("ValueSet.compose.include.concept.code is required")
                c = cs.get(code) if cs is not None else None
                if c is None and cs is not None and cs.content == "complete":
                    continue  # not a code of the system: not in the value set
                display = ref.get("display") or (c.display if c else None)
                entries.append(entry(system, code, display, cs.version if cs else version,
                                     bool(c and c.inactive), c if c else _inline_concept(ref)))
        else:
            if cs is None:
                raise UnknownSystem(f"A definition for CodeSystem {system}"
                                    + (f" version {version}" if version else "") + " could not be found")
            if filters:
                ordered = filter_codes(cs, filters[0])
                for f in filters[1:]:
                    keep = set(filter_codes(cs, f))
                    ordered = [c for c in ordered if c in keep]
            else:
                ordered = list(cs)
            get = cs.get
            v = cs.version
            entries = [Entry((system, code, c.display, v, c.inactive, c)) for code in ordered for c in (get(code),)]
        for s in imported:
            keep = {e[:2] for e in s}
            entries = [e for e in entries if e[:2] in keep]
        return entries

    # -------------------------------------------------------------- membership

    def member(self, vs: dict, system: str, code: str, stack: tuple[str, ...] = ()) -> tuple[bool, Entry | None, str | None]:
        """Whether ``(system, code)`` is in ``vs``, rule by rule; ``(found, entry, problem)``."""
        compose = vs.get("compose")
        if not compose:
            for e in self.entries(vs, stack):
                if e.system == system and e.code == code:
                    return True, e, None
            return False, None, None
        hit: Entry | None = None
        problem = None
        for inc in compose.get("include") or ():
            e, p = self._item_member(inc, system, code, stack)
            problem = problem or p
            if e is not None:
                hit = e
                break
        if hit is None:
            return False, None, problem
        for exc in compose.get("exclude") or ():
            e, _ = self._item_member(exc, system, code, stack)
            if e is not None:
                return False, None, None
        if compose.get("inactive") is False and hit.inactive:
            return False, None, f"the code {code!r} is inactive"
        return True, hit, None

    def _item_member(self, item: dict, system: str, code: str, stack: tuple[str, ...]) -> tuple[Entry | None, str | None]:
        isys = item.get("system")
        hit: Entry | None = None
        if isys:
            if isys != system:
                return None, None
            cs = self.cs(isys, item.get("version"))
            c = cs.get(code) if cs is not None else None
            concepts = item.get("concept")
            if concepts:
                ref = next((r for r in concepts if r.get("code") == code), None)
                if ref is None or (c is None and cs is not None and cs.content == "complete"):
                    return None, None
                hit = entry(system, code, ref.get("display") or (c.display if c else None),
                            cs.version if cs else None, bool(c and c.inactive), c or _inline_concept(ref))
            else:
                if cs is None:
                    return None, f"A definition for CodeSystem {isys} could not be found"
                if c is None:
                    return None, None
                for f in item.get("filter") or ():
                    if not predicate(cs, f)(c):
                        return None, None
                hit = entry(system, code, c.display, cs.version, c.inactive, c)
        for ref in item.get("valueSet") or ():
            url = split_canonical(ref)[0]
            if url in stack:
                raise InvalidRequest(f"ValueSet {url} imports itself")
            ok, e, p = self.member(resolve_value_set(self.provider, ref), system, code, stack + (url,))
            if not ok:
                return None, p
            hit = hit or e
        return hit, None


def _inline_concept(ref: dict) -> Concept:
    from ..model import Designation

    return Concept(ref["code"], ref.get("display"), designations=tuple(
        Designation(d.get("language"), d.get("use"), d.get("value", "")) for d in ref.get("designation") or ()))


def _flatten_contains(contains: Iterable[dict]) -> Iterable[Entry]:
    for c in contains:
        if c.get("code") and c.get("system"):
            yield entry(c["system"], c["code"], c.get("display"), c.get("version"), bool(c.get("inactive")),
                        _inline_concept(c))
        yield from _flatten_contains(c.get("contains") or ())
