"""In-memory model of one code-system version: concepts, is-a hierarchy, supplements.

``CodeSystemData`` is what every operation works on. The server builds it from its
SQL store (and caches it); tests build it from FHIR JSON or from ``Concept`` lists.

Hierarchy semantics are FHIR R4 ``CodeSystem.hierarchyMeaning = is-a`` (§4.8.x): a
concept's ``parents`` are the codes that subsume it, possibly several (SNOMED CT is a
polyhierarchy). Transitive closures are computed on demand and cached per instance.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Iterable, Iterator

from .errors import InvalidRequest

#: FHIR R4 CodeSystem.content values (code-system-content-mode).
CONTENT_MODES = ("not-present", "example", "fragment", "complete", "supplement")

# Property codes that FHIR defines for every code system (R4 §4.8.8 "concept-properties").
PARENT = "parent"
CHILD = "child"
INACTIVE = "inactive"
STATUS = "status"
SUBSUMED_BY = "subsumedBy"

_VALUE_KEYS = (
    "valueCode", "valueCoding", "valueString", "valueInteger", "valueBoolean",
    "valueDateTime", "valueDecimal",
)
_TYPE_FOR_KEY = {
    "valueCode": "code", "valueCoding": "Coding", "valueString": "string",
    "valueInteger": "integer", "valueBoolean": "boolean", "valueDateTime": "dateTime",
    "valueDecimal": "decimal",
}

_ANCESTOR_CACHE = 65_536      # small sets, many codes
_DESCENDANT_CACHE = 2_048     # possibly huge sets, few distinct roots asked


@dataclass(frozen=True, slots=True)
class Designation:
    """An additional representation of a concept (FHIR CodeSystem.concept.designation).

    Attributes:
        language: BCP-47 language tag, or None.
        use: a Coding dict (``{"system", "code", "display"}``) saying what the designation
            is for (for example SNOMED's "Fully specified name"), or None.
        value: the text.
    """

    language: str | None
    use: dict | None
    value: str

    def to_json(self) -> dict:
        """The FHIR ``designation`` element."""
        out: dict[str, Any] = {}
        if self.language:
            out["language"] = self.language
        if self.use:
            out["use"] = dict(self.use)
        out["value"] = self.value
        return out


@dataclass(frozen=True, slots=True)
class Concept:
    """One concept of a code system.

    Attributes:
        code: the code (case-sensitive).
        display: the preferred display, or None.
        parents: is-a parents, codes of the same system.
        designations: other representations.
        properties: ``(property code, value)`` pairs (FHIR CodeSystem.concept.property);
            values are str, bool, int, float or a Coding dict. ``parent``/``inactive``
            are kept in ``parents``/``inactive`` instead.
        inactive: True for retired/inactive concepts.
    """

    code: str
    display: str | None = None
    parents: tuple[str, ...] = ()
    designations: tuple[Designation, ...] = ()
    properties: tuple[tuple[str, object], ...] = ()
    inactive: bool = False

    def property_values(self, code: str) -> list[object]:
        """Every value of property ``code``."""
        return [v for k, v in self.properties if k == code]


class CodeSystemData:
    """One indexed code-system version, in memory.

    Iterating yields codes in insertion order (the order of the source), which is
    also the order of whole-system and filtered expansions.

    Attributes:
        url, version, name, title: canonical metadata.
        content: ``complete | fragment | supplement | not-present | example``.
        supplements: for a supplement, the canonical of the code system it supplements.
        property_defs: the CodeSystem.property definitions (list of dicts).
        meta: other top-level CodeSystem fields kept for ``to_resource`` (status,
            publisher, language, hierarchyMeaning, ...).
    """

    def __init__(
        self,
        url: str,
        concepts: dict[str, Concept],
        *,
        version: str | None = None,
        name: str | None = None,
        title: str | None = None,
        content: str = "complete",
        supplements: str | None = None,
        property_defs: list[dict] | None = None,
        meta: dict | None = None,
    ) -> None:
        if content not in CONTENT_MODES:
            raise InvalidRequest(f"CodeSystem.content must be one of {', '.join(CONTENT_MODES)}, not {content!r}")
        self.url = url
        self.version = version
        self.name = name
        self.title = title
        self.content = content
        self.supplements = supplements
        self.property_defs = list(property_defs or [])
        self.meta = dict(meta or {})
        self._concepts = concepts
        self._children: dict[str, list[str]] | None = None
        self._order: dict[str, int] | None = None
        # Per-instance caches (lru_cache on a bound method would pin every instance).
        self.ancestors = lru_cache(maxsize=_ANCESTOR_CACHE)(self._ancestors)  # type: ignore[method-assign]
        self.descendants = lru_cache(maxsize=_DESCENDANT_CACHE)(self._descendants)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_concepts(cls, url: str, concepts: Iterable[Concept], **meta: Any) -> "CodeSystemData":
        """Build from concepts (a later duplicate code replaces the earlier one).

        Args:
            url: the code system canonical.
            concepts: the concepts, in the order expansions should list them.
            **meta: ``version``, ``name``, ``title``, ``content``, ``supplements``,
                ``property_defs``, ``meta`` (see the class attributes).
        """
        index: dict[str, Concept] = {}
        for c in concepts:
            index[c.code] = c
        return cls(url, index, **meta)

    @classmethod
    def from_resource(cls, codesystem: dict) -> "CodeSystemData":
        """Build from FHIR R4 CodeSystem JSON.

        Is-a parents come from nesting of ``concept`` (a nested concept is a child of
        its container, R4 §4.8.3) and from ``parent``/``subsumedBy`` properties;
        ``child`` properties add the inverse links. ``inactive=true`` or
        ``status=retired`` marks a concept inactive.
        """
        if not isinstance(codesystem, dict) or codesystem.get("resourceType") != "CodeSystem":
            raise InvalidRequest("expected a CodeSystem resource")
        url = codesystem.get("url")
        if not url:
            raise InvalidRequest("CodeSystem.url is required")
        concepts: dict[str, Concept] = {}
        extra_parents: dict[str, list[str]] = {}

        def walk(items: list, container: str | None) -> None:
            for item in items or ():
                code = item.get("code")
                if not isinstance(code, str) or not code:
                    raise InvalidRequest("CodeSystem.concept.code is required")
                parents: list[str] = [container] if container else []
                props: list[tuple[str, object]] = []
                inactive = False
                for p in item.get("property") or ():
                    pcode = p.get("code")
                    value = _unwrap_value(p)
                    if pcode in (PARENT, SUBSUMED_BY):
                        if isinstance(value, str) and value not in parents:
                            parents.append(value)
                    elif pcode == CHILD:
                        if isinstance(value, str):
                            extra_parents.setdefault(value, []).append(code)
                    elif pcode == INACTIVE:
                        inactive = value is True or value == "true"
                    else:
                        if pcode == STATUS and value == "retired":
                            inactive = True
                        props.append((pcode, value))
                designations = tuple(
                    Designation(d.get("language"), d.get("use"), d.get("value", ""))
                    for d in item.get("designation") or ()
                )
                prev = concepts.get(code)
                if prev is not None:  # the same code nested under several parents
                    parents = list(prev.parents) + [p for p in parents if p not in prev.parents]
                concepts[code] = Concept(code, item.get("display"), tuple(parents), designations, tuple(props), inactive)
                walk(item.get("concept"), code)

        walk(codesystem.get("concept"), None)
        for child, parents in extra_parents.items():
            c = concepts.get(child)
            if c is not None:
                merged = tuple(dict.fromkeys((*c.parents, *parents)))
                concepts[child] = replace(c, parents=merged)
        skip = {"resourceType", "url", "version", "name", "title", "content", "supplements",
                "property", "concept", "count"}
        return cls(
            url, concepts,
            version=codesystem.get("version"), name=codesystem.get("name"), title=codesystem.get("title"),
            content=codesystem.get("content", "complete"), supplements=codesystem.get("supplements"),
            property_defs=[dict(p) for p in codesystem.get("property") or ()],
            meta={k: v for k, v in codesystem.items() if k not in skip},
        )

    def to_resource(self, include_concepts: bool = True) -> dict:
        """FHIR R4 CodeSystem JSON.

        Concepts are written flat with a ``parent`` property per is-a parent (which,
        unlike nesting, expresses several parents) and ``inactive`` where true.
        """
        res: dict[str, Any] = {"resourceType": "CodeSystem"}
        for k in ("id", "meta", "extension", "identifier"):
            if k in self.meta:
                res[k] = self.meta[k]
        res["url"] = self.url
        if self.version is not None:
            res["version"] = self.version
        if self.name is not None:
            res["name"] = self.name
        if self.title is not None:
            res["title"] = self.title
        res["status"] = self.meta.get("status", "active")
        for k, v in self.meta.items():
            if k not in res:
                res[k] = v
        if self.content != "supplement" and any(c.parents for c in self._concepts.values()):
            res.setdefault("hierarchyMeaning", "is-a")
        res["content"] = self.content
        if self.supplements:
            res["supplements"] = self.supplements
        res["count"] = len(self._concepts)
        defs = {p["code"]: p for p in self.property_defs if p.get("code")}
        used: dict[str, str] = {}
        for c in self._concepts.values():
            if c.parents:
                used.setdefault(PARENT, "code")
            if c.inactive:
                used.setdefault(INACTIVE, "boolean")
            for k, v in c.properties:
                if k not in used:
                    used[k] = defs.get(k, {}).get("type") or _infer_type(v)
        props = list(self.property_defs)
        for code, typ in used.items():
            if code not in defs:
                d: dict[str, Any] = {"code": code, "type": typ}
                if code in (PARENT, INACTIVE):
                    d["uri"] = f"http://hl7.org/fhir/concept-properties#{code}"
                props.append(d)
        if props:
            res["property"] = props
        if include_concepts:
            types = {**{p["code"]: p.get("type") for p in props if p.get("code")}}
            res["concept"] = [_concept_json(c, types) for c in self._concepts.values()]
        return res

    # ------------------------------------------------------------------ access

    def get(self, code: str) -> Concept | None:
        """The concept for ``code`` or None."""
        return self._concepts.get(code)

    def __contains__(self, code: object) -> bool:
        return code in self._concepts

    def __len__(self) -> int:
        return len(self._concepts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._concepts)

    def concepts(self) -> Iterator[Concept]:
        """Every concept, in order."""
        return iter(self._concepts.values())

    def __repr__(self) -> str:
        return f"CodeSystemData({self.url!r}, version={self.version!r}, content={self.content!r}, {len(self)} concepts)"

    # ------------------------------------------------------------------ hierarchy

    def children(self, code: str) -> tuple[str, ...]:
        """Direct is-a children of ``code`` (index built on first use)."""
        if self._children is None:
            idx: dict[str, list[str]] = {}
            for c in self._concepts.values():
                for p in c.parents:
                    idx.setdefault(p, []).append(c.code)
            self._children = idx
        return tuple(self._children.get(code, ()))

    def roots(self) -> list[str]:
        """Codes without parents."""
        return [c.code for c in self._concepts.values() if not c.parents]

    def _ancestors(self, code: str) -> frozenset[str]:
        """Transitive is-a ancestors of ``code`` (excluding it); empty for unknown codes."""
        c = self._concepts.get(code)
        if c is None or not c.parents:
            return frozenset()
        seen: set[str] = set()
        stack = list(c.parents)
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            pc = self._concepts.get(p)
            if pc is not None and pc.parents:
                stack.extend(pc.parents)
        seen.discard(code)  # a cycle in bad data must not make a code its own ancestor
        return frozenset(seen)

    def _descendants(self, code: str) -> frozenset[str]:
        """Transitive is-a descendants of ``code`` (excluding it); empty for unknown codes."""
        self.children(code)  # build the index
        assert self._children is not None
        kids = self._children
        seen: set[str] = set()
        stack = list(kids.get(code, ()))
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            more = kids.get(k)
            if more:
                stack.extend(more)
        seen.discard(code)
        return frozenset(seen)

    def descendants_in_order(self, code: str) -> list[str]:
        """Transitive descendants of ``code`` in depth-first pre-order (children in
        source order, each code once): the order of hierarchy-filter expansions. Costs
        time proportional to the subtree, nothing global.

        A subclass that keeps the hierarchy elsewhere (overrides ``children``), such as
        the server's SQL-backed code system, gets ``order_of(descendants(code))``
        instead: one closure query rather than one query per node (and ``order_of`` may
        prefetch the concepts the expansion reads next).
        """
        if type(self).children is not CodeSystemData.children:
            return self.order_of(self.descendants(code))
        self.children(code)
        assert self._children is not None
        kids = self._children
        seen = {code}
        out: list[str] = []
        stack = list(reversed(kids.get(code, ())))
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            out.append(k)
            more = kids.get(k)
            if more:
                stack.extend(reversed(more))
        return out

    def ancestors_in_order(self, code: str) -> list[str]:
        """Transitive ancestors of ``code``, most general first (reverse breadth-first)."""
        c = self.get(code)
        if c is None:
            return []
        seen = {code}
        order: list[str] = []
        queue = list(c.parents)
        while queue:
            nxt = []
            for p in queue:
                if p in seen:
                    continue
                seen.add(p)
                order.append(p)
                pc = self.get(p)
                if pc is not None:
                    nxt.extend(pc.parents)
            queue = nxt
        order.reverse()
        return order

    # The public names are replaced per instance by cached wrappers in __init__;
    # these definitions document the signatures.
    def ancestors(self, code: str) -> frozenset[str]:  # noqa: D401 - replaced in __init__
        """Transitive is-a ancestors of ``code`` (excluding ``code``), cached."""
        return self._ancestors(code)

    def descendants(self, code: str) -> frozenset[str]:  # noqa: D401 - replaced in __init__
        """Transitive is-a descendants of ``code`` (excluding ``code``), cached."""
        return self._descendants(code)

    def subsumes(self, a: str, b: str) -> str:
        """The FHIR R4 ``$subsumes`` outcome of A against B.

        Returns:
            ``equivalent`` (same code), ``subsumes`` (A is an ancestor of B),
            ``subsumed-by`` (B is an ancestor of A) or ``not-subsumed``.
        """
        if a == b:
            return "equivalent"
        if a in self.ancestors(b):
            return "subsumes"
        if b in self.ancestors(a):
            return "subsumed-by"
        return "not-subsumed"

    def order_of(self, codes: Iterable[str]) -> list[str]:
        """``codes`` (known ones) sorted in code-system order."""
        codes = codes if isinstance(codes, (set, frozenset)) else set(codes)
        if len(codes) * 8 >= len(self._concepts):
            return [c for c in self._concepts if c in codes]
        if self._order is None:
            self._order = {c: i for i, c in enumerate(self._concepts)}
        order = self._order
        return sorted((c for c in codes if c in order), key=order.__getitem__)

    # ------------------------------------------------------------------ supplements

    def apply_supplement(self, supplement: "CodeSystemData") -> "CodeSystemData":
        """A new CodeSystemData with a supplement's displays, designations and properties.

        FHIR R4 §4.8.2: a supplement may add designations and properties but not change
        the meaning of codes. So a supplement display fills a missing display and is
        otherwise kept as a designation; codes the base lacks are added only when the
        base is not ``complete`` (a store without a licensed release can still answer
        ``$lookup`` for the codes it holds).
        """
        lang = supplement.meta.get("language")
        merged = dict(self._concepts)
        for sc in supplement.concepts():
            base = merged.get(sc.code)
            if base is None:
                if self.content == "complete":
                    continue
                merged[sc.code] = sc
                continue
            designations = list(base.designations)
            display = base.display
            if sc.display:
                if display is None:
                    display = sc.display
                elif sc.display != display:
                    designations.append(Designation(lang, None, sc.display))
            for d in sc.designations:
                if d not in designations:
                    designations.append(d)
            props = list(base.properties) + [p for p in sc.properties if p not in base.properties]
            parents = base.parents or sc.parents
            merged[sc.code] = replace(base, display=display, designations=tuple(designations),
                                      properties=tuple(props), parents=parents)
        content = self.content
        if content == "not-present" and merged:
            content = "fragment"
        return CodeSystemData(
            self.url, merged, version=self.version, name=self.name, title=self.title,
            content=content, supplements=self.supplements,
            property_defs=self.property_defs + [p for p in supplement.property_defs if p not in self.property_defs],
            meta=self.meta,
        )


# ---------------------------------------------------------------------- helpers


def _unwrap_value(element: dict) -> object:
    for k in _VALUE_KEYS:
        if k in element:
            return element[k]
    return None


def _infer_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "decimal"
    if isinstance(value, dict):
        return "Coding"
    return "string"


_KEY_FOR_TYPE = {v: k for k, v in _TYPE_FOR_KEY.items()}


def _property_json(code: str, value: object, typ: str | None) -> dict:
    key = _KEY_FOR_TYPE.get(typ or "") or _KEY_FOR_TYPE[_infer_type(value)]
    return {"code": code, key: value}


def _concept_json(c: Concept, types: dict[str, str | None]) -> dict:
    out: dict[str, Any] = {"code": c.code}
    if c.display is not None:
        out["display"] = c.display
    if c.designations:
        out["designation"] = [d.to_json() for d in c.designations]
    props = [{"code": PARENT, "valueCode": p} for p in c.parents]
    if c.inactive:
        props.append({"code": INACTIVE, "valueBoolean": True})
    props.extend(_property_json(k, v, types.get(k)) for k, v in c.properties)
    if props:
        out["property"] = props
    return out


__all__ = ["Concept", "CodeSystemData", "Designation", "CONTENT_MODES"]
