"""Search-index rows for one FHIR R4 resource, derived from the specification's FHIRPath.

Every search parameter of a resource type (:func:`server.fhir.searchparams.registry`) has a
FHIRPath ``expression`` that selects the elements it indexes (FHIR R4 search, "Search
Parameter Types": http://hl7.org/fhir/R4/search.html#ptypes). :func:`extract` evaluates them
for one resource and converts the selected values into rows of the index tables of
:mod:`server.db.schema`: ``(param_code, *columns)``, columns in ``INDEX_COLUMNS[kind]`` order.

A general FHIRPath engine is far too slow for bulk ingest (fhirpathpy manages about 400
resources/s), so every expression is parsed once with fhirpathpy's parser and the subset the
specification uses is compiled into plain-Python steps over the JSON dicts:

* member navigation ``A.b.c`` (lists are flattened), with choice elements ``value[x]``
  expanded into one *branch* per allowed type (``valueQuantity``, ``valueCodeableConcept``...);
* union ``|`` (one branch per operand);
* ``.as(T)`` / ``as T`` / ``.ofType(T)``: a static filter over those typed branches;
* ``.where(resolve() is T)`` (the Reference points at a T: its ``reference`` has type T or its
  ``type`` is T), ``.where(path = literal)`` and general ``=``/``!=``/``and``/``exists()``;
* ``first()``, ``[n]``, ``%resource`` and literals;
* a leading type name (``Observation.``, ``Resource.``) that only matches a resource of that
  type (or a subtype), so each union is split per resource type at compile time.

Each branch knows its static FHIR type (from fhirpathpy's R4 model), so the value converter
(search.html#number ... #uri) is chosen at compile time too. At extraction time branches
are dispatched on the resource's top-level keys, so parameters whose elements are absent cost
nothing. Expressions outside the subset fall back to ``fhirpathpy.compile`` with structural
value conversion; :data:`COMPILE_STATS` records how many did (none of the R4 definitions do).
"""
from __future__ import annotations

import functools
import itertools
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Any, Callable

import fhirpathpy
from fhirpathpy.models import models as _fp_models
from fhirpathpy.parser import parse as _fp_parse

from server.db.schema import INDEX_COLUMNS
from server.fhir.searchparams import RESOURCE_TYPES, SearchParam, registry

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = tuple(INDEX_COLUMNS)
_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}

#: Parameters that the ``resource`` table answers itself (not indexed).
SKIPPED_PARAMS = frozenset({"_id", "_lastUpdated"})

# Column widths (server/db/schema.py) that values are truncated to.
_W_STR = 512
_W_URL = 1024
_W_SHORT = 128

#: Open Period bounds (search.html#date: a Period without end is ongoing).
DATE_MAX = 1e18
DATE_MIN = -1e18

# ---------------------------------------------------------------------------------------------
# FHIR R4 type model (fhirpathpy's, built from the R4 StructureDefinitions)
# ---------------------------------------------------------------------------------------------

_MODEL = _fp_models["r4"]
_PATH2TYPE: dict[str, str] = _MODEL["path2Type"]
_CHOICES: dict[str, list[str]] = _MODEL["choiceTypePaths"]
_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_PARENT: dict[str, str] = _MODEL["type2Parent"]

_PRIMITIVES = frozenset({
    "boolean", "integer", "string", "decimal", "uri", "url", "canonical", "base64Binary",
    "instant", "date", "dateTime", "time", "code", "oid", "id", "markdown", "unsignedInt",
    "positiveInt", "uuid", "xhtml",
})
# Paths of backbone elements (no type of their own): every proper prefix of a known path.
_BACKBONES = frozenset(
    p.rsplit(".", i)[0]
    for p in itertools.chain(_PATH2TYPE, _CHOICES)
    for i in range(1, p.count("."))
)
_ALL_RESOURCES = frozenset(RESOURCE_TYPES | {"Resource", "DomainResource"}
                           | {t for t, p in _PARENT.items() if p in ("Resource", "DomainResource")})


def _norm_type(name: str) -> str:
    """FHIR type name for a type specifier or model entry (``System.String`` -> ``string``,
    ``FHIR.Quantity`` -> ``Quantity``, ``DateTime`` -> ``dateTime``).

    FHIRPath's ``DateTime``/``String``... are System types; the R4 search definitions use them
    where they mean the FHIR primitive (e.g. ``value.as(DateTime)``), so they are mapped to it.
    """
    if name.startswith(("FHIR.", "System.")):
        name = name.split(".", 1)[1]
    low = name[:1].lower() + name[1:]
    return low if low in _PRIMITIVES else name


def _ancestors(typ: str) -> list[str]:
    """``typ`` and its supertypes (``Age`` -> ``Age, Quantity, Element``)."""
    out = [typ]
    while typ in _PARENT:
        typ = _PARENT[typ]
        out.append(typ)
    if "." in out[-1]:           # a backbone path
        out += ["BackboneElement", "Element"]
    return out


def _member(state: str, name: str) -> list[tuple[str, str]] | None:
    """Static navigation: the JSON keys and FHIR types of ``state.name``.

    Args:
        state: A FHIR type name or a backbone element path (``Observation.component``).
        name: The element name as written in FHIRPath (``value`` for ``value[x]``).

    Returns:
        ``[(json_key, type)]`` (one per allowed type of a choice element), or None when the
        model does not know the element.
    """
    for base in _ancestors(state):
        path = f"{base}.{name}"
        choices = _CHOICES.get(path)
        if choices is not None:
            return [(name + t, _norm_type(t)) for t in choices]
        typ = _PATH2TYPE.get(path)
        if typ is not None:
            return [(name, _norm_type(typ))]
        if path in _ELSEWHERE:
            return [(name, _ELSEWHERE[path])]
        if path in _BACKBONES:
            return [(name, path)]
    return None


# ---------------------------------------------------------------------------------------------
# Value conversion (FHIR R4 search.html#ptypes, one section per kind). A converter appends
# rows to ``out``:
#     conv(value, param_code, out, root_resource) -> None
# ---------------------------------------------------------------------------------------------

Converter = Callable[[Any, Any, list, dict], None]


def _s(v: Any, width: int = _W_STR) -> str | None:
    return v[:width] if type(v) is str else None


def _lower(v: Any) -> str | None:
    return v.lower() if type(v) is str else None


def _is_num(v: Any) -> bool:
    t = type(v)
    return t is int or t is float or t is Decimal


_NORM_CACHE: dict[str, str] = {}


def normalize_string(s: str) -> str:
    """Normalised form for string search (search.html#string: case- and accent-insensitive).

    Lower-cases, strips accents (NFKD, dropping combining marks), collapses whitespace and
    truncates to 512 characters.
    """
    r = _NORM_CACHE.get(s)
    if r is None:
        if s.isascii():
            r = " ".join(s.lower().split())
        else:
            r = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
            r = " ".join(r.lower().split())
        r = r[:_W_STR]
        if len(_NORM_CACHE) > 200_000:
            _NORM_CACHE.clear()
        _NORM_CACHE[s] = r
    return r


# --- dates (search.html#date: every date is an implicit range given by its precision) -------

_EPOCH_DAY = date(1970, 1, 1).toordinal()
_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?")
_DATE_CACHE: dict[str, tuple[float, float] | None] = {}


def _day(y: int, m: int, d: int) -> int:
    return date(y, m, d).toordinal() - _EPOCH_DAY


def _parse_date_range(s: str) -> tuple[float, float] | None:
    m = _DATE_RE.fullmatch(s)
    if m is None:
        return None
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    try:
        y = int(y)
        if mo is None:                                   # YYYY
            lo = _day(y, 1, 1) * 86400.0
            hi = (_day(y, 12, 31) + 1) * 86400.0
        elif d is None:                                  # YYYY-MM
            mo = int(mo)
            lo = _day(y, mo, 1) * 86400.0
            hi = (_day(y + 1, 1, 1) if mo == 12 and y < 9999 else
                  _day(y, 12, 31) + 1 if mo == 12 else _day(y, mo + 1, 1)) * 86400.0
        elif hh is None:                                 # YYYY-MM-DD
            lo = _day(y, int(mo), int(d)) * 86400.0
            hi = lo + 86400.0
        else:                                            # dateTime / instant
            h, mi = int(hh), int(mi)
            sec = int(ss) if ss else 0
            if h > 23 or mi > 59 or sec > 60:
                return None
            lo = _day(y, int(mo), int(d)) * 86400.0 + h * 3600 + mi * 60 + sec
            if frac:
                lo += int(frac) / 10 ** len(frac)
                width = 10.0 ** -len(frac)
            else:
                width = 1.0 if ss else 60.0
            if tz and tz != "Z":                         # no zone: taken as UTC
                off = int(tz[1:3]) * 3600 + int(tz[4:6]) * 60
                lo = lo - off if tz[0] == "+" else lo + off
            hi = lo + width
    except ValueError:                                   # e.g. 2021-02-30
        return None
    return lo, max(lo, hi - 1e-6)


def date_range(s: Any) -> tuple[float, float] | None:
    """``(low, high)`` in epoch seconds (UTC) covered by a FHIR date/dateTime/instant string.

    ``"2020"`` covers ``[2020-01-01T00:00:00Z, 2021-01-01T00:00:00Z)``; ``high`` is the
    exclusive end minus 1 µs. A dateTime without a zone is taken as UTC. Invalid -> None.
    """
    if type(s) is not str:
        return None
    r = _DATE_CACHE.get(s, False)
    if r is False:
        r = _parse_date_range(s)
        if len(_DATE_CACHE) > 200_000:
            _DATE_CACHE.clear()
        _DATE_CACHE[s] = r
    return r


# --- references (search.html#reference) -------------------------------------------------------

_REF_RE = re.compile(r"(?:(https?://.+)/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})"
                     r"(?:/_history/[A-Za-z0-9\-.]{1,64})?")
_REF_CACHE: dict[str, tuple[str | None, str | None, str | None]] = {}


def parse_reference(ref: str) -> tuple[str | None, str | None, str | None]:
    """Split a ``Reference.reference`` into ``(target_type, target_id, url)``.

    ``Type/id`` (and ``Type/id/_history/n``) gives type and id; an absolute
    ``http(s)://base/Type/id`` gives them too and keeps the whole string as ``url``; anything
    else (``urn:uuid:``, ``#contained``, conditional references) is kept as ``url`` only.
    """
    r = _REF_CACHE.get(ref)
    if r is None:
        m = _REF_RE.fullmatch(ref)
        if m is not None and m.group(2) in RESOURCE_TYPES:
            r = (m.group(2), m.group(3), ref[:_W_URL] if m.group(1) else None)
        else:
            r = (None, None, ref[:_W_URL])
        if len(_REF_CACHE) > 200_000:
            _REF_CACHE.clear()
        _REF_CACHE[ref] = r
    return r


def reference_is(value: Any, res_type: str) -> bool:
    """FHIRPath ``resolve() is T`` without resolving: the Reference's ``reference`` has
    type T (relative or absolute form), or its ``type`` element is T."""
    if type(value) is not dict:
        return False
    ref = value.get("reference")
    if type(ref) is str and parse_reference(ref)[0] == res_type:
        return True
    return value.get("type") == res_type


# --- converters per index kind ------------------------------------------------------------------
# string (search.html#string): (value normalised, exact)

def _str_string(x, code, out, root):
    if type(x) is str:
        v = normalize_string(x)
        if v:
            out.append((code, v, x[:_W_STR]))


def _str_parts(x, code, out, keys):
    for k in keys:
        v = x.get(k)
        if type(v) is list:
            for p in v:
                _str_string(p, code, out, None)
        else:
            _str_string(v, code, out, None)


_NAME_KEYS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_KEYS = ("line", "city", "district", "state", "postalCode", "country", "text")


def _str_human_name(x, code, out, root):
    if type(x) is dict:
        _str_parts(x, code, out, _NAME_KEYS)


def _str_address(x, code, out, root):
    if type(x) is dict:
        _str_parts(x, code, out, _ADDRESS_KEYS)


# token (search.html#token): (system, code, text, type_system, type_code)

def _tok_code(x, code, out, root):
    if type(x) is str:
        out.append((code, None, x[:_W_STR], None, None, None))


def _tok_boolean(x, code, out, root):
    if type(x) is bool:
        out.append((code, None, "true" if x else "false", None, None, None))


def _tok_integer(x, code, out, root):
    if type(x) is int:
        out.append((code, None, str(x), None, None, None))


def _tok_coding(x, code, out, root):
    if type(x) is dict:
        s, c, d = x.get("system"), x.get("code"), x.get("display")
        s = s[:_W_STR] if type(s) is str else None
        c = c[:_W_STR] if type(c) is str else None
        d = d.lower() if type(d) is str else None
        if s is not None or c is not None or d is not None:
            out.append((code, s, c, d, None, None))


def _tok_codeable_concept(x, code, out, root):
    if type(x) is not dict:
        return
    text = x.get("text")
    text = text.lower() if type(text) is str else None
    n = len(out)
    codings = x.get("coding")
    if type(codings) is list:
        for cd in codings:
            if type(cd) is dict:
                s, c = cd.get("system"), cd.get("code")
                s = s[:_W_STR] if type(s) is str else None
                c = c[:_W_STR] if type(c) is str else None
                t = text
                if t is None:
                    t = cd.get("display")
                    t = t.lower() if type(t) is str else None
                if s is not None or c is not None or t is not None:
                    out.append((code, s, c, t, None, None))
    if len(out) == n and text is not None:
        out.append((code, None, None, text, None, None))


def _tok_identifier(x, code, out, root):
    if type(x) is not dict:
        return
    s, v = _s(x.get("system")), _s(x.get("value"))
    if s is None and v is None:
        return
    tt = ts = tc = None
    typ = x.get("type")
    if type(typ) is dict:                 # for the :of-type modifier (search.html#token)
        tt = _lower(typ.get("text"))
        codings = typ.get("coding")
        if type(codings) is list and codings and type(codings[0]) is dict:
            ts, tc = _s(codings[0].get("system")), _s(codings[0].get("code"), _W_SHORT)
    out.append((code, s, v, tt, ts, tc))


def _tok_contact_point(x, code, out, root):
    if type(x) is dict:
        v = _s(x.get("value"))
        if v is not None:
            out.append((code, None, v, None, None, None))


# date (search.html#date): (low, high)

def _date_string(x, code, out, root):
    r = date_range(x)
    if r is not None:
        out.append((code, r[0], r[1]))


def _date_period(x, code, out, root):
    if type(x) is not dict:
        return
    s, e = date_range(x.get("start")), date_range(x.get("end"))
    if s is None and e is None:
        return
    out.append((code, s[0] if s is not None else DATE_MIN, e[1] if e is not None else DATE_MAX))


def _date_timing(x, code, out, root):
    if type(x) is not dict:
        return
    events = x.get("event")
    if type(events) is list:
        for ev in events:
            _date_string(ev, code, out, root)
    rep = x.get("repeat")
    if type(rep) is dict:
        _date_period(rep.get("boundsPeriod"), code, out, root)


# reference (search.html#reference): (target_type, target_id, url, ident_system, ident_value)

def _ref_reference(x, code, out, root):
    if type(x) is not dict:
        return
    ref = x.get("reference")
    ident = x.get("identifier")
    if type(ref) is str and ident is None:            # the common case
        r = _REF_CACHE.get(ref) or parse_reference(ref)
        out.append((code, r[0], r[1], r[2], None, None))
        return
    tt = tid = url = None
    if type(ref) is str:
        tt, tid, url = parse_reference(ref)
    if tt is None:
        typ = x.get("type")
        if type(typ) is str and typ in RESOURCE_TYPES:
            tt = typ
    isys = ival = None
    if type(ident) is dict:
        isys, ival = _s(ident.get("system")), _s(ident.get("value"))
    if tt is not None or url is not None or isys is not None or ival is not None:
        out.append((code, tt, tid, url, isys, ival))


def _ref_canonical(x, code, out, root):
    if type(x) is str:
        out.append((code, None, None, x[:_W_URL], None, None))


def _ref_resource(x, code, out, root):
    if type(x) is dict and type(x.get("resourceType")) is str:
        out.append((code, x["resourceType"], _s(x.get("id"), 64), None, None, None))


# quantity (search.html#quantity): (value, system, code, unit)

def _qty_quantity(x, code, out, root):
    if type(x) is dict:
        v = x.get("value")
        t = type(v)
        if t is float or t is int or t is Decimal:
            s, c, u = x.get("system"), x.get("code"), x.get("unit")
            out.append((code, float(v), s[:_W_STR] if type(s) is str else None,
                        c[:_W_SHORT] if type(c) is str else None,
                        u[:_W_SHORT] if type(u) is str else None))


def _qty_money(x, code, out, root):
    if type(x) is dict:
        v = x.get("value")
        if _is_num(v):
            cur = _s(x.get("currency"), _W_SHORT)
            out.append((code, float(v), "urn:iso:std:iso:4217" if cur else None, cur, None))


def _qty_range(x, code, out, root):
    if type(x) is dict:                   # low and high each give a row
        _qty_quantity(x.get("low"), code, out, root)
        _qty_quantity(x.get("high"), code, out, root)


# number (search.html#number): (value,)

def _num_number(x, code, out, root):
    if _is_num(x):
        out.append((code, float(x)))


# uri (search.html#uri): (value,)

def _uri_uri(x, code, out, root):
    if type(x) is str:
        out.append((code, x[:_W_URL]))


# Static converters: kind -> FHIR type -> converter (looked up through _ancestors()).
_STATIC: dict[str, dict[str, Converter]] = {
    "string": {"string": _str_string, "uri": _str_string, "HumanName": _str_human_name,
               "Address": _str_address},
    "token": {"string": _tok_code, "uri": _tok_code, "boolean": _tok_boolean,
              "integer": _tok_integer, "Coding": _tok_coding,
              "CodeableConcept": _tok_codeable_concept, "Identifier": _tok_identifier,
              "ContactPoint": _tok_contact_point},
    "date": {"date": _date_string, "dateTime": _date_string, "instant": _date_string,
             "string": _date_string, "Period": _date_period, "Timing": _date_timing},
    "reference": {"Reference": _ref_reference, "uri": _ref_canonical, "string": _ref_canonical,
                  "Resource": _ref_resource},
    "quantity": {"Quantity": _qty_quantity, "Money": _qty_money, "Range": _qty_range},
    "number": {"decimal": _num_number, "integer": _num_number},
    "uri": {"uri": _uri_uri, "string": _uri_uri},
}


def _static_converter(kind: str, typ: str | None) -> Converter | None:
    if typ is None:
        return _DYNAMIC[kind]
    table = _STATIC[kind]
    for t in _ancestors(typ):
        conv = table.get(t)
        if conv is not None:
            return conv
    return None


# Structural (dynamic) converters: for values of unknown static type (fhirpathpy fallback).
_NAME_SET = frozenset(("family", "given", "prefix", "suffix"))
_ADDRESS_SET = frozenset(("line", "city", "district", "state", "postalCode", "country"))
_CONTACT_SYSTEMS = frozenset(("phone", "fax", "email", "pager", "url", "sms", "other"))


def _dyn_string(x, code, out, root):
    if type(x) is str:
        _str_string(x, code, out, root)
    elif isinstance(x, dict):
        if not _NAME_SET.isdisjoint(x):
            _str_human_name(x, code, out, root)
        elif not _ADDRESS_SET.isdisjoint(x):
            _str_address(x, code, out, root)
        else:
            _str_string(x.get("text"), code, out, root)


def _dyn_token(x, code, out, root):
    t = type(x)
    if t is str:
        _tok_code(x, code, out, root)
    elif t is bool:
        _tok_boolean(x, code, out, root)
    elif t is int:
        _tok_integer(x, code, out, root)
    elif isinstance(x, dict):
        if "coding" in x or ("text" in x and "value" not in x and "code" not in x):
            _tok_codeable_concept(x, code, out, root)
        elif "value" in x:
            if x.get("system") in _CONTACT_SYSTEMS or "rank" in x:
                _tok_contact_point(x, code, out, root)
            else:
                _tok_identifier(x, code, out, root)
        elif "reference" not in x:
            _tok_coding(x, code, out, root)


def _dyn_date(x, code, out, root):
    if type(x) is str:
        _date_string(x, code, out, root)
    elif isinstance(x, dict):
        if "event" in x or "repeat" in x:
            _date_timing(x, code, out, root)
        else:
            _date_period(x, code, out, root)


def _dyn_reference(x, code, out, root):
    if type(x) is str:
        _ref_canonical(x, code, out, root)
    elif isinstance(x, dict):
        if "resourceType" in x:
            _ref_resource(x, code, out, root)
        else:
            _ref_reference(x, code, out, root)


def _dyn_quantity(x, code, out, root):
    if isinstance(x, dict):
        if "low" in x or "high" in x:
            _qty_range(x, code, out, root)
        elif "currency" in x:
            _qty_money(x, code, out, root)
        else:
            _qty_quantity(x, code, out, root)


def _dyn_number(x, code, out, root):
    _num_number(x, code, out, root)


def _dyn_uri(x, code, out, root):
    _uri_uri(x, code, out, root)


_DYNAMIC: dict[str, Converter] = {
    "string": _dyn_string, "token": _dyn_token, "date": _dyn_date, "reference": _dyn_reference,
    "quantity": _dyn_quantity, "number": _dyn_number, "uri": _dyn_uri,
}


def convert_values(kind: str, code: str, values: list) -> list[tuple]:
    """Rows of index ``kind`` for values whose FHIR type is unknown (inferred from shape).

    This is the conversion used for values from the fhirpathpy fallback; the compiled path
    picks the same converters from the static type instead.
    """
    out: list[tuple] = []
    conv = _DYNAMIC[kind]
    for v in values:
        conv(v, code, out, None)
    return out


# --- composite (search.html#composite: one row per combination of component values) ----------

def _composite_columns(kind: str, r: tuple, nth_number: int) -> tuple | None:
    """Columns ``num, q_system, q_code, c2_system, c2_code, low, high, text`` that one
    converted row of a second/third component fills (None: the row gives nothing)."""
    if kind == "quantity":
        return (r[1], r[2], r[3], None, None, None, None, None)
    if kind == "token":
        return (None, None, None, r[1], r[2], None, None, None) if r[2] is not None else None
    if kind == "date":
        return (None, None, None, None, None, r[1], r[2], None)
    if kind == "string":
        return (None, None, None, None, None, None, None, r[1])
    if kind == "number":      # MolecularSequence coordinates: start -> low, end -> high
        return ((None, None, None, None, None, r[1], None, None) if nth_number == 0 else
                (None, None, None, None, None, None, r[1], None))
    if kind == "reference":
        ref = f"{r[1]}/{r[2]}" if r[2] is not None else r[3]
        return (None, None, None, None, ref, None, None, None) if ref is not None else None
    if kind == "uri":
        return (None, None, None, None, r[1], None, None, None)
    return None


def _merge(columns: tuple[tuple, ...]) -> tuple:
    return tuple(next((v for v in col if v is not None), None) for col in zip(*columns))


def composite_rows(code: str, parts: list[tuple[str, list[tuple]]]) -> list[tuple]:
    """Composite index rows from the converted rows of each component.

    Args:
        code: The composite parameter's code.
        parts: ``(kind, rows)`` per component in definition order, ``rows`` as produced by
            the converter of that kind (with any param code in position 0). The first
            component is a token: its (system, code) pairs fill ``c1_system, c1_code``.

    Returns:
        One row per combination. The other components fill, by kind: quantity ->
        ``num, q_system, q_code``; token -> ``c2_system, c2_code``; date -> ``low, high``;
        string -> ``text`` (normalised); number -> ``low`` then ``high`` (the coordinate
        pairs of MolecularSequence); reference -> ``c2_code`` ("Type/id" or the url).
    """
    firsts = [(r[1], r[2]) for r in parts[0][1] if r[2] is not None]
    if not firsts:
        return []
    others = []
    nth_number = 0
    for kind, rows in parts[1:]:
        cols = [c for r in rows if (c := _composite_columns(kind, r, nth_number)) is not None]
        nth_number += kind == "number"
        if not cols:
            return []
        others.append(cols)
    combos = others[0] if len(others) == 1 else [_merge(c) for c in itertools.product(*others)]
    return [(code, s, c, *cols) for s, c in firsts for cols in combos]


# ---------------------------------------------------------------------------------------------
# FHIRPath compiler
# ---------------------------------------------------------------------------------------------

Step = Callable[[list, dict], list]


class Unsupported(Exception):
    """An expression (or part) outside the compiled subset."""


@dataclass(frozen=True)
class Branch:
    """One typed path of an expression, relative to a focus collection.

    Attributes:
        head: The JSON key read first from the focus items (None: start at the focus).
        steps: Further steps, each ``step(items, root) -> items``.
        type: Static FHIR type (type name or backbone path); None if unknown.
    """
    head: str | None
    steps: tuple[Step, ...]
    type: str | None

    def then(self, step: Step, typ: str | None, total: bool = False) -> Branch:
        """This branch followed by ``step``.

        Steps map an empty collection to an empty one, so evaluation stops at the first empty
        result; a ``total`` step (``exists()``) must see it: it is fused with the steps
        before it into one step that always runs.
        """
        if not total:
            return Branch(self.head, self.steps + (step,), typ)
        prev = self

        def fused(items, root):
            return step(run_branch(prev, items, root), root)
        return Branch(None, (fused,), typ)


def _get_items(items: list, key: str) -> list:
    out: list = []
    for it in items:
        if type(it) is dict:
            v = it.get(key)
            if v is not None:
                if type(v) is list:
                    out.extend(v)
                else:
                    out.append(v)
    return out


def _get_step(key: str) -> Step:
    def get(items, root):
        return _get_items(items, key)
    return get


def run_branch(b: Branch, items: list, root: dict) -> list:
    """Evaluate a branch on a focus collection (``root`` is ``%resource``)."""
    if b.head is not None:
        items = _get_items(items, b.head)
    for step in b.steps:
        if not items:
            break
        items = step(items, root)
    return items


def _collapse(branches: list[Branch]) -> Branch:
    """One branch evaluating all ``branches`` and concatenating (for first(), [n], ...)."""
    if len(branches) == 1:
        return branches[0]
    if not branches:
        return Branch(None, (lambda items, root: [],), None)
    bs = tuple(branches)
    types = {b.type for b in bs}

    def concat(items, root):
        out: list = []
        for b in bs:
            out.extend(run_branch(b, items, root))
        return out
    return Branch(None, (concat,), types.pop() if len(types) == 1 else None)


def _fp_equal(a: Any, b: Any) -> bool:
    """FHIRPath ``=`` on two items (a Boolean never equals a number)."""
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    return a == b


def _singleton_bool(items: list) -> bool | None:
    """FHIRPath singleton evaluation of a collection as a Boolean."""
    if not items:
        return None
    if len(items) > 1:
        raise ValueError("expected a singleton")
    x = items[0]
    return x if type(x) is bool else True


def _identifier(node: dict) -> str:
    name = node["terminalNodeText"][0]
    return name[1:-1] if name.startswith("`") else name


def _type_name(node: dict) -> str:
    """Text of a type specifier / identifier path (``Quantity``, ``FHIR.Quantity``)."""
    if node.get("type") == "Identifier":
        return _identifier(node)
    return ".".join(_type_name(c) for c in node.get("children", [])
                    if c.get("type") not in ("FunctionInvocation",))


def _literal(node: dict) -> tuple[Any, str]:
    kind = node["type"]
    text = node["terminalNodeText"][0]
    if kind == "StringLiteral":
        s = text[1:-1]
        s = re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r", "f": "\f"}.get(
            m.group(1), m.group(1)), s)
        return s, "string"
    if kind == "BooleanLiteral":
        return text == "true", "boolean"
    if kind == "NumberLiteral":
        return (int(text), "integer") if text.isdigit() else (Decimal(text), "decimal")
    raise Unsupported(f"literal {kind}")


class _Compiler:
    """Compiles a parsed FHIRPath AST into typed branches for one resource type."""

    def __init__(self, res_type: str):
        self.res_type = res_type

    def compile(self, node: dict, state: str | None) -> list[Branch]:
        """Branches of ``node`` evaluated on a focus of static type ``state``.

        Raises:
            Unsupported: The expression uses something outside the compiled subset.
        """
        t = node.get("type")
        ch = node.get("children", [])
        if t is None or t in ("TermExpression", "ParenthesizedTerm"):
            return self.compile(ch[0], state)
        if t == "InvocationTerm":
            return self.invoke([Branch(None, (), state)], ch[0], head=True)
        if t == "InvocationExpression":
            return self.invoke(self.compile(ch[0], state), ch[1], head=False)
        if t == "UnionExpression":
            return self.compile(ch[0], state) + self.compile(ch[1], state)
        if t == "TypeExpression":
            if node["terminalNodeText"][0] != "as":
                raise Unsupported("'is' outside where(resolve() is T)")
            return self.as_type(self.compile(ch[0], state), _type_name(ch[1]))
        if t == "LiteralTerm":
            value, typ = _literal(ch[0])
            return [Branch(None, (lambda items, root: [value],), typ)]
        if t == "ExternalConstantTerm":
            name = _identifier(ch[0]["children"][0])
            if name not in ("resource", "rootResource"):
                raise Unsupported(f"%{name}")
            return [Branch(None, (lambda items, root: [root],), self.res_type)]
        if t == "EqualityExpression":
            return [self.equality(node, state)]
        if t == "AndExpression":
            return [self.and_(node, state)]
        if t == "IndexerExpression":
            left = _collapse(self.compile(ch[0], state))
            term = ch[1]["children"][0] if ch[1].get("type") == "TermExpression" else {}
            if term.get("type") != "LiteralTerm" or term["children"][0]["type"] != "NumberLiteral":
                raise Unsupported("index that is not a number literal")
            n = _literal(term["children"][0])[0]
            return [left.then(lambda items, root: items[n:n + 1], left.type)]
        raise Unsupported(t)

    # -- invocations ---------------------------------------------------------------------------

    def invoke(self, branches: list[Branch], inv: dict, head: bool) -> list[Branch]:
        t = inv["type"]
        if t == "MemberInvocation":
            return self.member(branches, _identifier(inv["children"][0]), head)
        if t == "FunctionInvocation":
            fn = inv["children"][0]
            name = _identifier(fn["children"][0])
            params = fn["children"][1]["children"] if len(fn["children"]) > 1 else []
            return self.function(branches, name, params)
        raise Unsupported(t)

    def member(self, branches: list[Branch], name: str, head: bool) -> list[Branch]:
        out = []
        for b in branches:
            if head and name[:1].isupper() and (name in _ALL_RESOURCES or name in _PARENT):
                # A leading type name filters the focus by type (FHIRPath, "Path selection").
                if b.type is not None and name in _ancestors(b.type):
                    out.append(b)
                continue
            members = _member(b.type, name) if b.type is not None else None
            if members is None:
                members = [(name, None)]          # unknown element: navigate untyped
            for key, typ in members:
                if b.head is None and not b.steps:
                    out.append(Branch(key, (), typ))
                else:
                    out.append(b.then(_get_step(key), typ))
        return out

    def function(self, branches: list[Branch], name: str, params: list[dict]) -> list[Branch]:
        if name in ("as", "ofType") and len(params) == 1:
            return self.as_type(branches, _type_name(params[0]))
        if name == "where" and len(params) == 1:
            return [self.where(b, params[0]) for b in branches]
        if name == "exists" and len(params) <= 1:
            if params:
                branches = [self.where(b, params[0]) for b in branches]
            return [_collapse(branches).then(lambda items, root: [bool(items)], "boolean",
                                             total=True)]
        if name == "first" and not params:
            if not branches:
                return []
            b = _collapse(branches)
            return [b.then(lambda items, root: items[:1], b.type)]
        raise Unsupported(f"{name}()")

    def as_type(self, branches: list[Branch], type_name: str) -> list[Branch]:
        """``as`` / ``ofType``: keep the branches whose static type is (a subtype of) T.

        Used on choice elements (``Observation.value.as(Quantity)``), it selects the
        ``valueQuantity`` branch at compile time. Like ``ofType``, it filters a collection
        instead of failing on several items (FHIRPath ``as`` requires a singleton).
        """
        want = _norm_type(type_name)
        out = []
        for b in branches:
            if b.type is None:
                raise Unsupported(f"as({type_name}) on a value of unknown type")
            if want in _ancestors(b.type):
                out.append(b)
            elif want in _ALL_RESOURCES and "Resource" in _ancestors(b.type):
                out.append(b.then(lambda items, root: [
                    x for x in items if type(x) is dict and x.get("resourceType") == want], want))
        return out

    def where(self, b: Branch, crit: dict) -> Branch:
        target = _resolve_is(crit)
        if target is not None:
            # where(resolve() is T): decided from the reference itself (no resolution).
            return b.then(lambda items, root: [x for x in items if reference_is(x, target)],
                          b.type)
        pred = _collapse(self.compile(crit, b.type))

        def where(items, root):
            out = []
            for x in items:
                r = run_branch(pred, [x], root)
                if len(r) == 1 and r[0] is True:
                    out.append(x)
            return out
        return b.then(where, b.type)

    def equality(self, node: dict, state: str | None) -> Branch:
        op = node["terminalNodeText"][0]
        if op not in ("=", "!="):
            raise Unsupported(op)
        left = _collapse(self.compile(node["children"][0], state))
        right = _collapse(self.compile(node["children"][1], state))
        negate = op == "!="

        def eq(items, root):
            a, b = run_branch(left, items, root), run_branch(right, items, root)
            if not a or not b:
                return []
            same = len(a) == len(b) and all(_fp_equal(x, y) for x, y in zip(a, b))
            return [same != negate]
        return Branch(None, (eq,), "boolean")

    def and_(self, node: dict, state: str | None) -> Branch:
        left = _collapse(self.compile(node["children"][0], state))
        right = _collapse(self.compile(node["children"][1], state))

        def and_(items, root):
            a = _singleton_bool(run_branch(left, items, root))
            if a is False:
                return [False]
            b = _singleton_bool(run_branch(right, items, root))
            if b is False:
                return [False]
            return [True] if a and b else []
        return Branch(None, (and_,), "boolean")


def _resolve_is(node: dict) -> str | None:
    """T if ``node`` is ``resolve() is T``, else None."""
    if node.get("type") != "TypeExpression" or node["terminalNodeText"][0] != "is":
        return None
    left = node["children"][0]
    try:
        fn = left["children"][0]["children"][0]["children"][0]
        if fn["children"][0]["terminalNodeText"][0] != "resolve":
            return None
    except (KeyError, IndexError):
        return None
    return _type_name(node["children"][1])


@functools.lru_cache(maxsize=None)
def _parse(expression: str) -> dict:
    return _fp_parse(expression)


# ---------------------------------------------------------------------------------------------
# Per-type plans
# ---------------------------------------------------------------------------------------------

# An entry: (steps after the head key, converter(x, code, out, root), param code, kind index).
Entry = tuple[tuple[Step, ...], Converter, str, int]


@dataclass
class CompiledType:
    """Everything :func:`extract` runs for one resource type.

    Attributes:
        res_type: The resource type.
        by_key: Entries keyed by the top-level JSON key their branch starts with.
        always: Entries evaluated on the resource itself (no head key).
        fallback: ``(param, fhirpathpy function)`` for expressions outside the subset.
        fast: Codes of the parameters compiled to plain Python.
        errors: ``{code: reason}`` for the parameters that fell back.
    """
    res_type: str
    by_key: dict[str, list[Entry]] = field(default_factory=dict)
    always: list[Entry] = field(default_factory=list)
    fallback: list[tuple[SearchParam, Callable]] = field(default_factory=list)
    fast: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, b: Branch, conv: Converter, code: str, kind: str) -> None:
        entry = (b.steps, conv, code, _KIND_INDEX[kind])
        if b.head is None:
            self.always.append(entry)
        else:
            self.by_key.setdefault(b.head, []).append(entry)

    def add_on_keys(self, keys: set[str], conv: Converter, code: str, kind: str) -> None:
        """An entry evaluated on the resource itself, only when one of ``keys`` is present
        (at most once per key: its rows are de-duplicated)."""
        for key in sorted(keys):
            self.by_key.setdefault(key, []).append(((_root_step,), conv, code, _KIND_INDEX[kind]))


def _root_step(items: list, root: dict) -> list:
    return [root]


def _component_kind(sp: SearchParam, i: int) -> str:
    if i == 0:
        return "token"
    ref = registry().by_url.get(sp.components[i].definition)
    return ref.type if ref is not None else "token"


def _compile_composite(c: _Compiler, sp: SearchParam, plan: CompiledType) -> None:
    for focus in c.compile(_parse(sp.expression), c.res_type):
        comps: list[tuple[str, list[tuple[Branch, Converter]]]] = []
        for i, comp in enumerate(sp.components):
            kind = defined_kind = _component_kind(sp, i)
            convs = []
            for b in c.compile(_parse(comp.expression), focus.type):
                conv = _static_converter(defined_kind, b.type)
                if conv is None and i > 0:
                    # Definitions with a mismatched type (e.g. DocumentReference-relationship,
                    # whose target is a Reference): convert by the element's own type.
                    for alt in ("reference", "token", "quantity", "date", "string", "uri"):
                        conv = _static_converter(alt, b.type)
                        if conv is not None:
                            kind = alt
                            break
                if conv is not None:
                    convs.append((b, conv))
            if not convs:
                break                              # a component with no value: no rows
            comps.append((kind, convs))
        else:
            handler = _composite_handler(comps)
            if focus.head is None and not focus.steps:
                # Focus on the resource itself (``Observation``): rows need every component,
                # so run only when the top-level keys of one of them are present (e.g.
                # valueQuantity), instead of on every resource.
                heads = [{b.head for b, _ in convs} for _, convs in comps[1:] or comps]
                heads = [h for h in heads if None not in h]
                if heads:
                    plan.add_on_keys(min(heads, key=len), handler, sp.code, "composite")
                    continue
            plan.add(focus, handler, sp.code, "composite")


def _composite_handler(comps: list[tuple[str, list[tuple[Branch, Converter]]]]) -> Converter:
    def handler(x, code, out, root):
        items = [x]
        parts: list[tuple[str, list[tuple]]] = []
        for kind, convs in reversed(comps):        # values first: they are usually absent
            rows: list[tuple] = []
            for b, conv in convs:
                for v in run_branch(b, items, root):
                    conv(v, None, rows, root)
            if not rows:
                return
            parts.append((kind, rows))
        parts.reverse()
        out.extend(composite_rows(code, parts))
    return handler


_TYPE_PREFIX_RE = re.compile(r"(?<![\w.%`])(?:Resource|DomainResource)\.")
_AS_OP_RE = re.compile(r"\s+as\s+([A-Za-z][\w.]*)")
_AS_FN_RE = re.compile(r"\.as\(")
_SYSTEM_TYPE_RE = re.compile(r"ofType\((Boolean|String|Integer|Decimal|Date|DateTime|Time)\)")
_RESOLVE_IS_RE = re.compile(r"resolve\(\)\s+is\s+([A-Za-z]+)")


def _fhirpathpy_text(expression: str, res_type: str) -> str:
    """Rewrite an expression for fhirpathpy so that it means what the compiled form does.

    ``Resource.x`` -> ``<res_type>.x`` (fhirpathpy does not match supertypes); ``as`` ->
    ``ofType`` (``as`` fails on several items) with System type names as FHIR primitives;
    ``resolve() is T`` -> a test of the reference itself (fhirpathpy cannot resolve).
    """
    text = _TYPE_PREFIX_RE.sub(f"{res_type}.", expression)
    text = _AS_OP_RE.sub(r".ofType(\1)", text)
    text = _AS_FN_RE.sub(".ofType(", text)
    text = _SYSTEM_TYPE_RE.sub(lambda m: f"ofType({m.group(1)[0].lower()}{m.group(1)[1:]})", text)
    return _RESOLVE_IS_RE.sub(
        lambda m: (f"(reference.matches('^(https?://.+/)?{m.group(1)}/[-A-Za-z0-9.]{{1,64}}"
                   f"(/_history/[-A-Za-z0-9.]{{1,64}})?$') or type = '{m.group(1)}')"), text)


def _split_union(text: str) -> list[str]:
    """The top-level operands of a union expression (``A | (B | C)`` -> ``A``, ``(B | C)``)."""
    parts, depth, start, quoted = [], 0, 0, False
    for i, ch in enumerate(text):
        if ch == "'" and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch in "([":
            depth += 1
        elif not quoted and ch in ")]":
            depth -= 1
        elif not quoted and ch == "|" and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def _fallback(sp: SearchParam, res_type: str) -> Callable:
    """A fhirpathpy evaluator ``fn(resource, context) -> values`` for one parameter.

    For a composite it returns the focus nodes (with their paths, which a union would lose,
    hence one evaluator per operand), on which :func:`_run_fallback` evaluates the components.
    """
    text = _fhirpathpy_text(sp.expression, res_type)
    if sp.type != "composite":
        return fhirpathpy.compile(text, _MODEL)
    fns = [fhirpathpy.compile(t, _MODEL, {"returnRawData": True}) for t in _split_union(text)]
    return lambda resource, ctx: [node for fn in fns for node in fn(resource, ctx)]


@functools.cache
def compile_type(res_type: str) -> CompiledType:
    """Compile (once, cached) the search parameters of a resource type.

    Args:
        res_type: A FHIR R4 resource type.

    Returns:
        The :class:`CompiledType` plan; empty for an unknown type.
    """
    return compile_params(res_type, registry().for_type(res_type))


def compile_params(res_type: str, params: dict[str, SearchParam]) -> CompiledType:
    """Compile search parameters for resources of one type (see :func:`compile_type`).

    Args:
        res_type: The resource type the expressions are evaluated on.
        params: ``{code: SearchParam}``; ``_id`` and ``_lastUpdated`` are skipped.

    Returns:
        A plan for :func:`run_plan`. Parameters outside the compiled subset are evaluated by
        fhirpathpy (``plan.errors`` says why).
    """
    plan = CompiledType(res_type)
    c = _Compiler(res_type)
    for code, sp in sorted(params.items()):
        if code in SKIPPED_PARAMS:
            continue
        try:
            if sp.type == "composite":
                _compile_composite(c, sp, plan)
            else:
                for b in c.compile(_parse(sp.expression), res_type):
                    conv = _static_converter(sp.type, b.type)
                    if conv is not None:            # e.g. SampledData for a quantity: none
                        plan.add(b, conv, code, sp.type)
            plan.fast.append(code)
        except Exception as exc:  # Unsupported, or an expression fhirpathpy cannot parse
            _remove_param(plan, code)
            plan.errors[code] = f"{type(exc).__name__}: {exc}"
            try:
                plan.fallback.append((sp, _fallback(sp, res_type)))
            except Exception as exc2:  # not even fhirpathpy can compile it: never indexed
                plan.errors[code] += f"; fhirpathpy: {exc2}"
                log.warning("search parameter %s of %s cannot be evaluated: %s",
                            code, res_type, plan.errors[code])
    return plan


def _remove_param(plan: CompiledType, code: str) -> None:
    for key in list(plan.by_key):
        plan.by_key[key] = [e for e in plan.by_key[key] if e[2] != code]
        if not plan.by_key[key]:
            del plan.by_key[key]
    plan.always = [e for e in plan.always if e[2] != code]


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

def _run_fallback(sp: SearchParam, fn: Callable, resource: dict, outs: list[list]) -> None:
    ctx = {"resource": resource}
    try:
        if sp.type != "composite":
            outs[_KIND_INDEX[sp.type]].extend(convert_values(sp.type, sp.code, fn(resource, ctx)))
            return
        # Composite: evaluate the components on each focus node, from that node's path.
        for node in fn(resource, ctx):
            data, path = getattr(node, "data", node), getattr(node, "path", None)
            parts = []
            for i, comp in enumerate(sp.components):
                text = _fhirpathpy_text(comp.expression, resource["resourceType"])
                expr = {"expression": text, "base": path} if path else text
                kind = _component_kind(sp, i)
                values = fhirpathpy.evaluate(data, expr, ctx, _MODEL)
                parts.append((kind, convert_values(kind, None, values)))
            outs[_KIND_INDEX["composite"]].extend(composite_rows(sp.code, parts))
    except Exception:  # a runtime error of the expression: no values
        log.debug("fhirpathpy evaluation of %s failed", sp.code, exc_info=True)


def extract(resource: dict) -> dict[str, list[tuple]]:
    """Index rows of every search parameter of the resource's type.

    Args:
        resource: A FHIR R4 resource as parsed JSON.

    Returns:
        ``{kind: [(param_code, *columns), ...]}`` for every kind of ``INDEX_COLUMNS`` (empty
        lists included), columns in ``INDEX_COLUMNS[kind]`` order, duplicates removed.
        ``_id`` and ``_lastUpdated`` are not included. Never raises on bad data: a
        parameter that cannot be evaluated yields no rows.
    """
    res_type = resource.get("resourceType")
    if type(res_type) is not str:
        return {kind: [] for kind in KINDS}
    return run_plan(compile_type(res_type), resource)


def run_plan(plan: CompiledType, resource: dict) -> dict[str, list[tuple]]:
    """Evaluate a compiled plan on a resource (see :func:`extract` for the result)."""
    outs: list[list] = [[], [], [], [], [], [], [], []]
    by_key = plan.by_key
    starts = resource.items()
    if plan.always:      # entries without a head key start at the resource itself
        starts = itertools.chain(starts, ((None, resource),))
    for key, value in starts:
        entries = by_key.get(key) if key is not None else plan.always
        if entries is None:
            continue
        items = value if type(value) is list else [value]
        for steps, conv, code, k in entries:
            try:
                xs = items
                for step in steps:
                    xs = step(xs, resource)
                    if not xs:
                        break
                else:
                    out = outs[k]
                    for x in xs:
                        conv(x, code, out, resource)
            except Exception:  # malformed data: this parameter yields nothing more
                log.debug("extraction of %s failed", code, exc_info=True)
    for sp, fn in plan.fallback:
        _run_fallback(sp, fn, resource, outs)
    return {kind: (list(dict.fromkeys(rows)) if len(rows) > 1 else rows)
            for kind, rows in zip(KINDS, outs)}


# ---------------------------------------------------------------------------------------------
# Compile statistics
# ---------------------------------------------------------------------------------------------

@dataclass
class CompileStats:
    """How the search-parameter definitions compiled (over every type they apply to).

    Attributes:
        fast: Definitions compiled to plain Python for every base type.
        fallback: ``{url: "expression: reason"}`` of definitions evaluated by fhirpathpy.
    """
    fast: int = 0
    fallback: dict[str, str] = field(default_factory=dict)


def compile_all() -> CompileStats:
    """Compile the parameters of every resource type; count fast vs fallback definitions."""
    stats = CompileStats()
    plans = {t: compile_type(t) for t in sorted(RESOURCE_TYPES)}
    reg = registry()
    for sp in reg.by_url.values():
        if sp.code in SKIPPED_PARAMS:
            continue
        reasons = sorted({plan.errors[sp.code] for t, plan in plans.items()
                          if sp.code in plan.errors and reg.for_type(t).get(sp.code) is sp})
        if reasons:
            stats.fallback[sp.url] = f"{sp.expression}: {'; '.join(reasons)}"
        else:
            stats.fast += 1
    return stats


def __getattr__(name: str):
    """``COMPILE_STATS`` is computed on first use: compiling every type costs ~1.5 s, and
    a process (a gunicorn worker, a CLI command) only compiles the types it meets."""
    if name == "COMPILE_STATS":
        stats = compile_all()
        log.info("search parameters: %d compiled, %d evaluated by fhirpathpy",
                 stats.fast, len(stats.fallback))
        globals()["COMPILE_STATS"] = stats
        return stats
    raise AttributeError(name)
