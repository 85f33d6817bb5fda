"""Read patient records through the source protocol and write the analysis tables.

``synthport map`` calls :func:`export_tables`. Records come from ``Source.search``
(``Patient``, paged by ``next`` links on a snapshot) and ``Source.everything`` (paged the
same way), never from the SQL tables, so consent filtering and audit that sit at the
source boundary apply here too. Consent rules plug in as ``include_patient``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import orjson

from server.source import RequestContext, Source

log = logging.getLogger(__name__)

PAGE = 200           # patients per search page


@dataclass
class ExportReport:
    """What an export read and wrote."""

    patients: int = 0
    excluded: int = 0
    resources: int = 0
    events: int = 0
    columns: int = 0
    read_seconds: float = 0.0
    map_seconds: float = 0.0
    files: list[Path] = field(default_factory=list)


def _bodies(result) -> list[dict]:
    return [orjson.loads(r.body) for r in result.matches if r.body and not r.deleted]


def iter_patients(source: Source, ctx: RequestContext, limit: int | None = None,
                  page_size: int = PAGE) -> Iterator[dict]:
    """Every Patient of the source, in the source's order, following ``next`` pages."""
    params: list[tuple[str, str]] | None = [("_count", str(page_size))]
    n = 0
    while params is not None:
        res = source.search(ctx, "Patient", params)
        for p in _bodies(res):
            yield p
            n += 1
            if limit is not None and n >= limit:
                return
        params = res.next_params


def patient_record(source: Source, ctx: RequestContext, patient_id: str,
                   page_size: int | None = None) -> list[dict]:
    """``Patient/<id>/$everything``, all pages, as one record (Patient first).

    Without ``page_size`` the source answers in one page (the real store has no cap,
    ADR 0004): paging on a snapshot costs about three times as much per resource.
    """
    out: list[dict] = []
    params: list[tuple[str, str]] | None = [("_count", str(page_size))] if page_size else []
    while params is not None:
        res = source.everything(ctx, patient_id, params)
        out.extend(_bodies(res))
        params = res.next_params
    out.sort(key=lambda r: r.get("resourceType") != "Patient")
    return out


def iter_source_records(source: Source, ctx: RequestContext | None = None, *,
                        limit: int | None = None,
                        include_patient: Callable[[dict], bool] | None = None,
                        report: ExportReport | None = None) -> Iterator[list[dict]]:
    """Patient records read through the source protocol.

    Args:
        include_patient: predicate on the Patient resource; patients it rejects are not
            read any further (their ``$everything`` is never asked for).
    """
    ctx = ctx or RequestContext(caller="synthport-map")
    if include_patient is None:
        include_patient = research_consent(source)
    read: list[str] = []
    for p in iter_patients(source, ctx, limit=limit):
        if include_patient is not None and not include_patient(p):
            if report is not None:
                report.excluded += 1
            continue
        rec = patient_record(source, ctx, p["id"])
        read.append(p["id"])
        if report is not None:
            report.patients += 1
            report.resources += len(rec)
        yield rec
    _audit_export(source, ctx, read)


def research_consent(source) -> Callable[[dict], bool] | None:
    """The research-consent predicate of the real store (server/consent.py): training
    snapshots and exports leave out patients whose Consent denies research use."""
    config = getattr(source, "config", None)
    if not getattr(source, "writable", False) or config is None:
        return None          # a synthetic cohort holds nobody real
    from server.consent import ConsentPolicy

    return ConsentPolicy(source, str(config.get("consent_default", "opt-out"))).include_patient


def _audit_export(source, ctx: RequestContext, patients: list[str]) -> None:
    """One AuditEvent (subtype export) for the snapshot, naming every patient read."""
    config = getattr(source, "config", None)
    engine = getattr(source, "engine", None)
    if config is None or engine is None or not config.get("audit", True) or not source.writable:
        return
    from server.access import Policy
    from server.audit.log import AuditLog

    Policy(enforce=False, audit=AuditLog(engine, config)).record(
        ctx, "export", "0", patients=patients,
        description=f"training/mapping snapshot of {len(patients)} patients")


def export_tables(source: Source, out_dir: str | Path, *, limit: int | None = None,
                  spec=None, include_patient: Callable[[dict], bool] | None = None,
                  ctx: RequestContext | None = None, **vocabulary) -> ExportReport:
    """Map the source's patients and write the tables as Parquet + metadata JSON."""
    from mappings.io import write_tables
    from mappings.tables import map_records

    report = ExportReport()

    def timed(it):
        # records stream into map_records (flat memory); time spent reading is summed here
        while True:
            t = time.perf_counter()
            try:
                rec = next(it)
            except StopIteration:
                report.read_seconds += time.perf_counter() - t
                return
            report.read_seconds += time.perf_counter() - t
            yield rec

    t0 = time.perf_counter()
    tables = map_records(timed(iter_source_records(source, ctx, limit=limit,
                                                   include_patient=include_patient, report=report)),
                         spec, **vocabulary)
    report.map_seconds = time.perf_counter() - t0 - report.read_seconds
    report.events = len(tables.events)
    report.columns = tables.patients.shape[1]
    report.files = write_tables(tables, out_dir)
    return report
