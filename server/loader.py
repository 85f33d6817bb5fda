"""``synthport load``: bulk-load FHIR files, folders, archives and NDJSON into the real store.

What is read
    * ``.json`` (a resource or a Bundle), ``.json.bz2``, ``.json.gz``;
    * ``.ndjson``, ``.ndjson.bz2``, ``.ndjson.gz`` (one resource per line);
    * folders, recursively, files in order of their path;
    * ``.tar.xz`` / ``.tar.gz`` / ``.tgz`` / ``.tar.bz2`` / ``.tar`` / ``.zip`` archives holding
      any of the above. Members are streamed from the archive (``tarfile`` stream mode,
      ``zipfile``), never extracted: a member name is only ever a label, so
      ``../../evil.json`` is read as data and nothing is written to disk. Only regular
      members are read (no links, devices, nested archives).
      Files and members with other names are skipped (and counted).

What is written
    * ``transaction`` and ``batch`` Bundles go to :meth:`SqlStore.bundle` unchanged
      (a batch of only POST/PUT entries is first tried as one transaction, which has the
      same effect when every entry succeeds, and re-run as a batch if one fails).
      A failed entry of a batch is reported with its index and reason.
    * ``document``, ``collection``, ``searchset`` and ``message`` Bundles are split into
      their resources, loaded as one transaction: ``PUT Type/id`` when the resource has
      an id (the id is kept, so loading the file again is idempotent and the store's no-op
      detection writes no new versions), else ``POST Type``. Each entry keeps its
      ``fullUrl``, so ``urn:uuid:`` references are rewritten to ``Type/id`` by the
      transaction code. OperationOutcome entries of a searchset are dropped. A document
      Bundle is *only* split: the Bundle itself is not also stored as a ``Bundle``
      resource (POST it to ``/fhir/Bundle`` for that), because the loader's job is to make
      the clinical content searchable, and storing both would duplicate every resource.
    * A plain resource: ``PUT Type/id`` if it has an id, else ``POST Type``.
    * NDJSON: chunks of 500 resources, each one transaction; if a chunk fails, its
      resources are retried one by one (a batch) so that a bad line is reported with its
      line number and reason while the others load.

Order
    Synthea writes the hospital and practitioner bundles (``0-*.json.bz2``, or named
    ``hospitalInformation*`` / ``practitionerInformation*``) that the patient bundles
    reference through conditional references. Those files load first, one at a time and
    completely, before any other file starts. Inside a zip the same rule applies to its
    members. A tar archive can only be read in its own order without reading it twice:
    there such a member is loaded on its own (after everything before it finished, before
    anything after it starts), so build tars with ``tar --sort=name``.

Speed
    ``jobs`` worker processes (default: the number of cores) each own a store/engine,
    created in the worker after the fork; the parent migrates the schema once, disposes its
    engine and then only hands out work and adds up results. Workers read, decompress,
    parse (orjson) and validate in parallel; on SQLite the writes serialise on the write
    lock (``BEGIN IMMEDIATE``), where the workers queue at a shared gate and on the
    database's lock file (server/db/engine.py) rather than in SQLite's busy handler.
    Archive members and NDJSON chunks are read by the parent and handed over as bytes,
    with at most ``2 * jobs`` tasks in flight so memory stays bounded.

Report
    :class:`LoadReport` counts files ok/failed, resources, seconds, overall rate, and the
    rate over the first and the last tenth of the resources loaded (in completion order),
    to show whether ingest slows down as the store grows.
"""
from __future__ import annotations

import bz2
import gc
import gzip
import io
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import orjson

NDJSON_CHUNK = 500
SPLIT_TYPES = ("document", "collection", "searchset", "message")
_JSON_SUFFIXES = (".json", ".json.bz2", ".json.gz")
_NDJSON_SUFFIXES = (".ndjson", ".ndjson.bz2", ".ndjson.gz")
_TAR_SUFFIXES = (".tar.xz", ".txz", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar")
_ZIP_SUFFIXES = (".zip",)
_ENTRY_RE = re.compile(r"^Bundle\.entry\[(\d+)\]")


# ---------------------------------------------------------------------- report
@dataclass
class LoadReport:
    """What a load did. ``failed`` lists ``(path, reason)`` for every failure."""

    files_ok: int = 0
    files_failed: int = 0
    files_skipped: int = 0
    resources: int = 0
    seconds: float = 0.0
    rate: float = 0.0                # resources per second, whole run
    first_rate: float | None = None  # resources/s over the first tenth of the resources
    last_rate: float | None = None   # resources/s over the last tenth of the resources
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def failures(self) -> list[tuple[str, str]]:
        return self.failed

    @property
    def files(self) -> int:
        return self.files_ok + self.files_failed

    def summary(self) -> str:
        return (f"loaded {self.resources} resources from {self.files} files in "
                f"{self.seconds:.1f} s ({self.rate:.0f} resources/s); {self.files_failed} failed")


def _kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(_NDJSON_SUFFIXES):
        return "ndjson"
    if low.endswith(_JSON_SUFFIXES):
        return "json"
    if low.endswith(_TAR_SUFFIXES):
        return "tar"
    if low.endswith(_ZIP_SUFFIXES):
        return "zip"
    return None


def is_first_phase(name: str) -> bool:
    """Files that others reference (Synthea's hospital/practitioner bundles) load first."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.startswith(("0-", "hospitalInformation", "practitionerInformation"))


def _decompress(name: str, data: bytes) -> bytes:
    low = name.lower()
    if low.endswith(".bz2"):
        return bz2.decompress(data)
    if low.endswith(".gz"):
        return gzip.decompress(data)
    return data


def _open_stream(name: str, raw) -> io.BufferedIOBase:
    low = name.lower()
    if low.endswith(".bz2"):
        return bz2.open(raw, "rb")
    if low.endswith(".gz"):
        return gzip.open(raw, "rb")
    return raw


# ---------------------------------------------------------------------- tasks
# A task is a tuple handed to a worker:
#   ("file", file_key, path)            read + parse a JSON file (maybe compressed)
#   ("data", file_key, name, bytes)     parse JSON bytes (an archive member, maybe compressed)
#   ("ndjson", file_key, [(lineno, bytes), ...])
#   ("fail", file_key, reason)          nothing to run: report (e.g. unreadable archive)
#   ("file0", file_key)                 announce a file with nothing to load (empty NDJSON)
# The scheduler gets (task, exclusive): an exclusive task runs alone.


def _ndjson_tasks(file_key: str, stream) -> Iterator[tuple]:
    chunk: list[tuple[int, bytes]] = []
    announced = False
    for lineno, line in enumerate(stream, start=1):
        line = line.strip()
        if not line:
            continue
        chunk.append((lineno, line))
        if len(chunk) >= NDJSON_CHUNK:
            announced = True
            yield ("ndjson", file_key, chunk)
            chunk = []
    if chunk or not announced:
        yield ("ndjson", file_key, chunk)


class _Planner:
    """Turns the input paths into tasks, in load order."""

    def __init__(self, paths: list[str], limit: int | None):
        self.paths = paths
        self.limit = limit
        self.files = 0      # files / members handed out
        self.skipped = 0

    def _take(self) -> bool:
        if self.limit is not None and self.files >= self.limit:
            return False
        self.files += 1
        return True

    def _expand(self) -> tuple[list[Path], list[tuple[str, str]]]:
        files: list[Path] = []
        bad: list[tuple[str, str]] = []
        seen: set[Path] = set()
        for p in self.paths:
            path = Path(p)
            if path.is_dir():
                found = sorted((f for f in path.rglob("*") if f.is_file()),
                               key=lambda f: f.relative_to(path).as_posix())
                for f in found:
                    if _kind(f.name) is None:
                        self.skipped += 1
                    elif f.resolve() not in seen:
                        seen.add(f.resolve())
                        files.append(f)
            elif path.is_file():
                if _kind(path.name) is None:
                    bad.append((str(path), "unsupported file type (expected .json, .ndjson, "
                                           ".json.bz2/.gz, .tar.xz/.tar.gz/.tgz or .zip)"))
                elif path.resolve() not in seen:
                    seen.add(path.resolve())
                    files.append(path)
            else:
                bad.append((str(path), "no such file or folder"))
        return files, bad

    def tasks(self) -> Iterator[tuple[tuple, bool]]:
        files, bad = self._expand()
        for key, reason in bad:
            yield ("fail", key, reason), False
        first = sorted((f for f in files if is_first_phase(f.name)), key=lambda f: f.name)
        rest = [f for f in files if not is_first_phase(f.name)]
        for f in first + rest:
            if self.limit is not None and self.files >= self.limit:
                return
            yield from self._file_tasks(f, exclusive=is_first_phase(f.name))

    def _file_tasks(self, f: Path, exclusive: bool) -> Iterator[tuple[tuple, bool]]:
        kind = _kind(f.name)
        key = str(f)
        if kind == "json":
            if self._take():
                yield ("file", key, key), exclusive
        elif kind == "ndjson":
            if self._take():
                try:
                    with open(f, "rb") as raw, _open_stream(f.name, raw) as stream:
                        for t in _ndjson_tasks(key, stream):
                            yield t, exclusive
                except (OSError, EOFError, ValueError) as exc:
                    yield ("fail", key, f"cannot read: {exc}"), False
        elif kind == "tar":
            yield from self._tar_tasks(f)
        elif kind == "zip":
            yield from self._zip_tasks(f)

    def _member_tasks(self, key: str, name: str, fh) -> Iterator[tuple[tuple, bool]]:
        kind = _kind(name)
        exclusive = is_first_phase(name)
        if kind == "json":
            yield ("data", key, name, fh.read()), exclusive
        elif kind == "ndjson":
            with _open_stream(name, fh) as stream:
                for t in _ndjson_tasks(key, stream):
                    yield t, exclusive

    def _tar_tasks(self, f: Path) -> Iterator[tuple[tuple, bool]]:
        try:
            with tarfile.open(f, mode="r|*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    if _kind(m.name) not in ("json", "ndjson"):
                        self.skipped += 1
                        continue
                    if not self._take():
                        return
                    fh = tar.extractfile(m)
                    # The member name is a label only: nothing is written to disk.
                    yield from self._member_tasks(f"{f}:{m.name}", m.name, fh)
        except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
            yield ("fail", str(f), f"cannot read archive: {exc}"), False

    def _zip_tasks(self, f: Path) -> Iterator[tuple[tuple, bool]]:
        try:
            with zipfile.ZipFile(f) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
                usable = []
                for i in infos:
                    if _kind(i.filename) in ("json", "ndjson"):
                        usable.append(i)
                    else:
                        self.skipped += 1
                first = sorted((i for i in usable if is_first_phase(i.filename)),
                               key=lambda i: i.filename.rsplit("/", 1)[-1])
                rest = sorted((i for i in usable if not is_first_phase(i.filename)),
                              key=lambda i: i.filename)
                for info in first + rest:
                    if not self._take():
                        return
                    with zf.open(info) as fh:
                        yield from self._member_tasks(f"{f}:{info.filename}", info.filename, fh)
        except (OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
            yield ("fail", str(f), f"cannot read archive: {exc}"), False


# ---------------------------------------------------------------------- worker side
_STORE = None
_CTX = None
_GC_SAVED: tuple | None = None   # the gc thresholds before tune_gc (restored at close)


def _init_worker(url: str, config: dict) -> None:
    """Create this process's own store/engine (after the fork, never inherited)."""
    global _STORE, _CTX, _GC_SAVED
    from server.source import RequestContext
    from server.store import SqlStore

    _STORE = SqlStore.from_url(url, config, auto_migrate=False)
    _CTX = RequestContext(caller="synthport-load", prefer_return="minimal")
    if _GC_SAVED is None:
        from server.fhir.validation import GC_THRESHOLD_BULK, tune_gc

        _GC_SAVED = tune_gc(GC_THRESHOLD_BULK)


def _close_worker() -> None:
    global _STORE, _GC_SAVED
    if _STORE is not None:
        _STORE.engine.dispose()
        _STORE = None
    if _GC_SAVED is not None:
        gc.set_threshold(*_GC_SAVED)
        gc.unfreeze()
        _GC_SAVED = None


def _reason(exc: BaseException) -> str:
    from server.errors import SynthportError

    if isinstance(exc, SynthportError):
        return exc.message
    if isinstance(exc, orjson.JSONDecodeError):
        return f"invalid JSON: {exc}"
    orig = getattr(exc, "orig", None)   # SQLAlchemy: the driver's error, without the SQL
    if isinstance(orig, BaseException):
        exc = orig
    text = " ".join(str(exc).split())
    if len(text) > 500:
        text = text[:500] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _entry(res: dict, full_url: str | None = None) -> dict:
    rt = res.get("resourceType")
    rid = res.get("id")
    if isinstance(rid, str) and rid:
        e = {"resource": res, "request": {"method": "PUT", "url": f"{rt}/{rid}"}}
    else:
        e = {"resource": res, "request": {"method": "POST", "url": str(rt)}}
    if full_url:
        e["fullUrl"] = full_url
    return e


def _rewrite_refs(node, aliases: dict[str, str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and v in aliases:
                node[k] = aliases[v]
            elif isinstance(v, (dict, list)):
                _rewrite_refs(v, aliases)
    elif isinstance(node, list):
        for v in node:
            _rewrite_refs(v, aliases)


def split_bundle(bundle: dict) -> tuple[dict, list[int]]:
    """A document/collection/searchset/message Bundle as one transaction Bundle.

    Returns the transaction and, per transaction entry, the index of the entry it came
    from (for error messages). A resource that appears twice (same Type/id) is written
    once; references to the dropped copy's fullUrl point at the kept one.
    """
    btype = bundle.get("type")
    entries, origin = [], []
    by_key: dict[str, int] = {}
    aliases: dict[str, str] = {}
    for i, raw in enumerate(bundle.get("entry") or []):
        if not isinstance(raw, dict) or not isinstance(raw.get("resource"), dict):
            continue
        res = raw["resource"]
        if btype == "searchset" and (res.get("resourceType") == "OperationOutcome"
                                     or (raw.get("search") or {}).get("mode") == "outcome"):
            continue
        full_url = raw.get("fullUrl") if isinstance(raw.get("fullUrl"), str) else None
        rid = res.get("id")
        if isinstance(rid, str) and rid:
            key = f"{res.get('resourceType')}/{rid}"
            if key in by_key:
                kept = entries[by_key[key]]
                if full_url and full_url != kept.get("fullUrl"):
                    aliases[full_url] = key
                continue
            by_key[key] = len(entries)
        entries.append(_entry(res, full_url))
        origin.append(i)
    if aliases:
        for e in entries:
            _rewrite_refs(e["resource"], aliases)
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, origin


def _renumber(message: str, origin: list[int]) -> str:
    """``Bundle.entry[3]: …`` of the transaction -> the index in the original Bundle."""
    m = _ENTRY_RE.match(message)
    if m and int(m.group(1)) < len(origin):
        return f"Bundle.entry[{origin[int(m.group(1))]}]" + message[m.end():]
    return message


def _outcome_text(resp: dict) -> str:
    oo = resp.get("outcome") or {}
    issues = oo.get("issue") or []
    text = "; ".join(str(i.get("diagnostics") or i.get("code") or "") for i in issues[:3])
    return f"{text} (HTTP {resp.get('status', '?')})" if text else f"HTTP {resp.get('status', '?')}"


def _load_resource_doc(file_key: str, doc) -> tuple[int, list[tuple[str, str]]]:
    """Load one parsed JSON document (resource or Bundle); return (resources, failures)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
        return 0, [(file_key, "not a FHIR resource (no resourceType)")]
    if doc["resourceType"] != "Bundle":
        tx = {"resourceType": "Bundle", "type": "transaction", "entry": [_entry(doc)]}
        _STORE.bundle(_CTX, tx)
        return 1, []
    btype = doc.get("type")
    if btype in ("transaction", "batch"):
        entries = doc.get("entry") or []
        if btype == "batch" and all(((e or {}).get("request") or {}).get("method") in ("POST", "PUT")
                                    for e in entries):
            # A batch of writes that all succeed has the effect of one transaction; one
            # commit instead of one per entry (Synthea's 0-* bundles: ~8x faster). Any
            # failure falls back to the batch, which reports each entry on its own.
            from server.errors import SynthportError
            try:
                _STORE.bundle(_CTX, {**doc, "type": "transaction"})
                return len(entries), []
            except SynthportError:
                pass
        resp = _STORE.bundle(_CTX, doc)
        loaded, failures = 0, []
        for i, (req, out) in enumerate(zip(entries, resp.get("entry") or [])):
            method = str(((req or {}).get("request") or {}).get("method", "")).upper()
            status = str((out.get("response") or {}).get("status", ""))
            if status.startswith(("2", "3")):
                if method not in ("GET", "HEAD"):
                    loaded += 1
            else:
                failures.append((file_key, f"Bundle.entry[{i}]: {_outcome_text(out['response'])}"))
        return loaded, failures
    if btype in SPLIT_TYPES:
        tx, origin = split_bundle(doc)
        if not tx["entry"]:
            return 0, []
        from server.errors import SynthportError
        try:
            _STORE.bundle(_CTX, tx)
        except SynthportError as exc:
            exc.message = _renumber(exc.message, origin)
            raise
        return len(tx["entry"]), []
    return 0, [(file_key, f"Bundle.type '{btype}' cannot be loaded (expected transaction, batch, "
                          f"{', '.join(SPLIT_TYPES)})")]


def _load_ndjson(file_key: str, lines: list[tuple[int, bytes]]) -> tuple[int, list[tuple[str, str]]]:
    failures: list[tuple[str, str]] = []
    good: list[tuple[int, bytes, dict]] = []
    for lineno, raw in lines:
        try:
            res = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            failures.append((file_key, f"line {lineno}: invalid JSON: {exc}"))
            continue
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            failures.append((file_key, f"line {lineno}: not a FHIR resource (no resourceType)"))
            continue
        good.append((lineno, raw, res))
    if not good:
        return 0, failures
    for attempt in range(RETRIES):
        entries = [_entry(r) for _, _, r in good] if attempt == 0 else \
            [_entry(orjson.loads(raw)) for _, raw, _ in good]
        try:
            _STORE.bundle(_CTX, {"resourceType": "Bundle", "type": "transaction", "entry": entries})
            return len(good), failures
        except Exception as exc:  # noqa: BLE001 - retried entry by entry below
            if not _transient(exc):
                break
    # The transaction may have changed the dicts: re-parse the lines for the retry.
    batch = {"resourceType": "Bundle", "type": "batch",
             "entry": [_entry(orjson.loads(raw)) for _, raw, _ in good]}
    try:
        resp = _STORE.bundle(_CTX, batch)
    except Exception as exc:  # noqa: BLE001
        why = _reason(exc)
        return 0, failures + [(file_key, f"line {n}: {why}") for n, _, _ in good]
    loaded = 0
    for (lineno, _, _), out in zip(good, resp.get("entry") or []):
        r = out.get("response") or {}
        if str(r.get("status", "")).startswith("2"):
            loaded += 1
        else:
            failures.append((file_key, f"line {lineno}: {_outcome_text(r)}"))
    return loaded, failures


def _read_json_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read()
    return _decompress(path, data)


def _transient(exc: BaseException) -> bool:
    """A write that lost a race with another worker and may simply be tried again.

    On PostgreSQL two workers may create the same new resource (a Practitioner shared by
    two documents) at once: one of them hits the unique version constraint. On SQLite the
    busy timeout may run out under heavy load. A retry sees the committed version (and the
    no-op detection then writes nothing).
    """
    from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

    if isinstance(exc, IntegrityError):
        return "ux_resource_type_id_version" in str(exc) or "UNIQUE constraint failed: resource." in str(exc)
    if isinstance(exc, OperationalError):
        text = str(exc).lower()
        return "database is locked" in text or "deadlock" in text or "could not serialize" in text
    return isinstance(exc, DBAPIError) and "deadlock" in str(exc).lower()


RETRIES = 3


def _run_task(task: tuple) -> dict:
    """Run one task in a worker; never raises (failures are part of the result)."""
    kind, file_key = task[0], task[1]
    resources, failures = 0, []
    try:
        if kind == "fail":
            failures = [(file_key, task[2])]
        elif kind == "ndjson":
            resources, failures = _load_ndjson(file_key, task[2])
        else:
            data = _read_json_file(task[2]) if kind == "file" else _decompress(task[2], task[3])
            for attempt in range(RETRIES):
                try:
                    # Parsed afresh each time: a failed attempt may have changed the dicts.
                    resources, failures = _load_resource_doc(file_key, orjson.loads(data))
                    break
                except Exception as exc:  # noqa: BLE001
                    if attempt + 1 < RETRIES and _transient(exc):
                        time.sleep(0.05 * (attempt + 1))
                        continue
                    raise
    except Exception as exc:  # noqa: BLE001 - a failed file must not stop the load
        failures = [(file_key, _reason(exc))]
    return {"file": file_key, "resources": resources, "failures": failures}


# ---------------------------------------------------------------------- parent side
def rate_windows(marks: list[tuple[float, int]], t0: float) -> tuple[float | None, float | None]:
    """Rate over the first and the last tenth of the resources (completion order): first =
    resources up to the completion that crossed 10 % over the time since ``t0``; last =
    resources after the last completion at or below 90 % over the time from it to the end."""
    marks = sorted(marks)
    total = sum(n for _, n in marks)
    if total <= 0 or not marks:
        return None, None
    cum, first = 0, None
    points = []  # (time, cumulative resources) after each completion
    for t, n in marks:
        cum += n
        points.append((t, cum))
    for t, c in points:
        if c >= 0.1 * total:
            first = c / max(t - t0, 1e-9)
            break
    t_end = points[-1][0]
    start_t, start_c = t0, 0
    for t, c in points:
        if c <= 0.9 * total:
            start_t, start_c = t, c
        else:
            break
    last = (total - start_c) / max(t_end - start_t, 1e-9)
    return first, last


def _echo(msg: str) -> None:
    print(msg, flush=True)


def load_paths(cfg, paths: list[str], jobs: int | None = None, progress: bool = True,
               limit: int | None = None) -> LoadReport:
    """Load FHIR data from files, folders and archives into the store named by ``cfg``.

    Args:
        cfg: a :class:`server.config.Config` (or a dict with ``database_url`` /
            ``data_dir``); its store settings (``max_bundle_entries`` …) apply.
        paths: files, folders and archives, see the module docstring.
        jobs: worker processes (default ``os.cpu_count()``); 1 loads in this process.
        progress: show a tqdm progress bar on stderr (only when stderr is a terminal).
        limit: load at most this many files/archive members (archives are read only
            as far as needed).
    """
    from server.db.engine import make_engine, migrate

    t0 = time.perf_counter()
    url = cfg.resolved_database_url if hasattr(cfg, "resolved_database_url") else cfg["database_url"]
    config = dict(cfg)
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    if config.get("auto_migrate", True):
        engine = make_engine(url)
        try:
            migrate(engine)   # once, here, before any worker starts
        finally:
            engine.dispose()  # nothing pooled is inherited by the forked workers

    report = LoadReport()
    planner = _Planner([str(p) for p in paths], limit)
    file_failed: dict[str, bool] = {}
    marks: list[tuple[float, int]] = []
    bar = _progress_bar(progress)

    def collect(result: dict) -> None:
        key = result["file"]
        file_failed[key] = file_failed.get(key, False) or bool(result["failures"])
        report.resources += result["resources"]
        report.failed.extend(result["failures"])
        marks.append((time.perf_counter(), result["resources"]))
        if bar is not None:
            bar.update(result["resources"])
            bar.set_postfix(files=len(file_failed), failed=sum(file_failed.values()), refresh=False)

    try:
        if jobs == 1:
            _init_worker(url, config)
            try:
                for task, _exclusive in planner.tasks():
                    collect(_run_task(task))
            finally:
                _close_worker()
        else:
            _run_pool(url, config, jobs, planner.tasks(), collect)
    finally:
        if bar is not None:
            bar.close()

    _analyze(url)
    report.seconds = time.perf_counter() - t0
    report.rate = report.resources / report.seconds if report.seconds > 0 else 0.0
    report.files_failed = sum(1 for v in file_failed.values() if v)
    report.files_ok = len(file_failed) - report.files_failed
    report.files_skipped = planner.skipped
    report.first_rate, report.last_rate = rate_windows(marks, t0)

    _echo(report.summary())
    if report.first_rate is not None:
        _echo(f"rate over the first 10% of resources: {report.first_rate:.0f} resources/s; "
              f"over the last 10%: {report.last_rate:.0f} resources/s")
    if report.files_skipped:
        _echo(f"skipped {report.files_skipped} files that are not FHIR JSON/NDJSON")
    for path, reason in report.failed:
        _echo(f"FAILED {path}: {reason}")
    return report


def _analyze(url: str) -> None:
    """After a bulk load. PostgreSQL: refresh planner statistics (on fresh tables without
    them, chained searches were seen to take seconds instead of milliseconds). SQLite:
    checkpoint what the WAL still holds into the database (PASSIVE: never waits for
    readers), so the load's cost is counted in full and the next reader starts clean."""
    from sqlalchemy import text

    from server.db.engine import make_engine

    if url.startswith("sqlite"):
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            engine.dispose()
        return
    if not url.startswith("postgresql"):
        return
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()


def _progress_bar(progress: bool):
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(unit=" res", unit_scale=True, desc="loading", file=sys.stderr, smoothing=0.1)


def _run_pool(url: str, config: dict, jobs: int, tasks: Iterator[tuple[tuple, bool]], collect) -> None:
    """Feed tasks to ``jobs`` processes, at most 2*jobs in flight; exclusive tasks run alone."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    if method == "fork":
        # Import the heavy modules (FHIR models, search parameters) once, before forking,
        # so that workers share them; engines are still only created in the workers.
        import server.fhir.transaction  # noqa: F401
        import server.store  # noqa: F401
    ctx = mp.get_context(method)
    max_inflight = 2 * jobs
    inflight: dict[Future, tuple] = {}

    def finish(fut: Future) -> None:
        task = inflight.pop(fut)
        try:
            collect(fut.result())
        except BrokenProcessPool:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a result that could not be sent back
            collect({"file": task[1], "resources": 0, "failures": [(task[1], _reason(exc))]})

    def drain(until: int) -> None:
        while len(inflight) > until:
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in done:
                finish(fut)

    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(url, config)) as pool:
        try:
            for task, exclusive in tasks:
                if task[0] == "fail":
                    collect(_run_task(task))
                    continue
                if exclusive:
                    drain(0)
                    inflight[pool.submit(_run_task, task)] = task
                    drain(0)
                    continue
                drain(max_inflight - 1)
                inflight[pool.submit(_run_task, task)] = task
            drain(0)
        except BrokenProcessPool as exc:
            for task in list(inflight.values()):
                collect({"file": task[1], "resources": 0,
                         "failures": [(task[1], f"loader worker died: {exc}")]})
            inflight.clear()
            left = sum(1 for _ in tasks)
            if left:
                collect({"file": "(remaining inputs)", "resources": 0,
                         "failures": [("(remaining inputs)", f"{left} tasks not loaded: a loader "
                                                             "worker process died")]})
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
