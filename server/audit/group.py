"""Group commit for audit appends: concurrent requests of one process share a transaction.

Every request waits until its own entry is committed (an interaction whose entry cannot
be written still fails), but the threads of a gunicorn worker that arrive while an append
is being written are written together in the next transaction: one commit (one fsync on
SQLite, one row lock on PostgreSQL) per batch instead of per request. No thread of its
own: the first waiting request writes the batch (leader/follower).
"""
from __future__ import annotations

import threading

from server.errors import InternalError

# A batch larger than this is split: bounds the time the log's lock is held.
MAX_BATCH = 64


class _Slot:
    __slots__ = ("event", "done", "seq", "error")

    def __init__(self, event: dict):
        self.event = event
        self.done = False
        self.seq: int | None = None
        self.error: BaseException | None = None


class GroupCommit:
    """Wraps an :class:`server.audit.log.AuditLog`; ``append`` is its drop-in."""

    def __init__(self, log):
        self.log = log
        self._cv = threading.Condition()
        self._pending: list[_Slot] = []
        self._writing = False

    def __getattr__(self, name: str):
        return getattr(self.log, name)

    def append(self, event: dict, conn=None) -> int:
        """Append ``event``; returns its seq once committed.

        Args:
            conn: the caller's write transaction: then the entry is written in it at once
                (it commits or rolls back with the caller's writes), not batched.
        """
        if conn is not None:
            return self.log.append(event, conn=conn)
        slot = _Slot(event)
        with self._cv:
            self._pending.append(slot)
            while not slot.done:
                if self._writing:
                    self._cv.wait()
                    continue
                self._writing = True
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._cv.release()
                try:
                    self._write(batch)
                finally:
                    self._cv.acquire()
                    self._writing = False
                    self._cv.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.seq

    def _write(self, batch: list[_Slot]) -> None:
        try:
            seqs = self.log.append_many([s.event for s in batch])
        except Exception as exc:  # noqa: BLE001 - every waiting request fails with it
            err = exc if isinstance(exc, InternalError) else InternalError(
                f"The audit entry could not be written ({type(exc).__name__})")
            for s in batch:
                s.error, s.done = err, True
            return
        for s, seq in zip(batch, seqs):
            s.seq, s.done = seq, True
