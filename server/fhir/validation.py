"""Resource validation with fhir.resources (its R4B models accept R4 content).

Errors name the offending element as a FHIRPath (``Patient.name[0].family``) so the
OperationOutcome tells a client exactly what to fix.

Speed: fhir.resources validates every complex element (CodeableConcept, Reference, Meta …)
by a Python-level call into that element's model, and the same element values recur over
and over (ingest of 120 Synthea patients: 65,000 CodeableConcepts, 640 distinct). Inside
:func:`validate` an element value that already validated as the same model is not
validated again (see :class:`_ElementCache`); a value that fails is never cached, so
errors and their messages are exactly those of fhir.resources.
"""
from __future__ import annotations

import functools
import gc
import re
from contextvars import ContextVar

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from server.errors import InvalidResource
from server.fhir.searchparams import RESOURCE_TYPES

_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 datatypes §2.24.0.1 (id)


@functools.cache
def model_class(res_type: str):
    return get_fhir_model_class(res_type)


class _ElementCache:
    """Memo of complex-element values that validated, per element model.

    The key is the value's JSON serialisation. An entry is stored only for a value that is
    plain JSON data equal to its own round trip (``orjson.loads(key) == value``: no tuples,
    NaN, UUIDs, enums, subclasses …), and that round trip is kept with it; a lookup hits
    only when the value serialises to the key *and* equals the kept round trip. So a hit
    is a value that is the very same JSON as one that validated, and validates alike:
    fhir.resources validates an element from its value and model alone (no context).
    Elements that rarely repeat (hit rate under ``MIN_HIT_RATE`` after ``PROBE``
    lookups) stop being cached; each model keeps at most ``MAX_ENTRIES`` values.
    """

    PROBE = 2000
    MIN_HIT_RATE = 0.2
    MAX_ENTRIES = 20_000
    # Types orjson would write as something else (datetime as a string, a str subclass as
    # a str …) raise instead: such a value is validated uncached.
    _DUMPS_OPTS = (orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATETIME
                   | orjson.OPT_PASSTHROUGH_DATACLASS)

    def __init__(self):
        self.models: dict[type, _Memo] = {}

    def validate(self, orig, cls, value: dict, model_klass):
        """``orig(cls, value, model_klass)``, or the model it returned for the same JSON."""
        memo = self.models.get(model_klass)
        if memo is None:
            memo = self.models.setdefault(model_klass, _Memo())
        if memo.off:
            return orig(cls, value, model_klass)
        try:
            key = orjson.dumps(value, option=self._DUMPS_OPTS)
        except TypeError:        # not plain JSON data (int over 64 bits, datetime …)
            return orig(cls, value, model_klass)
        memo.lookups += 1
        found = memo.entries.get(key)
        if found is not None and found[0] == value:
            memo.hits += 1
            return found[1]
        out = orig(cls, value, model_klass)   # raises for an invalid value: nothing stored
        if memo.lookups >= self.PROBE and memo.hits < self.MIN_HIT_RATE * memo.lookups:
            memo.off = True
            memo.entries = {}
            return out
        plain = orjson.loads(key)
        if plain == value:
            if len(memo.entries) >= self.MAX_ENTRIES:
                memo.entries = {}
            memo.entries[key] = (plain, out)
        return out


class _Memo:
    """One element model's entries (key -> (plain value, model)) and hit statistics."""

    __slots__ = ("entries", "lookups", "hits", "off")

    def __init__(self):
        self.entries: dict[bytes, tuple[dict, object]] = {}
        self.lookups = 0
        self.hits = 0
        self.off = False


_ELEMENTS = _ElementCache()
_IN_VALIDATE: ContextVar[bool] = ContextVar("synthport_in_validate", default=False)


def _install_element_cache() -> bool:
    """Route fhir.resources' element validation through :data:`_ELEMENTS` inside
    :func:`validate` only (elsewhere models may be built and mutated: no sharing there)."""
    try:
        from fhir_core.types import FhirBase
        orig = FhirBase.__dict__["fhir_model_validator"].__func__
    except (ImportError, KeyError, AttributeError):   # another fhir_core: validate uncached
        return False
    if getattr(orig, "_synthport_cached", False):
        return True

    def fhir_model_validator(cls, value, model_klass):
        if type(value) is dict and _IN_VALIDATE.get():
            return _ELEMENTS.validate(orig, cls, value, model_klass)
        return orig(cls, value, model_klass)

    fhir_model_validator._synthport_cached = True
    FhirBase.fhir_model_validator = classmethod(fhir_model_validator)
    return True


ELEMENT_CACHE = _install_element_cache()


# Validation builds and drops ~20 pydantic models per resource: with the default gen-0
# threshold (700) the collector ran every few resources and, walking the thousands of
# long-lived FHIR model classes each full pass, took a quarter of the CPU of an ingest.
GC_THRESHOLD = (20_000, 50, 100)      # a server: a young collection stays ~1 ms
GC_THRESHOLD_BULK = (100_000, 20, 100)  # the loader: throughput only (GC 19 -> 11 us/resource)


def tune_gc(threshold: tuple[int, int, int] = GC_THRESHOLD) -> tuple[int, int, int]:
    """For a process that validates resources in bulk (loader worker, server worker):
    freeze what is alive now (modules, models: never garbage) and collect less often.
    Returns the previous thresholds (``gc.set_threshold(*old); gc.unfreeze()`` undoes it)."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*threshold)
    return old


def _fhirpath(res_type: str, loc: tuple) -> str:
    out = res_type
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or str(part) in {"__root__"}:
            continue
        else:
            out += f".{part}"
    return out


def check_type(res_type: str) -> None:
    """Raise NotFound-like InvalidRequest for a type that is not an R4 resource."""
    from server.errors import NotFound

    if res_type not in RESOURCE_TYPES:
        raise NotFound(f"Unknown resource type '{res_type}'")


def valid_id(res_id: str) -> bool:
    return bool(_ID_RE.match(res_id or ""))


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# The same in orjson's output, which escapes them as \b, \f and \u00XX (tab, CR, LF
# as \t, \r, \n): an escape preceded by an even run of backslashes (an escaped
# backslash followed by "b" is text).
_CONTROL_ESCAPED = re.compile(rb"(?<!\\)(?:\\\\)*\\(?:u00[01][0-9a-fA-F]|[bf])")


def _control_character(body: object, path: str) -> str | None:
    """The path of the first string (key or value) with a control character, or None.

    pydantic's str accepts them; PostgreSQL text refuses NUL outright (the search index
    would fail with a 500), and no FHIR string may hold them. Serialising with orjson
    and searching its escapes costs a fraction of walking the resource in Python (which
    cost a quarter of a warm validation); the walk runs only to name the path."""
    try:
        data = orjson.dumps(body)
        if (b"\\u00" not in data and b"\\b" not in data and b"\\f" not in data) \
                or not _CONTROL_ESCAPED.search(data):
            return None
    except TypeError:       # not JSON-serialisable: the walk below decides
        pass
    stack = [(body, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            if _CONTROL.search(node):
                return where
        elif isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and _CONTROL.search(key):
                    return where
                stack.append((value, f"{where}.{key}"))
        elif isinstance(node, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node))
    return None


def validate(body: object, expected_type: str | None = None) -> dict:
    """Validate one resource dict; return it unchanged or raise InvalidResource.

    Args:
        body: the parsed JSON.
        expected_type: the type named by the URL, if any (must match).
    """
    if not isinstance(body, dict):
        raise InvalidResource("Resource body must be a JSON object")
    res_type = body.get("resourceType")
    if not isinstance(res_type, str) or not res_type:
        raise InvalidResource("Resource has no resourceType", ["resourceType"])
    if expected_type and res_type != expected_type:
        raise InvalidResource(f"resourceType '{res_type}' does not match the URL type "
                              f"'{expected_type}'", ["resourceType"])
    if res_type not in RESOURCE_TYPES:
        raise InvalidResource(f"Unknown resource type '{res_type}'", ["resourceType"])
    if "id" in body and not (isinstance(body["id"], str) and valid_id(body["id"])):
        raise InvalidResource("Resource id must match [A-Za-z0-9-.]{1,64}", [f"{res_type}.id"])
    where = _control_character(body, res_type)
    if where:
        raise InvalidResource(f"{where}: a string holds a control character (FHIR R4 "
                              "datatypes §2.24.0.1: none below U+0020 but tab, CR and LF)",
                              [where])
    token = _IN_VALIDATE.set(True)
    try:
        model_class(res_type).model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        paths = [_fhirpath(res_type, e["loc"]) for e in errors]
        first = errors[0]
        msg = (f"{len(errors)} validation error(s) in {res_type}; first at "
               f"{paths[0]}: {first['msg']}")
        issues = [{"severity": "error", "code": "structure", "diagnostics": f"{p}: {e['msg']}",
                   "expression": [p]} for p, e in zip(paths[1:20], errors[1:20])]
        raise InvalidResource(msg, [paths[0]], issues) from None
    except RecursionError:
        # Each level of nesting costs the validator several Python frames: a body nested
        # a few hundred levels deep (extension in extension ...) is refused, not a 500.
        raise InvalidResource(f"{res_type} is nested too deeply to validate") from None
    except (ValueError, TypeError) as exc:
        raise InvalidResource(f"Invalid {res_type}: {exc}") from None
    finally:
        _IN_VALIDATE.reset(token)
    return body
