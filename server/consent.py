"""Research consent (data donorship and opt-out) from FHIR ``Consent`` resources.

A patient's research choice is read from their active Consents whose ``scope`` is
``research`` or ``patient-privacy`` (http://terminology.hl7.org/CodeSystem/consentscope)
and whose ``provision.type`` is ``deny`` or ``permit`` (FHIR R4 §Consent). The newest
applicable Consent (by ``dateTime``, then ``meta.lastUpdated``) wins; a provision whose
``period`` does not cover now does not apply. Without one, the ``consent_default``
setting decides: ``opt-out`` (take part unless denied, the EHDS secondary-use model)
or ``opt-in`` (only patients with a permitting Consent take part).

Who honours it: training snapshots (``synthport map`` / ``train`` read through
:meth:`ConsentPolicy.include_patient`), research-purpose access to the real source
(server/access.py) and exports (``$deidentify``, ``synthport map``).
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import orjson

from server.fhir.timeutil import parse_instant
from server.source import RequestContext

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
RESEARCH_SCOPES = {"research", "patient-privacy"}
# Consent decisions change rarely; one scan serves a worker for this long.
CACHE_SECONDS = 5.0


class ConsentPolicy:
    """Which patients may be used for research, from the store's Consents.

    Args:
        source: the real source (a :class:`server.source.Source`; only ``search`` is used).
        default: ``opt-out`` or ``opt-in``.
    """

    def __init__(self, source, default: str = "opt-out"):
        if default not in ("opt-out", "opt-in"):
            raise ValueError(f"consent_default must be opt-out or opt-in, not '{default}'")
        self.source = source
        self.default = default
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, str]] | None = None

    # ------------------------------------------------------------------ decisions
    def decisions(self) -> dict[str, str]:
        """Patient id -> ``deny`` / ``permit`` for patients with an applicable Consent."""
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < CACHE_SECONDS:
                return self._cached[1]
        found = _scan(self.source)
        with self._lock:
            self._cached = (time.monotonic(), found)
        return found

    def invalidate(self) -> None:
        with self._lock:
            self._cached = None

    def allowed(self, patient_id: str) -> bool:
        """Whether this patient's data may be used for research."""
        d = self.decisions().get(patient_id)
        if d is None:
            return self.default == "opt-out"
        return d == "permit"

    def include_patient(self, patient: dict) -> bool:
        """Predicate on a Patient resource (mappings' ``include_patient`` hook)."""
        return self.allowed(str(patient.get("id", "")))

    def excluded(self, patient_ids) -> set[str]:
        """The ids among ``patient_ids`` that must be left out of research use."""
        return {p for p in patient_ids if not self.allowed(p)}


def _scan(source) -> dict[str, str]:
    ctx = RequestContext(caller="synthport-consent")
    best: dict[str, tuple[tuple, str]] = {}
    params = [("status", "active"), ("_count", "1000")]
    now = time.time()
    while params is not None:
        page = source.search(ctx, "Consent", params)
        for stored in page.matches:
            body = orjson.loads(stored.body)
            decision = consent_decision(body, now)
            pid = _patient_id(body)
            if decision is None or pid is None:
                continue
            key = (_when(body.get("dateTime")), stored.last_updated)
            if pid not in best or key > best[pid][0]:
                best[pid] = (key, decision)
        params = page.next_params
    return {pid: d for pid, (_, d) in best.items()}


def consent_decision(consent: dict, now: float | None = None) -> str | None:
    """``deny`` / ``permit`` when this Consent rules on research use now, else None."""
    if consent.get("resourceType") != "Consent" or consent.get("status") != "active":
        return None
    codes = {(c.get("system"), c.get("code")) for c in (consent.get("scope") or {}).get("coding", [])}
    if not any(sys == SCOPE_SYSTEM and code in RESEARCH_SCOPES for sys, code in codes):
        return None
    prov = consent.get("provision") or {}
    kind = prov.get("type")
    if kind not in ("deny", "permit"):
        return None
    period = prov.get("period") or {}
    now = time.time() if now is None else now
    start, end = period.get("start"), period.get("end")
    if start and (parse_instant(start) or 0) > now:
        return None
    if end and (parse_instant(end) or now) < now:
        return None
    return kind


def _patient_id(consent: dict) -> str | None:
    ref = (consent.get("patient") or {}).get("reference") or ""
    if "Patient/" not in ref:
        return None
    return ref.rsplit("Patient/", 1)[1].split("/")[0] or None


def _when(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return parse_instant(value) or 0.0
    except Exception:  # noqa: BLE001 - a malformed date only loses the ordering
        return datetime.min.replace(tzinfo=timezone.utc).timestamp()
