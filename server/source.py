"""The source protocol: what every FHIR route talks to, real store or synthetic cohort.

Routes call a :class:`Source` with a :class:`RequestContext`; they never know which
kind of source they hold. Access control and audit hook in at this boundary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class RequestContext:
    """Who asks, with what rights, and how links must be written.

    Attributes:
        base_url: the FHIR base as the client called it (e.g. ``http://h:8080/fhir``).
        caller: authenticated client id (``anonymous`` when auth is off).
        scopes: granted SMART scopes (empty = unrestricted while auth is off).
        patient: patient id the caller is bound to (patient compartment), if any.
        handling: ``lenient`` or ``strict`` for unknown search parameters.
        prefer_return: ``minimal`` / ``representation`` / ``OperationOutcome``.
        claims: the verified access token (:class:`server.auth.tokens.TokenClaims`), or
            None when the request carried none.
        purpose: purpose of use of the caller (``research`` excludes patients whose
            Consent denies research use).
        deidentified: the caller may only receive de-identified data.
        channel: ``fhir``, ``dicomweb``, ``dimse`` or ``cli`` (audit and errors).
        remote: the peer's network address (audit).
        query: the request as the client sent it (method, path and query; audit).
    """

    base_url: str = ""
    caller: str = "anonymous"
    scopes: tuple[str, ...] = ()
    patient: str | None = None
    handling: str = "lenient"
    prefer_return: str = "representation"
    request_id: str = ""
    claims: Any = None
    purpose: str = ""
    deidentified: bool = False
    channel: str = "fhir"
    remote: str = ""
    query: str = ""


@dataclass
class StoredResource:
    """One version of a resource as stored: the JSON bytes are served as they are."""

    res_type: str
    res_id: str
    version: int
    last_updated: float        # epoch seconds UTC
    deleted: bool = False
    body: bytes | None = None  # JSON incl. meta.versionId / meta.lastUpdated
    method: str = "PUT"

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


@dataclass
class WriteResult:
    """Outcome of a create/update/patch/delete."""

    status: int                       # 200, 201, 204 ...
    resource: StoredResource | None = None
    outcome: dict | None = None       # OperationOutcome for warnings/information


@dataclass
class SearchResult:
    """A page of search results and what is needed to build its Bundle."""

    matches: list[StoredResource]
    includes: list[StoredResource] = field(default_factory=list)
    total: int | None = None
    self_params: list[tuple[str, str]] = field(default_factory=list)
    next_params: list[tuple[str, str]] | None = None
    prev_params: list[tuple[str, str]] | None = None
    warnings: list[str] = field(default_factory=list)
    summary_count: bool = False
    elements: list[str] | None = None
    summary: str | None = None


class Source(Protocol):
    """What the FHIR REST layer needs from a source."""

    name: str
    writable: bool

    def capabilities(self) -> dict[str, Any]: ...
    def read(self, ctx: RequestContext, res_type: str, res_id: str) -> StoredResource: ...
    def vread(self, ctx: RequestContext, res_type: str, res_id: str, version: int) -> StoredResource: ...
    def search(self, ctx: RequestContext, res_type: str | None,
               params: list[tuple[str, str]]) -> SearchResult: ...
    def history(self, ctx: RequestContext, res_type: str | None, res_id: str | None,
                params: list[tuple[str, str]]) -> SearchResult: ...
    def create(self, ctx: RequestContext, res_type: str, body: dict,
               if_none_exist: str | None = None) -> WriteResult: ...
    def update(self, ctx: RequestContext, res_type: str, res_id: str, body: dict,
               if_match: str | None = None) -> WriteResult: ...
    def conditional_update(self, ctx: RequestContext, res_type: str,
                           params: list[tuple[str, str]], body: dict) -> WriteResult: ...
    def patch(self, ctx: RequestContext, res_type: str, res_id: str, patch: list,
              if_match: str | None = None) -> WriteResult: ...
    def delete(self, ctx: RequestContext, res_type: str, res_id: str) -> WriteResult: ...
    def conditional_delete(self, ctx: RequestContext, res_type: str,
                           params: list[tuple[str, str]]) -> WriteResult: ...
    def bundle(self, ctx: RequestContext, bundle: dict) -> dict: ...
    def everything(self, ctx: RequestContext, patient_id: str,
                   params: list[tuple[str, str]]) -> SearchResult: ...
    def operation(self, ctx: RequestContext, res_type: str, res_id: str | None, name: str,
                  params: dict | list[tuple[str, str]]) -> dict:
        """Run ``{res_type}[/{res_id}]/${name}`` (terminology operations: ``$lookup``,
        ``$validate-code``, ``$subsumes``, ``$expand``, ``$translate``) with a Parameters
        body or the query's pairs; returns the output resource (Parameters, ValueSet)."""
        ...


_REFERENCE = re.compile(rb'"reference"\s*:\s*"((?:[^"\\]|\\.)*)"')


def patients_in_json(res_type: str, res_id: str | None, body: bytes) -> set[str] | None:
    """Ids of the patients a resource's JSON bytes are about, without parsing them: itself
    if a Patient, and every ``Patient/<id>`` reference (the Patient compartment as
    ``$everything`` takes it). None when a reference string holds a JSON escape: the
    caller parses the body instead."""
    out: set[str] = {res_id} if res_type == "Patient" and res_id else set()
    for raw in _REFERENCE.findall(body):
        if b"\\" in raw:
            return None
        if b"Patient/" in raw:
            pid = raw.rsplit(b"Patient/", 1)[1].split(b"/")[0]
            if pid:
                out.add(pid.decode())
    return out
