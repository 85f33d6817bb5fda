"""FHIR de-identification driven by a Microsoft FHIR Anonymizer style configuration.

The configuration format is the one of Microsoft's Tools-for-Health-Data-Anonymization
(FHIR): ``fhirVersion``, ``processingErrors``, ``fhirPathRules`` (``path`` + ``method`` +
method options) and ``parameters``. Its semantics are mirrored (docs/deidentification.md):

- rules run in order on every resource (Bundle entries and contained resources are
  resources of their own); a rule whose path starts with a resource type only applies to
  that type, ``Resource.``/``DomainResource.`` and paths without a type apply to all;
- a matched element is processed with all its descendants (not crossing into nested
  resources), and an element processed by an earlier rule is never processed again by a
  later one (so ``keep`` rules first protect, later rules sweep);
- ``nodesByType('T')`` / ``nodesByName('n')`` select the elements of a FHIR type / name
  inside the resource, excluding those inside nested resources;
- methods ``keep``, ``redact``, ``dateShift``, ``cryptoHash``, ``encrypt``, ``substitute``,
  ``perturb``, ``generalize``, plus synthport's ``pseudonymize`` (reversible, keyed; see
  :mod:`server.deid.pseudonym`);
- emptied elements are removed; each changed resource gets ``meta.security`` labels.

FHIRPath is evaluated with fhirpathpy (R4 model). A result is mapped back to the element
to change through the identity of JSON objects (complex elements) and fhirpathpy's
``propName`` location (primitives), both checked against a typed tree of the resource.
"""
from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import hmac
import json
import math
import os
import random
import re
import secrets
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote, unquote
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, Iterable

from antlr4 import CommonTokenStream, InputStream
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy import apply_parsed_path
from fhirpathpy.engine.nodes import FP_Type, ResourceNode
from fhirpathpy.models import models as _fp_models
from fhirpathpy.parser import parse as _fp_parse
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from server.deid import pseudonym as psn
from server.errors import InvalidRequest, Unprocessable

# ------------------------------------------------------------------------------ R4 model
_MODEL = _fp_models["r4"]
_P2T: dict[str, str] = _MODEL["path2Type"]
_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_T2P: dict[str, str] = _MODEL["type2Parent"]
# "Observation.valueQuantity" -> "value" (FHIRPath name of a choice element)
_CHOICE_NAME: dict[str, str] = {
    f"{base}{t}": base.rsplit(".", 1)[1]
    for base, types in _MODEL["choiceTypePaths"].items() for t in types}
# Paths of backbone elements (not typed in path2Type, but parents of typed paths).
_BACKBONE: set[str] = set(_ELSEWHERE)
for _p in _P2T:
    _parts = _p.split(".")
    for _i in range(2, len(_parts)):
        _pre = ".".join(_parts[:_i])
        if _pre not in _P2T:
            _BACKBONE.add(_pre)


def _is_resource_type(name: str) -> bool:
    seen = 0
    while name and seen < 10:
        if name == "Resource":
            return True
        name = _T2P.get(name, "")
        seen += 1
    return False


_GENERAL_TYPES = ("Resource", "DomainResource")
_DATE_TYPES = ("date", "dateTime", "instant")
_NUMERIC = {"decimal", "integer", "positiveInt", "unsignedInt", "integer64"}
_QUANTITY = {"Quantity", "Age", "Duration", "Count", "Distance", "Money", "SimpleQuantity",
             "MoneyQuantity"}
_V3 = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
# Security labels, as the Microsoft tool writes them (v3-ObservationValue where the code
# exists there; the tool's own codes without a system otherwise).
_LABELS = {
    "redact": (_V3, "REDACTED", "redacted"),
    "abstract": (_V3, "ABSTRED", "abstracted"),
    "cryptoHash": (_V3, "CRYTOHASH", "cryptographic hash function"),
    "encrypt": (_V3, "MASKED", "masked"),
    "pseudonymize": (_V3, "PSEUDED", "pseudonymized"),
    "perturb": (None, "PERTURBED", "value replaced by a nearby value"),
    "substitute": (None, "SUBSTITUTED", "value replaced by a fixed value"),
    "generalize": (None, "GENERALIZED", "value replaced by a more general value"),
}
METHODS = ("keep", "redact", "dateShift", "cryptoHash", "encrypt", "substitute", "perturb",
           "generalize", "pseudonymize")
_METHOD_BY_LOWER = {m.lower(): m for m in METHODS}
SCOPES = ("resource", "file", "folder", "patient")
STRICT = "safe-harbor-strict"
AGE_LIMIT = 89  # HIPAA §164.514(b)(2)(i)(C): ages over 89 and dates indicating them
DATE_SHIFT_RANGE = 50  # days either way, as the Microsoft tool


class DeidProcessingError(Unprocessable):
    """A rule could not be applied to a resource (processingErrors = raise)."""


# ----------------------------------------------------------------------------- config
@dataclass
class _Branch:
    resource_type: str | None      # None: every resource
    expression: str | None         # None: the resource itself
    names: tuple[str, ...] | None = None      # fast path: member names from the resource
    lookup: tuple[str, str] | None = None     # fast path: ("type"|"name", value) then names
    parsed: Any = None             # fhirpathpy parse tree otherwise


@dataclass
class Rule:
    """One ``fhirPathRules`` entry."""

    path: str
    method: str
    settings: dict
    branches: list[_Branch]
    cases: list[tuple[Any, Any]] = field(default_factory=list)   # generalize, parsed


@dataclass
class Parameters:
    """The ``parameters`` section."""

    date_shift_key: str = ""
    date_shift_scope: str = "resource"
    crypto_hash_key: str = ""
    encrypt_key: str = ""
    partial_ages: bool = False
    partial_dates: bool = False
    partial_zip_codes: bool = False
    restricted_zip_codes: tuple[str, ...] = ()


_NAMES_RE = re.compile(r"^[a-z][A-Za-z0-9]*(?:\.[a-z][A-Za-z0-9]*)*$")
_LOOKUP_RE = re.compile(
    r"""^nodesBy(Type|Name)\((['"])([A-Za-z0-9]+)\2\)((?:\.[a-z][A-Za-z0-9]*)*)$""")
_TYPE_PREFIX_RE = re.compile(r"^([A-Z][A-Za-z0-9]*)(?:\.(.+))?$", re.S)


def _split_union(path: str) -> list[str]:
    """Split a FHIRPath at its top-level ``|`` operators (outside brackets and strings):
    each branch is matched on its own, so a union never merges equal values of two
    different elements into one."""
    out, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(path):
        c = path[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'`\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append(path[start:i])
            start = i + 1
        i += 1
    out.append(path[start:])
    return [p.strip() for p in out if p.strip()]


class _RaiseOnError(ErrorListener):
    def syntaxError(self, recognizer, offending, line, column, msg, e):  # noqa: N802
        raise ValueError(f"at {column}: {msg}")


def _parse_fp(expr: str, what: str):
    """fhirpathpy's parse tree, after a strict syntax check (fhirpathpy's own parser
    recovers from errors silently: ``Patient.name.where(`` would parse)."""
    try:
        lexer = FHIRPathLexer(InputStream(expr))
        lexer.removeErrorListeners()
        lexer.addErrorListener(_RaiseOnError())
        parser = FHIRPathParser(CommonTokenStream(lexer))
        parser.removeErrorListeners()
        parser.addErrorListener(_RaiseOnError())
        parser.entireExpression()
        return _fp_parse(expr)
    except Exception as exc:  # antlr and fhirpathpy raise plain exceptions
        raise InvalidRequest(f"Invalid FHIRPath in {what}: {expr!r} ({exc})") from None


def _branch(path: str, where: str) -> _Branch:
    rtype, expr = None, path
    m = _TYPE_PREFIX_RE.match(path)
    if m:
        head = m.group(1)
        if head in _GENERAL_TYPES or _is_resource_type(head):
            rtype = None if head in _GENERAL_TYPES else head
            expr = m.group(2)
        elif "(" not in head:
            raise InvalidRequest(f"{where}: path {path!r} must start with a resource type, "
                                 "Resource, DomainResource, nodesByType() or nodesByName()")
    b = _Branch(rtype, expr)
    if expr is None:
        return b
    if _NAMES_RE.match(expr):
        b.names = tuple(expr.split("."))
        return b
    lm = _LOOKUP_RE.match(expr)
    if lm:
        b.lookup = (lm.group(1).lower(), lm.group(3))
        b.names = tuple(n for n in lm.group(4).split(".") if n)
        return b
    b.parsed = _parse_fp(expr, where)
    return b


def _bool(params: dict, key: str) -> bool:
    v = params.get(key, False)
    if not isinstance(v, bool):
        raise InvalidRequest(f"parameters.{key} must be true or false")
    return v


def _str(params: dict, key: str) -> str:
    v = params.get(key) or ""
    if not isinstance(v, str):
        raise InvalidRequest(f"parameters.{key} must be a string")
    return v


@dataclass
class DeidConfig:
    """A validated de-identification configuration."""

    rules: list[Rule]
    parameters: Parameters
    processing_errors: str = "raise"
    fhir_version: str = "R4"
    source: dict = field(default_factory=dict)

    @staticmethod
    def default_path() -> Path:
        """The shipped Safe Harbor + EHDS configuration."""
        return Path(str(importlib_resources.files("server.deid") / "default-config.json"))

    @classmethod
    def load(cls, spec: "str | os.PathLike | dict | DeidConfig | None" = None) -> "DeidConfig":
        """Load and validate a configuration.

        Args:
            spec: a dict, a JSON file path, ``None``/``""``/``"default"`` for the shipped
                default, ``"safe-harbor-strict"`` for the default with every date reduced
                to its year instead of shifted, or a DeidConfig (returned as is).

        Raises:
            InvalidRequest: unreadable file, bad JSON, or an invalid rule or parameter
                (the message names it).
        """
        if isinstance(spec, DeidConfig):
            return spec
        if spec == STRICT:
            with open(cls.default_path(), encoding="utf-8") as fh:
                data = json.load(fh)
            for r in data["fhirPathRules"]:
                if str(r.get("method", "")).lower() == "dateshift":
                    r["method"] = "redact"   # with enablePartialDatesForRedact: the year
            return cls._validate(data)
        if spec is None or spec == "" or spec == "default":
            spec = cls.default_path()
        if isinstance(spec, (str, os.PathLike)):
            try:
                with open(spec, encoding="utf-8") as fh:
                    data = json.load(fh)
            except OSError as exc:
                raise InvalidRequest(f"Cannot read de-identification config {spec}: "
                                     f"{exc.strerror or exc}") from None
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"De-identification config {spec} is not JSON: "
                                     f"{exc}") from None
        else:
            data = spec
        return cls._validate(data)

    @classmethod
    def _validate(cls, data: object) -> "DeidConfig":
        if not isinstance(data, dict):
            raise InvalidRequest("A de-identification config is a JSON object")
        version = data.get("fhirVersion") or ""
        if version and str(version).upper() != "R4":
            raise InvalidRequest(f"fhirVersion {version!r} is not supported (expected R4)")
        errors = data.get("processingErrors", data.get("processingError", "raise")) or "raise"
        if str(errors).lower() not in ("raise", "skip"):
            raise InvalidRequest("processingErrors must be 'raise' or 'skip'")
        raw_rules = data.get("fhirPathRules")
        if not isinstance(raw_rules, list):
            raise InvalidRequest("The config needs a fhirPathRules array")
        rules = [cls._rule(r, i) for i, r in enumerate(raw_rules)]
        p = data.get("parameters") or {}
        if not isinstance(p, dict):
            raise InvalidRequest("parameters must be an object")
        scope = _str(p, "dateShiftScope") or "resource"
        if scope.lower() not in SCOPES:
            raise InvalidRequest(f"parameters.dateShiftScope must be one of {', '.join(SCOPES)}")
        enc = _str(p, "encryptKey")
        if enc and len(enc.encode("utf-8")) not in (16, 24, 32):
            raise InvalidRequest("parameters.encryptKey must be 128, 192 or 256 bits "
                                 "(16, 24 or 32 bytes)")
        zips = p.get("restrictedZipCodeTabulationAreas") or []
        if not isinstance(zips, list) or not all(isinstance(z, str) for z in zips):
            raise InvalidRequest("parameters.restrictedZipCodeTabulationAreas must be an "
                                 "array of strings")
        params = Parameters(
            date_shift_key=_str(p, "dateShiftKey"), date_shift_scope=scope.lower(),
            crypto_hash_key=_str(p, "cryptoHashKey"), encrypt_key=enc,
            partial_ages=_bool(p, "enablePartialAgesForRedact"),
            partial_dates=_bool(p, "enablePartialDatesForRedact"),
            partial_zip_codes=_bool(p, "enablePartialZipCodesForRedact"),
            restricted_zip_codes=tuple(zips))
        return cls(rules, params, str(errors).lower(), "R4", data)

    @staticmethod
    def _rule(raw: object, i: int) -> Rule:
        where = f"fhirPathRules[{i}]"
        if not isinstance(raw, dict) or "path" not in raw or "method" not in raw:
            raise InvalidRequest(f"{where} needs a path and a method")
        path, method = raw["path"], raw["method"]
        if not isinstance(path, str) or not path.strip():
            raise InvalidRequest(f"{where}.path must be a non-empty string")
        canon = _METHOD_BY_LOWER.get(str(method).lower())
        if canon is None:
            raise InvalidRequest(f"{where}: method {method!r} is not supported "
                                 f"(one of {', '.join(METHODS)})")
        _parse_fp(path, where)   # the whole path must parse, as in the Microsoft tool
        rule = Rule(path, canon, dict(raw), [_branch(b, where) for b in _split_union(path)])
        if canon == "redact" and not isinstance(raw.get("partial", True), bool):
            raise InvalidRequest(f"{where}: partial must be true or false")
        if canon == "substitute" and "replaceWith" not in raw:
            raise InvalidRequest(f"{where}: substitute needs replaceWith")
        if canon == "perturb":
            span = raw.get("span")
            if isinstance(span, bool) or not isinstance(span, (int, float)) or span < 0:
                raise InvalidRequest(f"{where}: perturb needs a non-negative number span")
            rt = str(raw.get("rangeType", "fixed")).lower()
            if rt not in ("fixed", "proportional"):
                raise InvalidRequest(f"{where}: rangeType must be fixed or proportional")
            rnd = raw.get("roundTo")
            if rnd is not None and (isinstance(rnd, bool) or not isinstance(rnd, int)
                                    or not 0 <= rnd <= 28):
                raise InvalidRequest(f"{where}: roundTo must be an integer from 0 to 28")
        if canon == "generalize":
            cases = raw.get("cases")
            if not isinstance(cases, dict) or not cases:
                raise InvalidRequest(f"{where}: generalize needs a cases object")
            other = str(raw.get("otherValues", "redact")).lower()
            if other not in ("redact", "keep"):
                raise InvalidRequest(f"{where}: otherValues must be redact or keep")
            for cond, target in cases.items():
                if not isinstance(target, str):
                    raise InvalidRequest(f"{where}: a generalize case value is a FHIRPath string")
                rule.cases.append((_parse_fp(f"select({cond})", where),
                                   _parse_fp(f"select({target})", where)))
        if canon == "pseudonymize":
            wk = str(raw.get("withoutKey", "redact"))
            if wk.lower() not in ("redact", "cryptohash", "raise"):
                raise InvalidRequest(f"{where}: withoutKey must be redact, cryptoHash or raise")
            ctx = raw.get("context", "value")
            if not isinstance(ctx, str):
                raise InvalidRequest(f"{where}: context must be a string")
        return rule


# ----------------------------------------------------------------------------- the tree
class _Node:
    """One element of a resource: name, FHIR type, value (primitives) and children.

    A primitive's ``_name`` part (id, extension) is held as its children, as FHIR's
    element model does."""

    __slots__ = ("name", "key", "type", "tpath", "prim", "value", "kids", "arrays", "parent",
                 "is_resource", "json")

    def __init__(self, name, key, type_, tpath, parent, prim):
        self.name, self.key, self.type, self.tpath = name, key, type_, tpath
        self.parent, self.prim = parent, prim
        self.value = None
        self.kids: dict[str, list[_Node]] = {}
        self.arrays: set[str] = set()
        self.is_resource = False
        self.json = None

    def children(self) -> Iterable["_Node"]:
        for kids in list(self.kids.values()):
            yield from list(kids)

    def first(self, key: str) -> "_Node | None":
        kids = self.kids.get(key)
        return kids[0] if kids else None

    def resource(self) -> "_Node":
        n = self
        while not n.is_resource and n.parent is not None:
            n = n.parent
        return n


def _child_type(parent: _Node, key: str) -> tuple[str, str | None, str | None]:
    """(FHIRPath name, FHIR type, model path) of ``parent``'s property ``key``."""
    base = "Element" if parent.prim else parent.tpath
    if base is None:
        return key, None, None
    full = f"{base}.{key}"
    name = _CHOICE_NAME.get(full, key)
    t = _P2T.get(full)
    if t == "System.String":
        if key == "id" and parent.is_resource:
            return name, "id", "id"
        return name, ("uri" if full == "Extension.url" else "string"), None
    if t == "Resource":
        return name, "Resource", None
    if t is not None:
        return name, t, t
    if full in _BACKBONE:
        return name, "BackboneElement", _ELSEWHERE.get(full, full)
    return name, None, None


def _is_prim_type(t: str | None) -> bool:
    return bool(t) and t[0].islower()


def _build_value(obj, ext, name, key, type_, tpath, parent) -> _Node | None:
    if isinstance(obj, dict):
        node = _Node(name, key, type_, tpath, parent, False)
        if isinstance(obj.get("resourceType"), str) and (type_ in (None, "Resource")
                                                          or parent is None):
            node.is_resource = True
            node.type = node.tpath = obj["resourceType"]
        _fill(node, obj)
        return node
    if obj is None and not isinstance(ext, dict):
        return None
    node = _Node(name, key, type_ if type_ else None, tpath, parent, True)
    node.value = obj
    if isinstance(ext, dict):
        _fill(node, ext)
    return node


def _fill(node: _Node, obj: dict) -> None:
    for k, v in obj.items():
        if not isinstance(k, str) or (k == "resourceType" and node.is_resource):
            continue   # (a non-string key is not JSON: dropped)
        if k.startswith("_"):
            if k[1:] in obj:
                continue
            v, ext = None, v   # a primitive with only an extension part
            k = k[1:]
        else:
            ext = obj.get("_" + k)
        name, t, tp = _child_type(node, k)
        kids = []
        if isinstance(v, list) or isinstance(ext, list):
            node.arrays.add(k)
            vals = v if isinstance(v, list) else []
            exts = ext if isinstance(ext, list) else []
            for i in range(max(len(vals), len(exts))):
                c = _build_value(vals[i] if i < len(vals) else None,
                                 exts[i] if i < len(exts) else None, name, k, t, tp, node)
                if c is not None:
                    kids.append(c)
        else:
            c = _build_value(v, ext, name, k, t, tp, node)
            if c is not None:
                kids.append(c)
        if kids:
            node.kids[k] = kids


def _build(resource: dict) -> _Node:
    return _build_value(resource, None, resource.get("resourceType"), None, None, None, None)


def _emit(node: _Node, index: dict | None = None) -> dict:
    """The JSON of a complex node (or of a primitive's id/extension part)."""
    d: dict = {}
    if node.is_resource:
        d["resourceType"] = node.type
    for key, kids in node.kids.items():
        if not kids:
            continue
        if all(c.prim for c in kids):
            vals = [c.value for c in kids]
            exts = [(_emit(c, index) if c.kids else None) for c in kids]
            if index is not None:
                for c, e in zip(kids, exts):
                    if e is not None:
                        index[id(e)] = c
            if key in node.arrays:
                if any(v is not None for v in vals):
                    d[key] = vals
                if any(e is not None for e in exts):
                    d["_" + key] = exts
            else:
                if vals[0] is not None:
                    d[key] = vals[0]
                if exts[0] is not None:
                    d["_" + key] = exts[0]
        else:
            items = [_emit(c, index) for c in kids if not c.prim]
            d[key] = items if key in node.arrays else items[0]
    if index is not None and not node.prim:
        index[id(d)] = node
        node.json = d
    return d


def _alive(node: _Node) -> bool:
    """Prune emptied children; whether ``node`` keeps any content."""
    for key in list(node.kids):
        kids = []
        for c in node.kids[key]:
            if _alive(c):
                kids.append(c)
            else:
                c.parent = None      # detached: lookups made before no longer find it
        if kids:
            node.kids[key] = kids
        else:
            del node.kids[key]
    if node.type == "Extension" and not node.is_resource:
        # ext-1: an extension has a value or nested extensions; a bare url is removed
        return any(k not in ("url", "id") for k in node.kids)
    return node.is_resource or node.value is not None or bool(node.kids)


def _attached(node: _Node, root: _Node) -> bool:
    while node is not None:
        if node is root:
            return True
        node = node.parent
    return False


class _Lookup:
    """The elements of one resource by FHIR type and by name (not inside nested
    resources), built once per resource as the Microsoft tool does; elements removed
    since are skipped, elements added since were processed by the rule that added them."""

    def __init__(self, res: _Node):
        self.res = res
        self.by_type: dict[str, list[_Node]] = {}
        self.by_name: dict[str, list[_Node]] = {}
        stack = [res]
        while stack:
            n = stack.pop()
            for c in n.children():
                if c.type:
                    self.by_type.setdefault(c.type, []).append(c)
                self.by_name.setdefault(c.name, []).append(c)
                if not c.is_resource:
                    stack.append(c)

    def get(self, kind: str, value: str) -> list[_Node]:
        found = (self.by_type if kind == "type" else self.by_name).get(value, [])
        return [n for n in found if _attached(n, self.res)]


def _descendants(node: _Node, pred, out: list) -> list:
    """Elements under ``node`` matching ``pred``, not looking inside nested resources."""
    for c in node.children():
        if pred(c):
            out.append(c)
        if not c.is_resource:
            _descendants(c, pred, out)
    return out


def _detach_dropped(before: dict, after: dict) -> None:
    keep = {id(c) for ks in after.values() for c in ks}
    for ks in before.values():
        for c in ks:
            if id(c) not in keep:
                c.parent = None


def _walk_names(nodes: list[_Node], names: Iterable[str]) -> list[_Node]:
    for n in names:
        nxt = []
        for node in nodes:
            for key, kids in node.kids.items():
                if kids and (key == n or kids[0].name == n):
                    nxt.extend(kids)
        nodes = nxt
    return nodes


def _prop_of(node: _Node, root: _Node) -> str:
    """fhirpathpy's propName of ``node`` from ``root`` (``Patient.name[0].given[1]``)."""
    parts = []
    n = node
    while n is not None and n is not root:
        p = n.parent
        seg = n.key
        if p is not None and n.key in p.arrays:
            seg += f"[{p.kids[n.key].index(n)}]"
        parts.append(seg)
        n = p
    return ".".join([root.type or ""] + parts[::-1])


_SEG_RE = re.compile(r"^([A-Za-z0-9]*)(?:\[(\d+)\])?$")


def _walk_prop(root: _Node, prop: str) -> _Node | None:
    segs = prop.split(".")
    if segs[0] not in ("", root.type):
        return None   # not anchored at this resource (e.g. after extension('url'))
    node = root
    for seg in segs[1:]:
        m = _SEG_RE.match(seg)
        if not m:
            return None
        name, idx = m.group(1), m.group(2)
        kids = node.kids.get(name)
        if kids is None:
            kids = next((ks for ks in node.kids.values() if ks and ks[0].name == name), None)
        if not kids:
            return None
        if idx is None:
            if len(kids) != 1:
                return None
            node = kids[0]
        else:
            i = int(idx)
            if i >= len(kids):
                return None
            node = kids[i]
    return node


# --------------------------------------------------------------------- value helpers
_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
_DATETIME_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:(T)(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)(Z|[+-]\d{2}:\d{2})?)?)?)?$")
_REST_RE = re.compile(r"^(?P<prefix>(?:https?://[^?#]*?/)?)(?P<type>[A-Z][A-Za-z]+)/"
                      r"(?P<id>[A-Za-z0-9\-.]{1,64})(?P<suffix>/_history/[A-Za-z0-9\-.]{1,64})?$")
_OID_RE = re.compile(r"^[0-2](?:\.(?:0|[1-9][0-9]*))+$")
_TYPE_ONLY_RE = re.compile(r"^(?:https?://[^?#]*?/)?[A-Z][A-Za-z]+$")


def _over_age(year: int, month: int | None, day: int | None, today: dt.date) -> bool:
    """Whether a date (missing month/day taken as 1) indicates an age over 89 today."""
    m, d = month or 1, day or 1
    age = today.year - year - (1 if (today.month, today.day) < (m, d) else 0)
    return age > AGE_LIMIT


def transform_reference(ref: str, id_fn, uuid_fn, oid_fn, other_fn, ident_fn=None) -> str:
    """Apply ``id_fn`` to the id part of a literal reference (FHIR R4 references §2.3.0.1):
    ``Type/id``, ``base/Type/id[/_history/v]``, ``#id``; ``urn:uuid:`` and ``urn:oid:``
    through their own functions; anything else goes through ``other_fn`` whole.

    A conditional reference (``Type?identifier=system|value``, FHIR R4 transaction
    §3.1.0.11.2) keeps its ``identifier`` parameters with ``ident_fn`` applied to the value
    (the function that identifier values get, so that it still matches once both are
    de-identified); its other parameters are dropped."""
    if ref.startswith("#"):
        return "#" + id_fn(ref[1:]) if len(ref) > 1 else ref
    low = ref.lower()
    if low.startswith("urn:uuid:"):
        return "urn:uuid:" + uuid_fn(ref[9:].lower())
    if low.startswith("urn:oid:"):
        return "urn:oid:" + oid_fn(ref[8:])
    base, q, query = ref.partition("?")
    m = _REST_RE.match(base)
    if m:
        return f"{m['prefix']}{m['type']}/{id_fn(m['id'])}{m['suffix'] or ''}"
    if _TYPE_ONLY_RE.match(base):
        kept = []
        for part in query.split("&") if (q and ident_fn is not None) else []:
            name, _, val = part.partition("=")
            if name.split(":")[0] != "identifier" or not val:
                continue
            system, bar, value = unquote(val).rpartition("|")
            new = f"{system}|{ident_fn(value)}" if bar else ident_fn(value)
            kept.append("identifier=" + quote(new, safe="|:/.-_~"))
        return base + ("?" + "&".join(kept) if kept else "")
    return other_fn(ref)


def _ref_target(ref: str, fullurls: dict) -> tuple[str | None, str | None]:
    """(type, id) a reference string points at, if known."""
    if ref in fullurls:
        return fullurls[ref]
    m = _REST_RE.match(ref.partition("?")[0])
    if m:
        return m["type"], m["id"]
    if ref.lower().startswith("urn:uuid:"):
        return None, ref[9:]
    return None, None


def _is_ref_like(node: _Node) -> bool:
    p = node.parent
    if p is None or not node.prim:
        return False
    return ((node.key == "reference" and p.type == "Reference")
            or (node.key == "fullUrl" and p.tpath == "Bundle.entry")
            or (node.key == "url" and p.tpath == "Bundle.entry.request")
            or (node.key == "location" and p.tpath == "Bundle.entry.response"))


def _is_structural(node: _Node) -> bool:
    """Extension.url names the extension's definition, not data: no method changes it
    (an extension without its url is invalid, FHIR R4 extensibility §2.4.1)."""
    return node.key == "url" and node.parent is not None and node.parent.type == "Extension"


def _is_resource_id(node: _Node) -> bool:
    return node.key == "id" and node.parent is not None and node.parent.is_resource


def encrypt_value(text: str, key: bytes) -> str:
    """AES-CBC with a random IV and PKCS#7 padding; base64 of IV + ciphertext (the
    encrypt method: different output each time)."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    data = padder.update(text.encode("utf-8")) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + enc.update(data) + enc.finalize()).decode("ascii")


def decrypt_value(token: str, key: bytes) -> str:
    """Inverse of :func:`encrypt_value`."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    raw = base64.b64decode(token)
    dec = Cipher(algorithms.AES(key), modes.CBC(raw[:16])).decryptor()
    data = dec.update(raw[16:]) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return (unpadder.update(data) + unpadder.finalize()).decode("utf-8")


def _as_key(k: "str | bytes | None") -> bytes | None:
    if k is None or k == "" or k == b"":
        return None
    return k.encode("utf-8") if isinstance(k, str) else bytes(k)


# ----------------------------------------------------------------------------- engine
class _Run:
    """State of one ``apply`` call."""

    def __init__(self, fullurls: dict, prefix_override: str | None, root_id: str):
        self.visited: set[_Node] = set()
        self.fullurls = fullurls
        self.prefix_override = prefix_override
        self.root_id = root_id
        self.ops: list[set[str]] = []
        self.prefixes: list[str] = []
        self.lookups: list[_Lookup] = []
        self.changed = False
        self.version = 0
        self.eval_cache: tuple | None = None

    def record(self, op: str) -> None:
        self.ops[-1].add(op)
        self.changed = True


class DeidEngine:
    """Apply a :class:`DeidConfig` to FHIR resources.

    Keys (bytes or str) come from the arguments, else from the config's parameters, else
    are derived from ``pseudonym_key`` (HKDF), else are random for this engine (results
    then only agree within one engine's lifetime; see :attr:`ephemeral_keys`).

    Args:
        config: a DeidConfig, or what :meth:`DeidConfig.load` accepts.
        crypto_hash_key: HMAC-SHA256 key of ``cryptoHash``.
        date_shift_key: key of ``dateShift``'s offsets.
        encrypt_key: AES key (16, 24 or 32 bytes) of ``encrypt``.
        pseudonym_key: 64-byte AES-SIV key of ``pseudonymize``; without it such rules
            fall back to their ``withoutKey`` method.
        today: the date ages are computed at (default: today, UTC).
        rng: random source of ``perturb`` (default: the OS's).
    """

    def __init__(self, config=None, *, crypto_hash_key=None, date_shift_key=None,
                 encrypt_key=None, pseudonym_key=None, today: dt.date | None = None,
                 rng: random.Random | None = None):
        self.config = DeidConfig.load(config)
        p = self.config.parameters
        self.pseudonym_key = _as_key(pseudonym_key)
        if self.pseudonym_key is not None and len(self.pseudonym_key) != psn.KEY_BYTES:
            raise InvalidRequest(f"A pseudonym key is {psn.KEY_BYTES} bytes")
        self.ephemeral_keys: list[str] = []
        self.crypto_hash_key = self._key(crypto_hash_key, p.crypto_hash_key, "cryptoHash", 32)
        self.date_shift_key = self._key(date_shift_key, p.date_shift_key, "dateShift", 32)
        self.encrypt_key = self._key(encrypt_key, p.encrypt_key, "encrypt", 32)
        if len(self.encrypt_key) not in (16, 24, 32):
            raise InvalidRequest("The encrypt key must be 16, 24 or 32 bytes")
        self.today = today
        self.rng = rng or random.SystemRandom()

    def _key(self, explicit, configured: str, purpose: str, size: int) -> bytes:
        k = _as_key(explicit) or _as_key(configured)
        if k is not None:
            return k
        if self.pseudonym_key is not None:
            return psn.derive_key(self.pseudonym_key, purpose, size)
        self.ephemeral_keys.append(purpose)
        return secrets.token_bytes(size)

    # ------------------------------------------------------------------ public API
    def apply(self, resource: dict, *, date_shift_prefix: str | None = None) -> dict:
        """De-identify one resource (a Bundle, Parameters or a resource with contained
        resources included); the input is not changed.

        Args:
            date_shift_prefix: overrides the dateShiftScope: every date of this call is
                shifted by the offset of this key (e.g. ``Patient/123``).
        """
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InvalidRequest("De-identification takes a FHIR resource (JSON object with "
                                 "a resourceType)")
        fullurls = {}
        entries = resource.get("entry") if resource["resourceType"] == "Bundle" else None
        if isinstance(entries, list):
            for e in entries:
                r = e.get("resource") if isinstance(e, dict) else None
                if isinstance(e, dict) and isinstance(e.get("fullUrl"), str) \
                        and isinstance(r, dict):
                    fullurls[e["fullUrl"]] = (r.get("resourceType"), r.get("id"))
        try:
            root = _build(resource)
            run = _Run(fullurls, date_shift_prefix, str(resource.get("id") or ""))
            orig_ids = self._entry_ids(root)
            self._process_resource(root, run)
            self._follow_full_urls(root, orig_ids, run)
            _alive(root)
            return _emit(root)
        except DeidProcessingError:
            if self.config.processing_errors == "skip":
                system, code, display = _LABELS["redact"]
                return {"resourceType": resource["resourceType"],
                        "meta": {"security": [{"system": system, "code": code,
                                               "display": display}]}}
            raise

    def apply_bundle(self, bundle: dict, *, date_shift_prefix: str | None = None) -> dict:
        """De-identify a Bundle: each entry's resource, and ``fullUrl``\\ s rewritten
        consistently with the (hashed or pseudonymised) ids and references."""
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise InvalidRequest("apply_bundle takes a Bundle")
        return self.apply(bundle, date_shift_prefix=date_shift_prefix)

    def apply_many(self, resources: Iterable[dict], *, file: str | None = None,
                   folder: str | None = None) -> list[dict]:
        """De-identify resources read together (an NDJSON file, a folder).

        dateShiftScope ``file`` shifts all of them by the offset of ``file``'s name,
        ``folder`` by that of ``folder``'s name (as the Microsoft tool); ``resource`` and
        ``patient`` decide per resource.
        """
        scope = self.config.parameters.date_shift_scope
        prefix = None
        if scope == "file":
            prefix = os.path.basename(file) if file else ""
        elif scope == "folder":
            prefix = os.path.basename(str(folder).rstrip("/\\")) if folder else ""
        return [self.apply(r, date_shift_prefix=prefix) for r in resources]

    def date_shift_days(self, prefix: str) -> int:
        """The date-shift offset (days, -50..50) of a scope key."""
        d = hmac.new(self.date_shift_key, prefix.encode("utf-8"), hashlib.sha256).digest()
        return int.from_bytes(d[:8], "big") % (2 * DATE_SHIFT_RANGE + 1) - DATE_SHIFT_RANGE

    def hash_value(self, value: str) -> str:
        """cryptoHash of a value (HMAC-SHA256, hex)."""
        return psn.keyed_hash(self.crypto_hash_key, value)

    # ------------------------------------------------------------------ traversal
    @staticmethod
    def _entry_ids(root: _Node) -> dict:
        out = {}
        if root.type == "Bundle":
            for e in root.kids.get("entry", []):
                r = e.first("resource")
                if r is not None and r.is_resource and r.first("id") is not None:
                    out[e] = r.first("id").value
        return out

    def _follow_full_urls(self, root: _Node, orig_ids: dict, run: _Run) -> None:
        """A RESTful fullUrl that no rule changed follows its resource's new id."""
        for e, old in orig_ids.items():
            fu, r = e.first("fullUrl"), e.first("resource")
            new = r.first("id").value if r is not None and r.first("id") is not None else None
            if fu is None or fu in run.visited or not isinstance(fu.value, str) or new == old:
                continue
            m = _REST_RE.match(fu.value)
            if m and m["id"] == old and new:
                fu.value = f"{m['prefix']}{m['type']}/{new}{m['suffix'] or ''}"

    def _scope_prefix(self, node: _Node, run: _Run) -> str:
        if run.prefix_override is not None:
            return run.prefix_override
        scope = self.config.parameters.date_shift_scope
        if scope == "patient":
            if node.key == "contained" and run.prefixes:
                return run.prefixes[-1]
            pid = self._patient_of(node, run)
            if pid:
                return f"Patient/{pid}"
            rid = node.first("id")
            return f"{node.type}/{rid.value if rid is not None else ''}"
        if scope == "resource":
            return run.root_id
        return ""

    @staticmethod
    def _patient_of(res: _Node, run: _Run) -> str | None:
        """The id of the Patient a resource is about (before any rule changed it)."""
        if res.type == "Patient":
            i = res.first("id")
            return str(i.value) if i is not None and i.value is not None else None
        refs = _descendants(res, lambda c: c.type == "Reference", [])
        refs.sort(key=lambda c: c.name not in ("subject", "patient", "beneficiary"))
        for ref in refs:
            r = ref.first("reference")
            if r is None or not isinstance(r.value, str):
                continue
            t, i = _ref_target(r.value, run.fullurls)
            if t is None:
                rt = ref.first("type")
                t = "Patient" if (rt is not None and rt.value == "Patient") else t
            if t == "Patient" and i:
                return str(i)
        return None

    def _process_resource(self, res: _Node, run: _Run) -> None:
        run.ops.append(set())
        run.prefixes.append(self._scope_prefix(res, run))
        run.lookups.append(_Lookup(res))
        try:
            for rule in self.config.rules:
                run.changed = False
                matches: list[_Node] = []
                for br in rule.branches:
                    if br.resource_type is not None and br.resource_type != res.type:
                        continue
                    matches.extend(self._match(br, res, run))
                seen = set()
                for m in matches:
                    if m not in seen:
                        seen.add(m)
                        self._recurse(m, rule, run, True)
                if run.changed:
                    _alive(res)
                    run.version += 1
            nested = _descendants(res, lambda c: c.is_resource, [])
            for n in nested:
                self._process_resource(n, run)
        finally:
            ops = run.ops.pop()
            run.prefixes.pop()
            run.lookups.pop()
        if run.ops:
            run.ops[-1] |= ops
        if ops and res.key != "contained":
            self._label(res, ops)

    def _match(self, br: _Branch, res: _Node, run: _Run) -> list[_Node]:
        if br.expression is None:
            return [res]
        if br.lookup is not None:
            return _walk_names(run.lookups[-1].get(*br.lookup), br.names or ())
        if br.names is not None:
            return _walk_names([res], br.names)
        return self._evaluate(br.parsed, res, run)

    def _evaluate(self, parsed, res: _Node, run: _Run) -> list[_Node]:
        cache = run.eval_cache
        if cache is None or cache[0] is not res or cache[1] != run.version:
            index: dict = {}
            data = _emit(res, index)
            run.eval_cache = cache = (res, run.version, data, index)
        _, _, data, index = cache

        def by(kind):
            def fn(inputs, value):
                out = []
                for item in inputs:
                    start = index.get(id(item))
                    if start is None:
                        continue
                    if start is res:
                        found = run.lookups[-1].get(kind, value)
                    else:
                        pred = ((lambda c: c.type == value) if kind == "type"
                                else (lambda c: c.name == value))
                        found = _descendants(start, pred, [])
                    for n in found:
                        if n.prim:
                            out.append(ResourceNode.create_node(n.value, n.type,
                                                                propName=_prop_of(n, res)))
                        else:
                            out.append(ResourceNode.create_node(n.json, n.tpath or n.type,
                                                                propName=_prop_of(n, res)))
                return out
            return fn

        table = {"nodesByType": {"fn": by("type"), "arity": {1: ["String"]}},
                 "nodesByName": {"fn": by("name"), "arity": {1: ["String"]}}}
        try:
            found = apply_parsed_path(data, parsed, {}, _MODEL,
                                      {"returnRawData": True, "userInvocationTable": table})
        except Exception as exc:  # fhirpathpy raises plain exceptions on evaluation errors
            raise DeidProcessingError(f"FHIRPath evaluation failed on {res.type} "
                                      f"({type(exc).__name__})") from None
        out = []
        for item in found if isinstance(found, list) else [found]:
            node = self._locate(item, res, index)
            if node is not None:
                out.append(node)
        return out

    @staticmethod
    def _locate(item, root: _Node, index: dict) -> _Node | None:
        if not isinstance(item, ResourceNode):
            raise DeidProcessingError("A rule path must select elements, not compute values")
        data = item.data
        if data is None:
            return None
        if isinstance(data, dict):
            node = index.get(id(data))
            if node is None:
                raise DeidProcessingError(f"Cannot locate the element {item.propName or item.path}")
            return node
        if isinstance(data, list):
            raise DeidProcessingError("A rule path selected a list, not elements")
        if item.propName:
            node = _walk_prop(root, item.propName)
            if node is not None and node.prim and node.value == data \
                    and type(node.value) is type(data):
                return node
        cands = [n for n in _descendants(root, lambda c: c.prim, [])
                 if n.value == data and type(n.value) is type(data)]
        if len(cands) == 1:
            return cands[0]
        raise DeidProcessingError(f"Cannot locate the element {item.propName or item.path} "
                                  "selected by a rule")

    def _recurse(self, node: _Node, rule: Rule, run: _Run, top: bool = False) -> None:
        if node in run.visited:
            return
        self._method(node, rule, run, top)
        run.visited.add(node)
        for c in node.children():
            if not c.is_resource and not _is_structural(c):
                self._recurse(c, rule, run)

    # ------------------------------------------------------------------ methods
    def _method(self, node: _Node, rule: Rule, run: _Run, top: bool) -> None:
        m = rule.method
        if m == "keep":
            return
        if m == "substitute":
            self._substitute(node, rule.settings.get("replaceWith"), run)
        elif m == "perturb":
            self._perturb(node, rule.settings, run)
        elif m == "generalize":
            if node.prim:
                self._generalize(node, rule, run)
            elif top:
                raise DeidProcessingError(f"generalize applies to primitive elements only, "
                                          f"not {node.type or node.name} ({rule.path})")
        elif not node.prim or node.value is None:
            return
        elif m == "redact":
            self._redact(node, run, rule.settings.get("partial", True))
        elif m == "dateShift":
            self._date_shift(node, run)
        elif m == "cryptoHash":
            self._crypto_hash(node, run)
        elif m == "encrypt":
            node.value = encrypt_value(str(node.value), self.encrypt_key)
            run.record("encrypt")
        elif m == "pseudonymize":
            self._pseudonymize(node, rule.settings, run)

    def _today(self) -> dt.date:
        return self.today or dt.datetime.now(dt.timezone.utc).date()

    def _redact(self, node: _Node, run: _Run, partial: bool = True) -> None:
        p = self.config.parameters
        v = node.value
        if not partial:
            node.value = None
            run.record("redact")
        elif node.type in _DATE_TYPES and isinstance(v, str):
            self._redact_date(node, run)
        elif node.type == "decimal" and node.parent is not None and node.parent.type == "Age" \
                and p.partial_ages and isinstance(v, (int, float)):
            if self._age_years(node.parent, v) > AGE_LIMIT:
                node.value = None
                run.record("redact")
        elif node.key == "postalCode" and p.partial_zip_codes and isinstance(v, str):
            if any(v.startswith(z) for z in p.restricted_zip_codes):
                new = re.sub(r"[0-9]", "0", v)
            else:
                new = v[:3] + re.sub(r"[A-Za-z0-9]", "0", v[3:])
            if new != v:
                node.value = new
                run.record("abstract")
        else:
            node.value = None
            run.record("redact")

    @staticmethod
    def _age_years(age: _Node, value: float) -> float:
        unit = age.first("code") or age.first("unit")
        u = str(unit.value).lower() if unit is not None and unit.value is not None else "a"
        per_year = {"mo": 12, "month": 12, "months": 12, "wk": 52.1775, "week": 52.1775,
                    "weeks": 52.1775, "d": 365.25, "day": 365.25, "days": 365.25,
                    "h": 8766, "hour": 8766, "hours": 8766, "min": 525960}.get(u, 1)
        return value / per_year

    def _redact_date(self, node: _Node, run: _Run) -> None:
        v = node.value
        m = _DATE_RE.match(v) if node.type == "date" else _DATETIME_RE.match(v)
        new = None
        if m and self.config.parameters.partial_dates:
            y = int(m.group(1))
            mo = int(m.group(2)) if m.group(2) else None
            d = int(m.group(3)) if m.group(3) else None
            new = None if _over_age(y, mo, d, self._today()) else m.group(1)
            if new and node.type == "instant":
                # an instant cannot hold a year alone (R4 datatypes: instant); the start of
                # the year says the same and stays valid (the MS tool writes the bare year)
                new = f"{new}-01-01T00:00:00{m.group(6) or 'Z'}"
        if new != v:
            node.value = new
            run.record("redact")

    def _date_shift(self, node: _Node, run: _Run) -> None:
        v = node.value
        if node.type not in _DATE_TYPES or not isinstance(v, str):
            return
        m = _DATE_RE.match(v) if node.type == "date" else _DATETIME_RE.match(v)
        if not m or not m.group(3):
            self._redact_date(node, run)   # no day to shift: year at most (as the MS tool)
            return
        y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if _over_age(y, mo, d, self._today()):
            self._redact_date(node, run)
            return
        try:
            day = dt.date(y, mo, d)
        except ValueError:   # not a calendar date: nothing safe to keep
            node.value = None
            run.record("redact")
            return
        shifted = day + dt.timedelta(days=self.date_shift_days(run.prefixes[-1]))
        new = shifted.isoformat()
        if node.type != "date" and m.group(4):
            # the time of day is dropped (zeroed, the zone kept), as the Microsoft tool does
            new += "T" + re.sub(r"[0-9]", "0", m.group(5)) + (m.group(6) or "")
        node.value = new
        run.record("perturb")

    def _hash_uuid(self, key: bytes, u: str) -> str:
        d = hmac.new(key, b"uuid:" + u.encode("utf-8"), hashlib.sha256).digest()
        return str(uuid.UUID(bytes=d[:16], version=4))

    def _hash_oid(self, key: bytes, o: str) -> str:
        # 2.25 is the arc of OIDs made from UUIDs (ITU-T X.667 §6.3)
        d = hmac.new(key, b"oid:" + o.encode("utf-8"), hashlib.sha256).digest()
        return "2.25." + str(int.from_bytes(d[:16], "big"))

    def _hash_plain(self, v: str) -> str:
        if _OID_RE.match(v):
            return self._hash_oid(self.crypto_hash_key, v)   # an OID (a DICOM UID) stays one
        return psn.keyed_hash(self.crypto_hash_key, v)

    def _crypto_hash(self, node: _Node, run: _Run) -> None:
        k = self.crypto_hash_key
        h = lambda s: psn.keyed_hash(k, s)  # noqa: E731
        v = str(node.value)
        if _is_ref_like(node):
            node.value = transform_reference(v, h, lambda u: self._hash_uuid(k, u),
                                             lambda o: self._hash_oid(k, o), h,
                                             self._hash_plain)
        else:
            node.value = self._hash_plain(v)
        run.record("cryptoHash")

    def _pseudonymize(self, node: _Node, settings: dict, run: _Run) -> None:
        key = self.pseudonym_key
        if key is None:
            fallback = str(settings.get("withoutKey", "redact")).lower()
            if fallback == "cryptohash":
                self._crypto_hash(node, run)
            elif fallback == "redact":
                node.value = None
                run.record("redact")
            else:
                raise DeidProcessingError("pseudonymize needs a pseudonym key "
                                          "(pseudonym_key_file)")
            return

        def pid(s: str) -> str:
            out = psn.pseudonymize(s, key, "id")
            if len(out) > 64:
                # too long for a reversible pseudonym within FHIR's 64-character id: a keyed
                # hash instead (the same wherever the id occurs, but not reversible)
                return psn.keyed_hash(self.crypto_hash_key, s)
            return out

        v = str(node.value)
        if _is_ref_like(node):
            node.value = transform_reference(
                v, pid, lambda u: self._hash_uuid(self.crypto_hash_key, u),
                lambda o: self._hash_oid(self.crypto_hash_key, o),
                lambda s: psn.pseudonymize(s, key, "value"),
                lambda s: psn.pseudonymize(s, key, "value"))
        elif _is_resource_id(node):
            node.value = pid(v)
        else:
            node.value = psn.pseudonymize(v, key, settings.get("context", "value"))
        run.record("pseudonymize")

    def _substitute(self, node: _Node, repl, run: _Run) -> None:
        if node.prim:
            if isinstance(repl, (dict, list)):
                raise DeidProcessingError(f"substitute: {node.name} is a primitive; "
                                          "replaceWith must be a value")
            node.value = repl
            # the element's extension part goes too, unless an earlier rule processed it
            kept = {k: [x for x in ks if self._touches(x, run.visited)]
                    for k, ks in node.kids.items()}
            kept = {k: ks for k, ks in kept.items() if ks}
            _detach_dropped(node.kids, kept)
            node.kids = kept
        else:
            if repl is None:
                repl = {}
            if not isinstance(repl, dict):
                raise DeidProcessingError(f"substitute: {node.name} is a {node.type}; "
                                          "replaceWith must be a JSON object")
            new = _Node(node.name, node.key, node.type, node.tpath, node.parent, False)
            _fill(new, repl)
            self._merge(node, new, run.visited)
        self._mark(node, run.visited)
        run.record("substitute")

    def _merge(self, node: _Node, new: _Node, visited: set) -> None:
        """Replace ``node``'s content by ``new``'s, keeping what earlier rules processed."""
        if node in visited:
            return
        out: dict[str, list[_Node]] = {}
        for key, targets in new.kids.items():
            kept, i = [], 0
            for c in node.kids.get(key, []):
                if c in visited:
                    kept.append(c)
                    i += 1
                elif i < len(targets):
                    self._merge_into(c, targets[i], visited)
                    kept.append(c)
                    i += 1
                elif self._touches(c, visited):
                    self._merge_into(c, None, visited)
                    kept.append(c)
            for t in targets[i:]:
                t.parent = node
                kept.append(t)
            if kept:
                out[key] = kept
            if key in new.arrays:
                node.arrays.add(key)
        for key, kids in node.kids.items():
            if key in new.kids:
                continue
            kept = []
            for c in kids:
                if c in visited:
                    kept.append(c)
                elif self._touches(c, visited):
                    self._merge_into(c, None, visited)
                    kept.append(c)
            if kept:
                out[key] = kept
        _detach_dropped(node.kids, out)
        node.kids = out
        node.value = new.value

    def _merge_into(self, c: _Node, target: _Node | None, visited: set) -> None:
        if target is None:
            target = _Node(c.name, c.key, c.type, c.tpath, c.parent, c.prim)
        if c.prim and target.prim:
            c.value = target.value
            if c not in visited:
                kept = {k: [x for x in ks if self._touches(x, visited)] for k, ks in c.kids.items()}
                kept = {k: ks for k, ks in kept.items() if ks}
                _detach_dropped(c.kids, kept)
                c.kids = kept
                for k, ks in target.kids.items():
                    for x in ks:
                        x.parent = c
                    c.kids.setdefault(k, []).extend(ks)
            return
        self._merge(c, target, visited)

    @staticmethod
    def _touches(node: _Node, visited: set) -> bool:
        if node in visited:
            return True
        return any(DeidEngine._touches(c, visited) for c in node.children())

    @staticmethod
    def _mark(node: _Node, visited: set) -> None:
        visited.add(node)
        for c in node.children():
            if not c.is_resource:
                DeidEngine._mark(c, visited)

    def _perturb(self, node: _Node, settings: dict, run: _Run) -> None:
        target = None
        if node.prim and (node.type in _NUMERIC or (node.type is None and isinstance(
                node.value, (int, float)) and not isinstance(node.value, bool))):
            target = node
        elif node.type in _QUANTITY:
            target = node.first("value")
        if target is None or target.value is None or target in run.visited \
                or isinstance(target.value, bool) or not isinstance(target.value, (int, float)):
            return
        v = target.value
        span = float(settings["span"])
        if str(settings.get("rangeType", "fixed")).lower() == "proportional":
            span *= abs(v)
        noisy = v + self.rng.uniform(-span / 2, span / 2)
        integer = target.type in ("integer", "positiveInt", "unsignedInt", "integer64") or (
            target.type is None and isinstance(v, int))
        if integer:
            new: float | int = int(round(noisy))
            if target.type == "positiveInt" and new <= 0:
                new = 1
            if target.type == "unsignedInt" and new < 0:
                new = 0
        else:
            r = settings.get("roundTo")
            new = round(noisy, 2 if r is None else r)
            if new == math.floor(new) and (r == 0):
                new = int(new)
        target.value = new
        self._mark(node, run.visited)
        run.record("perturb")

    def _generalize(self, node: _Node, rule: Rule, run: _Run) -> None:
        if node.value is None:
            return
        data = ResourceNode.create_node(node.value, node.type)
        try:
            for cond, target in rule.cases:
                hit = apply_parsed_path(data, cond, {}, _MODEL, {})
                if hit == [True]:
                    out = apply_parsed_path(data, target, {}, _MODEL, {})
                    node.value = _scalar(out[0]) if out else None
                    run.record("generalize")
                    return
        except DeidProcessingError:
            raise
        except Exception as exc:  # fhirpathpy raises plain exceptions
            raise DeidProcessingError(f"generalize failed on {node.name} "
                                      f"({type(exc).__name__})") from None
        if str(rule.settings.get("otherValues", "redact")).lower() == "redact":
            node.value = None
        run.record("generalize")

    # ------------------------------------------------------------------ labels
    def _label(self, res: _Node, ops: set[str]) -> None:
        meta = res.first("meta")
        if meta is None:
            name, t, tp = _child_type(res, "meta")
            meta = _Node(name, "meta", t, tp, res, False)
            kids = {}
            for k, v in res.kids.items():
                kids[k] = v
                if k == "id":
                    kids["meta"] = [meta]
            if "meta" not in kids:
                kids = {"meta": [meta], **kids}
            res.kids = kids
        have = {str(c.first("code").value) for c in meta.kids.get("security", [])
                if c.first("code") is not None}
        for op in _LABELS:
            if op not in ops:
                continue
            system, code, display = _LABELS[op]
            if code in have:
                continue
            coding = {"system": system, "code": code, "display": display} if system else \
                {"code": code, "display": display}
            n = _build_value(coding, None, "security", "security", "Coding", "Coding", meta)
            meta.kids.setdefault("security", []).append(n)
            meta.arrays.add("security")
            have.add(code)


def _scalar(v):
    if isinstance(v, ResourceNode):
        v = v.data
    if isinstance(v, FP_Type):
        return str(v)
    return v


# ------------------------------------------------------------------ re-identification
def reidentify_resource(resource: dict, key: bytes, contexts: Iterable[str] = ("value",)) -> dict:
    """Turn the pseudonyms of a de-identified resource back (a holder of the key only).

    Resource ids and the id parts of references are tried with context ``id``; other values
    with ``contexts`` then ``id``. The ``PSEUDED`` security label is removed.

    Raises:
        PseudonymError: a pseudonym that this key does not open.
    """
    ctx = tuple(contexts)

    def undo(s: str, first: tuple[str, ...]) -> str:
        if not psn.is_pseudonym(s):
            return s
        last = None
        for c in first + tuple(x for x in ctx + ("id",) if x not in first):
            try:
                return psn.reidentify(s, key, c)
            except psn.PseudonymError as exc:
                last = exc
        raise last  # type: ignore[misc]

    def walk(obj, name=None, in_resource=False):
        if isinstance(obj, dict):
            is_res = isinstance(obj.get("resourceType"), str)
            out = {}
            for k, v in obj.items():
                if is_res and k == "id" and isinstance(v, str):
                    out[k] = undo(v, ("id",))
                elif k in ("reference", "fullUrl", "url", "location") and isinstance(v, str):
                    idf = lambda s: undo(s, ("id",))  # noqa: E731
                    ident = lambda s: s  # noqa: E731
                    out[k] = transform_reference(v, idf, ident, ident, lambda s: undo(s, ctx),
                                                 lambda s: undo(s, ctx))
                else:
                    out[k] = walk(v, k, is_res)
            if is_res and isinstance(out.get("meta"), dict):
                sec = out["meta"].get("security")
                if isinstance(sec, list):
                    sec = [s for s in sec
                           if not (isinstance(s, dict) and s.get("code") == "PSEUDED")]
                    if sec:
                        out["meta"]["security"] = sec
                    else:
                        out["meta"].pop("security")
            return out
        if isinstance(obj, list):
            return [walk(x, name, in_resource) for x in obj]
        if isinstance(obj, str):
            return undo(obj, ctx)
        return obj

    return walk(copy.deepcopy(resource))
