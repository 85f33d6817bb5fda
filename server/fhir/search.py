"""FHIR R4 search over the versioned store (http://hl7.org/fhir/R4/search.html).

Section numbers (§) in this module are those of the R4 (v4.0.1) search page.

* :func:`parse` turns a resource type and the query's ``(name, value)`` pairs into a
  :class:`ParsedSearch`: a tree of criteria (leaf tests on one search parameter, chains
  §3.1.1.4.15, reverse chains ``_has`` §3.1.1.4.16), sort keys, paging, the
  ``_include``/``_revinclude`` specs and the result parameters (§3.1.1.5).
* :func:`execute` evaluates it as SQL (SQLAlchemy Core, valid on SQLite and PostgreSQL)
  over ``resource`` and the typed ``idx_*`` tables *as of a snapshot* (see
  :mod:`server.db.schema`): a version row is visible as of ``S`` iff
  ``pk <= S AND (superseded_by IS NULL OR superseded_by > S) AND NOT deleted``. Follow-up
  pages carry ``_snapshot=S&_offset=n``, so paging is stable while others write.
* :func:`match_pks` serves conditional create/update/delete and conditional references:
  the current, non-deleted matches of a query, strict handling.

SQL shape: a positive test on a search parameter is ``pk IN (SELECT res_pk FROM idx_<kind>
WHERE res_type = ? AND param = ? AND <value test>)``, an index range scan on
``(res_type, param, value...)`` that the planner can drive the query from (by rowid on
SQLite, a semi-join on PostgreSQL). Negations (``:not``) and ``:missing`` are correlated
``[NOT] EXISTS`` probes by ``res_pk``. Chains select the target ids of the reference
index from a subquery on the target type; ``_has`` selects the ids that the referring
resources' reference rows point at. ``_sort`` keys are correlated ``min``/``max``
subqueries on the index rows of the version. Only a search that narrows the candidates
through such a list counts its total in the same pass (``count(*) OVER ()``).

Planner notes: SQLite has no statistics, so the type test is written so that no index
serves it when a criterion yields a pk list (see :class:`_Builder`). PostgreSQL needs
statistics (autovacuum's ANALYZE, or an explicit ANALYZE after a bulk load) to order the
joins of chains sensibly.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable, Union

import sqlalchemy as sa
from sqlalchemy import and_, exists, func, not_, or_, select

from server.db.engine import MAX_QUERY_INT
from server.db.schema import INDEX_TABLES, resource
from server.errors import InvalidRequest, NotImplementedYet
from server.fhir.searchparams import RESOURCE_TYPES, SearchParam, registry

__all__ = ["ParsedSearch", "SearchPage", "parse", "execute", "match_pks", "resolve_terminology",
           "TermResolver", "ValueSetRef", "CodeSet", "TERMINOLOGY_MODIFIERS",
           "Leaf", "Chain", "Has", "Criterion", "SortKey", "IncludeSpec",
           "TokenValue", "DateValue", "NumberValue", "QuantityValue", "ReferenceValue",
           "StringValue", "UriValue", "CompositeValue", "TypeFilter", "date_search_range"]

# --------------------------------------------------------------------------- constants

#: Result parameters (§3.1.1.5 and friends): not criteria.
RESULT_PARAMS = frozenset({"_count", "_offset", "_snapshot", "_sort", "_include", "_revinclude",
                           "_summary", "_elements", "_total", "_totalMethod", "_format",
                           "_pretty", "_contained", "_containedType"})
#: Valid FHIR search features this server does not implement.
NOT_IMPLEMENTED_PARAMS = frozenset({"_text", "_content", "_list", "_query", "_filter"})
#: Parameters every resource type has (Resource base), usable in system-level search.
COMMON_PARAMS = frozenset({"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"})

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")   # §3.1.1.4.5
_SUMMARY_VALUES = ("true", "false", "text", "data", "count")
_TOTAL_VALUES = ("none", "estimate", "accurate")

# The R4 modifiers (§3.1.1.4.4 and the per-type sections); a resource type name is [type].
_R4_MODIFIERS = frozenset({"missing", "exact", "contains", "text", "in", "below", "above",
                           "not-in", "identifier", "not", "of-type"})
_MODIFIERS = {
    "string": {"exact", "contains", "missing"},
    "token": {"text", "not", "of-type", "missing", "in", "not-in", "above", "below"},
    "reference": {"identifier", "missing"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "uri": {"below", "above", "missing"},
    "composite": {"missing"},
    "_id": {"missing", "not"},
    "_lastUpdated": {"missing"},
}
# Valid for the type per the spec, but not implemented here (hierarchy of references).
_UNSUPPORTED_MODIFIERS = {
    "token": set(),
    "reference": {"above", "below"},
    "uri": set(),
}

MAX_INCLUDE_ITERATIONS = 10
# Bounds on one search, so that a crafted query is a 400 and not a database error: SQLite
# refuses SQL whose expression tree is over 1000 deep (AND of criteria, OR of a
# parameter's comma values) or whose ORDER BY has over 1000 terms.
MAX_SEARCH_PARAMS = 100  # name=value pairs in one search
# A chain or _has nests a subquery per level; the databases' effort (and SQLite's depth
# count) grows with levels x values, planning with the number of nested subqueries: a value
# costs levels squared (``subject:Patient.organization.name``: 9).
MAX_OR_VALUES = 200      # cost of one parameter's comma-separated values (_id: an IN list, free)
MAX_SEARCH_VALUES = 1000  # cost of all parameters together (a chain also repeats its values per
                          # target type; PostgreSQL takes at most 65535 bind parameters)
MAX_SORT_KEYS = 20
MAX_INCLUDES = 10_000
_IN_CHUNK = 900          # bind parameters per IN list
OPEN_END = 1e18          # open period ends, as extract writes them

_SORT_COLUMN = {"string": ("value", "value"), "token": ("code", "code"), "date": ("low", "high"),
                "number": ("value", "value"), "quantity": ("value", "value"),
                "reference": ("target_id", "target_id"), "uri": ("value", "value")}


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class StringValue:
    text: str                    # as given (unescaped)


@dataclass(frozen=True)
class UriValue:
    uri: str


@dataclass(frozen=True)
class TokenValue:
    """``code`` / ``system|code`` / ``|code`` / ``system|``; ``:of-type`` / ``:text`` forms.

    ``system is None`` = any system; ``no_system`` = ``|code`` (the token has no system);
    ``code is None`` = any code.
    """
    system: str | None = None
    code: str | None = None
    no_system: bool = False
    type_system: str | None = None      # :of-type
    type_code: str | None = None
    text: str | None = None             # :text


@dataclass(frozen=True)
class DateValue:
    """A date search value (§3.1.1.4.7): prefix and its range ``[low, high)`` (epoch s, UTC)."""
    prefix: str
    low: float
    high: float                         # exclusive


@dataclass(frozen=True)
class NumberValue:
    """A number: prefix, value and its implicit-precision range ``[low, high)`` (§3.1.1.4.6)."""
    prefix: str
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class QuantityValue(NumberValue):
    """``[prefix]value|system|code`` or ``value||unit`` (§3.1.1.4.11 quantity)."""
    system: str | None = None
    code: str | None = None             # code, or unit when system is not given
    unit_or_code: bool = False          # ``value||unit``: code OR unit


@dataclass(frozen=True)
class ReferenceValue:
    """``id`` / ``Type/id`` / absolute URL / ``:identifier`` ``system|value`` (§3.1.1.4.12)."""
    type: str | None = None
    id: str | None = None
    url: str | None = None
    ident_system: str | None = None
    ident_value: str | None = None
    ident_no_system: bool = False


@dataclass(frozen=True)
class ValueSetRef:
    """``:in`` / ``:not-in`` (§3.1.1.4.10 token): a value set canonical URL (``url|version``
    allowed) or a literal reference ``ValueSet/id``."""
    ref: str


@dataclass(frozen=True)
class CodeSet:
    """A terminology modifier resolved to the ``(system, code)`` pairs it stands for
    (see :func:`resolve_terminology`); ``system`` None = a code without system."""
    pairs: frozenset


@dataclass(frozen=True)
class CompositeValue:
    parts: tuple[Any, ...]              # one value per component


Value = Union[StringValue, UriValue, TokenValue, DateValue, NumberValue, QuantityValue,
              ReferenceValue, CompositeValue, ValueSetRef, CodeSet]

#: Token modifiers that need a terminology service (resolved by :func:`resolve_terminology`).
TERMINOLOGY_MODIFIERS = frozenset({"in", "not-in", "above", "below"})


# --------------------------------------------------------------------------- criteria tree


@dataclass
class Leaf:
    """A test on one search parameter of ``types`` (None = every type: system search)."""
    types: tuple[str, ...] | None
    code: str
    kind: str                            # param type, or "_id" / "_lastUpdated" / "_type"
    modifier: str | None = None
    values: list = field(default_factory=list)    # OR-ed
    missing: bool | None = None          # :missing=true/false
    components: tuple[str, ...] = ()     # composite: component kinds


@dataclass
class Chain:
    """``ref[:Type].rest`` (§3.1.1.4.15): a reference whose target satisfies ``targets[T]``."""
    types: tuple[str, ...] | None
    code: str
    targets: dict[str, "Node"]


@dataclass
class Has:
    """``_has:Src:ref:rest`` (§3.1.1.4.16): some ``Src`` referring to us via ``ref`` matches."""
    type: str
    src_type: str
    code: str
    inner: "Node"


@dataclass
class TypeFilter:
    """``_type=A,B`` (§3.1.1.4.24)."""
    types: tuple[str, ...]


Node = Union[Leaf, Chain, Has, TypeFilter]


@dataclass
class Criterion:
    """One query parameter (parameters are AND-ed, its comma values OR-ed)."""
    name: str
    value: str
    node: Node


@dataclass(frozen=True)
class SortKey:
    code: str
    kind: str                # param type, or "_id" / "_lastUpdated"
    descending: bool = False


@dataclass(frozen=True)
class IncludeSpec:
    """``_include`` / ``_revinclude`` (§3.1.1.5.4): ``source_type:param[:target_type]``.

    ``source_type``/``param`` None = ``*`` (every reference parameter).
    """
    source_type: str | None
    param: str | None
    target_type: str | None = None
    iterate: bool = False
    reverse: bool = False


@dataclass
class ParsedSearch:
    type: str | None
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = 50
    offset: int = 0
    snapshot: int | None = None
    includes: list[IncludeSpec] = field(default_factory=list)
    revincludes: list[IncludeSpec] = field(default_factory=list)
    total: str | None = None             # none / estimate / accurate; None = default (accurate)
    summary: str | None = None           # true / false / text / data / count
    elements: list[str] | None = None
    contained: str | None = None
    contained_type: str | None = None
    types: tuple[str, ...] | None = None  # _type
    warnings: list[str] = field(default_factory=list)
    self_params: list[tuple[str, str]] = field(default_factory=list)
    handling: str = "lenient"


@dataclass
class SearchPage:
    pks: list[int]
    include_pks: list[int] = field(default_factory=list)
    total: int | None = None
    snapshot: int = 0
    next_params: list[tuple[str, str]] | None = None
    prev_params: list[tuple[str, str]] | None = None
    warnings: list[str] = field(default_factory=list)


class _Unknown(Exception):
    """An unknown search parameter (lenient: warning; strict: InvalidRequest)."""


# --------------------------------------------------------------------------- escaping (§3.1.1.4.19)


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` unless escaped with a backslash; escapes stay in the parts."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


_UNESCAPE = re.compile(r"\\([\\,$|])")


def _unescape(text: str) -> str:
    return _UNESCAPE.sub(r"\1", text)


# --------------------------------------------------------------------------- normalisation


def _normalize(text: str) -> str:
    """The normalisation extract.py applies to ``idx_string.value`` (case, accents, spaces)."""
    from server.fhir.extract import normalize_string  # late: extract compiles at import

    return normalize_string(text)


# --------------------------------------------------------------------------- value parsing


def _prefix(text: str) -> tuple[str, str]:
    """Split a leading comparison prefix (§3.1.1.4.5) off a value."""
    if len(text) > 2 and text[:2] in PREFIXES and not text[2:3].isalpha():
        return text[:2], text[2:]
    return "eq", text


_DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:?\d{2})?)?)?)?$")


def date_search_range(text: str) -> tuple[float, float]:
    """A FHIR date/dateTime/instant (possibly partial) -> ``[low, high)`` epoch seconds UTC.

    The range is the value's precision (§3.1.1.4.5 "range of the value", §3.1.1.4.7);
    no time zone = UTC. A ``+`` that arrived as a space (unencoded query) is restored.
    ``high`` is exclusive, unlike the index rows (:func:`server.fhir.extract.date_range`:
    ``high`` = end - 1 µs, inclusive); the comparisons in :func:`_date_cond` allow for both.
    """
    s = text.strip()
    s = re.sub(r" (\d{2}:?\d{2})$", r"+\1", s)
    m = _DATE_RE.match(s)
    if not m:
        raise InvalidRequest(f"Invalid date '{text}' (expected YYYY[-MM[-DD[Thh:mm[:ss[.fff]][Z|+hh:mm]]]])")
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    tzinfo = timezone.utc
    if tz and tz != "Z":
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        tzinfo = timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    try:
        if mo is None:
            start = datetime(int(y), 1, 1, tzinfo=tzinfo)
            end = datetime(int(y) + 1, 1, 1, tzinfo=tzinfo) if int(y) < 9999 else None
        elif d is None:
            start = datetime(int(y), int(mo), 1, tzinfo=tzinfo)
            ny, nm = (int(y) + 1, 1) if int(mo) == 12 else (int(y), int(mo) + 1)
            end = datetime(ny, nm, 1, tzinfo=tzinfo) if ny <= 9999 else None
        elif hh is None:
            start = datetime(int(y), int(mo), int(d), tzinfo=tzinfo)
            end = start + timedelta(days=1)
        else:
            start = datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss or 0), tzinfo=tzinfo)
            if ss is None:
                end = start + timedelta(minutes=1)
            elif frac is None:
                end = start + timedelta(seconds=1)
            else:
                low = start.timestamp() + float("0." + frac)
                return low, low + 10.0 ** -len(frac)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"Invalid date '{text}'") from None
    return start.timestamp(), (end.timestamp() if end is not None else OPEN_END)


def _parse_date(raw: str) -> DateValue:
    prefix, rest = _prefix(_unescape(raw))
    low, high = date_search_range(rest)
    return DateValue(prefix, low, high)


def _decimal(text: str, what: str = "number") -> Decimal:
    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        raise InvalidRequest(f"Invalid {what} '{text}'") from None
    if not d.is_finite():
        raise InvalidRequest(f"Invalid {what} '{text}'")
    return d


def _number_parts(raw: str, what: str = "number") -> tuple[str, float, float, float]:
    prefix, rest = _prefix(raw)
    d = _decimal(rest, what)
    # Implicit precision (§3.1.1.4.6): half a unit of the last significant digit, so
    # 100 -> [99.5, 100.5), 100.00 -> [99.995, 100.005), 1e2 (one digit) -> [50, 150).
    half = Decimal(5) * Decimal(10) ** (d.as_tuple().exponent - 1)
    return prefix, float(d), float(d - half), float(d + half)


def _parse_number(raw: str) -> NumberValue:
    return NumberValue(*_number_parts(_unescape(raw)))


def _parse_quantity(raw: str) -> QuantityValue:
    parts = _split(raw, "|")
    if len(parts) == 1:
        return QuantityValue(*_number_parts(_unescape(parts[0]), "quantity"))
    if len(parts) != 3:
        raise InvalidRequest(f"Invalid quantity '{raw}' (expected [prefix]value[|system|code])")
    num, system, code = (_unescape(p) for p in parts)
    prefix, value, low, high = _number_parts(num, "quantity")
    if not system:
        return QuantityValue(prefix, value, low, high, None, code or None, bool(code))
    return QuantityValue(prefix, value, low, high, system, code or None, False)


def _parse_token(raw: str, modifier: str | None) -> TokenValue | ValueSetRef:
    if modifier == "text":
        return TokenValue(text=_unescape(raw))
    if modifier in ("in", "not-in"):
        ref = _unescape(raw).strip()
        if not ref:
            raise InvalidRequest(f"':{modifier}' needs a value set URL or ValueSet/id")
        return ValueSetRef(ref)
    parts = _split(raw, "|")
    if modifier in ("below", "above"):
        # §3.1.1.4.10: subsumption is defined within one code system, so both are needed.
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise InvalidRequest(f"Invalid :{modifier} value '{raw}' (expected system|code)")
        return TokenValue(system=_unescape(parts[0]), code=_unescape(parts[1]))
    if modifier == "of-type":
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise InvalidRequest(f"Invalid :of-type value '{raw}' (expected system|code|value)")
        ts, tc, v = (_unescape(p) for p in parts)
        return TokenValue(code=v, type_system=ts or None, type_code=tc)
    if len(parts) == 1:
        return TokenValue(code=_unescape(parts[0]))
    if len(parts) != 2:
        raise InvalidRequest(f"Invalid token '{raw}' (an unescaped '|' too many)")
    system, code = (_unescape(p) for p in parts)
    if not system and not code:
        raise InvalidRequest(f"Invalid token '{raw}'")
    if not system:
        return TokenValue(code=code, no_system=True)
    return TokenValue(system=system, code=code or None)


_ABS_REF = re.compile(r"^(?:https?://.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def _parse_reference(raw: str, modifier: str | None, sp: SearchParam | None) -> ReferenceValue:
    if modifier == "identifier":
        parts = _split(raw, "|")
        if len(parts) == 1:
            return ReferenceValue(ident_value=_unescape(parts[0]))
        if len(parts) != 2 or not parts[1]:
            raise InvalidRequest(f"Invalid :identifier value '{raw}' (expected [system|]value)")
        system, value = (_unescape(p) for p in parts)
        return ReferenceValue(ident_system=system or None, ident_value=value,
                              ident_no_system=not system)
    v = _unescape(raw).strip()
    type_mod = modifier if modifier and modifier in RESOURCE_TYPES else None
    if "://" in v or v.startswith("urn:"):
        m = _ABS_REF.match(v)
        if m and m.group(1) in RESOURCE_TYPES:
            if type_mod and m.group(1) != type_mod:
                raise InvalidRequest(f"Reference '{v}' is not a {type_mod}")
            return ReferenceValue(type=m.group(1), id=m.group(2), url=v)
        return ReferenceValue(url=v)
    if "/" in v:
        m = _ABS_REF.match(v)
        if not m or m.group(1) not in RESOURCE_TYPES:
            raise InvalidRequest(f"Invalid reference '{v}' (expected id, Type/id or an absolute URL)")
        if type_mod and m.group(1) != type_mod:
            raise InvalidRequest(f"Reference '{v}' is not a {type_mod}")
        return ReferenceValue(type=m.group(1), id=m.group(2))
    if not v:
        raise InvalidRequest("Empty reference")
    return ReferenceValue(type=type_mod, id=v)


def _parse_value(kind: str, raw: str, modifier: str | None, sp: SearchParam | None,
                 components: tuple[str, ...] = ()) -> Value:
    if kind == "string":
        return StringValue(_unescape(raw))
    if kind == "uri":
        return UriValue(_unescape(raw))
    if kind == "token":
        return _parse_token(raw, modifier)
    if kind in ("date", "_lastUpdated"):
        return _parse_date(raw)
    if kind == "number":
        return _parse_number(raw)
    if kind == "quantity":
        return _parse_quantity(raw)
    if kind == "reference":
        return _parse_reference(raw, modifier, sp)
    if kind == "composite":
        parts = _split(raw, "$")
        if len(parts) != len(components):
            raise InvalidRequest(f"Composite value '{raw}' needs {len(components)} '$'-separated parts")
        return CompositeValue(tuple(_parse_value(k, p, None, None) for k, p in zip(components, parts)))
    if kind == "_id":
        return TokenValue(code=_unescape(raw))
    raise NotImplementedYet(f"Search parameter type '{kind}' is not supported")  # pragma: no cover


# --------------------------------------------------------------------------- parameter resolution


def _resolve(types: tuple[str, ...] | None, code: str) -> SearchParam:
    """The definition of ``code`` on every type in ``types`` (None = Resource only)."""
    reg = registry()
    if types is None:
        sp = reg.by_type.get("Resource", {}).get(code)
        if sp is None:
            raise _Unknown(f"'{code}' is not a parameter of system-level search "
                           f"(only {', '.join(sorted(COMMON_PARAMS))} and _type)")
        return sp
    found: SearchParam | None = None
    for t in types:
        sp = reg.get(t, code)
        if sp is None:
            raise _Unknown(f"Unknown search parameter '{code}' for {t}")
        if found is not None and sp.type != found.type:
            raise InvalidRequest(f"Search parameter '{code}' has different types on {', '.join(types)}")
        found = found or sp
    assert found is not None
    return found


def _component_kinds(sp: SearchParam) -> tuple[str, ...]:
    """Kinds of a composite's components, as extract.py indexes them.

    The first component is always a token (``c1_system``/``c1_code``); the others are
    quantity (``num``...), token (``c2_*``), date (``low``/``high``), string (``text``) or
    number (first -> ``low``, second -> ``high``: MolecularSequence coordinates). A
    reference component (DocumentReference ``relationship``) is indexed as ``Type/id`` in
    ``c2_code`` and searched as a token code.
    """
    reg = registry()
    kinds = ["token"]
    for c in sp.components[1:]:
        csp = reg.by_url.get(c.definition)
        kind = csp.type if csp is not None else "token"
        if kind in ("reference", "uri"):
            kind = "token"
        kinds.append(kind)
    ok = (len(kinds) == 2 and kinds[1] in ("token", "quantity", "date", "string")) or \
         (len(kinds) == 3 and kinds[1] == kinds[2] == "number")
    if not ok:
        raise NotImplementedYet(f"Composite parameter '{sp.code}' ({'$'.join(kinds)}) is not supported")
    return tuple(kinds)


def _build(types: tuple[str, ...] | None, name: str, value: str, depth: int = 0) -> Node | None:
    """The criteria node for one ``name=value`` on ``types``; None = ignore (empty value)."""
    if depth > 8:
        raise InvalidRequest(f"Chain too deep: '{name}'")
    if name.startswith("_has:"):
        if types is None or len(types) != 1:
            raise InvalidRequest("_has needs exactly one resource type")
        parts = name[5:].split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise InvalidRequest(f"Invalid _has '{name}' (expected _has:Type:reference:parameter)")
        src, code, inner_name = parts
        if src not in RESOURCE_TYPES:
            raise InvalidRequest(f"Unknown resource type '{src}' in '{name}'")
        sp = registry().get(src, code)
        if sp is None:
            raise _Unknown(f"Unknown search parameter '{code}' for {src} in '{name}'")
        if sp.type != "reference":
            raise InvalidRequest(f"'{src}:{code}' in '{name}' is not a reference parameter")
        if sp.target and types[0] not in sp.target:
            raise InvalidRequest(f"'{src}:{code}' does not refer to {types[0]}")
        inner = _build((src,), inner_name, value, depth + 1)
        return None if inner is None else Has(types[0], src, code, inner)

    head, _, tail = name.partition(".")
    code, _, modifier = head.partition(":")
    modifier = modifier or None

    if tail:   # chain (§3.1.1.4.15)
        if code.startswith("_"):
            raise InvalidRequest(f"'{code}' cannot be chained")
        sp = _resolve(types, code)
        if sp.type != "reference":
            raise InvalidRequest(f"'{code}' is not a reference parameter and cannot be chained")
        if modifier:
            if modifier not in RESOURCE_TYPES:
                raise InvalidRequest(f"Chained '{head}': modifier must be a resource type")
            if sp.target and modifier not in sp.target:
                raise InvalidRequest(f"'{code}' cannot refer to {modifier}")
            candidates: tuple[str, ...] = (modifier,)
        else:
            candidates = tuple(sp.target)
            if not candidates:
                raise InvalidRequest(f"Chained '{code}' has no target types: use {code}:Type.{tail}")
        targets: dict[str, Node] = {}
        unknown = None
        for t in candidates:
            try:
                inner = _build((t,), tail, value, depth + 1)
            except _Unknown as exc:
                unknown = exc
                continue
            if inner is None:
                return None
            targets[t] = inner
        if not targets:
            raise InvalidRequest(f"Chain '{name}': '{tail.split('.')[0].split(':')[0]}' is not a "
                                 f"parameter of {', '.join(candidates)}") from unknown
        return Chain(types, code, targets)

    if code == "_type":
        vals = [_unescape(v).strip() for v in _split(value, ",") if v.strip()]
        bad = [v for v in vals if v not in RESOURCE_TYPES]
        if bad:
            raise InvalidRequest(f"Unknown resource type(s) in _type: {', '.join(bad)}")
        return TypeFilter(tuple(vals)) if vals else None

    if code == "_id":
        kind, sp = "_id", None
    elif code == "_lastUpdated":
        kind, sp = "_lastUpdated", None
    else:
        sp = _resolve(types, code)
        kind = sp.type

    components: tuple[str, ...] = ()
    if modifier is not None:
        allowed = _MODIFIERS.get(kind, set())
        if kind == "reference" and modifier in RESOURCE_TYPES:
            if sp and sp.target and modifier not in sp.target:
                raise InvalidRequest(f"'{code}' cannot refer to {modifier}")
        elif modifier in _UNSUPPORTED_MODIFIERS.get(kind, set()):
            raise NotImplementedYet(f"Modifier ':{modifier}' is not supported (on '{code}')")
        elif modifier not in allowed:
            if modifier in _R4_MODIFIERS or modifier in RESOURCE_TYPES:
                raise InvalidRequest(f"Modifier ':{modifier}' is not valid on {kind} parameter '{code}'")
            raise InvalidRequest(f"Unknown modifier ':{modifier}' on '{code}'")

    if modifier == "missing":
        v = value.strip().lower()
        if v not in ("true", "false"):
            raise InvalidRequest(f"':missing' takes true or false, not '{value}'")
        return Leaf(types, code, kind, modifier, [], missing=(v == "true"))

    if kind == "composite":
        assert sp is not None
        components = _component_kinds(sp)
    raws = [p for p in _split(value, ",") if p != ""]
    if not raws:
        return None
    vals = [_parse_value(kind, p, modifier, sp, components) for p in raws]
    return Leaf(types, code, kind, modifier, vals, components=components)


def _parse_include(value: str, modifier: str | None, reverse: bool,
                   types: tuple[str, ...] | None) -> IncludeSpec:
    pname = "_revinclude" if reverse else "_include"
    if modifier not in (None, "iterate", "recurse"):
        raise InvalidRequest(f"Unknown modifier '{pname}:{modifier}'")
    iterate = modifier is not None
    v = value.strip()
    if v == "*":
        return IncludeSpec(None, None, None, iterate, reverse)
    parts = v.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidRequest(f"Invalid {pname} '{value}' (expected Type:parameter[:TargetType])")
    src, code = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if src not in RESOURCE_TYPES:
        raise InvalidRequest(f"Unknown resource type '{src}' in {pname}")
    if target is not None and target not in RESOURCE_TYPES:
        raise InvalidRequest(f"Unknown resource type '{target}' in {pname}")
    if code == "*":
        return IncludeSpec(src, None, target, iterate, reverse)
    sp = registry().get(src, code)
    if sp is None or sp.type != "reference":
        raise InvalidRequest(f"'{code}' is not a reference parameter of {src} ({pname}={value})")
    if target is not None and sp.target and target not in sp.target:
        raise InvalidRequest(f"{src}:{code} cannot refer to {target} ({pname}={value})")
    return IncludeSpec(src, code, target, iterate, reverse)


def _parse_sort(value: str, types: tuple[str, ...] | None, descending_all: bool | None) -> list[SortKey]:
    keys = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        desc = item.startswith("-")
        code = item[1:] if desc else item
        if descending_all is not None:
            desc = descending_all
        if code in ("_id", "_lastUpdated"):
            keys.append(SortKey(code, code, desc))
            continue
        sp = _resolve(types, code)
        if sp.type not in _SORT_COLUMN:
            raise InvalidRequest(f"Cannot sort on {sp.type} parameter '{code}'")
        keys.append(SortKey(code, sp.type, desc))
    return keys


def int_param(name: str, value: str, minimum: int = 0) -> int:
    """An integer query value (``_count``, ``_offset``, ``_snapshot``, audit paging).

    Raises:
        InvalidRequest: not an integer, or outside ``minimum``..``MAX_QUERY_INT``.
    """
    try:
        n = int(value.strip())
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, not '{value[:40]}'") from None
    if not minimum <= n <= MAX_QUERY_INT:
        raise InvalidRequest(f"{name} must be an integer from {minimum} to {MAX_QUERY_INT}, "
                             f"not '{value[:40]}'")
    return n


def parse(res_type: str | None, params: list[tuple[str, str]], *, handling: str = "lenient",
          default_count: int = 50, max_count: int = 1000) -> ParsedSearch:
    """Parse a search (type-level, or system-level when ``res_type`` is None).

    ``handling`` (``Prefer: handling=``, §3.1.1.3 "Handling Errors"): ``strict``
    rejects unknown parameters (InvalidRequest) and unimplemented ones
    (NotImplementedYet); ``lenient`` ignores them with a warning. Malformed values,
    invalid modifiers and unsupported modifiers are rejected in both modes.
    """
    if handling not in ("lenient", "strict"):
        raise ValueError(f"handling must be lenient or strict, not {handling!r}")
    if res_type is not None and res_type not in RESOURCE_TYPES:
        raise InvalidRequest(f"Unknown resource type '{res_type}'")
    strict = handling == "strict"
    if len(params) > MAX_SEARCH_PARAMS:
        raise InvalidRequest(f"{len(params)} search parameters; at most {MAX_SEARCH_PARAMS} are accepted")
    ps = ParsedSearch(type=res_type, count=min(default_count, max_count), handling=handling)
    n_values = 0

    def unknown(msg: str) -> None:
        if strict:
            raise InvalidRequest(msg)
        ps.warnings.append(msg + " (ignored)")

    # _type first: it decides which parameters a system-level search may use.
    types: tuple[str, ...] | None = (res_type,) if res_type else None
    type_values: list[str] = []
    for name, value in params:
        if name == "_type":
            type_values += [v.strip() for v in value.split(",") if v.strip()]
    if type_values:
        bad = [t for t in type_values if t not in RESOURCE_TYPES]
        if bad:
            raise InvalidRequest(f"Unknown resource type(s) in _type: {', '.join(bad)}")
        ps.types = tuple(dict.fromkeys(type_values))
        if res_type is None:
            types = ps.types

    for name, value in params:
        base, _, modifier = name.partition(":")
        base = base.split(".", 1)[0]
        keep = True
        if name in ("_offset", "_snapshot"):
            n = int_param(name, value)
            if name == "_offset":
                ps.offset = n
            else:
                ps.snapshot = n
            continue
        if base == "_count":
            n = int_param("_count", value)
            if n > max_count:
                ps.warnings.append(f"_count={n} exceeds the maximum {max_count}; using {max_count}")
                n = max_count
            ps.count = n
            ps.self_params.append(("_count", str(n)))
            continue
        if base == "_sort":
            if modifier not in ("", "asc", "desc"):
                raise InvalidRequest(f"Unknown modifier '_sort:{modifier}'")
            # A repeated _sort adds inner sort orders (§3.1.1.9 "can repeat").
            try:
                ps.sort += _parse_sort(value, types, None if not modifier else modifier == "desc")
            except _Unknown as exc:
                unknown(f"_sort: {exc}")
                continue
            if len(ps.sort) > MAX_SORT_KEYS:
                raise InvalidRequest(f"_sort has {len(ps.sort)} keys; at most {MAX_SORT_KEYS} are accepted")
        elif base in ("_include", "_revinclude"):
            if value.strip():
                spec = _parse_include(value, modifier or None, base == "_revinclude", types)
                (ps.revincludes if spec.reverse else ps.includes).append(spec)
        elif base == "_summary":
            v = value.strip().lower()
            if v not in _SUMMARY_VALUES:
                raise InvalidRequest(f"_summary must be one of {', '.join(_SUMMARY_VALUES)}, not '{value}'")
            ps.summary = v
        elif base == "_elements":
            ps.elements = [e.strip() for e in value.split(",") if e.strip()]
        elif base == "_total":
            v = value.strip().lower()
            if v not in _TOTAL_VALUES:
                raise InvalidRequest(f"_total must be one of {', '.join(_TOTAL_VALUES)}, not '{value}'")
            ps.total = v
        elif base == "_contained":
            ps.contained = value.strip()
            if ps.contained not in ("false", ""):
                ps.warnings.append(f"_contained={value} is not supported; contained resources are not searched")
        elif base == "_containedType":
            ps.contained_type = value.strip()
        elif base in ("_totalMethod", "_format", "_pretty"):
            pass
        elif base in NOT_IMPLEMENTED_PARAMS:
            if strict:
                raise NotImplementedYet(f"Search parameter '{base}' is not supported")
            ps.warnings.append(f"Search parameter '{base}' is not supported (ignored)")
            keep = False
        elif base == "_type":
            # Already applied for system search; on a type-level search it filters.
            node = _build(types, name, value)
            if node is not None and res_type is not None:
                ps.criteria.append(Criterion(name, value, node))
        else:
            if res_type is None and not name.startswith("_has:") and base not in COMMON_PARAMS \
                    and types is None:
                unknown(f"'{base}' is not a parameter of system-level search "
                        f"(only {', '.join(sorted(COMMON_PARAMS))} and _type)")
                continue
            n = len(_split(value, ",")) if base != "_id" and "," in value else 1
            weight = (1 + name.count(".") + name.count("_has:")) ** 2
            if n * weight > MAX_OR_VALUES:
                raise InvalidRequest(f"'{name}' has {n} comma-separated values; at most "
                                     f"{MAX_OR_VALUES // weight} are accepted here")
            n_values += n * weight
            if n_values > MAX_SEARCH_VALUES:
                raise InvalidRequest(f"More than {MAX_SEARCH_VALUES} search values in one search")
            try:
                node = _build(types, name, value)
            except _Unknown as exc:
                unknown(str(exc))
                continue
            if node is None:
                continue          # empty value: ignored
            ps.criteria.append(Criterion(name, value, node))
        if keep:
            ps.self_params.append((name, value))
    return ps


# --------------------------------------------------------------------------- terminology modifiers

#: ``resolver(conn, leaf, value) -> (system, code) pairs``: what the value of a
#: ``:below``/``:above`` (a :class:`TokenValue` ``system|code``) or ``:in``/``:not-in``
#: (a :class:`ValueSetRef`) modifier stands for. The server's terminology service
#: provides one (:class:`server.terminology.search.TerminologyResolver`); it may use
#: ``conn`` to narrow a huge set to the codes the store holds for ``leaf``.
TermResolver = Callable[[Any, "Leaf", Any], Iterable[tuple[str | None, str]]]


def _needs_terminology(node: Node) -> bool:
    if isinstance(node, Leaf):
        return node.kind == "token" and node.modifier in TERMINOLOGY_MODIFIERS \
            and any(not isinstance(v, CodeSet) for v in node.values)
    if isinstance(node, Chain):
        return any(_needs_terminology(n) for n in node.targets.values())
    if isinstance(node, Has):
        return _needs_terminology(node.inner)
    return False


def _resolve_node(conn, node: Node, resolver: TermResolver) -> Node:
    if isinstance(node, Leaf) and _needs_terminology(node):
        pairs: set = set()
        for v in node.values:     # comma values are OR-ed: one set
            pairs.update(resolver(conn, node, v))
        return dataclasses.replace(node, values=[CodeSet(frozenset(pairs))])
    if isinstance(node, Chain):
        return dataclasses.replace(node, targets={t: _resolve_node(conn, n, resolver)
                                                  for t, n in node.targets.items()})
    if isinstance(node, Has):
        return dataclasses.replace(node, inner=_resolve_node(conn, node.inner, resolver))
    return node


def resolve_terminology(conn, parsed: ParsedSearch, resolver: TermResolver | None) -> ParsedSearch:
    """Replace the values of terminology modifiers by the code sets they stand for.

    Returns ``parsed`` itself when no criterion needs it; raises NotImplementedYet when
    one does and there is no ``resolver`` (a source without a terminology service).
    """
    if not any(_needs_terminology(c.node) for c in parsed.criteria):
        return parsed
    if resolver is None:
        mods = sorted({c.name.partition(":")[2] for c in parsed.criteria if _needs_terminology(c.node)})
        raise NotImplementedYet(f"Modifier(s) {', '.join(':' + m for m in mods)} need a terminology "
                                "service, which this source does not have")
    criteria = [dataclasses.replace(c, node=_resolve_node(conn, c.node, resolver))
                for c in parsed.criteria]
    return dataclasses.replace(parsed, criteria=criteria)


# --------------------------------------------------------------------------- SQL building


def _visible(t, snapshot: int | None):
    """Visibility of a version row as of ``snapshot`` (None = current)."""
    if snapshot is None:
        return and_(t.c.superseded_by.is_(None), t.c.deleted == sa.false())
    return and_(t.c.pk <= snapshot,
                or_(t.c.superseded_by.is_(None), t.c.superseded_by > snapshot),
                t.c.deleted == sa.false())


def _type_cond(col, types: tuple[str, ...] | None):
    if types is None:
        # Every type: an IN list keeps the (res_type, param, ...) indexes usable.
        return col.in_(sorted(RESOURCE_TYPES))
    if len(types) == 1:
        return col == types[0]
    return col.in_(types)


def _date_cond(lo, hi, v: DateValue):
    """§3.1.1.4.5 prefix table (ranges), §3.1.1.4.7: resource range [lo, hi] vs search [low, high)."""
    sl, sh = v.low, v.high
    contained = and_(lo >= sl, hi < sh)
    p = v.prefix
    if p == "eq":
        return contained
    if p == "ne":
        return not_(contained)
    if p == "gt":
        return hi >= sh
    if p == "lt":
        return lo < sl
    if p == "ge":
        return or_(hi >= sh, contained)
    if p == "le":
        return or_(lo < sl, contained)
    if p == "sa":
        return lo >= sh
    if p == "eb":
        return hi < sl
    # ap: overlap with the value widened by 10% of its distance from now.
    tol = 0.1 * abs(time.time() - sl)
    return and_(lo < sh + tol, hi >= sl - tol)


def _number_cond(col, v: NumberValue):
    """§3.1.1.4.6 number / §3.1.1.4.11 quantity: eq/ne use the implicit precision range,
    the other prefixes the exact value."""
    p = v.prefix
    if p == "eq":
        return and_(col >= v.low, col < v.high)
    if p == "ne":
        return or_(col < v.low, col >= v.high)
    if p in ("gt", "sa"):
        return col > v.value
    if p in ("lt", "eb"):
        return col < v.value
    if p == "ge":
        return col >= v.value
    if p == "le":
        return col <= v.value
    tol = max(0.1 * abs(v.value), (v.high - v.low) / 2)
    return and_(col >= v.value - tol, col <= v.value + tol)


def _no_system(col):
    return or_(col.is_(None), col == "")


def _token_cond(tb, v: TokenValue, modifier: str | None, system_col="system", code_col="code"):
    if modifier == "text":
        # §3.1.1.4.10 :text: a string search on the text/display (stored lower-cased):
        # any word of it starts with the value (accents compared as given and stripped).
        conds = []
        for q in dict.fromkeys((" ".join((v.text or "").lower().split()), _normalize(v.text or ""))):
            conds += [tb.c.text.startswith(q, autoescape=True),
                      tb.c.text.contains(" " + q, autoescape=True)]
        return or_(*conds)
    conds = []
    if v.code is not None:
        conds.append(tb.c[code_col] == v.code)
    if v.no_system:
        conds.append(_no_system(tb.c[system_col]))
    elif v.system is not None:
        conds.append(tb.c[system_col] == v.system)
    if modifier == "of-type":
        conds.append(tb.c.type_code == v.type_code)
        if v.type_system is not None:
            conds.append(tb.c.type_system == v.type_system)
    return and_(*conds) if conds else sa.true()


def _quantity_cond(tb, v: QuantityValue, value_col="value", system_col="system",
                   code_col="code", unit_col: str | None = "unit"):
    conds = [_number_cond(tb.c[value_col], v)]
    if v.system is not None:
        conds.append(tb.c[system_col] == v.system)
    if v.code is not None:
        if v.unit_or_code and unit_col is not None:
            conds.append(or_(tb.c[code_col] == v.code, tb.c[unit_col] == v.code))
        else:
            conds.append(tb.c[code_col] == v.code)
    return and_(*conds)


def _uri_prefixes(uri: str) -> list[str]:
    """``:above``: the uri and its parents at '/' boundaries (§3.1.1.4.9 uri)."""
    out = [uri]
    cur = uri.rstrip("/")
    if cur != uri:
        out.append(cur)
    scheme_end = cur.find("://")
    floor = scheme_end + 3 if scheme_end >= 0 else 0
    while True:
        i = cur.rfind("/")
        if i < floor or i <= 0:
            break
        cur = cur[:i]
        out += [cur, cur + "/"]
    return list(dict.fromkeys(out))


def _code_set_cond(tb, v: CodeSet, system_col="system", code_col="code"):
    """``(system, code) IN pairs``, one IN list of codes per system."""
    by_system: dict[str | None, list[str]] = {}
    for system, code in v.pairs:
        by_system.setdefault(system, []).append(code)
    conds = []
    for system, codes in sorted(by_system.items(), key=lambda kv: kv[0] or ""):
        codes.sort()
        if len(codes) > _IN_CHUNK:
            # Long lists are inlined: no bind-parameter limit (SQLite's is 32766).
            col_in = tb.c[code_col].in_(sa.bindparam(None, codes, expanding=True, literal_execute=True))
        else:
            col_in = tb.c[code_col].in_(codes)
        sys_cond = _no_system(tb.c[system_col]) if system is None else tb.c[system_col] == system
        conds.append(and_(col_in, sys_cond))
    return or_(*conds) if conds else sa.false()


def _value_cond(tb, leaf: Leaf, v):
    kind, mod = leaf.kind, leaf.modifier
    if isinstance(v, CodeSet):
        return _code_set_cond(tb, v)
    if isinstance(v, ValueSetRef) or (kind == "token" and mod in TERMINOLOGY_MODIFIERS):
        raise NotImplementedYet(f"Modifier ':{mod}' needs the terminology service")
    if kind == "string":
        if mod == "exact":
            return tb.c.exact == v.text
        norm = _normalize(v.text)
        if mod == "contains":
            return tb.c.value.contains(norm, autoescape=True)
        return tb.c.value.startswith(norm, autoescape=True)
    if kind == "token":
        return _token_cond(tb, v, mod)
    if kind == "date":
        return _date_cond(tb.c.low, tb.c.high, v)
    if kind == "number":
        return _number_cond(tb.c.value, v)
    if kind == "quantity":
        return _quantity_cond(tb, v)
    if kind == "uri":
        if mod == "below":
            return tb.c.value.startswith(v.uri, autoescape=True)
        if mod == "above":
            return tb.c.value.in_(_uri_prefixes(v.uri))
        return tb.c.value == v.uri
    if kind == "reference":
        if mod == "identifier":
            conds = [tb.c.ident_value == v.ident_value]
            if v.ident_no_system:
                conds.append(_no_system(tb.c.ident_system))
            elif v.ident_system is not None:
                conds.append(tb.c.ident_system == v.ident_system)
            return and_(*conds)
        if v.id is not None:
            c = tb.c.target_id == v.id
            if v.type is not None:
                c = and_(c, tb.c.target_type == v.type)
            return or_(c, tb.c.url == v.url) if v.url else c
        return tb.c.url == v.url
    if kind == "composite":
        # §3.1.1.4.17: all components must match within the same index row.
        conds = [_token_cond(tb, v.parts[0], None, "c1_system", "c1_code")]
        k2, second = leaf.components[1], v.parts[1]
        if k2 == "token":
            conds.append(_token_cond(tb, second, None, "c2_system", "c2_code"))
        elif k2 == "quantity":
            conds.append(_quantity_cond(tb, second, "num", "q_system", "q_code", None))
        elif k2 == "date":
            conds.append(_date_cond(tb.c.low, tb.c.high, second))
        elif k2 == "string":
            conds.append(tb.c.text.startswith(_normalize(second.text), autoescape=True))
        elif k2 == "number":
            conds.append(_number_cond(tb.c.low, second))
            conds.append(_number_cond(tb.c.high, v.parts[2]))
        return and_(*conds)
    raise NotImplementedYet(f"Search on {kind} parameters is not supported")  # pragma: no cover


def _driver_rank(node: Node) -> int | None:
    """How well a criterion can drive a query as ``pk IN (<index subquery>)``.

    None: it cannot (negations, ``:missing``, ``_has``...). Otherwise lower is better: an
    equality on an indexed value usually selects few rows, a range or a LIKE scan many.
    Without planner statistics (SQLite) this static guess picks the one criterion whose
    pk list drives the query; the others become per-candidate ``EXISTS`` probes by
    ``res_pk`` instead of lists of their own (a list for ``status=final`` or
    ``date=ge2015`` would cost a scan of the whole parameter).
    """
    if isinstance(node, Chain):
        return 3
    if not isinstance(node, Leaf) or node.kind not in INDEX_TABLES or node.missing is not None \
            or node.modifier in ("not", "not-in"):
        return None
    kind, mod = node.kind, node.modifier
    if kind == "reference":
        return 0 if mod != "identifier" else 1
    if kind == "token":
        if mod == "text":
            return 6
        if mod in TERMINOLOGY_MODIFIERS:
            return 2
        if all(v.code is not None for v in node.values):
            return 1 if all(v.system is not None or v.no_system for v in node.values) else 2
        return 5
    if kind == "uri":
        return 1 if mod is None else 5
    if kind == "string":
        return 2 if mod == "exact" else 4
    if kind == "composite":
        return 3
    return 7                                   # date / number / quantity ranges


def _drives(node: Node) -> bool:
    """Whether a node can restrict ``resource.pk`` through an index subquery."""
    return _driver_rank(node) is not None


class _Builder:
    """Turns criteria nodes into SQL boolean expressions on a ``resource`` alias.

    ``sqlite``: SQLite has no statistics (no ANALYZE), so given ``res_type = ?`` it scans
    every resource of the type through ``ix_resource_current`` and probes the criteria
    for each. When a criterion yields an ``IN (SELECT res_pk ...)`` list, the type test is
    written ``res_type || '' = ?`` instead, which no index serves, so the planner drives
    the query from that (small) list by rowid. PostgreSQL plans semi-joins from its
    statistics and gets the plain comparison.
    """

    def __init__(self, snapshot: int | None, sqlite: bool = False):
        self.snapshot = snapshot
        self.sqlite = sqlite

    def type_eq(self, t, res_type: str, nodes: list[Node]):
        if self.sqlite and any(_drives(n) for n in nodes):
            return (t.c.res_type + "") == res_type
        return t.c.res_type == res_type

    def node(self, node: Node, t, types: tuple[str, ...] | None, driver: bool = True):
        """SQL for ``node`` on alias ``t``; ``driver=False``: a probe, not a pk list."""
        if isinstance(node, Leaf):
            return self.leaf(node, t, driver)
        if isinstance(node, Chain):
            return self.chain(node, t, driver)
        if isinstance(node, Has):
            return self.has(node, t)
        if isinstance(node, TypeFilter):
            return t.c.res_type.in_(node.types)
        raise TypeError(node)  # pragma: no cover

    def leaf(self, leaf: Leaf, t, driver: bool = True):
        if leaf.kind == "_id":
            if leaf.missing is not None:
                return sa.false() if leaf.missing else sa.true()
            ids = [v.code for v in leaf.values]
            cond = t.c.res_id.in_(ids)
            if leaf.types is None:
                cond = and_(_type_cond(t.c.res_type, None), cond)
            return not_(cond) if leaf.modifier == "not" else cond
        if leaf.kind == "_lastUpdated":
            if leaf.missing is not None:
                return sa.false() if leaf.missing else sa.true()
            lu = t.c.last_updated
            return or_(*[_date_cond(lu, lu, v) for v in leaf.values])
        tb = INDEX_TABLES[leaf.kind].alias()
        # Probes by res_pk leave res_type out: the pk implies it, and with it SQLite may
        # prefer the (res_type, param, value) index and scan it for every candidate.
        probe = [tb.c.res_pk == t.c.pk, tb.c.param == leaf.code]
        if leaf.missing is not None:         # §3.1.1.4.18
            ex = exists().where(*probe)
            return not_(ex) if leaf.missing else ex
        match = or_(*[_value_cond(tb, leaf, v) for v in leaf.values])
        if leaf.modifier in ("not", "not-in"):
            # :not / :not-in (§3.1.1.4.10): resources without a matching token, incl. those
            # with none.
            return not_(exists().where(*probe, match))
        if not driver:
            return exists().where(*probe, match)
        return t.c.pk.in_(select(tb.c.res_pk).where(_type_cond(tb.c.res_type, leaf.types),
                                                    tb.c.param == leaf.code, match))

    def chain(self, node: Chain, t, driver: bool = True):
        ref = INDEX_TABLES["reference"].alias()
        alts = []
        for target, inner in node.targets.items():
            tt = resource.alias()
            ids = select(tt.c.res_id).where(self.type_eq(tt, target, [inner]),
                                           _visible(tt, self.snapshot), self.node(inner, tt, (target,)))
            alts.append(and_(ref.c.target_type == target, ref.c.target_id.in_(ids)))
        if not driver:
            return exists().where(ref.c.res_pk == t.c.pk, ref.c.param == node.code, or_(*alts))
        sub = select(ref.c.res_pk).where(_type_cond(ref.c.res_type, node.types),
                                         ref.c.param == node.code, or_(*alts))
        return t.c.pk.in_(sub)

    def has(self, node: Has, t):
        ref = INDEX_TABLES["reference"].alias()
        s = resource.alias()
        src = select(s.c.pk).where(self.type_eq(s, node.src_type, [node.inner]),
                                   _visible(s, self.snapshot), self.node(node.inner, s, (node.src_type,)))
        # Driven by the referring resources' pks (ix_idx_reference_res_pk) when the inner
        # criterion gives a list; otherwise by (res_type, param) (see type_eq).
        ref_type = ((ref.c.res_type + "") if self.sqlite and _drives(node.inner) else ref.c.res_type)
        ids = select(ref.c.target_id).where(ref_type == node.src_type, ref.c.param == node.code,
                                            ref.c.target_type == node.type, ref.c.res_pk.in_(src))
        if not self.sqlite:
            # PostgreSQL under-estimates references per target (skewed target_id) and would
            # probe every candidate's references; OFFSET 0 keeps the subquery from being
            # pulled up, so the referring set is computed once and hashed.
            ids = ids.offset(0)
        return t.c.res_id.in_(ids)


def _driver(criteria: list[Criterion]) -> int | None:
    """Index of the criterion that drives the query (see :func:`_driver_rank`)."""
    ranked = [(rank, i) for i, c in enumerate(criteria)
              if (rank := _driver_rank(c.node)) is not None]
    return min(ranked)[1] if ranked else None


def _where(parsed: ParsedSearch, r, snapshot: int | None, sqlite: bool = False) -> list:
    """The WHERE conditions of a search on alias ``r`` (as of ``snapshot``; None = current)."""
    b = _Builder(snapshot, sqlite)
    driver = _driver(parsed.criteria)
    conds = [_visible(r, snapshot)]
    if parsed.type is not None:
        driving = [parsed.criteria[driver].node] if driver is not None else []
        conds.insert(0, b.type_eq(r, parsed.type, driving))
    elif parsed.types:
        conds.insert(0, r.c.res_type.in_(parsed.types))
    types = (parsed.type,) if parsed.type else parsed.types
    for i, c in enumerate(parsed.criteria):
        conds.append(b.node(c.node, r, types, driver is None or i == driver))
    return conds


def _order_by(parsed: ParsedSearch, r) -> list:
    out = []
    for key in parsed.sort:
        if key.kind == "_id":
            expr = r.c.res_id
        elif key.kind == "_lastUpdated":
            expr = r.c.last_updated
        else:
            tb = INDEX_TABLES[key.kind].alias()
            col = tb.c[_SORT_COLUMN[key.kind][1 if key.descending else 0]]
            agg = func.max(col) if key.descending else func.min(col)
            expr = (select(agg).where(tb.c.res_pk == r.c.pk, tb.c.param == key.code)
                    .scalar_subquery())
        out.append(expr.desc().nulls_last() if key.descending else expr.asc().nulls_last())
    out.append(r.c.pk.asc())
    return out


def _chunks(seq: list, n: int = _IN_CHUNK):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def current_snapshot(conn) -> int:
    """The snapshot for a first page: the largest ``resource.pk`` (0 when empty)."""
    return int(conn.execute(select(func.coalesce(func.max(resource.c.pk), 0))).scalar_one())


# What the databases say when a statement is beyond their limits (SQLite: expression depth,
# ORDER BY terms, variables; PostgreSQL: bind parameters, parser stack): the client's
# search was too complex, not the server broken.
_TOO_COMPLEX = ("Expression tree is too large", "too many terms", "too many SQL variables",
                "parser stack overflow", "number of parameters must be between",
                "stack depth limit exceeded")


def _refuse_too_complex(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except sa.exc.DBAPIError as exc:
            if any(m in str(exc.orig) for m in _TOO_COMPLEX):
                raise InvalidRequest("This search is too complex for the database; use fewer "
                                     "parameters, values or chain levels") from None
            raise
    return wrapper


@_refuse_too_complex
def execute(conn, parsed: ParsedSearch, *, snapshot: int | None = None,
            terminology: TermResolver | None = None) -> SearchPage:
    """Run a parsed search; ``snapshot`` (or ``_snapshot``) pins the data version.

    ``terminology`` resolves ``:below``/``:above``/``:in``/``:not-in`` (see
    :func:`resolve_terminology`).
    """
    parsed = resolve_terminology(conn, parsed, terminology)
    snap = snapshot if snapshot is not None else parsed.snapshot
    if snap is None:
        snap = current_snapshot(conn)
    page = SearchPage(pks=[], snapshot=snap, warnings=list(parsed.warnings))
    r = resource.alias("r")
    where = _where(parsed, r, snap, conn.dialect.name == "sqlite")

    def count() -> int:
        return int(conn.execute(select(func.count()).select_from(r).where(*where)).scalar_one())

    # §3.1.1.5.2 _total: counted unless the client says none (_summary=count always counts).
    want_total = parsed.total != "none" or parsed.summary == "count"
    if parsed.summary == "count" or parsed.count == 0:      # §3.1.1.5.3: _count=0 = count only
        if want_total:
            page.total = count()
        return page

    order = _order_by(parsed, r)
    selective = any(_drives(c.node) or isinstance(c.node, Has) for c in parsed.criteria)
    selective = selective and not parsed.sort   # sort keys would be computed twice
    if want_total and selective:
        # One pass: the page and the number of matches (a window over all of them), so the
        # criteria are evaluated once rather than once for the page and once for a count.
        q = (select(r.c.pk, func.count().over()).where(*where).order_by(*order)
             .limit(parsed.count + 1).offset(parsed.offset))
        rows = conn.execute(q).all()
        if rows:
            page.total = int(rows[0][1])
        else:
            page.total = count() if parsed.offset else 0
        pks = [row[0] for row in rows]
    else:
        # Nothing narrows the type down to a short list: a covering-index count and a page
        # that can stop early are cheaper than materialising every match for a window.
        if want_total:
            page.total = count()
        q = select(r.c.pk).where(*where).order_by(*order).limit(parsed.count + 1).offset(parsed.offset)
        pks = [row[0] for row in conn.execute(q)]
    has_more = len(pks) > parsed.count
    page.pks = pks[:parsed.count]

    link_base = [(n, v) for n, v in parsed.self_params if n not in ("_offset", "_snapshot")]
    if has_more:
        page.next_params = link_base + [("_snapshot", str(snap)),
                                        ("_offset", str(parsed.offset + parsed.count))]
    if parsed.offset > 0:
        page.prev_params = link_base + [("_snapshot", str(snap)),
                                        ("_offset", str(max(0, parsed.offset - parsed.count)))]
    if page.pks and (parsed.includes or parsed.revincludes):
        page.include_pks = _includes(conn, parsed, page.pks, snap, page.warnings)
    return page


# --------------------------------------------------------------------------- _include / _revinclude


def _includes(conn, parsed: ParsedSearch, pks: list[int], snap: int, warnings: list[str]) -> list[int]:
    """§3.1.1.5.4: resolve includes (against versions visible as of ``snap``), iterating."""
    specs = parsed.includes + parsed.revincludes
    iterating = [s for s in specs if s.iterate]
    seen = set(pks)
    out: list[int] = []
    frontier = list(pks)
    for round_no in range(MAX_INCLUDE_ITERATIONS + 1):
        active = specs if round_no == 0 else iterating
        if not active or not frontier:
            break
        meta = _meta(conn, frontier) if any(s.reverse for s in active) else []
        found: list[int] = []
        for spec in active:
            found += (_rev_once(conn, spec, meta, snap) if spec.reverse
                      else _include_once(conn, spec, frontier, snap))
        new = [pk for pk in dict.fromkeys(found) if pk not in seen]
        if len(out) + len(new) > MAX_INCLUDES:
            new = new[:MAX_INCLUDES - len(out)]
            warnings.append(f"Included resources truncated at {MAX_INCLUDES}")
            seen.update(new)
            out += new
            break
        seen.update(new)
        out += new
        frontier = new
    else:
        if frontier and iterating:
            warnings.append(f"_include:iterate stopped after {MAX_INCLUDE_ITERATIONS} iterations")
    return out


def _meta(conn, pks: list[int]) -> list[tuple[int, str, str]]:
    out = []
    for chunk in _chunks(pks):
        out += [tuple(row) for row in conn.execute(
            select(resource.c.pk, resource.c.res_type, resource.c.res_id).where(resource.c.pk.in_(chunk)))]
    return out


def _include_once(conn, spec: IncludeSpec, pks: list[int], snap: int) -> list[int]:
    ref = INDEX_TABLES["reference"].alias()
    t = resource.alias()
    conds = [_visible(t, snap)]
    if spec.source_type is not None:
        # The page's pks drive (ix_idx_reference_res_pk); on SQLite keep the type test off
        # the (res_type, param, ...) index, which would mean scanning every such reference.
        src = (ref.c.res_type + "") if conn.dialect.name == "sqlite" else ref.c.res_type
        conds.append(src == spec.source_type)
    if spec.param is not None:
        conds.append(ref.c.param == spec.param)
    if spec.target_type is not None:
        conds.append(ref.c.target_type == spec.target_type)
    join = ref.join(t, and_(t.c.res_type == ref.c.target_type, t.c.res_id == ref.c.target_id))
    out: list[int] = []
    for chunk in _chunks(pks):
        q = select(t.c.pk).select_from(join).where(ref.c.res_pk.in_(chunk), *conds).order_by(t.c.pk)
        out += [row[0] for row in conn.execute(q)]
    return out


def _rev_once(conn, spec: IncludeSpec, meta: list[tuple[int, str, str]], snap: int) -> list[int]:
    ref = INDEX_TABLES["reference"].alias()
    s = resource.alias()
    by_type: dict[str, list[str]] = {}
    for _pk, rt, rid in meta:
        if spec.target_type is None or rt == spec.target_type:
            by_type.setdefault(rt, []).append(rid)
    conds = [_visible(s, snap)]
    if spec.source_type is not None:
        conds += [ref.c.res_type == spec.source_type, s.c.res_type == spec.source_type]
    if spec.param is not None:
        conds.append(ref.c.param == spec.param)
    join = ref.join(s, s.c.pk == ref.c.res_pk)
    out: list[int] = []
    for rt, ids in by_type.items():
        for chunk in _chunks(ids):
            q = (select(s.c.pk).select_from(join)
                 .where(ref.c.target_type == rt, ref.c.target_id.in_(chunk), *conds).order_by(s.c.pk))
            out += [row[0] for row in conn.execute(q)]
    return out


# --------------------------------------------------------------------------- conditional operations


def match_pks(conn, res_type: str, params: list[tuple[str, str]],
              terminology: TermResolver | None = None) -> list[tuple[int, str]]:
    """(pk, res_id) of the CURRENT non-deleted resources matching a query (strict handling).

    For conditional create/update/delete and conditional references in transactions
    (R4 http.html). Result parameters (``_count``, ``_sort``...) are ignored.
    """
    parsed = resolve_terminology(conn, parse(res_type, params, handling="strict"), terminology)
    r = resource.alias("r")
    q = select(r.c.pk, r.c.res_id).where(*_where(parsed, r, None, conn.dialect.name == "sqlite")) \
        .order_by(r.c.pk)
    return [(int(pk), rid) for pk, rid in conn.execute(q)]
