"""The audit log: AuditEvents as the leaves of an append-only RFC 9162 Merkle tree, in SQL.

Tables come from migration 0006. One append is one short write transaction: lock the
single ``audit_state`` row (SQLite: the write lock taken at ``BEGIN IMMEDIATE``;
PostgreSQL: ``SELECT ... FOR UPDATE``), take ``seq = tree_size``, store the entry bytes,
their leaf hash, the search columns and the entity references, fold the leaf into the
stored frontier, and store any perfect subtree of 256 leaves or more that the append
completed. Appends therefore get consecutive indexes across threads, workers and hosts.

The entry bytes are canonical JSON (orjson, sorted keys) of the AuditEvent with ``id`` =
``str(seq)`` and ``meta.versionId``/``meta.lastUpdated`` set; the leaf hash is
``SHA-256(0x00 || entry)`` (RFC 9162 §2.1.1). Everything else stored is derived from the
entries, and :meth:`AuditLog.verify` recomputes it and compares. Signed tree heads (STH)
are JWS compact serialisations (ES384, the server key) over the canonical JSON of
``{"sha256_root_hash", "timestamp", "tree_size"}``, as in RFC 9162 §4.10.

Search (``/fhir/AuditEvent``) pages newest first by ``seq``; a page's next link carries
``_before=<seq of its last entry>``, so pages stay stable while the log grows.
"""
from __future__ import annotations

import base64
import functools
import time
from dataclasses import dataclass
from typing import Any

import orjson
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey
from sqlalchemy import (BigInteger, Column, Float, Integer, LargeBinary, MetaData, String, Table,
                        Text, and_, func, insert, not_, or_, select)
from sqlalchemy.engine import Connection, Engine

from server.audit import merkle
from server.db.engine import begin_write, is_sqlite
from server.errors import InternalError, InvalidRequest, NotFound, SynthportError
from server.fhir.search import OPEN_END, date_search_range
from server.fhir.timeutil import instant, now, parse_instant
from server.source import SearchResult, StoredResource

metadata = MetaData()
_PK = BigInteger().with_variant(Integer, "sqlite")

entry_table = Table(
    "audit_entry", metadata,
    Column("seq", _PK, primary_key=True, autoincrement=False),
    Column("recorded", Float, nullable=False),
    Column("entry", LargeBinary, nullable=False),
    Column("leaf_hash", LargeBinary, nullable=False),
    Column("action", String(1), nullable=False),
    Column("subtype", String(64), nullable=False),
    Column("outcome", String(2), nullable=False),
    Column("agent", String(256), nullable=False),
    Column("source", String(128), nullable=False),
)
ref_table = Table(
    "audit_ref", metadata,
    Column("ref", String(256), primary_key=True),
    Column("seq", _PK, primary_key=True, autoincrement=False),
)
node_table = Table(
    "audit_node", metadata,
    Column("level", Integer, primary_key=True, autoincrement=False),
    Column("idx", _PK, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary, nullable=False),
)
state_table = Table(
    "audit_state", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("tree_size", BigInteger, nullable=False),
    Column("frontier", Text, nullable=False),
)
sth_table = Table(
    "audit_sth", metadata,
    Column("tree_size", BigInteger, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary, nullable=False),
    Column("timestamp", Float, nullable=False),
    Column("signature", Text, nullable=False),
)

E = entry_table
#: Perfect subtrees of 2**NODE_MIN_LEVEL leaves and more are stored (audit_node); smaller
#: ones are hashed from at most 256 stored leaf hashes when a proof needs them.
NODE_MIN_LEVEL = 8
#: Entries read per batch by verify().
VERIFY_BATCH = 2000
#: Search parameters of AuditEvent served here (FHIR R4 AuditEvent search parameters,
#: plus ``_before`` for paging).
SEARCH_PARAMS = ("date", "agent", "patient", "entity", "action", "outcome", "subtype", "source")
_IGNORED = {"_format", "_pretty", "_total", "_summary", "_elements", "_sort", "_count", "_before"}
_WIDTH = {"subtype": 64, "agent": 256, "source": 128, "ref": 256}


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes: orjson with sorted keys (no whitespace, UTF-8)."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _clip(value: str, column: str) -> str:
    return value[:_WIDTH[column]]


@dataclass(frozen=True)
class IndexValues:
    """What the search columns and ``audit_ref`` hold for one entry."""

    recorded: float
    action: str
    subtype: str
    outcome: str
    agent: str
    source: str
    refs: tuple[str, ...]


def _who(ref: dict | None) -> str:
    ref = ref or {}
    return ((ref.get("identifier") or {}).get("value") or ref.get("reference")
            or ref.get("display") or "")


def index_values(event: dict) -> IndexValues:
    """The search values of an AuditEvent: ``agent`` is the requestor (else the first
    agent), ``source`` the observer, ``refs`` every ``entity.what`` (reference, else
    identifier value)."""
    agents = event.get("agent") or []
    requestor = next((a for a in agents if a.get("requestor")), agents[0] if agents else {})
    subtypes = event.get("subtype") or []
    refs: list[str] = []
    for ent in event.get("entity") or []:
        r = _who(ent.get("what"))
        if r:
            r = _clip(r, "ref")
            if r not in refs:
                refs.append(r)
    recorded = event.get("recorded")
    if not isinstance(recorded, str):
        raise ValueError("AuditEvent.recorded is required")
    return IndexValues(
        recorded=round(parse_instant(recorded), 3),
        action=str(event.get("action") or ""),
        subtype=_clip(str(subtypes[0].get("code") or "") if subtypes else "", "subtype"),
        outcome=str(event.get("outcome") or ""),
        agent=_clip(_who(requestor.get("who")), "agent"),
        source=_clip(_who((event.get("source") or {}).get("observer")), "source"),
        refs=tuple(refs),
    )


def _decode_frontier(text: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in orjson.loads(text)]


def _encode_frontier(frontier: list[bytes]) -> str:
    return orjson.dumps([h.hex() for h in frontier]).decode()


def sth_payload(tree_size: int, timestamp_ms: int, root: bytes) -> bytes:
    """The bytes an STH signature covers (canonical JSON, RFC 9162 §4.10 fields)."""
    return canonical({"sha256_root_hash": _b64(root), "timestamp": timestamp_ms,
                      "tree_size": tree_size})


@dataclass
class VerifyReport:
    """The outcome of :meth:`AuditLog.verify`.

    Attributes:
        ok: True when every check passed.
        checked: entries verified before the first failure (all of them when ok).
        first_bad: what failed first: ``entry <seq>``, ``entries <a>-<b>``,
            ``sth <tree_size>`` or ``audit_state``; None when ok.
        reason: why, in words; None when ok.
    """

    ok: bool
    checked: int
    first_bad: str | None = None
    reason: str | None = None


class _Bad(Exception):
    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.what, self.reason = what, reason


class AuditLog:
    """The audit log over one database.

    Args:
        engine: the SQLAlchemy engine of the store (schema at migration 0006 or later).
        cfg: settings (``data_dir``/``auth_key_file`` name the signing key;
            ``default_count``/``max_count`` size search pages).
    """

    def __init__(self, engine: Engine, cfg):
        self.engine = engine
        self.cfg = cfg
        self._pg = not is_sqlite(engine)
        self.default_count = int(cfg.get("default_count", 50) or 50)
        self.max_count = int(cfg.get("max_count", 1000) or 1000)

    # ------------------------------------------------------------------ append
    def append(self, event: dict, conn: Connection | None = None) -> int:
        """Append one AuditEvent; return its ``seq`` (leaf index, also its id).

        Args:
            event: the AuditEvent (:func:`server.audit.balp.audit_event`); not modified.
            conn: a connection inside the caller's write transaction (the caller begins
                and commits; the entry commits or rolls back with the caller's writes).
                Without it the append runs in its own transaction.

        Raises:
            InternalError: the entry could not be written (the interaction must fail).
        """
        try:
            values = index_values(event)
            if conn is None:
                return self.append_many([event])[0]
            return self._append_locked(conn, dict(event), values)
        except SynthportError:
            raise
        except Exception as exc:  # never swallow: an interaction without its audit fails
            raise InternalError(f"The audit entry could not be written "
                                f"({type(exc).__name__}: {exc})") from exc

    def append_many(self, events: list[dict], *, before_commit=None) -> list[int]:
        """Append several AuditEvents in one transaction (group commit, spool merges);
        all or none are written.

        Args:
            before_commit: called with the connection inside the transaction after the
                entries are written (the spool records how far it merged, atomically).

        Raises:
            InternalError: the entries could not be written.
        """
        try:
            values = [index_values(ev) for ev in events]
            c = begin_write(self.engine)
            try:
                with c.begin():
                    seqs = self._append_batch(c, [dict(ev) for ev in events], values)
                    if before_commit is not None:
                        before_commit(c)
                    return seqs
            finally:
                c.close()
        except SynthportError:
            raise
        except Exception as exc:  # never swallow: an interaction without its audit fails
            raise InternalError(f"The audit entries could not be written "
                                f"({type(exc).__name__}: {exc})") from exc

    @functools.cached_property
    def _sql(self) -> dict[str, str]:
        """The append path's statements as driver SQL (no per-call statement building:
        an append runs on every request)."""
        m = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        lock = " FOR UPDATE" if self._pg else ""  # PostgreSQL: serialise appends on the row
        return {
            "state": f"SELECT tree_size, frontier FROM audit_state WHERE id = 1{lock}",
            "entry": "INSERT INTO audit_entry (seq, recorded, entry, leaf_hash, action, subtype, "
                     f"outcome, agent, source) VALUES ({', '.join([m] * 9)})",
            "ref": f"INSERT INTO audit_ref (ref, seq) VALUES ({m}, {m})",
            "node": f"INSERT INTO audit_node (level, idx, hash) VALUES ({m}, {m}, {m})",
            "update": f"UPDATE audit_state SET tree_size = {m}, frontier = {m} WHERE id = 1",
        }

    def _lock_state(self, conn: Connection) -> tuple[int, list[bytes]]:
        row = conn.exec_driver_sql(self._sql["state"]).first()
        if row is None:
            raise InternalError("audit_state row is missing (migration 0006 not applied?)")
        return int(row[0]), _decode_frontier(row[1])

    def _append_locked(self, conn: Connection, body: dict, v: IndexValues) -> int:
        return self._append_batch(conn, [body], [v])[0]

    def _append_batch(self, conn: Connection, bodies: list[dict], values: list[IndexValues]) -> list[int]:
        """Append under the lock: one statement per table for the whole batch."""
        sql = self._sql
        size, frontier = self._lock_state(conn)
        stamp = instant(now())
        entries, refs, nodes = [], [], []
        for k, (body, v) in enumerate(zip(bodies, values)):
            seq = size + k
            body["id"] = str(seq)
            body["meta"] = {**(body.get("meta") or {}), "versionId": "1", "lastUpdated": stamp}
            entry = canonical(body)
            leaf = merkle.leaf_hash(entry)
            frontier, made = merkle.append_with_nodes(frontier, seq, leaf)
            entries.append((seq, v.recorded, entry, leaf, v.action, v.subtype, v.outcome, v.agent,
                            v.source))
            refs.extend((r, seq) for r in v.refs)
            nodes.extend((lv, ix, h) for lv, ix, h in made if lv >= NODE_MIN_LEVEL)
        if not entries:
            return []
        conn.exec_driver_sql(sql["entry"], entries if len(entries) > 1 else entries[0])
        if refs:
            conn.exec_driver_sql(sql["ref"], refs)
        if nodes:
            conn.exec_driver_sql(sql["node"], nodes)
        conn.exec_driver_sql(sql["update"], (size + len(entries), _encode_frontier(frontier)))
        return list(range(size, size + len(entries)))

    # ------------------------------------------------------------------ tree heads
    def _key(self) -> ECKey:
        from server.auth.keys import server_key

        return server_key(self.cfg)

    def tree_size(self) -> int:
        """The number of entries."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(state_table.c.tree_size)
                                    .where(state_table.c.id == 1)).scalar_one())

    def root(self) -> tuple[int, bytes]:
        """(tree size, root hash) of the log now."""
        with self.engine.connect() as conn:
            row = conn.execute(select(state_table.c.tree_size, state_table.c.frontier)
                               .where(state_table.c.id == 1)).one()
        size = int(row[0])
        return size, merkle.root_from_frontier(_decode_frontier(row[1]), size)

    @staticmethod
    def _sth_dict(row) -> dict:
        return {"tree_size": int(row.tree_size), "timestamp": int(round(row.timestamp * 1000)),
                "sha256_root_hash": _b64(bytes(row.root_hash)), "signature": row.signature}

    def sign_tree_head(self, min_interval: float = 0.0) -> dict:
        """Sign the current tree head, or return the latest STH if the tree did not grow.

        Args:
            min_interval: also return the latest STH while it is younger than this many
                seconds (bounds the number of STHs a busy log accumulates).

        Returns:
            ``{"tree_size", "timestamp" (ms since the epoch), "sha256_root_hash" (base64),
            "signature" (JWS compact, ES384, payload = canonical JSON of the other three)}``.
        """
        key = self._key()
        c = begin_write(self.engine)
        try:
            with c.begin():
                size, frontier = self._lock_state(c)
                latest = c.execute(select(sth_table).order_by(sth_table.c.tree_size.desc())
                                   .limit(1)).first()
                if latest is not None and (int(latest.tree_size) == size or
                                           time.time() - latest.timestamp < min_interval):
                    return self._sth_dict(latest)
                root = merkle.root_from_frontier(frontier, size)
                ts_ms = int(time.time() * 1000)
                sig = jws.serialize_compact({"alg": "ES384", "kid": key.kid},
                                            sth_payload(size, ts_ms, root), key,
                                            algorithms=["ES384"])
                c.execute(insert(sth_table), {"tree_size": size, "root_hash": root,
                                              "timestamp": ts_ms / 1000, "signature": sig})
        finally:
            c.close()
        return {"tree_size": size, "timestamp": ts_ms, "sha256_root_hash": _b64(root),
                "signature": sig}

    def latest_sth(self) -> dict | None:
        """The newest stored STH, or None before the first :meth:`sign_tree_head`."""
        with self.engine.connect() as conn:
            row = conn.execute(select(sth_table).order_by(sth_table.c.tree_size.desc())
                               .limit(1)).first()
        return self._sth_dict(row) if row is not None else None

    def check_sth(self, sth: dict) -> bool:
        """True when an STH dict's signature verifies with the server key and covers
        exactly its other fields."""
        try:
            obj = jws.deserialize_compact(sth["signature"], self._public_key(),
                                          algorithms=["ES384"])
            want = sth_payload(int(sth["tree_size"]), int(sth["timestamp"]),
                               base64.b64decode(sth["sha256_root_hash"]))
        except (JoseError, KeyError, ValueError, TypeError):
            return False
        return obj.payload == want

    def _public_key(self) -> ECKey:
        return ECKey.import_key(self._key().as_dict(private=False))

    # ------------------------------------------------------------------ proofs
    def _tree(self, conn: Connection, size: int):
        """A ``perfect(level, idx)`` oracle over the stored log (memoised per call)."""
        blocks: dict[int, list[bytes]] = {}
        span = 1 << NODE_MIN_LEVEL

        def leaves(block: int) -> list[bytes]:
            if block not in blocks:
                lo = block * span
                rows = conn.execute(select(E.c.seq, E.c.leaf_hash)
                                    .where(E.c.seq >= lo, E.c.seq < min(lo + span, size))
                                    .order_by(E.c.seq)).all()
                if [r[0] for r in rows] != list(range(lo, min(lo + span, size))):
                    raise InternalError(f"audit log entries {lo}.. are missing; run "
                                        "'synthport audit verify'")
                blocks[block] = [bytes(r[1]) for r in rows]
            return blocks[block]

        def perfect(level: int, idx: int) -> bytes:
            if level >= NODE_MIN_LEVEL:
                h = conn.execute(select(node_table.c.hash).where(
                    node_table.c.level == level, node_table.c.idx == idx)).scalar()
                if h is None:
                    raise InternalError(f"audit subtree ({level}, {idx}) is missing; run "
                                        "'synthport audit verify'")
                return bytes(h)
            start = idx << level
            block = leaves(start >> NODE_MIN_LEVEL)
            off = start & (span - 1)
            return merkle.mth(block[off:off + (1 << level)])

        return lambda a, b: merkle.range_hash(a, b, perfect)

    def _current_size(self, conn: Connection) -> int:
        return int(conn.execute(select(state_table.c.tree_size)
                                .where(state_table.c.id == 1)).scalar_one())

    def inclusion(self, index: int, tree_size: int) -> dict:
        """The inclusion proof of entry ``index`` in the tree of ``tree_size`` entries
        (RFC 9162 §2.1.3.1).

        Returns:
            ``{"leaf_index", "tree_size", "leaf_hash", "inclusion_path", "sha256_root_hash"}``,
            hashes base64, the path from the leaf up.

        Raises:
            InvalidRequest: not ``0 <= index < tree_size <= current size``.
        """
        with self.engine.connect() as conn:
            current = self._current_size(conn)
            if not 0 <= index < tree_size <= current:
                raise InvalidRequest(f"need 0 <= index < tree_size <= {current} (the log's "
                                     f"size), got index={index}, tree_size={tree_size}")
            sub = self._tree(conn, tree_size)
            path = merkle.inclusion_path(index, sub, tree_size)
            leaf = sub(index, index + 1)
            root = sub(0, tree_size)
        return {"leaf_index": index, "tree_size": tree_size, "leaf_hash": _b64(leaf),
                "inclusion_path": [_b64(h) for h in path], "sha256_root_hash": _b64(root)}

    def consistency(self, first: int, second: int) -> dict:
        """The consistency proof between the trees of ``first`` and ``second`` entries
        (RFC 9162 §2.1.4.1).

        Returns:
            ``{"first", "second", "consistency_path", "first_root_hash",
            "second_root_hash"}``, hashes base64.

        Raises:
            InvalidRequest: not ``0 <= first <= second <= current size``.
        """
        with self.engine.connect() as conn:
            current = self._current_size(conn)
            if not 0 <= first <= second <= current:
                raise InvalidRequest(f"need 0 <= first <= second <= {current} (the log's "
                                     f"size), got first={first}, second={second}")
            sub = self._tree(conn, second)
            path = merkle.consistency_path(first, sub, second)
            r1 = sub(0, first) if first else merkle.EMPTY_ROOT
            r2 = sub(0, second) if second else merkle.EMPTY_ROOT
        return {"first": first, "second": second, "consistency_path": [_b64(h) for h in path],
                "first_root_hash": _b64(r1), "second_root_hash": _b64(r2)}

    # ------------------------------------------------------------------ reads
    def entry(self, seq: int) -> bytes:
        """The stored bytes of entry ``seq`` (exactly what was hashed)."""
        with self.engine.connect() as conn:
            b = conn.execute(select(E.c.entry).where(E.c.seq == seq)).scalar()
        if b is None:
            raise NotFound(f"audit entry {seq} does not exist")
        return bytes(b)

    def read(self, seq: int | str) -> StoredResource:
        """``AuditEvent/<seq>`` as a stored resource."""
        s = str(seq)
        if not (s.isascii() and s.isdigit()) or len(s) > 18 or s != str(int(s)):
            raise NotFound(f"AuditEvent/{s} is not known")
        body = self.entry(int(s))
        try:
            last = parse_instant(orjson.loads(body)["meta"]["lastUpdated"])
        except (KeyError, TypeError, orjson.JSONDecodeError, InvalidRequest):
            last = 0.0
        return StoredResource("AuditEvent", s, 1, last, False, body, "POST")

    # ------------------------------------------------------------------ search
    def search(self, params: list[tuple[str, str]], handling: str = "lenient") -> SearchResult:
        """Search AuditEvents, newest (highest seq) first.

        Parameters (FHIR R4 AuditEvent; repeated = AND, comma = OR): ``date`` (recorded,
        prefixes eq ne lt le gt ge sa eb), ``agent`` (client id), ``patient``
        (``Patient/ID`` or ``ID``), ``entity`` (a reference, or a DICOM UID), ``action``,
        ``outcome``, ``subtype`` (``code`` or ``system|code``), ``source`` (the source
        accessed); ``_count``, ``_before=<seq>`` (paging: entries below that seq),
        ``_total=none`` (skip the count), ``_summary=count``, ``_elements``.

        Raises:
            InvalidRequest: a malformed value, or an unknown parameter when ``handling``
                is ``strict``.
        """
        conds, warnings = [], []
        count, before, want_total = self.default_count, None, True
        summary, elements = None, None
        for raw_key, value in params:
            key, _, modifier = raw_key.partition(":")
            if key == "_count":
                count = _int(key, value, 0)
            elif key == "_before":
                before = _int(key, value, 0)
            elif key == "_total":
                want_total = value != "none"
            elif key == "_summary":
                summary = value
            elif key == "_elements":
                elements = [e.strip() for e in value.split(",") if e.strip()]
            elif key == "_sort":
                if value not in ("-date", "-_lastUpdated"):
                    warnings.append(f"_sort={value} not supported: entries are newest first")
            elif key in ("_format", "_pretty"):
                continue
            elif key in SEARCH_PARAMS and not modifier:
                conds.append(self._cond(key, value))
            else:
                msg = f"Unknown or unsupported AuditEvent search parameter '{raw_key}'"
                if handling == "strict":
                    raise InvalidRequest(msg)
                warnings.append(msg + " (ignored)")
        if count > self.max_count:
            warnings.append(f"_count capped at {self.max_count}")
            count = self.max_count
        summary_count = summary == "count" or count == 0
        page_conds = list(conds) + ([E.c.seq < before] if before is not None else [])
        with self.engine.connect() as conn:
            total = None
            if want_total or summary_count:
                total = conn.execute(select(func.count()).select_from(E)
                                     .where(*conds)).scalar_one()
            rows = [] if summary_count else conn.execute(
                select(E.c.seq, E.c.recorded, E.c.entry).where(*page_conds)
                .order_by(E.c.seq.desc()).limit(count + 1)).all()
        more = len(rows) > count
        rows = rows[:count]
        matches = [StoredResource("AuditEvent", str(r[0]), 1, float(r[1]), False, bytes(r[2]),
                                  "POST") for r in rows]
        base = [(k, v) for k, v in params if k != "_before"]
        nxt = base + [("_before", str(rows[-1][0]))] if more and rows else None
        return SearchResult(matches=matches, total=total, self_params=list(params),
                            next_params=nxt, warnings=warnings, summary_count=summary_count,
                            elements=elements, summary=None if summary == "count" else summary)

    def _cond(self, key: str, value: str):
        alts = [v for v in value.split(",") if v != ""]
        if not alts:
            raise InvalidRequest(f"Empty value for '{key}'")
        if key == "date":
            return or_(*[_date_cond(v) for v in alts])
        if key in ("patient", "entity"):
            refs: list[str] = []
            for v in alts:
                if key == "patient":
                    refs.append(_clip(v if v.startswith("Patient/") else f"Patient/{v}", "ref"))
                else:
                    refs.append(_clip(v, "ref"))
                    if "/" not in v and ":" not in v:  # a bare DICOM UID
                        refs.append(_clip(f"urn:oid:{v}", "ref"))
            return E.c.seq.in_(select(ref_table.c.seq).where(ref_table.c.ref.in_(refs)))
        if key == "subtype":
            return E.c.subtype.in_([_clip(v.rsplit("|", 1)[-1], "subtype") for v in alts])
        col = {"agent": E.c.agent, "action": E.c.action, "outcome": E.c.outcome,
               "source": E.c.source}[key]
        if key in _WIDTH:
            alts = [_clip(v, key) for v in alts]
        return col.in_(alts)

    # ------------------------------------------------------------------ verify
    def verify(self) -> VerifyReport:
        """Check the whole log; stop at the first problem.

        Recomputes every leaf hash from the stored entry bytes (an edited entry is caught),
        checks that seqs run 0, 1, 2... with each entry's id equal to its seq (a deleted
        or moved entry is caught), that the search columns and references match the
        entry, recomputes the tree and compares the stored subtree hashes and the
        ``audit_state`` frontier, and checks every STH: its signature (server public
        key) and that its root is the root of the log's first ``tree_size`` entries.
        """
        progress = [0]
        try:
            with self.engine.connect() as conn:
                self._verify(conn, progress)
        except _Bad as bad:
            return VerifyReport(False, progress[0], bad.what, bad.reason)
        return VerifyReport(True, progress[0])

    def _verify(self, conn: Connection, progress: list[int]) -> None:
        """Raise :class:`_Bad` at the first problem; ``progress[0]`` counts good entries."""
        state = conn.execute(select(state_table.c.tree_size, state_table.c.frontier)
                             .where(state_table.c.id == 1)).first()
        sths = conn.execute(select(sth_table).order_by(sth_table.c.tree_size)).all()
        nodes = {(int(r[0]), int(r[1])): bytes(r[2]) for r in conn.execute(
            select(node_table.c.level, node_table.c.idx, node_table.c.hash))}
        pub = self._public_key()
        frontier: list[bytes] = []
        size, si = 0, 0

        def check_sths() -> None:
            nonlocal si
            while si < len(sths) and int(sths[si].tree_size) == size:
                self._check_sth_row(sths[si], merkle.root_from_frontier(frontier, size), pub)
                si += 1

        check_sths()
        while True:
            rows = conn.execute(select(E).where(E.c.seq >= size).order_by(E.c.seq)
                                .limit(VERIFY_BATCH)).all()
            if not rows:
                break
            lo, hi = int(rows[0].seq), int(rows[-1].seq)
            refs: dict[int, set[str]] = {}
            for r, s in conn.execute(select(ref_table.c.ref, ref_table.c.seq)
                                     .where(ref_table.c.seq >= lo, ref_table.c.seq <= hi)):
                refs.setdefault(int(s), set()).add(r)
            for row in rows:
                seq = int(row.seq)
                if seq != size:
                    raise _Bad(f"entry {size}", f"missing: the next stored entry is {seq}")
                self._check_entry(row, refs.get(seq, set()))
                frontier, made = merkle.append_with_nodes(frontier, size, bytes(row.leaf_hash))
                size += 1
                for lv, ix, h in made:
                    if lv >= NODE_MIN_LEVEL and nodes.pop((lv, ix), None) != h:
                        a, b = ix << lv, ((ix + 1) << lv) - 1
                        raise _Bad(f"entries {a}-{b}", f"the stored hash of the subtree of "
                                                       f"entries {a}-{b} differs from the "
                                                       "recomputed one")
                check_sths()
                progress[0] = size
        if state is None:
            raise _Bad("audit_state", "the audit_state row is missing")
        if int(state[0]) > size:
            raise _Bad(f"entry {size}", f"missing: audit_state records {int(state[0])} "
                                        f"entries, the log holds {size}")
        if int(state[0]) < size:
            raise _Bad("audit_state", f"audit_state records {int(state[0])} entries, the log "
                                      f"holds {size}")
        if _decode_frontier(state[1]) != frontier:
            raise _Bad("audit_state", "the stored frontier differs from the recomputed tree")
        if si < len(sths):
            n = int(sths[si].tree_size)
            raise _Bad(f"sth {n}", f"a signed tree head covers {n} entries, the log holds {size}")
        if nodes:
            lv, ix = min(nodes)
            raise _Bad("audit_node", f"stored subtree ({lv}, {ix}) lies beyond the log")

    def _check_entry(self, row, refs: set[str]) -> None:
        seq = int(row.seq)
        entry = bytes(row.entry)
        if merkle.leaf_hash(entry) != bytes(row.leaf_hash):
            raise _Bad(f"entry {seq}", "the entry's bytes do not match its leaf hash "
                                       "(the entry was edited)")
        try:
            event = orjson.loads(entry)
        except orjson.JSONDecodeError:
            raise _Bad(f"entry {seq}", "the entry is not JSON") from None
        if not isinstance(event, dict) or event.get("id") != str(seq):
            got = event.get("id") if isinstance(event, dict) else None
            raise _Bad(f"entry {seq}", f"the entry at position {seq} is AuditEvent/{got} "
                                       "(entries were moved or swapped)")
        if canonical(event) != entry:
            raise _Bad(f"entry {seq}", "the entry is not in canonical form")
        try:
            v = index_values(event)
        except (ValueError, InvalidRequest, AttributeError, TypeError) as exc:
            raise _Bad(f"entry {seq}", f"the entry is not a valid AuditEvent: {exc}") from None
        stored = (float(row.recorded), row.action, row.subtype, row.outcome, row.agent,
                  row.source)
        if stored != (v.recorded, v.action, v.subtype, v.outcome, v.agent, v.source):
            raise _Bad(f"entry {seq}", "the search columns differ from the entry")
        if refs != set(v.refs):
            raise _Bad(f"entry {seq}", "the reference index (audit_ref) differs from the entry")

    def _check_sth_row(self, row, root: bytes, pub: ECKey) -> None:
        n = int(row.tree_size)
        ts_ms = int(round(row.timestamp * 1000))
        try:
            obj = jws.deserialize_compact(row.signature, pub, algorithms=["ES384"])
        except (JoseError, ValueError, TypeError) as exc:
            raise _Bad(f"sth {n}", f"the signature does not verify ({type(exc).__name__})") from None
        if obj.payload != sth_payload(n, ts_ms, bytes(row.root_hash)):
            raise _Bad(f"sth {n}", "the signed payload differs from the stored tree head")
        if bytes(row.root_hash) != root:
            raise _Bad(f"sth {n}", f"the signed root differs from the root of the log's first "
                                   f"{n} entries")


def _int(name: str, value: str, minimum: int) -> int:
    from server.fhir.search import int_param     # one parser of integer query values

    return int_param(name, value, minimum)


def _date_cond(raw: str):
    """FHIR R4 search §3.1.1.4.5 on a point in time (recorded, ms precision)."""
    prefix = raw[:2] if len(raw) > 2 and raw[:2].isalpha() else "eq"
    text = raw[2:] if prefix != "eq" or raw.startswith("eq") else raw
    if prefix not in ("eq", "ne", "lt", "le", "gt", "ge", "sa", "eb"):
        raise InvalidRequest(f"Unsupported date prefix '{prefix}' for AuditEvent date")
    lo, hi = date_search_range(text)
    r = E.c.recorded
    inside = and_(r >= lo, r < hi) if hi != OPEN_END else r >= lo
    return {"eq": inside, "ne": not_(inside), "lt": r < lo, "eb": r < lo, "le": r < hi,
            "gt": r >= hi, "sa": r >= hi, "ge": r >= lo}[prefix]
