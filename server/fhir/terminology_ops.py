"""Terminology operations of the REST API: input parameters to ``terminologies.operations``
calls and back (FHIR R4 §4.8.15 CodeSystem, §4.9.18 ValueSet, §4.10.14 ConceptMap).

The logic is in ``terminologies.operations``; this module maps each operation's FHIR
parameter names to the function's arguments, fills in what an instance-level call
(``CodeSystem/{id}/$lookup``) implies, and turns ``TerminologyError`` into the server's
errors (``server.errors.from_terminology``). No Flask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from server.errors import InvalidRequest, NotFound, from_terminology
from terminologies.errors import TerminologyError
from terminologies.operations import (codesystem_lookup, codesystem_subsumes,
                                      codesystem_validate_code, conceptmap_translate,
                                      valueset_expand, valueset_validate_code)
from terminologies.operations.parameters import as_bool, as_int, parse_parameters

#: How many codes one ``$expand`` page may hold (larger: 422 too-costly; use count/offset).
MAX_EXPANSION = 100_000

_STR, _CODING, _CC, _RES, _BOOL, _INT, _LIST = "str", "Coding", "CodeableConcept", "resource", "bool", "int", "list"


@dataclass(frozen=True)
class Operation:
    """One operation: ``params`` maps FHIR parameter name -> (argument, kind)."""

    func: Callable[..., dict]
    params: dict[str, tuple[str, str]]
    instance: Callable[[dict], dict[str, Any]]        # arguments implied by the resource
    extra: dict[str, Any] = field(default_factory=dict)


def _cs_instance(system_arg: str) -> Callable[[dict], dict]:
    return lambda body: {system_arg: body.get("url"), "version": body.get("version")}


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("CodeSystem", "lookup"): Operation(codesystem_lookup.lookup, {
        "system": ("system", _STR), "code": ("code", _STR), "version": ("version", _STR),
        "coding": ("coding", _CODING), "displayLanguage": ("display_language", _STR),
        "property": ("properties", _LIST)}, _cs_instance("system")),
    ("CodeSystem", "validate-code"): Operation(codesystem_validate_code.validate_code, {
        "url": ("url", _STR), "code": ("code", _STR), "version": ("version", _STR),
        "display": ("display", _STR), "coding": ("coding", _CODING),
        "codeableConcept": ("codeable_concept", _CC)}, _cs_instance("url")),
    ("CodeSystem", "subsumes"): Operation(codesystem_subsumes.subsumes, {
        "system": ("system", _STR), "codeA": ("code_a", _STR), "codeB": ("code_b", _STR),
        "codingA": ("coding_a", _CODING), "codingB": ("coding_b", _CODING),
        "version": ("version", _STR)}, _cs_instance("system")),
    ("ValueSet", "expand"): Operation(valueset_expand.expand, {
        "url": ("url", _STR), "valueSet": ("valueset", _RES), "valueSetVersion": ("version", _STR),
        "filter": ("filter", _STR), "count": ("count", _INT), "offset": ("offset", _INT),
        "activeOnly": ("active_only", _BOOL), "includeDesignations": ("include_designations", _BOOL)},
        lambda body: {"valueset": body}, {"max_size": MAX_EXPANSION}),
    ("ValueSet", "validate-code"): Operation(valueset_validate_code.validate_code, {
        "url": ("url", _STR), "valueSet": ("valueset", _RES), "valueSetVersion": ("value_set_version", _STR),
        "system": ("system", _STR), "systemVersion": ("system_version", _STR), "code": ("code", _STR),
        "display": ("display", _STR), "coding": ("coding", _CODING),
        "codeableConcept": ("codeable_concept", _CC)}, lambda body: {"valueset": body}),
    ("ConceptMap", "translate"): Operation(conceptmap_translate.translate, {
        "url": ("url", _STR), "conceptMap": ("conceptmap", _RES),
        "conceptMapVersion": ("conceptmap_version", _STR), "system": ("system", _STR),
        "code": ("code", _STR), "version": ("version", _STR), "coding": ("coding", _CODING),
        "codeableConcept": ("codeable_concept", _CC), "source": ("source", _STR),
        "target": ("target", _STR), "targetsystem": ("targetsystem", _STR),
        "reverse": ("reverse", _BOOL)}, lambda body: {"conceptmap": body}),
}

#: Operation names per resource type (routes and the CapabilityStatement use this).
OPERATION_NAMES: dict[str, tuple[str, ...]] = {}
for _t, _n in OPERATIONS:
    OPERATION_NAMES.setdefault(_t, ())
    OPERATION_NAMES[_t] += (_n,)

DEFINITIONS = {
    ("CodeSystem", "lookup"): "http://hl7.org/fhir/OperationDefinition/CodeSystem-lookup",
    ("CodeSystem", "validate-code"): "http://hl7.org/fhir/OperationDefinition/CodeSystem-validate-code",
    ("CodeSystem", "subsumes"): "http://hl7.org/fhir/OperationDefinition/CodeSystem-subsumes",
    ("ValueSet", "expand"): "http://hl7.org/fhir/OperationDefinition/ValueSet-expand",
    ("ValueSet", "validate-code"): "http://hl7.org/fhir/OperationDefinition/ValueSet-validate-code",
    ("ConceptMap", "translate"): "http://hl7.org/fhir/OperationDefinition/ConceptMap-translate",
}


def _coding_from_text(text: str, name: str) -> dict:
    """A Coding given in a query string as ``system|code`` (the token syntax)."""
    system, sep, code = text.partition("|")
    if not sep or not code:
        raise InvalidRequest(f"'{name}' in a query string must be system|code")
    return {"system": system, "code": code} if system else {"code": code}


def _convert(name: str, kind: str, values: list) -> Any:
    if kind == _LIST:
        out: list[str] = []
        for v in values:      # repeated, or comma-separated in a query string
            out += [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else [v]
        return out
    if len(values) > 1:
        raise InvalidRequest(f"Parameter '{name}' may occur only once")
    v = values[0]
    if kind == _STR:
        if not isinstance(v, str):
            raise InvalidRequest(f"Parameter '{name}' must be a primitive value")
        return v
    if kind == _BOOL:
        return as_bool(v, name)
    if kind == _INT:
        return as_int(v, name)
    if kind == _CODING:
        if isinstance(v, str):
            return _coding_from_text(v, name)
        if not isinstance(v, dict):
            raise InvalidRequest(f"Parameter '{name}' must be a Coding")
        return v
    if kind in (_CC, _RES):
        if not isinstance(v, dict):
            raise InvalidRequest(f"Parameter '{name}' must be sent in a Parameters body (POST)")
        return v
    raise AssertionError(kind)  # pragma: no cover


def arguments(op: Operation, params: dict | list[tuple[str, str]]) -> dict[str, Any]:
    """Keyword arguments of ``op.func`` from a Parameters body or query pairs.

    Parameters the operation does not use (``date``, ``_format``...) are ignored, as
    FHIR R4 §2.36 (operations) lets a server do for parameters it does not support.
    """
    try:
        parsed = parse_parameters(params)
    except TerminologyError as exc:
        raise from_terminology(exc) from exc
    kwargs: dict[str, Any] = {}
    for name, values in parsed.items():
        if name in op.params and values:
            arg, kind = op.params[name]
            try:
                kwargs[arg] = _convert(name, kind, values)
            except TerminologyError as exc:
                raise from_terminology(exc) from exc
    return kwargs


def run_operation(provider, read_body: Callable[[str, str], dict], res_type: str,
                  res_id: str | None, name: str, params: dict | list[tuple[str, str]]) -> dict:
    """Run ``{res_type}[/{res_id}]/${name}``; returns Parameters or a ValueSet.

    Args:
        provider: a terminology provider (``refresh()`` is called when it has one).
        read_body: ``(type, id) -> resource dict`` for instance-level calls (raises
            NotFound/Gone).
        params: a ``Parameters`` resource (POST) or the query's (name, value) pairs (GET).
    """
    op = OPERATIONS.get((res_type, name))
    if op is None:
        raise NotFound(f"Operation {res_type}/${name} is not known")
    kwargs = {**op.extra, **arguments(op, params)}
    if res_id is not None:
        implied = op.instance(read_body(res_type, res_id))
        for arg, value in implied.items():
            if arg in kwargs and kwargs[arg] != value and value is not None and arg != "version":
                raise InvalidRequest(f"Parameter for '{arg}' conflicts with {res_type}/{res_id}")
            if value is not None:
                kwargs[arg] = value
    if hasattr(provider, "refresh"):
        provider.refresh()
    try:
        if isinstance(kwargs.get("valueset"), dict) and hasattr(provider, "prefetch_value_set"):
            provider.prefetch_value_set(kwargs["valueset"])
        return op.func(provider, **kwargs)
    except TerminologyError as exc:
        raise from_terminology(exc) from exc
