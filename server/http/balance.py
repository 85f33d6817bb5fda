"""Spreading long uploads over gunicorn's workers.

A gthread worker keeps each keep-alive connection for itself: with two workers and three
clients POSTing transaction Bundles, one worker holds two connections and runs their
bundles on one core (one GIL) while the other worker waits for its single client; on the
2-core bench machine the server then used 1.3 of its 2 cores (worker CPU 13.0 s against
5.8 s over the same run). Two measures:

* :func:`close_after_large_body` closes the connection after a request with a large body,
  so the client's next request is a new connection, which any worker may accept. A
  reconnection costs ~0.1 ms on a request that takes tenths of a second; small requests
  (reads, searches) keep their connection.
* :class:`SpreadingThreadWorker` makes that new connection go to a worker that is not
  already running a large upload. Every worker polls the shared listening socket and the
  kernel wakes them all for a new connection; the first to call ``accept`` gets it. A
  worker with a large upload in flight waits :data:`ACCEPT_YIELD_S` before its
  ``accept``, so a free worker, if there is one, takes the connection (the busy one's
  ``accept`` then finds nothing). When every worker is busy the connection is still taken,
  a few milliseconds later: nothing waits on another upload to finish. Measured on the
  2-core machine (benchmarks/README.md, ingest B): two bundles in one process both run
  under its GIL, and each time the one holding the database's write lock comes back from
  SQLite it waits for the other's Python work, so the write lock (which serialises all
  writers) is held longer than its work needs.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from gunicorn.workers.gthread import ThreadWorker

#: How long a worker with a large upload in flight lets the other workers go first.
ACCEPT_YIELD_S = 0.005


def is_large(req: Any, threshold: int) -> bool:
    """Whether a gunicorn request announces a body of at least ``threshold`` bytes."""
    if threshold <= 0:
        return False
    for name, value in req.headers:
        if name == "CONTENT-LENGTH":
            try:
                return int(value) >= threshold
            except ValueError:
                return False
    return False


def close_after_large_body(threshold: int) -> Callable[[Any, Any], None]:
    """A gunicorn ``pre_request`` hook: mark a request whose ``Content-Length`` is at
    least ``threshold`` bytes so gunicorn answers it with ``Connection: close``
    (RFC 9112 §9.6). ``threshold`` 0 disables it."""

    def pre_request(worker: Any, req: Any) -> None:
        worker.log.debug("%s %s", req.method, req.path)     # gunicorn's default hook
        if is_large(req, threshold):
            req.must_close = True

    return pre_request


class SpreadingThreadWorker(ThreadWorker):
    """gunicorn's gthread worker that leaves new connections to other workers while it
    runs a large upload (see the module docstring). ``large_body`` is the threshold in
    bytes (:func:`spreading_worker` sets it; 0 turns the yielding off)."""

    large_body: int = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.uploads = 0                     # large requests in flight (threads update it)
        self._uploads_lock = threading.Lock()

    def accept(self, listener):
        if self.uploads:
            time.sleep(ACCEPT_YIELD_S)       # a free worker takes it meanwhile, if any
        super().accept(listener)

    def handle_request(self, req, conn):
        large = is_large(req, self.large_body)
        if not large:
            return super().handle_request(req, conn)
        with self._uploads_lock:
            self.uploads += 1
        try:
            return super().handle_request(req, conn)
        finally:
            with self._uploads_lock:
                self.uploads -= 1


def spreading_worker(threshold: int) -> type[SpreadingThreadWorker]:
    """A :class:`SpreadingThreadWorker` subclass with ``large_body = threshold``."""
    return type("SpreadingThreadWorker", (SpreadingThreadWorker,), {"large_body": int(threshold)})


__all__ = ["close_after_large_body", "is_large", "SpreadingThreadWorker", "spreading_worker",
           "ACCEPT_YIELD_S"]
