"""The real source: FHIR resources in SQL (SQLite by default, PostgreSQL at scale).

Every write appends a version row and its index rows in one transaction; nothing is
half-written. Conditional writes are serialised per condition (SQLite: the write lock
taken at BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock keyed by the
condition), so concurrent identical conditional creates yield exactly one resource.
"""
from __future__ import annotations

import functools
import hashlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import parse_qsl

import jsonpatch
import orjson
from sqlalchemy import bindparam, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine

from server.db import schema as S
from server.db.engine import begin_write, is_sqlite, make_engine, migrate
from server.errors import (Gone, InvalidRequest, MultipleMatches, NotFound, PreconditionFailed,
                           Unprocessable)
from server.fhir import search as fsearch
from server.fhir.extract import extract
from server.fhir.ids import new_id
from server.fhir.timeutil import instant, now, parse_instant
from server.fhir.validation import check_type, valid_id, validate
from server.source import RequestContext, SearchResult, StoredResource, WriteResult, patients_in_json

R = S.resource
# Called inside the transaction of every write, with the connection and what was written:
# the audit entry of a write commits or rolls back with it (server/access.py).
WRITE_HOOK: ContextVar = ContextVar("synthport_write_hook", default=None)
_INSERT_COLS = ("res_type", "res_id", "version", "last_updated", "deleted", "method",
                "superseded_by", "body")
_SQLITE_INSERT = (f"INSERT INTO resource ({', '.join(_INSERT_COLS)}) "
                  f"VALUES ({', '.join('?' * len(_INSERT_COLS))})")
_LOAD_COLS = (R.c.pk, R.c.res_type, R.c.res_id, R.c.version, R.c.last_updated, R.c.deleted,
              R.c.body, R.c.method)


@dataclass
class PendingWrite:
    """A version about to be written (body already validated).

    :meth:`prepare` does the CPU work that does not depend on the stored state (index
    extraction, serialising everything but ``meta.versionId``/``lastUpdated``), so that
    callers can run it before taking the write lock.
    """

    res_type: str
    res_id: str
    body: dict | None          # None for a delete tombstone
    method: str
    prev_pk: int | None = None
    prev_version: int = 0
    rest: bytes | None = None  # body minus resourceType/id/meta, serialised
    meta: dict | None = None   # meta minus versionId/lastUpdated
    index: dict | None = None  # extract() rows
    patients: set[str] | None = None   # patients_in_json, when a write hook (audit) wants them

    @property
    def deleted(self) -> bool:
        return self.body is None

    def prepare(self) -> "PendingWrite":
        if self.body is not None:
            body = self.body
            body["id"] = self.res_id
            meta = dict(body.get("meta") or {})
            meta.pop("versionId", None)
            meta.pop("lastUpdated", None)
            self.meta = meta
            self.rest = orjson.dumps({k: v for k, v in body.items()
                                      if k not in ("resourceType", "id", "meta")})
            self.index = extract(body)
            if WRITE_HOOK.get() is not None:
                found = patients_in_json(self.res_type, self.res_id, self.rest)
                if found is not None and meta.get("extension"):     # a valueReference in meta
                    extra = patients_in_json("", None, orjson.dumps(meta))
                    found = None if extra is None else found | extra
                self.patients = found
        return self

    def render(self, version: int, stamp: str) -> bytes:
        """Final JSON: resourceType, id, meta first (as FHIR JSON conventionally does)."""
        head = orjson.dumps({"resourceType": self.res_type, "id": self.res_id,
                             "meta": {**self.meta, "versionId": str(version), "lastUpdated": stamp}})
        return head[:-1] + b"," + self.rest[1:] if len(self.rest) > 2 else head


def parse_etag(value: str | None) -> int | None:
    """``W/"3"`` or ``"3"`` or ``3`` -> 3 (FHIR R4 http §3.1.0.5)."""
    if not value:
        return None
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    if not (v.isascii() and v.isdigit()):
        raise InvalidRequest(f"Invalid ETag '{value}'")
    return int(v)


def strip_meta(body: dict) -> dict:
    """Body without the server-managed parts of meta (for no-op update detection)."""
    out = dict(body)
    meta = dict(out.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out


def _row_to_stored(row) -> StoredResource:
    return StoredResource(res_type=row.res_type, res_id=row.res_id, version=row.version,
                          last_updated=row.last_updated, deleted=bool(row.deleted),
                          body=row.body, method=row.method)


class SqlStore:
    """SQL-backed implementation of :class:`server.source.Source` (the real data)."""

    name = "real"
    writable = True

    def __init__(self, engine: Engine, config: dict | None = None):
        self.engine = engine
        self.config = dict(config or {})
        self.default_count = int(self.config.get("default_count", 50))
        self.max_count = int(self.config.get("max_count", 1000))

    @classmethod
    def from_url(cls, url: str, config: dict | None = None, auto_migrate: bool = True) -> "SqlStore":
        engine = make_engine(url)
        if auto_migrate:
            migrate(engine)
        return cls(engine, config)

    # ------------------------------------------------------------------ helpers
    def capabilities(self) -> dict:
        return {"writable": True}

    @staticmethod
    def _latest(conn: Connection, res_type: str, res_id: str):
        return conn.execute(
            select(*_LOAD_COLS).where(R.c.res_type == res_type, R.c.res_id == res_id)
            .order_by(R.c.version.desc()).limit(1)
        ).first()

    @staticmethod
    def stored(row) -> StoredResource:
        return _row_to_stored(row)

    def current_rows(self, conn: Connection, keys: list[tuple[str, str]]) -> dict:
        """Latest version rows (deleted or not) of (type, id) pairs, in bulk."""
        out = {}
        by_type: dict[str, list[str]] = {}
        for t, i in keys:
            by_type.setdefault(t, []).append(i)
        for t, ids in by_type.items():
            for n in range(0, len(ids), 900):
                for row in conn.execute(select(*_LOAD_COLS).where(
                        R.c.res_type == t, R.c.res_id.in_(ids[n:n + 900]),
                        # "+ 0": not an index term, so (type, id) drives the lookup (see _read_sql)
                        (R.c.superseded_by + 0).is_(None))):
                    out[(row.res_type, row.res_id)] = row
        return out

    def current_ids(self, conn: Connection, keys: list[tuple[str, str]]) -> set[str]:
        """``Type/id`` of the pairs that exist and are not deleted."""
        return {f"{t}/{i}" for (t, i), row in self.current_rows(conn, keys).items() if not row.deleted}

    def load(self, conn: Connection, pks: Iterable[int]) -> list[StoredResource]:
        """Load version rows by pk, in the given order."""
        pks = list(pks)
        if not pks:
            return []
        rows = {}
        for i in range(0, len(pks), 900):
            chunk = pks[i:i + 900]
            for row in conn.execute(select(*_LOAD_COLS).where(R.c.pk.in_(chunk))):
                rows[row.pk] = row
        return [_row_to_stored(rows[p]) for p in pks if p in rows]

    def _lock_condition(self, conn: Connection, key: str) -> None:
        """Serialise writers on one condition (SQLite already holds the write lock)."""
        if not is_sqlite(self.engine):
            k = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": k})

    def lock_condition(self, conn: Connection, key: str) -> None:
        """Serialise on ``key`` for the rest of the caller's write transaction.

        Public form of the lock conditional writes take (``Patient?identifier=s|v``), so
        other writers (the DICOM store linking Patient/ImagingStudy) queue with them.
        """
        self._lock_condition(conn, key)

    def _match_at_most_one(self, conn: Connection, res_type: str, params: list[tuple[str, str]],
                           what: str) -> list[tuple[int, str]]:
        """Lock the condition, match it, refuse several matches (FHIR R4 http §3.1.0.4.3)."""
        key = "&".join(f"{k}={v}" for k, v in params)
        self._lock_condition(conn, f"{res_type}?{key}")
        found = self.match(conn, res_type, params)
        if len(found) > 1:
            raise MultipleMatches(f"Conditional {what} matched {len(found)} resources; "
                                  "refine the criteria")
        return found

    def write_versions(self, conn: Connection, items: list[PendingWrite],
                       ts: float | None = None) -> list[StoredResource]:
        """Append versions and their index rows (bulk); the caller owns the transaction."""
        if not items:
            return []
        ts = now() if ts is None else ts
        stamp = instant(ts)
        rows, stored = [], []
        for it in items:
            if it.body is not None and it.rest is None:
                it.prepare()
            version = it.prev_version + 1
            raw = it.render(version, stamp) if it.body is not None else None
            rows.append({"res_type": it.res_type, "res_id": it.res_id, "version": version,
                         "last_updated": ts, "deleted": it.body is None, "method": it.method,
                         "superseded_by": None, "body": raw})
            stored.append(StoredResource(it.res_type, it.res_id, version, ts, it.body is None,
                                         raw, it.method))
        pks = self._insert_rows(conn, rows)
        supersede = [{"old": it.prev_pk, "new": pk} for it, pk in zip(items, pks) if it.prev_pk]
        if supersede:
            conn.execute(update(R).where(R.c.pk == bindparam("old"))
                         .values(superseded_by=bindparam("new")), supersede)
        index_rows: dict[str, list[tuple]] = {}
        for it, pk in zip(items, pks):
            if it.index is None:
                continue
            prepend = (pk, it.res_type).__add__    # under the write lock: C-level concatenation
            for kind, tuples in it.index.items():
                if tuples:
                    index_rows.setdefault(kind, []).extend(map(prepend, tuples))
        for kind, bucket in index_rows.items():
            conn.exec_driver_sql(self._index_sql(kind), bucket)
        hook = WRITE_HOOK.get()
        if hook is not None:
            hook(conn, stored, items)
        return stored

    def _insert_rows(self, conn: Connection, rows: list[dict]) -> list[int]:
        """Insert version rows; return their pks in row order.

        SQLite: one executemany, pks from ``last_insert_rowid()``. The first INSERT takes the
        write lock, so the rows get consecutive rowids (SQLite gives max + 1); the first one
        is checked. SQLAlchemy's ``RETURNING`` with ``sort_by_parameter_order`` runs one
        INSERT per row on SQLite (30 -> 9 us per row here).
        """
        if not is_sqlite(self.engine):
            result = conn.execute(insert(R).returning(R.c.pk, sort_by_parameter_order=True), rows)
            return [r[0] for r in result]
        conn.exec_driver_sql(_SQLITE_INSERT, [tuple(r[c] for c in _INSERT_COLS) for r in rows])
        last = conn.exec_driver_sql("SELECT last_insert_rowid()").scalar_one()
        first = last - len(rows) + 1
        row = conn.exec_driver_sql("SELECT res_type, res_id, version FROM resource WHERE pk = ?",
                                   (first,)).first()
        if row is None or tuple(row) != (rows[0]["res_type"], rows[0]["res_id"], rows[0]["version"]):
            raise RuntimeError("resource rows did not get consecutive pks")
        return list(range(first, last + 1))

    @functools.cache
    def _index_sql(self, kind: str) -> str:
        """Plain INSERT for executemany with tuples: the hot path of every write."""
        cols = ("res_pk", "res_type", "param") + S.INDEX_COLUMNS[kind]
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        return (f"INSERT INTO {S.INDEX_TABLES[kind].name} ({', '.join(cols)}) "
                f"VALUES ({', '.join([mark] * len(cols))})")

    # ------------------------------------------------------------------ reads
    def _fetch_one(self, sql: str, params: tuple):
        """Hot read path: one plain SELECT on a pooled DBAPI connection (no ORM/Core
        statement building, no explicit transaction); read by id is the most frequent call."""
        raw = self._read_engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(sql, params)
            row = cur.fetchone()
            cur.close()
        finally:
            raw.close()
        return row

    @functools.cached_property
    def _read_engine(self) -> Engine:
        """PostgreSQL: an autocommit pool for single-statement reads, so a read by id is one
        round trip (no BEGIN, no ROLLBACK on return to the pool). SQLite: the same engine."""
        if is_sqlite(self.engine):
            return self.engine
        from sqlalchemy import create_engine

        return create_engine(self.engine.url, isolation_level="AUTOCOMMIT", pool_reset_on_return=None,
                             pool_recycle=1800, pool_size=5, max_overflow=10)

    @functools.cached_property
    def _read_sql(self) -> str:
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        # The newest version is the current one; ordering on the unique (type, id, version)
        # index leaves the planner no other choice (without statistics SQLite could pick
        # ix_resource_current and scan every current resource of the type).
        return ("SELECT res_type, res_id, version, last_updated, deleted, body, method FROM resource "
                f"WHERE res_type = {mark} AND res_id = {mark} ORDER BY version DESC LIMIT 1")

    def read(self, ctx: RequestContext, res_type: str, res_id: str) -> StoredResource:
        check_type(res_type)
        row = self._fetch_one(self._read_sql, (res_type, res_id))
        if row is not None:
            row = StoredResource(row[0], row[1], row[2], row[3], bool(row[4]),
                                 bytes(row[5]) if row[5] is not None else None, row[6])
        if row is None:
            raise NotFound(f"{res_type}/{res_id} is not known")
        if row.deleted:
            raise Gone(f"{res_type}/{res_id} was deleted (version {row.version})")
        return row

    def vread(self, ctx: RequestContext, res_type: str, res_id: str, version: int) -> StoredResource:
        check_type(res_type)
        with self.engine.connect() as conn:
            row = conn.execute(select(*_LOAD_COLS).where(
                R.c.res_type == res_type, R.c.res_id == res_id, R.c.version == version)).first()
        if row is None:
            raise NotFound(f"{res_type}/{res_id}/_history/{version} is not known")
        if row.deleted:
            raise Gone(f"{res_type}/{res_id} version {version} is a deletion")
        return _row_to_stored(row)

    def search(self, ctx: RequestContext, res_type: str | None,
               params: list[tuple[str, str]]) -> SearchResult:
        if res_type:
            check_type(res_type)
        parsed = fsearch.parse(res_type, params, handling=ctx.handling,
                               default_count=self.default_count, max_count=self.max_count)
        with self.engine.connect() as conn:
            snapshot = _snapshot_param(params)
            page = fsearch.execute(conn, parsed, snapshot=snapshot, terminology=self.term_resolver())
            matches = self.load(conn, page.pks)
            includes = self.load(conn, page.include_pks)
        return SearchResult(matches=matches, includes=includes, total=page.total,
                            self_params=parsed.self_params, next_params=page.next_params,
                            prev_params=page.prev_params, warnings=list(page.warnings),
                            summary_count=parsed.summary == "count",
                            elements=parsed.elements, summary=parsed.summary)

    def match(self, conn: Connection, res_type: str, query: str | list[tuple[str, str]]) -> list[tuple[int, str]]:
        """Current matches of a conditional criterion (``identifier=a|b``)."""
        params = parse_qsl(query, keep_blank_values=True) if isinstance(query, str) else query
        if not params:
            raise InvalidRequest("A conditional operation needs search criteria")
        return fsearch.match_pks(conn, res_type, params, terminology=self.term_resolver())

    def history(self, ctx: RequestContext, res_type: str | None, res_id: str | None,
                params: list[tuple[str, str]]) -> SearchResult:
        """Instance, type or system history (FHIR R4 http §3.1.0.11), newest first, paged."""
        if res_type:
            check_type(res_type)
        count, offset, since, at = self.default_count, 0, None, None
        for k, v in params:
            if k == "_count":
                count = fsearch.int_param(k, v)
            elif k == "_offset":
                offset = fsearch.int_param(k, v)
            elif k == "_since":
                since = parse_instant(v)
            elif k == "_at":
                at = parse_instant(v)
        warnings = []
        if count > self.max_count:
            warnings.append(f"_count capped at {self.max_count}")
            count = self.max_count
        with self.engine.connect() as conn:
            snapshot = _snapshot_param(params)
            if snapshot is None:
                snapshot = conn.execute(select(func.coalesce(func.max(R.c.pk), 0))).scalar_one()
            cond = [R.c.pk <= snapshot]
            if res_type:
                cond.append(R.c.res_type == res_type)
            if res_id:
                cond.append(R.c.res_id == res_id)
                if not conn.execute(select(R.c.pk).where(*cond).limit(1)).first():
                    raise NotFound(f"{res_type}/{res_id} is not known")
            if since is not None:
                cond.append(R.c.last_updated >= since)
            if at is not None:
                cond.append(R.c.last_updated <= at)
            total = conn.execute(select(func.count()).select_from(R).where(*cond)).scalar_one()
            rows = conn.execute(select(*_LOAD_COLS).where(*cond)
                                .order_by(R.c.last_updated.desc(), R.c.pk.desc())
                                .limit(count).offset(offset)).all()
        base = [(k, v) for k, v in params if k not in ("_offset", "_snapshot")]
        nxt = base + [("_snapshot", str(snapshot)), ("_offset", str(offset + count))] \
            if offset + count < total and count > 0 else None
        prev = base + [("_snapshot", str(snapshot)), ("_offset", str(max(0, offset - count)))] \
            if offset > 0 else None
        return SearchResult(matches=[_row_to_stored(r) for r in rows], total=total,
                            self_params=params, next_params=nxt, prev_params=prev,
                            warnings=warnings)

    # ------------------------------------------------------------------ writes
    def create(self, ctx: RequestContext, res_type: str, body: dict,
               if_none_exist: str | None = None) -> WriteResult:
        check_type(res_type)
        validate(body, res_type)
        item = PendingWrite(res_type, new_id(), body, "POST").prepare()
        conn = begin_write(self.engine)
        try:
            with conn.begin():
                if if_none_exist:
                    self._lock_condition(conn, f"{res_type}?{if_none_exist}")
                    found = self.match(conn, res_type, if_none_exist)
                    if len(found) > 1:
                        raise MultipleMatches(f"If-None-Exist '{if_none_exist}' matched "
                                              f"{len(found)} resources")
                    if found:
                        existing = self.load(conn, [found[0][0]])[0]
                        return WriteResult(200, existing)
                stored = self.write_versions(conn, [item])
        finally:
            conn.close()
        return WriteResult(201, stored[0])

    def update(self, ctx: RequestContext, res_type: str, res_id: str, body: dict,
               if_match: str | None = None) -> WriteResult:
        check_type(res_type)
        if not valid_id(res_id):
            raise InvalidRequest(f"Invalid id '{res_id}'")
        if not isinstance(body, dict) or body.get("id") != res_id:
            raise InvalidRequest(f"The resource id must be present and equal to the URL id '{res_id}' "
                                 "(FHIR R4 http §3.1.0.4)", [f"{res_type}.id"])
        validate(body, res_type)
        want = parse_etag(if_match)
        conn = begin_write(self.engine)
        try:
            with conn.begin():
                return self._update_locked(conn, res_type, res_id, body, want)
        finally:
            conn.close()

    def _update_locked(self, conn, res_type, res_id, body, want_version=None,
                       method="PUT") -> WriteResult:
        self._lock_condition(conn, f"{res_type}/{res_id}")  # two PUTs creating one id
        cur = self._latest(conn, res_type, res_id)
        if want_version is not None and (cur is None or cur.deleted or cur.version != want_version):
            have = "none" if cur is None or cur.deleted else cur.version
            raise PreconditionFailed(f"If-Match version {want_version} does not match current "
                                     f"version {have} of {res_type}/{res_id}")
        if cur is not None and not cur.deleted and cur.body is not None:
            old = orjson.loads(cur.body)
            if strip_meta(old) == strip_meta(body):  # no-op update: no new version
                return WriteResult(200, _row_to_stored(cur))
        item = PendingWrite(res_type, res_id, body, method,
                            prev_pk=cur.pk if cur is not None else None,
                            prev_version=cur.version if cur is not None else 0)
        stored = self.write_versions(conn, [item])[0]
        created = cur is None or cur.deleted
        return WriteResult(201 if created else 200, stored)

    def conditional_update(self, ctx: RequestContext, res_type: str,
                           params: list[tuple[str, str]], body: dict) -> WriteResult:
        check_type(res_type)
        validate(body, res_type)
        conn = begin_write(self.engine)
        try:
            with conn.begin():
                found = self._match_at_most_one(conn, res_type, params, "update")
                if found:
                    res_id = found[0][1]
                    if body.get("id") not in (None, res_id):
                        raise InvalidRequest(f"Body id '{body.get('id')}' differs from the matched "
                                             f"resource {res_type}/{res_id}")
                else:
                    res_id = body.get("id") or new_id()
                body["id"] = res_id
                return self._update_locked(conn, res_type, res_id, body)
        finally:
            conn.close()

    def patch(self, ctx: RequestContext, res_type: str, res_id: str, patch: list,
              if_match: str | None = None) -> WriteResult:
        check_type(res_type)
        want = parse_etag(if_match)
        conn = begin_write(self.engine)
        try:
            with conn.begin():
                cur = self._latest(conn, res_type, res_id)
                if cur is None:
                    raise NotFound(f"{res_type}/{res_id} is not known")
                if cur.deleted:
                    raise Gone(f"{res_type}/{res_id} was deleted")
                body = apply_json_patch(orjson.loads(cur.body), patch)
                if body.get("resourceType") != res_type or body.get("id") != res_id:
                    raise Unprocessable("A patch may not change resourceType or id")
                validate(body, res_type)
                return self._update_locked(conn, res_type, res_id, body, want, method="PATCH")
        finally:
            conn.close()

    def delete(self, ctx: RequestContext, res_type: str, res_id: str) -> WriteResult:
        check_type(res_type)
        conn = begin_write(self.engine)
        try:
            with conn.begin():
                return self._delete_locked(conn, res_type, res_id)
        finally:
            conn.close()

    def _delete_locked(self, conn, res_type, res_id) -> WriteResult:
        cur = self._latest(conn, res_type, res_id)
        if cur is None:
            raise NotFound(f"{res_type}/{res_id} is not known")
        if cur.deleted:
            return WriteResult(204, _row_to_stored(cur))
        stored = self.write_versions(conn, [PendingWrite(res_type, res_id, None, "DELETE",
                                                         prev_pk=cur.pk, prev_version=cur.version)])
        return WriteResult(204, stored[0])

    def conditional_delete(self, ctx: RequestContext, res_type: str,
                           params: list[tuple[str, str]]) -> WriteResult:
        check_type(res_type)
        conn = begin_write(self.engine)
        try:
            with conn.begin():
                found = self._match_at_most_one(conn, res_type, params, "delete")
                if not found:
                    return WriteResult(204)
                return self._delete_locked(conn, res_type, found[0][1])
        finally:
            conn.close()

    # ------------------------------------------------------------------ terminology
    @functools.cached_property
    def terminology(self):
        """The terminology provider over this store (server/terminology, ADR 0005)."""
        from server.terminology.provider import SqlTerminologyProvider

        return SqlTerminologyProvider(self)

    def term_resolver(self):
        """Resolves :below/:above/:in/:not-in for one search (server.fhir.search)."""
        from server.terminology.search import TerminologyResolver

        return TerminologyResolver(self.terminology)

    def operation(self, ctx: RequestContext, res_type: str, res_id: str | None, name: str,
                  params: dict | list[tuple[str, str]]) -> dict:
        """A FHIR operation other than the REST interactions (terminology operations)."""
        from server.fhir.terminology_ops import run_operation

        check_type(res_type)

        def read_body(t: str, i: str) -> dict:
            return orjson.loads(self.read(ctx, t, i).body)

        return run_operation(self.terminology, read_body, res_type, res_id, name, params)

    # ------------------------------------------------------------------ bundles / operations
    def bundle(self, ctx: RequestContext, bundle: dict) -> dict:
        from server.fhir.transaction import process_bundle

        return process_bundle(self, ctx, bundle)

    def everything(self, ctx: RequestContext, patient_id: str,
                   params: list[tuple[str, str]]) -> SearchResult:
        from server.fhir.everything import patient_everything

        return patient_everything(self, ctx, patient_id, params)

    def compartments(self, ctx: RequestContext, snapshot: int | None = None):
        """``$everything`` of many patients on one snapshot, a few statements each: a
        :class:`server.fhir.everything.CompartmentReader` (close it). For ``synthport
        map`` and training, which filter consent and audit the export themselves; not
        part of the guarded protocol (server/access.py does not pass it through)."""
        from server.fhir.everything import CompartmentReader

        return CompartmentReader(self.engine, snapshot)


def apply_json_patch(doc: dict, patch: list) -> dict:
    """Apply RFC 6902 JSON Patch (FHIR R4 http §3.1.0.7.1)."""
    if not isinstance(patch, list):
        raise InvalidRequest("JSON Patch body must be an array of operations")
    try:
        return jsonpatch.apply_patch(doc, patch)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError,
            KeyError, ValueError) as exc:
        raise Unprocessable(f"JSON Patch could not be applied: {exc}") from None


def _snapshot_param(params: list[tuple[str, str]]) -> int | None:
    for k, v in params:
        if k == "_snapshot":
            return fsearch.int_param(k, v)
    return None
