"""Audit spool: read-side entries reach the Merkle log in batches, not one write each.

On SQLite every write transaction queues for the database's one write lock, so an audit
append on every read (one short write transaction per request, or per group of a
worker's threads) cost two thirds of the read throughput (1,100 against 3,000 req/s,
benchmarks/README.md). Here an entry that is not part of a FHIR write is appended as one
JSON line to a spool segment in ``<database file>-audit-spool/`` (one ``write`` under an
``flock`` of the segment) before the request answers, and a merger moves the spooled
lines into the log (:class:`server.audit.log.AuditLog`) a few hundred at a time.

Guarantees, as the log had them:
- An interaction whose entry cannot be spooled fails (``InternalError``), as before.
- Durability is the database's: SQLite commits with ``synchronous=NORMAL`` are a
  ``write`` to the WAL without ``fsync``; a spool line is a ``write`` without ``fsync``.
  Both survive a crash of the process; neither is guaranteed across a power loss.
- Nothing is merged twice: a merge commits its entries and the segment's ``merged_to``
  offset (table ``audit_spool``, migration 0008) in one transaction, and removes the
  segment file only afterwards; a crash in between resumes from the offset.
- Nothing is left behind: every reader of the log (search, read, proofs, tree heads,
  ``verify``) merges first, so it sees each entry spooled before it was called; a
  background thread per process merges every ``interval`` seconds; a segment of a worker
  that died is merged by any other process using the same database file.

What changes: an entry's ``seq`` (its AuditEvent id and leaf index) is given when it is
merged, so spooled entries are not in exact time order against entries of FHIR writes,
which are still appended inside the write's own transaction; ``recorded`` keeps the time
of the interaction. PostgreSQL keeps synchronous group commit (server/audit/group.py):
its workers may run on several hosts, and a spool on one host's disk could outlive it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import uuid
from pathlib import Path

import orjson
from sqlalchemy import text

from server.errors import InternalError

log = logging.getLogger(__name__)

#: Entries per merge transaction: bounds how long the database's write lock is held.
MERGE_BATCH = 500
#: A segment this large is closed and a new one started (a closed segment is removed once
#: merged).
SEGMENT_BYTES = 4 << 20
#: Seconds without appends after which a process's merge thread ends (restarted on demand).
IDLE_EXIT = 60.0
_SUFFIX = ".jsonl"
_MERGE_LOCK = ".merge.lock"


class SpooledLog:
    """Wraps an AuditLog; ``append`` without a connection spools, readers merge first.

    Args:
        log: the :class:`server.audit.log.AuditLog`.
        folder: the spool directory (created).
        interval: seconds between background merges (0: only readers and ``flush`` merge).
    """

    # Methods of the log that read it (merge first) or that need no merge.
    _PASSTHROUGH = frozenset({"engine", "cfg", "default_count", "max_count"})

    def __init__(self, log, folder: str | Path, interval: float = 0.2):
        self.log = log
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.interval = interval
        self._lock = threading.Lock()        # this process's appenders
        self._merging = threading.Lock()     # this process's mergers
        self._starting = threading.Lock()    # starts the background merger once
        self._fd: int | None = None
        self._name = ""
        self._pid = 0
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def __getattr__(self, name: str):
        attr = getattr(self.log, name)
        if name in self._PASSTHROUGH or name.startswith("_") or not callable(attr):
            return attr

        def merged_first(*args, **kwargs):
            self.flush()
            return attr(*args, **kwargs)

        return merged_first

    # ------------------------------------------------------------------ append
    def append(self, event: dict, conn=None) -> int | None:
        """Spool ``event`` (its seq is given at merge: returns None); with ``conn``, the
        caller's write transaction, append it there at once and return its seq.

        Raises:
            InternalError: the entry could not be spooled (the interaction must fail).
        """
        if conn is not None:
            return self.log.append(event, conn=conn)
        try:
            line = orjson.dumps(event) + b"\n"
            with self._lock:
                self._write(line)
        except InternalError:
            raise
        except Exception as exc:  # never swallow: an interaction without its audit fails
            raise InternalError(f"The audit entry could not be spooled "
                                f"({type(exc).__name__}: {exc})") from exc
        self._start_merger()
        return None

    def _open_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pid = os.getpid()
        self._name = f"{uuid.uuid4().hex}{_SUFFIX}"
        self._fd = os.open(self.folder / self._name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _write(self, line: bytes) -> None:
        if self._fd is None or self._pid != os.getpid():  # a forked worker gets its own segment
            self._fd = None
            self._open_segment()
        for _ in range(3):
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                st = os.fstat(fd)
                gone = st.st_nlink == 0              # merged and removed meanwhile
                if not gone:
                    try:
                        n = os.write(fd, line)       # O_APPEND: at the end
                        if n != len(line):
                            raise OSError(f"short write ({n} of {len(line)} bytes)")
                    except BaseException:
                        os.ftruncate(fd, st.st_size)  # never leave half a line
                        raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            if gone:
                self._open_segment()
                continue
            if st.st_size + n >= SEGMENT_BYTES:
                # Start a new segment, so that this one, once merged, can be removed (a
                # segment still written to never is: it would grow for ever).
                self._open_segment()
            return
        raise InternalError("The audit spool segment kept disappearing")

    # ------------------------------------------------------------------ merge
    def _start_merger(self) -> None:
        if self.interval <= 0:
            return
        t = self._thread
        if t is not None and t.is_alive() and getattr(t, "pid", None) == os.getpid():
            self._wake.set()
            return
        with self._starting:
            t = self._thread
            if t is not None and t.is_alive() and getattr(t, "pid", None) == os.getpid():
                return
            self._wake = threading.Event()
            self._wake.set()                           # this append's entry
            t = threading.Thread(target=self._run, name="audit-spool-merger", daemon=True)
            t.pid = os.getpid()
            self._thread = t
            t.start()

    def _run(self) -> None:
        wake = self._wake
        while True:
            if not wake.wait(IDLE_EXIT):
                with self._starting:       # idle: the next append starts a new thread
                    if not wake.is_set():
                        self._thread = None
                        return
            wake.clear()
            threading.Event().wait(self.interval)     # let a batch gather
            try:
                self.flush(block=False)
            except Exception as exc:  # noqa: BLE001 - retried at the next wake; readers raise
                log.error("audit spool merge failed (entries stay spooled): %s", exc)

    def follow(self, every: float, stop: threading.Event, parent: int | None = None) -> int:
        """Merge every ``every`` seconds until ``stop`` is set or the process ``parent``
        is gone (the merger process of ``synthport serve``); a last merge on the way out.
        Returns the entries merged."""
        total = 0
        while not stop.wait(every) and (parent is None or os.getppid() == parent):
            try:
                total += self.flush(block=False)
            except Exception as exc:  # noqa: BLE001 - retried next round; readers raise
                log.error("audit spool merge failed (entries stay spooled): %s", exc)
        total += self.flush()
        return total

    def flush(self, block: bool = True) -> int:
        """Merge every spooled entry of every process into the log; return how many.

        Args:
            block: wait for a merge in progress elsewhere (readers); False skips when one
                runs (the background merger).

        Raises:
            InternalError: the entries could not be written (they stay spooled).
        """
        if not self._merging.acquire(blocking=block):
            return 0
        try:
            fd = os.open(self.folder / _MERGE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return 0
                return self._merge_all()
            finally:
                os.close(fd)
        finally:
            self._merging.release()

    def _merge_all(self) -> int:
        done = 0
        names = sorted((p for p in self.folder.iterdir() if p.name.endswith(_SUFFIX)),
                       key=lambda p: p.stat().st_mtime if p.exists() else 0)
        names = [p.name for p in names]
        offsets = self._offsets()
        for name in names:
            done += self._merge_segment(name, offsets.get(name, 0))
        offsets = self._offsets()
        stale = [n for n in offsets if not (self.folder / n).exists()]
        if stale:  # segments removed after their last merge (a crash in between)
            self._forget(stale)
        return done

    def _offsets(self) -> dict[str, int]:
        with self.log.engine.connect() as c:
            return {r[0]: int(r[1]) for r in c.execute(text("SELECT segment, merged_to FROM audit_spool"))}

    def _forget(self, names: list[str]) -> None:
        from server.db.engine import begin_write

        c = begin_write(self.log.engine)
        try:
            with c.begin():
                c.execute(text("DELETE FROM audit_spool WHERE segment = :s"), [{"s": n} for n in names])
        finally:
            c.close()

    def _merge_segment(self, name: str, offset: int) -> int:
        path = self.folder / name
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return 0
        done = 0
        try:
            # Read under the segment's lock (its writer is never mid-line then), merge
            # without it: writers append meanwhile and are never held up by the database.
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_nlink == 0:
                    return 0
                size = os.fstat(fd).st_size
                data = os.pread(fd, size - offset, offset) if size > offset else b""
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            end = data.rfind(b"\n") + 1               # whole lines only
            lines = data[:end].splitlines()
            pos = offset
            for k in range(0, len(lines), MERGE_BATCH):
                chunk = lines[k:k + MERGE_BATCH]
                events = [orjson.loads(b) for b in chunk]
                pos += sum(len(b) + 1 for b in chunk)
                self.log.append_many(events, before_commit=_mark(name, pos))
                done += len(events)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size == pos and os.fstat(fd).st_nlink:
                    # Fully merged and nothing new: remove it (its row goes in the stale
                    # pass). Its writer sees st_nlink == 0 under this lock and opens a new one.
                    os.unlink(path)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return done


def _mark(name: str, offset: int):
    def before_commit(conn) -> None:
        # Same transaction as the entries: a crash never merges these lines twice.
        if conn.execute(text("UPDATE audit_spool SET merged_to = :o WHERE segment = :s"),
                        {"o": offset, "s": name}).rowcount == 0:
            conn.execute(text("INSERT INTO audit_spool (segment, merged_to) VALUES (:s, :o)"),
                         {"s": name, "o": offset})
    return before_commit
