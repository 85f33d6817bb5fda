"""Access control, consent and audit at the source boundary.

Every FHIR, DICOMweb and DIMSE request reaches a source through one of the two guards
below, so that the rules sit in one place:

* :class:`GuardedSource` wraps a FHIR :class:`server.source.Source`;
* :class:`GuardedDicomSource` wraps a :class:`server.dicom.source.DicomSource`.

For each call a guard (1) checks the caller's SMART v2 scopes (SMART App Launch v2
§"Scopes"), (2) narrows the result to the token's patient compartment when only
``patient/`` scopes permit it, and to the resources that granular scopes name,
(3) leaves out patients whose Consent denies research use when the caller's purpose is
research, (4) de-identifies DICOM for de-identified access, and (5) appends one
AuditEvent (IHE BALP) to the tamper-evident log — inside the write's own transaction
for FHIR writes, so a write whose audit entry cannot be written does not happen.

Decisions a newcomer may question are in docs/adr/0007-access-control.md: a resource
outside the caller's compartment answers 404 (not 403) so its existence does not leak;
``user/`` scopes act like ``system/`` (synthport has no user directory); the Patient
compartment is "any reference to Patient/<id>", as ``$everything`` takes it.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson
from sqlalchemy import select

from server.auth.scopes import ScopeSet
from server.errors import (Forbidden, InternalError, MethodNotAllowed, NotFound,
                           SynthportError, Unauthorized, describe)
from server.source import (RequestContext, SearchResult, StoredResource, WriteResult,
                           patients_in_json)

log = logging.getLogger("synthport.access")

# FHIR R4 restful-interaction codes (BALP subtype) and DICOM audit actions.
ACTION = {"read": "R", "vread": "R", "search-type": "E", "search-system": "E",
          "history-instance": "R", "history-type": "R", "history-system": "R",
          "create": "C", "update": "U", "patch": "U", "delete": "D", "operation": "E",
          "batch": "E", "transaction": "E"}
NON_PATIENT_OK = {"Patient"}   # a Patient resource is always patient data
#: Seconds a DIMSE calling AE title's client (registry lookup) is remembered per process.
AE_CLIENT_TTL = 5.0


# --------------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Decision:
    """What one permitted call may see.

    Attributes:
        compartment: the patient id results are limited to, or None.
        filters: granular scope filters (alternatives of AND-ed search pairs), or None.
        research: leave out patients whose Consent denies research use.
    """

    compartment: str | None = None
    filters: list[tuple[tuple[str, str], ...]] | None = None
    research: bool = False

    @property
    def restricted(self) -> bool:
        return self.compartment is not None or self.filters is not None or self.research


OPEN = Decision()


class Policy:
    """Who may do what on one source.

    Args:
        enforce: whether tokens are required (``auth = required``).
        consent: a :class:`server.consent.ConsentPolicy` for research-purpose callers.
        audit: an :class:`server.audit.log.AuditLog`, or None when auditing is off.
        source_label: names the source in audit entries (``real``, ``synthetic/<name>``).
        clients: the client registry (DIMSE calling AE titles act as clients).
    """

    def __init__(self, *, enforce: bool, consent=None, audit=None, source_label: str = "real",
                 clients=None):
        self.enforce = enforce
        self.consent = consent
        self.audit = audit
        self.source_label = source_label
        self.clients = clients
        self._aet_cache: dict[str, tuple[float, Any]] = {}

    # -------------------------------------------------------------- who is asking
    def resolve(self, ctx: RequestContext) -> RequestContext:
        """Fill the claims of a DIMSE peer from the client registry (by calling AE)."""
        if ctx.claims is None and ctx.channel == "dimse" and self.clients is not None:
            client = self._client_by_aet(ctx.caller)
            if client is not None and client.active:
                from server.auth.tokens import TokenClaims

                claims = TokenClaims(client_id=client.client_id, scope=client.scopes, patient=None,
                                     purpose=client.purpose, deidentified=client.deidentified,
                                     exp=time.time() + 60, iat=time.time(), jti="")
                return replace(ctx, claims=claims, caller=client.client_id,
                               purpose=client.purpose, deidentified=client.deidentified)
        return ctx

    def _client_by_aet(self, aet: str):
        """The registry's client for a calling AE title, remembered for
        :data:`AE_CLIENT_TTL` seconds: a DIMSE peer sends one request per instance, and
        the lookup (a query) cost more than the rest of the check. A client changed or
        deactivated in the registry is seen after at most that long."""
        now = time.monotonic()
        hit = self._aet_cache.get(aet)
        if hit is not None and now - hit[0] < AE_CLIENT_TTL:
            return hit[1]
        client = self.clients.by_ae_title(aet)
        if len(self._aet_cache) > 1024:
            self._aet_cache.clear()
        self._aet_cache[aet] = (now, client)
        return client

    def check(self, ctx: RequestContext, res_type: str, perm: str) -> Decision:
        """Raise unless ``perm`` (one of ``cruds``) on ``res_type`` is permitted.

        Raises:
            Unauthorized: no (valid) token while tokens are required.
            Forbidden: the token's scopes do not permit it.
        """
        research = ctx.purpose == "research" and self.consent is not None
        if not self.enforce:
            return Decision(research=research) if research else OPEN
        if ctx.claims is None:
            raise Unauthorized("This source needs a bearer token (SMART Backend Services, "
                               "see /.well-known/smart-configuration)")
        contexts, filters = _scope_answer(ctx.claims.scope, res_type, perm)
        if contexts == {"patient"} and not ctx.patient:
            contexts = frozenset()
        if not contexts:
            word = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}[perm]
            raise Forbidden(f"The token's scopes do not permit {word} ('{perm}') on {res_type}")
        compartment = ctx.patient if contexts == {"patient"} else None
        return Decision(compartment=compartment, filters=None if filters is None else list(filters),
                        research=research)

    # -------------------------------------------------------------- visibility
    def excluded_patients(self, decision: Decision, patients: Iterable[str]) -> set[str]:
        if not decision.research or self.consent is None:
            return set()
        return self.consent.excluded(patients)

    def visible_body(self, decision: Decision, body: dict) -> bool:
        """Compartment and consent rules on one resource (granular filters apart)."""
        if not decision.compartment and not decision.research:
            return True
        refs = patient_refs(body)
        if decision.compartment is not None:
            if body.get("resourceType") == "Patient":
                if body.get("id") != decision.compartment:
                    return False
            elif refs and decision.compartment not in refs:
                return False
        if decision.research and refs and self.excluded_patients(decision, refs):
            return False
        return True

    # -------------------------------------------------------------- audit
    def record(self, ctx: RequestContext, subtype: str, outcome: str, *, patients: Iterable[str] = (),
               what: Iterable[str] = (), conn=None, description: str = "") -> None:
        """Append one AuditEvent; raises when it cannot be written."""
        if self.audit is None:
            return
        from server.audit.balp import audit_event

        event = audit_event(action=ACTION.get(subtype, "E"), subtype=subtype, outcome=outcome,
                            agent=ctx.caller or "anonymous", patients=sorted(set(patients)),
                            query=ctx.query or None, what=list(dict.fromkeys(what)),
                            source=self.source_label, recorded=time.time(),
                            description=description, network=ctx.remote,
                            request_id=ctx.request_id)
        try:
            self.audit.append(event, conn=conn) if conn is not None else self.audit.append(event)
        except Exception as exc:  # noqa: BLE001 - any failure to audit fails the request
            log.error("audit entry could not be written: %s", exc)
            raise InternalError("The audit log could not be written; the request was not "
                                "carried out") from exc


def audited(policy: Policy, ctx: RequestContext, subtype: str, fn: Callable[[], Any],
            patients_of: Callable[[Any], Iterable[str]] = lambda r: (),
            what_of: Callable[[Any], Iterable[str]] = lambda r: ()):
    """Run ``fn`` and append its audit entry: success with the patients and resources it
    touched, or the failure's outcome and message (then re-raise)."""
    try:
        result = fn()
    except SynthportError as exc:
        policy.record(ctx, subtype, outcome_code(exc), description=exc.message)
        raise
    except Exception as exc:
        policy.record(ctx, subtype, outcome_code(exc), description=type(exc).__name__)
        raise
    policy.record(ctx, subtype, "0", patients=patients_of(result), what=what_of(result))
    return result


@functools.lru_cache(maxsize=4096)
def _scope_answer(scope: str, res_type: str, perm: str) -> tuple[frozenset, tuple | None]:
    """What a granted scope string says of ``perm`` on ``res_type``: the contexts that
    permit it and the granular filters (ScopeSet). Parsed once per token text, not per
    request (a tenth of a read's CPU)."""
    scopes = ScopeSet(scope)
    filters = scopes.filters(res_type, perm)
    return frozenset(scopes.contexts(res_type, perm)), None if filters is None else tuple(filters)


def outcome_code(err: BaseException | None) -> str:
    """BALP outcome: 0 success, 4 minor failure (4xx), 8 serious failure (5xx)."""
    if err is None:
        return "0"
    if isinstance(err, SynthportError) and describe(err).http_status < 500:
        return "4"
    return "8"


def patient_refs(body: Any) -> set[str]:
    """Ids of the patients a resource is about: itself if a Patient, and every
    ``Patient/<id>`` it references (the Patient compartment as $everything takes it)."""
    out: set[str] = set()
    if isinstance(body, dict) and body.get("resourceType") == "Patient" and body.get("id"):
        out.add(str(body["id"]))
    _walk(body, out)
    return out


def _walk(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and "Patient/" in v:
                pid = v.rsplit("Patient/", 1)[1].split("/")[0]
                if pid:
                    out.add(pid)
            elif isinstance(v, (dict, list)):
                _walk(v, out)
    elif isinstance(node, list):
        for v in node:
            _walk(v, out)


def stored_patient_refs(stored: StoredResource) -> set[str]:
    """:func:`patient_refs` of a stored resource, from its JSON bytes without parsing them
    (every read is audited with its patients; parsing the body cost a tenth of a read).
    A reference string with a JSON escape in it falls back to parsing."""
    if not stored.body:
        return set()
    found = patients_in_json(stored.res_type, stored.res_id, stored.body)
    return patient_refs(_body(stored)) if found is None else found


def _body(stored: StoredResource) -> dict:
    return orjson.loads(stored.body) if stored.body else {}


# --------------------------------------------------------------------------- FHIR
class GuardedSource:
    """A FHIR source behind access control, consent and audit (same protocol)."""

    def __init__(self, inner, policy: Policy, audit_log=None):
        self.inner = inner
        self.policy = policy
        self.audit_log = audit_log
        self.name = inner.name
        self.writable = inner.writable

    def __getattr__(self, name: str):
        # config, engine, terminology ... : what bundle processing and tools read.
        if name == "compartments":   # unguarded bulk $everything: the store's own callers only
            raise AttributeError(name)
        return getattr(self.inner, name)

    def capabilities(self, *args) -> dict:
        return self.inner.capabilities(*args)

    # -------------------------------------------------------------- plumbing
    def _run(self, ctx: RequestContext, subtype: str, fn: Callable[[], Any],
             patients_of: Callable[[Any], Iterable[str]] = lambda r: (),
             what_of: Callable[[Any], Iterable[str]] = lambda r: ()):
        return audited(self.policy, ctx, subtype, fn, patients_of, what_of)

    def _write(self, ctx: RequestContext, subtype: str, fn: Callable[[], WriteResult | dict]):
        """Run a write with its audit entry appended inside the write's transaction."""
        from server.store import WRITE_HOOK

        done: list[bool] = []

        def hook(conn, stored: list[StoredResource], items: list | None = None) -> None:
            if done:
                return
            pats: set[str] = set()
            # The patients of most versions were found before the write lock
            # (PendingWrite.prepare); only the others are scanned here, under it.
            for s, it in zip(stored, items or [None] * len(stored)):
                if s.body:
                    known = getattr(it, "patients", None)
                    pats |= stored_patient_refs(s) if known is None else known
            self.policy.record(ctx, subtype, "0", patients=pats, conn=conn,
                               what=[f"{s.res_type}/{s.res_id}/_history/{s.version}" for s in stored])
            done.append(True)

        token = WRITE_HOOK.set(hook if self.policy.audit is not None else None)
        try:
            result = fn()
        except SynthportError as exc:
            WRITE_HOOK.reset(token)
            self.policy.record(ctx, subtype, outcome_code(exc), description=exc.message)
            raise
        except Exception as exc:
            WRITE_HOOK.reset(token)
            self.policy.record(ctx, subtype, outcome_code(exc), description=type(exc).__name__)
            raise
        WRITE_HOOK.reset(token)
        if not done:
            # Nothing was written (e.g. If-None-Exist matched): audit the request itself.
            what = []
            if isinstance(result, WriteResult) and result.resource is not None:
                what = [f"{result.resource.res_type}/{result.resource.res_id}"]
            self.policy.record(ctx, subtype, "0", what=what)
        return result

    def _deny_audit(self, ctx: RequestContext, subtype: str, res_type: str, perm: str) -> Decision:
        ctx2 = self.policy.resolve(ctx)
        try:
            return self.policy.check(ctx2, res_type, perm)
        except SynthportError as exc:
            self.policy.record(ctx2, subtype, outcome_code(exc), description=exc.message)
            raise

    def _visible(self, ctx: RequestContext, d: Decision, res_type: str,
                 items: list[StoredResource]) -> list[StoredResource]:
        """The items this decision may see: compartment, consent, granular filters."""
        if not d.restricted:
            return items
        keep = [s for s in items if s.body is None or self.policy.visible_body(d, _body(s))]
        if d.filters is not None and keep:
            keep = self._match_filters(ctx, d, res_type, keep)
        return keep

    def _match_filters(self, ctx, d: Decision, res_type: str, items: list[StoredResource]):
        # Granular scopes are search parameters: let the store's own search decide.
        ids = [s.res_id for s in items if s.res_type == res_type]
        ok: set[str] = set()
        for f in d.filters or ():
            page = self.inner.search(RequestContext(caller="synthport-access"), res_type,
                                     [("_id", ",".join(ids)), *f, ("_count", str(len(ids)))])
            ok |= {m.res_id for m in page.matches}
        return [s for s in items if s.res_type == res_type and s.res_id in ok]

    def _pushdown(self, res_type: str, d: Decision, params: list[tuple[str, str]]):
        out = list(params)
        if d.compartment is not None:
            if res_type == "Patient":
                out.append(("_id", d.compartment))
            else:
                from server.fhir.searchparams import registry

                reg = registry()
                for code in ("patient", "subject", "beneficiary"):
                    p = reg.get(res_type, code)
                    if p is not None and p.type == "reference":
                        out.append((code, f"Patient/{d.compartment}"))
                        break
            if any(k.startswith("_has") for k, _ in params):
                raise Forbidden("Reverse chaining (_has) is not available to a token bound "
                                "to one patient")
        if d.filters is not None and len(d.filters) == 1:
            out.extend(d.filters[0])
        return out

    # -------------------------------------------------------------- reads
    def read(self, ctx: RequestContext, res_type: str, res_id: str) -> StoredResource:
        if res_type == "AuditEvent":
            return self._audit_read(ctx, res_id)
        d = self._deny_audit(ctx, "read", res_type, "r")
        return self._run(ctx, "read", lambda: self._one(ctx, d, res_type,
                                                        self.inner.read(ctx, res_type, res_id)),
                         stored_patient_refs, lambda s: [f"{res_type}/{res_id}"])

    def vread(self, ctx: RequestContext, res_type: str, res_id: str, version: int) -> StoredResource:
        if res_type == "AuditEvent":
            return self._audit_read(ctx, res_id)
        d = self._deny_audit(ctx, "vread", res_type, "r")
        return self._run(ctx, "vread", lambda: self._one(
            ctx, d, res_type, self.inner.vread(ctx, res_type, res_id, version)),
            stored_patient_refs, lambda s: [f"{res_type}/{res_id}/_history/{version}"])

    def _one(self, ctx, d: Decision, res_type: str, stored: StoredResource) -> StoredResource:
        if d.restricted and not self._visible(ctx, d, res_type, [stored]):
            raise NotFound(f"{res_type}/{stored.res_id} is not known")
        return stored

    def search(self, ctx: RequestContext, res_type: str | None,
               params: list[tuple[str, str]]) -> SearchResult:
        if res_type == "AuditEvent":
            return self._audit_search(ctx, params)
        subtype = "search-type" if res_type else "search-system"
        d = self._deny_audit(ctx, subtype, res_type or "*", "s") if res_type else \
            self._system_decision(ctx, subtype)
        query = self._pushdown(res_type, d, params) if res_type else params

        def run() -> SearchResult:
            result = self.inner.search(ctx, res_type, query)
            return self._filter_result(ctx, d, res_type, result)

        return self._run(ctx, subtype, run, _result_patients)

    def _system_decision(self, ctx, subtype: str) -> Decision:
        ctx2 = self.policy.resolve(ctx)
        if not self.policy.enforce:
            return self.policy.check(ctx2, "*", "s")
        if ctx2.claims is None:
            return self._deny_audit(ctx, subtype, "*", "s")
        scopes = ScopeSet(ctx2.claims.scope)
        if not any("s" in s.perms for s in scopes.scopes):
            return self._deny_audit(ctx, subtype, "*", "s")
        return Decision(compartment=ctx2.patient if all(s.context == "patient" for s in scopes.scopes)
                        else None, filters=None, research=ctx2.purpose == "research")

    def _filter_result(self, ctx, d: Decision, res_type: str | None, result: SearchResult,
                       perm: str = "s") -> SearchResult:
        before = len(result.matches) + len(result.includes)
        matches = result.matches
        if res_type is None and self.policy.enforce and ctx.claims is not None:
            scopes = ScopeSet(ctx.claims.scope)
            matches = [m for m in matches if scopes.permits(m.res_type, perm)]
        matches = self._visible_grouped(ctx, d, matches)
        includes = self._includes(ctx, result.includes)
        if len(matches) + len(includes) != before:
            # Counting what the caller may not see would leak it.
            result = replace(result, total=None)
        return replace(result, matches=matches, includes=includes)

    def _visible_grouped(self, ctx, d: Decision, items: list[StoredResource]):
        if not d.restricted:
            return items
        by_type: dict[str, list[StoredResource]] = {}
        for s in items:
            by_type.setdefault(s.res_type, []).append(s)
        keep = {id(s) for t, group in by_type.items() for s in self._visible(ctx, d, t, group)}
        return [s for s in items if id(s) in keep]

    def _includes(self, ctx, includes: list[StoredResource]) -> list[StoredResource]:
        """_include/_revinclude results pass the same checks as a read of each."""
        if not includes:
            return includes
        out = []
        by_type: dict[str, list[StoredResource]] = {}
        for s in includes:
            by_type.setdefault(s.res_type, []).append(s)
        for t, group in by_type.items():
            try:
                d = self.policy.check(self.policy.resolve(ctx), t, "r")
            except (Forbidden, Unauthorized):
                continue
            out.extend(self._visible(ctx, d, t, group))
        keep = {id(s) for s in out}
        return [s for s in includes if id(s) in keep]

    def history(self, ctx: RequestContext, res_type: str | None, res_id: str | None,
                params: list[tuple[str, str]]) -> SearchResult:
        if res_type == "AuditEvent":
            raise MethodNotAllowed("AuditEvent has no history: the audit log is append-only")
        subtype = "history-instance" if res_id else ("history-type" if res_type else "history-system")
        perm = "r" if res_id else "s"
        d = self._deny_audit(ctx, subtype, res_type or "*", perm) if res_type else \
            self._system_decision(ctx, subtype)

        def run() -> SearchResult:
            result = self.inner.history(ctx, res_type, res_id, params)
            filtered = self._filter_result(ctx, d, res_type, result, perm)
            if res_id and d.restricted and result.matches and not filtered.matches:
                raise NotFound(f"{res_type}/{res_id} is not known")
            return filtered

        return self._run(ctx, subtype, run, _result_patients)

    def everything(self, ctx: RequestContext, patient_id: str,
                   params: list[tuple[str, str]]) -> SearchResult:
        d = self._deny_audit(ctx, "operation", "Patient", "r")

        def run() -> SearchResult:
            if d.compartment is not None and d.compartment != patient_id:
                raise NotFound(f"Patient/{patient_id} is not known")
            if d.research and self.policy.excluded_patients(d, [patient_id]):
                raise NotFound(f"Patient/{patient_id} is not known")
            result = self.inner.everything(ctx, patient_id, params)
            return self._filter_result(ctx, d, None, result, "r")

        return self._run(ctx, "operation", run, lambda r: [patient_id],
                         lambda r: [f"Patient/{patient_id}/$everything"])

    def operation(self, ctx: RequestContext, res_type: str, res_id: str | None, name: str,
                  params) -> dict:
        self._deny_audit(ctx, "operation", res_type, "r")
        return self._run(ctx, "operation",
                         lambda: self.inner.operation(ctx, res_type, res_id, name, params),
                         what_of=lambda r: [f"{res_type}/{res_id or ''}${name}"])

    # -------------------------------------------------------------- writes
    def _check_write(self, ctx, subtype: str, res_type: str, perm: str, body: dict | None):
        if res_type == "AuditEvent":
            exc = MethodNotAllowed("AuditEvent is written by the server only; the audit log "
                                   "cannot be changed through the API")
            self.policy.record(ctx, subtype, outcome_code(exc), description=exc.message)
            raise exc
        d = self._deny_audit(ctx, subtype, res_type, perm)
        if body is not None and d.compartment is not None and not self.policy.visible_body(
                Decision(compartment=d.compartment), dict(body, resourceType=res_type)):
            exc = Forbidden(f"A token bound to Patient/{d.compartment} may only write that "
                            "patient's data")
            self.policy.record(ctx, subtype, outcome_code(exc), description=exc.message)
            raise exc
        return d

    def _check_target(self, ctx, d: Decision, res_type: str, res_id: str) -> None:
        """An update/patch/delete of a resource outside the caller's view is refused."""
        if not d.restricted:
            return
        try:
            current = self.inner.read(ctx, res_type, res_id)
        except SynthportError:
            return
        if not self._visible(ctx, d, res_type, [current]):
            raise NotFound(f"{res_type}/{res_id} is not known")

    def create(self, ctx: RequestContext, res_type: str, body: dict,
               if_none_exist: str | None = None) -> WriteResult:
        self._check_write(ctx, "create", res_type, "c", body)
        return self._write(ctx, "create", lambda: self.inner.create(ctx, res_type, body, if_none_exist))

    def update(self, ctx: RequestContext, res_type: str, res_id: str, body: dict,
               if_match: str | None = None) -> WriteResult:
        d = self._check_write(ctx, "update", res_type, "u", body)

        def run():
            self._check_target(ctx, d, res_type, res_id)
            return self.inner.update(ctx, res_type, res_id, body, if_match)

        return self._write(ctx, "update", run)

    def conditional_update(self, ctx: RequestContext, res_type: str,
                           params: list[tuple[str, str]], body: dict) -> WriteResult:
        d = self._check_write(ctx, "update", res_type, "u", body)
        return self._write(ctx, "update", lambda: self.inner.conditional_update(
            ctx, res_type, self._pushdown(res_type, d, params) if d.compartment else params, body))

    def patch(self, ctx: RequestContext, res_type: str, res_id: str, patch: list,
              if_match: str | None = None) -> WriteResult:
        d = self._check_write(ctx, "patch", res_type, "u", None)

        def run():
            self._check_target(ctx, d, res_type, res_id)
            return self.inner.patch(ctx, res_type, res_id, patch, if_match)

        return self._write(ctx, "patch", run)

    def delete(self, ctx: RequestContext, res_type: str, res_id: str) -> WriteResult:
        d = self._check_write(ctx, "delete", res_type, "d", None)

        def run():
            self._check_target(ctx, d, res_type, res_id)
            return self.inner.delete(ctx, res_type, res_id)

        return self._write(ctx, "delete", run)

    def conditional_delete(self, ctx: RequestContext, res_type: str,
                           params: list[tuple[str, str]]) -> WriteResult:
        d = self._check_write(ctx, "delete", res_type, "d", None)
        return self._write(ctx, "delete", lambda: self.inner.conditional_delete(
            ctx, res_type, self._pushdown(res_type, d, params) if d.compartment else params))

    # -------------------------------------------------------------- bundles
    def bundle(self, ctx: RequestContext, bundle: dict) -> dict:
        from server.fhir.transaction import process_bundle

        if isinstance(bundle, dict) and bundle.get("type") == "batch":
            # Each entry goes through this guard: checked and audited on its own.
            return process_bundle(self, ctx, bundle)
        self._check_transaction(ctx, bundle)
        return self._write(ctx, "transaction", lambda: self._filter_tx_response(
            ctx, self.inner.bundle(ctx, bundle)))

    def _check_transaction(self, ctx: RequestContext, bundle: Any) -> None:
        from server.fhir.transaction import _parse_entry

        if not isinstance(bundle, dict) or not isinstance(bundle.get("entry"), list):
            return                                   # the store gives the error
        perms = {"GET": "r", "HEAD": "r", "POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}
        for i, raw in enumerate(bundle["entry"]):
            try:
                e = _parse_entry(i, raw, ctx)
            except SynthportError:
                return                               # the store gives the error
            if not e.res_type or e.res_type.startswith("$"):
                continue
            perm = "s" if e.method == "GET" and not e.res_id else perms[e.method]
            try:
                self._check_write(ctx, "transaction", e.res_type, perm,
                                  e.resource if e.method in ("POST", "PUT") else None)
            except SynthportError as exc:
                exc.message = f"Bundle.entry[{i}]: {exc.message}"
                raise

    def _filter_tx_response(self, ctx, response: dict) -> dict:
        ctx2 = self.policy.resolve(ctx)
        if not self.policy.enforce and ctx2.purpose != "research":
            return response
        for entry in response.get("entry") or []:
            res = entry.get("resource")
            if not isinstance(res, dict):
                continue
            if res.get("resourceType") == "Bundle" and res.get("type") == "searchset":
                res["entry"] = [x for x in res.get("entry") or []
                                if self._body_visible(ctx2, x.get("resource") or {})]
                res.pop("total", None)
            elif not self._body_visible(ctx2, res):
                entry.pop("resource", None)
                entry["response"] = {"status": "404 Not Found"}
        return response

    def _body_visible(self, ctx, body: dict) -> bool:
        t = body.get("resourceType") or ""
        try:
            d = self.policy.check(ctx, t, "r")
        except (Forbidden, Unauthorized):
            return False
        if not d.restricted:
            return True
        stored = StoredResource(t, str(body.get("id", "")), 0, 0.0, False, orjson.dumps(body))
        return bool(self._visible(ctx, d, t, [stored]))

    def authenticate(self, ctx: RequestContext) -> None:
        """Raise unless the caller is authenticated (operations that read no stored data,
        e.g. ``$validate``, while tokens are required)."""
        ctx2 = self.policy.resolve(ctx)
        if self.policy.enforce and ctx2.claims is None:
            exc = Unauthorized("This source needs a bearer token")
            self.policy.record(ctx2, "operation", outcome_code(exc), description=exc.message)
            raise exc

    # -------------------------------------------------------------- $deidentify
    def deidentify_patient(self, ctx: RequestContext, patient_id: str, engine,
                           params: list[tuple[str, str]]) -> dict:
        """``Patient/{id}/$deidentify``: an export, so research consent applies whatever
        the caller's purpose; the record is read through :meth:`everything` (checked,
        filtered and audited like it)."""
        from server.fhir.deidentify import deidentify_patient

        if self.policy.consent is not None and self.policy.consent.excluded([patient_id]):
            exc = Forbidden(f"Patient/{patient_id} has opted out of research use: nothing of "
                            "this patient is exported")
            self.policy.record(ctx, "operation", outcome_code(exc), patients=[patient_id],
                               description=exc.message)
            raise exc
        return deidentify_patient(self, ctx, patient_id, engine, params)

    def deidentify_body(self, ctx: RequestContext, body: dict, engine) -> dict:
        """``$deidentify`` of a posted resource: nothing of the store is read; the caller
        must still be authenticated when tokens are required."""
        from server.fhir.deidentify import deidentify_body

        self.authenticate(ctx)
        ctx2 = self.policy.resolve(ctx)
        return self._run(ctx2, "operation", lambda: deidentify_body(body, engine),
                         what_of=lambda r: ["$deidentify"])

    # -------------------------------------------------------------- AuditEvent
    def _audit_read(self, ctx: RequestContext, res_id: str) -> StoredResource:
        self._deny_audit(ctx, "read", "AuditEvent", "r")
        if self.audit_log is None or not (res_id.isascii() and res_id.isdigit()):
            raise NotFound(f"AuditEvent/{res_id} is not known")
        return self._run(ctx, "read", lambda: self.audit_log.read(int(res_id)),
                         what_of=lambda r: [f"AuditEvent/{res_id}"])

    def _audit_search(self, ctx: RequestContext, params) -> SearchResult:
        self._deny_audit(ctx, "search-type", "AuditEvent", "s")
        if self.audit_log is None:
            return SearchResult(matches=[], total=0, self_params=list(params))
        return self._run(ctx, "search-type", lambda: self.audit_log.search(params))


def _result_patients(result: SearchResult) -> set[str]:
    out: set[str] = set()
    for s in result.matches:
        if s.body:
            out |= stored_patient_refs(s)
    return out


def synthetic_policy(cfg, name: str, audit=None, clients=None) -> Policy:
    """The policy of a synthetic cohort: open unless ``synthetic_auth = required``;
    audited when ``audit_synthetic`` is on; no consent (nobody real is in it)."""
    return Policy(enforce=str(cfg.get("synthetic_auth", "off")).lower() == "required",
                  consent=None, audit=audit if cfg.get("audit_synthetic", True) else None,
                  source_label=f"synthetic/{name}", clients=clients)


#: Set by ``synthport serve`` for its workers when it runs the audit spool's merger process.
MERGER_ENV = "SYNTHPORT_AUDIT_MERGER_PID"


def spools_audit(cfg, url) -> bool:
    """Whether entries of a store at ``url`` go through the audit spool."""
    return bool(cfg["audit"] and cfg["audit_spool"] and url.get_backend_name() == "sqlite"
                and url.database not in (None, "", ":memory:"))


def audit_writer(audit_log, cfg, interval: float | None = None):
    """How entries reach ``audit_log``: spooled and merged in batches on a SQLite file
    (server/audit/spool.py), else synchronous group commit (server/audit/group.py).

    Args:
        interval: seconds between background merges (default ``audit_spool_interval``;
            0 for a command that only reads the log: it merges before each read).
    """
    from server.audit.group import GroupCommit
    from server.audit.spool import SpooledLog

    url = audit_log.engine.url
    if spools_audit({**dict(cfg), "audit": True}, url):
        # Beside the database file: every process writing that file shares the spool.
        folder = Path(f"{url.database}-audit-spool")
        if interval is None:
            interval = cfg["audit_spool_interval"]
            if os.environ.get(MERGER_ENV):
                # ``synthport serve`` runs a merger process: this one's own thread is only
                # the fallback should that process be gone.
                interval = max(5.0, 25 * interval)
        return SpooledLog(audit_log, folder, interval)
    return GroupCommit(audit_log)


def security_layer(cfg, store, dicom) -> dict[str, Any]:
    """The token service, audit log, consent policy and the guarded real sources.

    ``auth = off`` is development mode: every caller may do everything (still audited).
    """
    from server.audit.log import AuditLog
    from server.auth.clients import ClientRegistry
    from server.auth.tokens import TokenService
    from server.consent import ConsentPolicy

    mode = str(cfg["auth"]).strip().lower()
    if mode not in ("required", "off"):
        raise ValueError(f"auth must be 'required' or 'off', not '{cfg['auth']}'")
    if mode == "off":
        log.warning("auth = off: DEVELOPMENT MODE, the real source is open to every caller "
                    "without a token. Never run this with real patient data.")
    audit = audit_writer(AuditLog(store.engine, cfg), cfg) if cfg["audit"] else None
    clients = ClientRegistry(store.engine)
    consent = ConsentPolicy(store, cfg["consent_default"])
    policy = Policy(enforce=mode == "required", consent=consent, audit=audit,
                    source_label="real", clients=clients)

    def on_event(ev: dict) -> None:
        from server.source import RequestContext

        ctx = RequestContext(caller=ev.get("client_id") or "unknown", channel="http")
        policy.record(ctx, "token" if ev.get("event") == "token" else "auth-failure",
                      "0" if ev.get("outcome") == "success" else "4",
                      description=ev.get("reason") or "")

    tokens = TokenService(store.engine, cfg, on_event=on_event)
    deid_key = _deid_key(cfg)
    return {"audit": audit, "clients": clients, "consent": consent, "policy": policy,
            "tokens": tokens, "fhir": GuardedSource(store, policy, audit),
            "dicomweb": GuardedDicomSource(dicom, policy, deid_key)}


def _deid_key(cfg) -> bytes | None:
    """The key of de-identified DICOM access: ``dicom_deid_key_file``, else
    ``pseudonym_key_file`` (files outside the database; None = no de-identified access)."""
    path = (cfg.get("dicom_deid_key_file") or cfg.get("pseudonym_key_file") or "").strip()
    if not path:
        return None
    from server.deid.dicom import key_from_file

    return key_from_file(path)


def guard_dimse_sources(cfg, sec: dict, sources: dict) -> dict:
    """AE title -> guarded DicomSource: the real one under the real policy, each cohort
    under its own (server/dimse/server.py)."""
    out = {}
    for aet, src in sources.items():
        if src is sec["dicomweb"].inner:
            out[aet] = sec["dicomweb"]
        elif isinstance(src, GuardedDicomSource):
            out[aet] = src
        else:
            out[aet] = GuardedDicomSource(src, synthetic_policy(
                cfg, getattr(src, "name", aet), sec.get("audit"), sec.get("clients")))
    return out


# --------------------------------------------------------------------------- DICOM
DICOM_SUBTYPES = {
    ("dicomweb", "store"): "dicomweb-store", ("dicomweb", "find"): "dicomweb-search",
    ("dicomweb", "retrieve"): "dicomweb-retrieve", ("dimse", "store"): "dimse-store",
    ("dimse", "find"): "dimse-find", ("dimse", "retrieve"): "dimse-get",
}


class GuardedDicomSource:
    """A DICOM source behind the same policy: a study is reachable only through a scope
    on ImagingStudy, and a patient-bound token reaches only its patient's studies."""

    def __init__(self, inner, policy: Policy, deid_key: bytes | None = None):
        self.inner = inner
        self.policy = policy
        self.deid_key = deid_key
        self.name = inner.name
        self.writable = inner.writable
        self.ae_title = getattr(inner, "ae_title", "")

    def __getattr__(self, name: str):
        attr = getattr(self.inner, name)
        if name == "metadata_json":
            return self._metadata_json
        if name == "store_many":
            return self._store_many
        return attr

    def _subtype(self, ctx, what: str) -> str:
        return DICOM_SUBTYPES.get((ctx.channel if ctx.channel in ("dimse",) else "dicomweb", what),
                                  f"dicom-{what}")

    def _decide(self, ctx: RequestContext, what: str, perm: str) -> tuple[RequestContext, Decision]:
        ctx2 = self.policy.resolve(ctx)
        try:
            d = self.policy.check(ctx2, "ImagingStudy", perm)
            if what == "store" and d.compartment is not None:
                raise Forbidden("Storing DICOM needs a system/ or user/ scope on ImagingStudy")
        except SynthportError as exc:
            self.policy.record(ctx2, self._subtype(ctx2, what), outcome_code(exc),
                               description=exc.message)
            raise
        return ctx2, d

    def _audit(self, ctx, what: str, fn, patients_of=lambda r: (), what_of=lambda r: ()):
        return audited(self.policy, ctx, self._subtype(ctx, what), fn, patients_of, what_of)

    # ---------------------------------------------------------------- patients
    def _fhir_ids(self, dicom_patient_ids: Iterable[str]) -> dict[str, str]:
        """DICOM Patient ID -> linked FHIR Patient id (server/dicom/fhirlink.py)."""
        ids = sorted({p for p in dicom_patient_ids if p is not None})
        engine = getattr(self.inner, "engine", None)
        if not ids or engine is None:
            return {}
        from server.db.schema import dicom_patient as P

        with engine.connect() as conn:
            rows = conn.execute(select(P.c.patient_id, P.c.fhir_id).where(P.c.patient_id.in_(ids)))
            return {r[0]: r[1] for r in rows if r[1]}

    def _dicom_ids_of(self, fhir_id: str) -> list[str]:
        engine = getattr(self.inner, "engine", None)
        if engine is None:
            return []
        from server.db.schema import dicom_patient as P

        with engine.connect() as conn:
            return [r[0] for r in conn.execute(select(P.c.patient_id).where(P.c.fhir_id == fhir_id))]

    def _patient_ok(self, d: Decision, dicom_patient_id: str, links: dict[str, str]) -> bool:
        if not d.restricted:
            return True
        fhir_id = links.get(dicom_patient_id)
        if d.compartment is not None and fhir_id != d.compartment:
            return False
        if d.research and fhir_id and self.policy.excluded_patients(d, [fhir_id]):
            return False
        return True

    # ---------------------------------------------------------------- writes
    def store_instance(self, ctx: RequestContext, data: bytes, **kw):
        ctx2, _ = self._decide(ctx, "store", "c")
        return self._audit(ctx2, "store", lambda: self.inner.store_instance(ctx2, data, **kw),
                           what_of=lambda o: [f"urn:oid:{getattr(o, 'study_uid', '')}"])

    def _store_many(self, ctx: RequestContext, items: list[bytes]):
        ctx2, _ = self._decide(ctx, "store", "c")
        return self._audit(ctx2, "store", lambda: self.inner.store_many(ctx2, items),
                           what_of=lambda outs: [f"urn:oid:{getattr(o, 'study_uid', '')}"
                                                 for o in outs if hasattr(o, "study_uid")])

    # ---------------------------------------------------------------- reads
    def find(self, ctx: RequestContext, level, query: dict[str, str], **kw):
        ctx2, d = self._decide(ctx, "find", "s")
        # DICOM PatientID -> linked FHIR Patient id of the matches: from the source's
        # own rows when it gives them (FindResult.patient_links), else one query.
        links: dict[str, str] = {}
        given = [True]

        def inner_find(q: dict) -> list:
            res = self.inner.find(ctx2, level, q, **kw)
            got = getattr(res, "patient_links", None)
            if got is None:
                given[0] = False
            else:
                links.update(got)
            return list(res)

        def run():
            q = dict(query)
            if d.compartment is not None:
                allowed = self._dicom_ids_of(d.compartment)
                asked = q.get("PatientID")
                if asked not in (None, "", "*"):
                    allowed = [p for p in allowed if p == asked]
                out = []
                for pid in allowed:
                    out.extend(inner_find(dict(q, PatientID=pid)))
            else:
                out = inner_find(q)
            if not given[0]:
                links.update(self._fhir_ids(getattr(ds, "PatientID", "") for ds in out))
            if d.research:
                out = [ds for ds in out if self._patient_ok(d, getattr(ds, "PatientID", ""), links)]
            # The patients whose data leave, named before any de-identification.
            patients = {links[p] for ds in out if (p := getattr(ds, "PatientID", None)) in links}
            if ctx2.deidentified:
                out = [self._deid_dataset(ds) for ds in out]
            return out, patients

        out, _ = self._audit(ctx2, "find", run, lambda r: r[1])
        return out

    def instance_refs(self, ctx: RequestContext, study_uid=None, series_uid=None, sop_uid=None,
                      **kw):
        ctx2, d = self._decide(ctx, "retrieve", "r")

        def run():
            refs = self.inner.instance_refs(ctx2, study_uid, series_uid, sop_uid, **kw)
            if d.restricted:
                links = self._fhir_ids(r.patient_id for r in refs)
                refs = [r for r in refs if self._patient_ok(d, r.patient_id, links)]
                if not refs:
                    raise NotFound("No such study, series or instance")
            return refs

        return self._audit(ctx2, "retrieve", run,
                           lambda refs: self._fhir_ids(r.patient_id for r in refs).values(),
                           lambda refs: sorted({f"urn:oid:{r.study_uid}" for r in refs}))

    def open_instance(self, ctx: RequestContext, ref) -> bytes:
        # instance_refs (checked and audited) always comes first; the bytes follow it.
        ctx2 = self.policy.resolve(ctx)
        self.policy.check(ctx2, "ImagingStudy", "r")
        data = self.inner.open_instance(ctx2, ref)
        if ctx2.deidentified:
            from server.deid.dicom import DicomDeidOptions, deidentify_bytes

            data = deidentify_bytes(data, self._key(), DicomDeidOptions(retain_uids=True))
        return data

    def _metadata_json(self, ctx: RequestContext, study_uid: str, series_uid: str | None = None,
                       *args, **kw):
        ctx2, d = self._decide(ctx, "retrieve", "r")

        def run():
            if d.restricted:
                self.instance_refs(ctx2, study_uid, series_uid)
            out = self.inner.metadata_json(ctx2, study_uid, series_uid, *args, **kw)
            if ctx2.deidentified:
                from server.deid.dicom import DicomDeidOptions, deidentify_json

                # the stored DICOM JSON of each instance (bytes), de-identified as the file is
                out = [orjson.dumps(deidentify_json(orjson.loads(o) if isinstance(o, (bytes, bytearray))
                                                    else o, self._key(),
                                                    DicomDeidOptions(retain_uids=True)))
                       for o in out]
            return out

        return self._audit(ctx2, "retrieve", run, what_of=lambda r: [f"urn:oid:{study_uid}"])

    def _deid_dataset(self, ds):
        from server.deid.dicom import DicomDeidOptions, deidentify_dataset

        return deidentify_dataset(ds, self._key(), DicomDeidOptions(retain_uids=True))

    def _key(self) -> bytes:
        if not self.deid_key:
            raise Forbidden("De-identified access needs a de-identification key "
                            "(setting pseudonym_key_file)")
        return self.deid_key
