"""Parse FHIR ``Parameters`` (or query-string pairs) into plain Python values, and
build ``Parameters`` for operation outputs."""
from __future__ import annotations

from typing import Any, Iterable

from ..errors import InvalidRequest


def _unwrap(param: dict) -> Any:
    if "resource" in param:
        return param["resource"]
    if "part" in param:
        return parse_parameters({"resourceType": "Parameters", "parameter": param["part"]})
    for k, v in param.items():
        if k.startswith("value") and len(k) > 5 and k[5].isupper():
            return v
    return None


def parse_parameters(params: dict | Iterable[tuple[str, Any]]) -> dict[str, list]:
    """Parse operation input.

    Args:
        params: a FHIR ``Parameters`` resource, or ``(name, value)`` pairs (query string).

    Returns:
        ``name -> [values]``. ``valueX`` is unwrapped (a Coding or CodeableConcept stays
        a dict, a ValueSet/ConceptMap ``resource`` is returned as the resource dict,
        parameters with ``part`` become a dict of their parsed parts).

    Raises:
        InvalidRequest: not a Parameters resource, or a parameter without a name.
    """
    out: dict[str, list] = {}
    if isinstance(params, dict):
        if params.get("resourceType") != "Parameters":
            raise InvalidRequest("expected a Parameters resource")
        for p in params.get("parameter") or ():
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                raise InvalidRequest("every Parameters.parameter needs a name")
            out.setdefault(p["name"], []).append(_unwrap(p))
        return out
    for name, value in params:
        out.setdefault(name, []).append(value)
    return out


def first(parsed: dict[str, list], name: str, default: Any = None) -> Any:
    """The single value of ``name`` (InvalidRequest when repeated)."""
    values = parsed.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name!r} may occur only once")
    return values[0]


def as_bool(value: Any, name: str = "parameter") -> bool:
    """A boolean from a JSON boolean or the query-string text ``true``/``false``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidRequest(f"{name} must be true or false, not {value!r}")


def as_int(value: Any, name: str = "parameter", minimum: int = 0) -> int:
    """A non-negative integer from JSON or query-string text."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be an integer, not {value!r}") from None
    if isinstance(value, float) and value != n or n < minimum:
        raise InvalidRequest(f"{name} must be an integer >= {minimum}, not {value!r}")
    return n


def _param(name: str, value: Any) -> dict:
    if isinstance(value, dict) and any(k.startswith(("value", "part", "resource")) for k in value):
        return {"name": name, **value}
    if isinstance(value, bool):
        return {"name": name, "valueBoolean": value}
    if isinstance(value, int):
        return {"name": name, "valueInteger": value}
    if isinstance(value, float):
        return {"name": name, "valueDecimal": value}
    if isinstance(value, list):  # parts given as (name, value) pairs
        return {"name": name, "part": [_param(n, v) for n, v in value]}
    return {"name": name, "valueString": str(value)}


def to_parameters(items: Iterable[tuple[str, Any]]) -> dict:
    """Build a FHIR ``Parameters`` resource from ``(name, value)`` pairs.

    A value is a ready-made parameter element when it is a dict whose keys start with
    ``value``, ``part`` or ``resource``; a list is taken as ``(name, value)`` parts;
    otherwise the type is inferred (bool -> valueBoolean, int -> valueInteger,
    float -> valueDecimal, anything else -> valueString). None values are skipped.
    """
    return {"resourceType": "Parameters",
            "parameter": [_param(n, v) for n, v in items if v is not None]}


def value_element(value: Any, fhir_type: str | None = None) -> dict:
    """``{"valueX": value}`` for a property value (``fhir_type`` from the property
    definition when known)."""
    key = {
        "code": "valueCode", "Coding": "valueCoding", "string": "valueString",
        "integer": "valueInteger", "boolean": "valueBoolean", "dateTime": "valueDateTime",
        "decimal": "valueDecimal",
    }.get(fhir_type or "")
    if key is None:
        if isinstance(value, bool):
            key = "valueBoolean"
        elif isinstance(value, int):
            key = "valueInteger"
        elif isinstance(value, float):
            key = "valueDecimal"
        elif isinstance(value, dict):
            key = "valueCoding"
        else:
            key = "valueString"
    return {key: value}
