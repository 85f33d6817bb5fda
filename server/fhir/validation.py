"""Resource validation with fhir.resources (its R4B models accept R4 content).

Errors name the offending element as a FHIRPath (``Patient.name[0].family``) so the
OperationOutcome tells a client exactly what to fix.
"""
from __future__ import annotations

import functools
import re

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from server.errors import InvalidResource
from server.fhir.searchparams import RESOURCE_TYPES

_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 datatypes §2.24.0.1 (id)


@functools.cache
def model_class(res_type: str):
    return get_fhir_model_class(res_type)


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
    except (ValueError, TypeError) as exc:
        raise InvalidResource(f"Invalid {res_type}: {exc}") from None
    return body
