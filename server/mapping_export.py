"""Read patient records through the source protocol and write the analysis tables.

``synthport map`` calls :func:`export_tables`. The patients come from ``Source.search``
(``Patient``, paged by ``next`` links on a snapshot) and each record is that patient's
``Patient/$everything``, so consent filtering (``include_patient``, by default the
store's research-consent rule) and the export audit entry apply to every snapshot. On
the real store, ``SqlStore.compartments`` (:class:`server.fhir.everything.CompartmentReader`)
reads the same ``$everything`` records in a few statements per patient on one snapshot, and :func:`export_tables` extracts their
events one resource at a time from the JSON bodies, in this process and ``jobs - 1``
worker processes.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import orjson

from server.source import RequestContext, Source

log = logging.getLogger(__name__)

PAGE = 200           # patients per search page
CHUNK = 5            # patients per unit of work of the parallel export (load balancing)


@dataclass
class ExportReport:
    """What an export read and wrote.

    ``read_seconds``: wall-clock time of reading the records (on the real store: reading
    them and extracting their events, which go hand in hand there, in all ``jobs``
    processes); ``map_seconds``: the rest of the mapping (on the real store: building the
    tables); ``write_seconds``: the Parquet files; ``timings``: CPU seconds per mapping
    phase of this process (``MappedTables.timings``).
    """

    patients: int = 0
    excluded: int = 0
    resources: int = 0
    events: int = 0
    columns: int = 0
    read_seconds: float = 0.0
    map_seconds: float = 0.0
    write_seconds: float = 0.0
    timings: dict = field(default_factory=dict)   # CPU seconds per mapping phase
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

    Each record is what ``Patient/<id>/$everything`` returns (Patient first). The real
    store (:class:`server.store.SqlStore`) is read by its ``compartments`` reader: the same
    resources in the same order, a few statements per patient on one snapshot instead of
    ``$everything``'s statement building per call (about 4x less CPU); any other source
    through ``Source.everything``.

    Args:
        include_patient: predicate on the Patient resource; patients it rejects are not
            read any further (their ``$everything`` is never asked for). Default: the
            store's research-consent rule (:func:`research_consent`).
    """
    ctx = ctx or RequestContext(caller="synthport-map")
    if include_patient is None:
        include_patient = research_consent(source)
    read: list[str] = []
    reader = source.compartments(ctx) if bulk_readable(source) else None
    try:
        for p in iter_patients(source, ctx, limit=limit):
            if include_patient is not None and not include_patient(p):
                if report is not None:
                    report.excluded += 1
                continue
            if reader is None:
                rec = patient_record(source, ctx, p["id"])
            else:
                bodies = reader.bodies(p["id"])
                if bodies is None:      # deleted since the search page was read
                    continue
                rec = parse_record(bodies)
            read.append(p["id"])
            if report is not None:
                report.patients += 1
                report.resources += len(rec)
            yield rec
    finally:
        if reader is not None:
            reader.close()
    _audit_export(source, ctx, read)


def parse_record(bodies: list[bytes]) -> list[dict]:
    """The JSON bodies of :meth:`server.fhir.everything.CompartmentReader.bodies` -> a record."""
    return list(map(orjson.loads, bodies))


def bulk_readable(source) -> bool:
    """Whether ``source`` is the SQL store itself, whose ``compartments`` reads many
    ``$everything`` records on one snapshot (not a wrapper such as the guarded source,
    whose ``everything`` applies access rules; ``synthport map`` filters consent and
    audits the export itself)."""
    from server.store import SqlStore

    return type(source) is SqlStore


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
                  ctx: RequestContext | None = None, jobs: int | None = None,
                  **vocabulary) -> ExportReport:
    """Map the source's patients and write the tables as Parquet + metadata JSON.

    Args:
        limit: at most this many patients of the search (before consent filtering).
        spec: mapping spec (``mappings.tables.resolve_spec``); ``**vocabulary`` overrides.
        include_patient: as in :func:`iter_source_records` (default: research consent).
        jobs: processes that read and extract records (this one included; default 1).
            More pay off on a machine with idle cores: on a busy one a worker adds its
            start and the transfer of its rows without adding CPU time (the 2-core
            development machine, Linux autogroup scheduling, measured no gain). More than
            one needs the real store on a database that another process can open (not
            SQLite ``:memory:``); otherwise records are read here. The tables are the
            same for every ``jobs``.
    """
    from mappings.io import write_tables
    from mappings.tables import map_records, resolve_spec

    report = ExportReport()
    spec = resolve_spec(spec, **vocabulary)
    t0 = time.perf_counter()
    if bulk_readable(source):
        tables = _map_store(source, ctx, spec, limit, include_patient, report, jobs or 1)
    else:
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

        tables = map_records(timed(iter_source_records(source, ctx, limit=limit,
                                                       include_patient=include_patient,
                                                       report=report)), spec)
    report.map_seconds = time.perf_counter() - t0 - report.read_seconds
    report.events = len(tables.events)
    report.columns = tables.patients.shape[1]
    report.timings = dict(tables.timings)
    t0 = time.perf_counter()
    report.files = write_tables(tables, out_dir)
    report.write_seconds = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------- parallel export


def _shareable_url(engine) -> str | None:
    """The engine's URL when another process can open the same database."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return None
    return url.render_as_string(hide_password=False)


def _claim(counter, n_chunks: int) -> int | None:
    """The next unit of work shared by all processes (None when all are taken)."""
    with counter.get_lock():
        k = counter.value
        if k >= n_chunks:
            return None
        counter.value = k + 1
    return k


def _extract_chunk(reader, ids: list[str], spec) -> dict:
    """Read and extract some patients: the extractor's state, who was read, how much."""
    from mappings.events import EventExtractor

    ex = EventExtractor(spec)
    read, n = [], 0
    for pid in ids:
        entries = reader.entries(pid)
        if entries is None:         # deleted since the search page was read
            continue
        # one resource parsed at a time: the working set stays in the CPU caches
        ex.add_packed_record(entries, orjson.loads)
        read.append(pid)
        n += len(entries)
    return {"state": ex.export_state(), "read": read, "resources": n}


def _worker(url: str, snapshot: int, spec_json: str, ids: list[str], chunk: int, counter,
            results) -> None:
    """A worker process of :func:`_map_store`: claims chunks until none is left."""
    try:
        from mappings.spec import MappingSpec
        from mappings.tables import paused_gc
        from server.store import SqlStore

        spec = MappingSpec.model_validate_json(spec_json)
        store = SqlStore.from_url(url, auto_migrate=False)
        engine = store.engine
        reader = store.compartments(RequestContext(caller="synthport-map"), snapshot)
        try:
            with paused_gc():
                while (k := _claim(counter, -(-len(ids) // chunk))) is not None:
                    results.put((k, _extract_chunk(reader, ids[k * chunk:(k + 1) * chunk], spec)))
        finally:
            reader.close()
            engine.dispose()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        results.put((-1, traceback.format_exc()))


def _map_store(store, ctx, spec, limit, include_patient, report: ExportReport, jobs: int):
    """The real store's consented patients -> MappedTables, read and extracted by ``jobs``
    processes (this one included) on one snapshot.

    Work is handed out in chunks of ``CHUNK`` patients through a shared counter, so a
    process that is given less CPU by a busy machine simply takes fewer chunks; the
    parent merges the chunks' extractions in patient order, so rows, tables and metadata
    are those of one process reading the patients one after the other.
    """
    from mappings.errors import MappingError
    from mappings.events import EventExtractor
    from mappings.tables import finish_tables, paused_gc

    t_read = time.perf_counter()
    c0 = time.process_time()
    ctx = ctx or RequestContext(caller="synthport-map")
    if include_patient is None:
        include_patient = research_consent(store)
    ids = []
    for p in iter_patients(store, ctx, limit=limit):
        if include_patient is not None and not include_patient(p):
            report.excluded += 1
            continue
        ids.append(p["id"])
    chunk = CHUNK
    n_chunks = -(-len(ids) // chunk)
    url = _shareable_url(store.engine)
    n_workers = max(0, min(jobs - 1, n_chunks - 1)) if url else 0
    ex = EventExtractor(spec)
    read: list[str] = []
    reader = store.compartments(ctx)
    procs: list = []
    started: list = []
    try:
        mpc = mp.get_context("spawn")        # no fork of a process that may hold threads
        counter = mpc.Value("i", 0) if n_workers else _LocalCounter()
        results = mpc.Queue() if n_workers else None
        procs = [mpc.Process(target=_worker, daemon=True, name=f"synthport-map-{i + 1}",
                             args=(url, reader.snapshot, spec.model_dump_json(), ids, chunk,
                                   counter, results))
                 for i in range(n_workers)]
        for pr in procs:
            pr.start()
            started.append(pr)
        done: dict[int, dict] = {}
        merged = 0

        def merge_ready():
            nonlocal merged
            while merged in done:
                part = done.pop(merged)
                ex.merge_state(part["state"], disjoint=True)
                read.extend(part["read"])
                report.patients += len(part["read"])
                report.resources += part["resources"]
                merged += 1

        with paused_gc():
            while (k := _claim(counter, n_chunks)) is not None:
                done[k] = _extract_chunk(reader, ids[k * chunk:(k + 1) * chunk], spec)
                merge_ready()
                while results is not None:      # merge what the workers have sent meanwhile
                    try:
                        _take(results.get_nowait(), done)
                    except queue.Empty:
                        break
                merge_ready()
            if merged < n_chunks:
                _warm_units()                  # needed by the tables; costs nothing while waiting
            while merged < n_chunks:
                try:
                    _take(results.get(timeout=1.0), done)
                except queue.Empty:
                    if not any(pr.is_alive() for pr in started):
                        raise MappingError("a worker process of the export ended without "
                                           "sending its part") from None
                merge_ready()
    finally:
        reader.close()
        for pr in started:
            pr.join(timeout=5)
            if pr.is_alive():
                pr.terminate()
    _audit_export(store, ctx, read)
    report.read_seconds = time.perf_counter() - t_read
    return finish_tables(ex, spec, {"read_and_extract": time.process_time() - c0})


class _LocalCounter:
    """``multiprocessing.Value`` stand-in when no worker is started."""

    def __init__(self):
        import threading

        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self):
        return self._lock


def _take(msg, done: dict[int, dict]) -> None:
    k, part = msg
    if k < 0:
        from mappings.errors import MappingError

        raise MappingError(f"a worker process of the export failed:\n{part}")
    done[k] = part


def _warm_units() -> None:
    """Build the UCUM registry (a few seconds, once per process) before the tables need it."""
    try:
        from terminologies import ucum

        ucum.is_valid("g")
    except Exception:  # noqa: BLE001 - only a warm-up: the tables report unit problems
        log.debug("UCUM warm-up failed", exc_info=True)
