"""Engine creation and schema migration (alembic), for SQLite and PostgreSQL."""
from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def writer_lock_path(database: str) -> str:
    """The lock file that writers of the SQLite file ``database`` queue on."""
    return f"{database}-writers.lock"


class _QueuedWriterConnection(sqlite3.Connection):
    """A pysqlite connection whose write transactions queue on a lock file.

    SQLite lets one writer in at a time and makes the others wait in its busy handler,
    which sleeps 1, 2, 5 … 100 ms between tries: a writer often starts long after the lock
    was freed while its process sits idle (gunicorn workers appending audit entries on every
    read: p99 484 ms; loader workers). Before ``BEGIN IMMEDIATE`` this connection takes an
    exclusive ``flock`` on :func:`writer_lock_path` instead, and the kernel wakes the next
    writer the moment the holder commits or rolls back. The lock is per open file, so the
    threads of one process queue on it too; a process that dies releases it. It only
    orders writers: SQLite's lock still guards the data, and a writer outside this engine
    (the sqlite3 shell) is still serialised by SQLite's busy timeout. A lock file that
    cannot be opened (read-only directory) lets the writer through to that busy timeout.
    """

    lock_path: str = ""

    def write_lock(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            return
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits without the GIL
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def write_unlock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            self._lock_fd = None
            os.close(fd)  # closing the file drops its lock

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self.write_unlock()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.write_unlock()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.write_unlock()


#: Largest integer taken from a query value (counts, offsets, snapshots): SQL binds
#: 64-bit integers (a bigger offset failed with a 500 on SQLite and PostgreSQL), and
#: 2^53 - 1 is also exact as a JSON number.
MAX_QUERY_INT = 2**53 - 1


def make_engine(url: str) -> Engine:
    """Create an engine with the settings each backend needs for a server.

    SQLite: WAL so readers never block the single writer, explicit ``BEGIN IMMEDIATE`` for
    write transactions (see :func:`begin_write`), queued on a lock file
    (:class:`_QueuedWriterConnection`), and a long busy timeout for writers from elsewhere.
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        args = {"timeout": 60, "check_same_thread": False, "isolation_level": None}
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            args["factory"] = type("QueuedWriterConnection", (_QueuedWriterConnection,),
                                   {"lock_path": writer_lock_path(path)})
        engine = create_engine(url, connect_args=args,
                               poolclass=NullPool if path == ":memory:" else None)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            # A commit that leaves more than this many pages in the WAL also checkpoints
            # (default 1,000): a FHIR transaction of a few hundred resources dirties
            # thousands of index pages, so each one checkpointed, holding its writer while
            # it copied. 20,000 pages (80 MB): bulk ingest 11-18 % faster. With
            # synchronous=NORMAL the WAL is synced at checkpoints, so after a power loss
            # (not an application crash) commits since the last one may roll back: up to
            # 80 MB of them now instead of 4 MB; the database is never corrupted.
            cur.execute("PRAGMA wal_autocheckpoint=20000")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA cache_size=-65536")
            cur.execute("PRAGMA mmap_size=1073741824")
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # pragma: no cover - trivial
            # pysqlite's own transaction handling is off (isolation_level=None);
            # emit BEGIN ourselves so SQLAlchemy's transaction maps to SQLite's.
            sql = conn.info.pop("begin_sql", "BEGIN")
            if sql == "BEGIN IMMEDIATE":
                dbapi = conn.connection.dbapi_connection
                if isinstance(dbapi, _QueuedWriterConnection):
                    dbapi.write_lock()  # queue behind the other writers, then BEGIN
            try:
                conn.exec_driver_sql(sql)
            except BaseException:
                dbapi = conn.connection.dbapi_connection
                if isinstance(dbapi, _QueuedWriterConnection):
                    dbapi.write_unlock()
                raise

        return engine
    # No pre-ping (a round trip per checkout on the hot read path); stale connections
    # are recycled instead.
    return create_engine(url, pool_recycle=1800, pool_size=5, max_overflow=10)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def begin_write(engine: Engine):
    """Open a write transaction; on SQLite take the write lock at BEGIN.

    Taking the lock up front (``BEGIN IMMEDIATE``) makes read-check-write sequences
    (conditional create, version checks) atomic across processes.
    """
    conn = engine.connect()
    if is_sqlite(engine):
        conn.info["begin_sql"] = "BEGIN IMMEDIATE"
    return conn


def alembic_config(url: str):
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
