"""Spreading long uploads over gunicorn's workers.

A gthread worker keeps each keep-alive connection for itself: with two workers and three
clients POSTing transaction Bundles, one worker holds two connections and runs their
bundles on one core (one GIL) while the other worker waits for its single client; on the
2-core bench machine the server then used 1.3 of its 2 cores (worker CPU 13.0 s against
5.8 s over the same run). Closing the connection after a request with a large body makes
the client's next request a new connection, which the idle worker accepts first (the busy
one's accept loop waits for its GIL). A reconnection costs ~0.1 ms on a request that
takes tenths of a second; small requests (reads, searches) keep their connection.
"""
from __future__ import annotations

from typing import Any, Callable


def close_after_large_body(threshold: int) -> Callable[[Any, Any], None]:
    """A gunicorn ``pre_request`` hook: mark a request whose ``Content-Length`` is at
    least ``threshold`` bytes so gunicorn answers it with ``Connection: close``
    (RFC 9112 §9.6). ``threshold`` 0 disables it."""

    def pre_request(worker: Any, req: Any) -> None:
        worker.log.debug("%s %s", req.method, req.path)     # gunicorn's default hook
        if threshold <= 0:
            return
        for name, value in req.headers:
            if name == "CONTENT-LENGTH":
                try:
                    large = int(value) >= threshold
                except ValueError:
                    large = False
                if large:
                    req.must_close = True
                return

    return pre_request


__all__ = ["close_after_large_body"]
