"""server/http/balance.py: closing connections after large uploads, and the gthread
worker that leaves new connections to the other workers while it runs one."""
from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest
from gunicorn.workers.gthread import ThreadWorker

from server.http import balance
from server.http.balance import (SpreadingThreadWorker, close_after_large_body, is_large,
                                 spreading_worker)


def _req(length: str | None, method: str = "POST"):
    headers = [("HOST", "x")] + ([("CONTENT-LENGTH", length)] if length is not None else [])
    return SimpleNamespace(method=method, path="/fhir", headers=headers, must_close=False)


def test_large_bodies_close_the_connection_small_ones_keep_it():
    worker = SimpleNamespace(log=logging.getLogger("test"))
    hook = close_after_large_body(1000)
    for length, closes in (("999", False), ("1000", True), ("5000000", True), (None, False),
                           ("abc", False)):
        req = _req(length)
        hook(worker, req)
        assert req.must_close is closes, length


def test_threshold_zero_keeps_every_connection():
    worker = SimpleNamespace(log=logging.getLogger("test"))
    req = _req("5000000")
    close_after_large_body(0)(worker, req)
    assert req.must_close is False


# ---------------------------------------------------------------- SpreadingThreadWorker
def _worker(threshold: int = 1000):
    w = object.__new__(spreading_worker(threshold))     # no gunicorn arbiter needed
    w.uploads, w._uploads_lock = 0, threading.Lock()
    return w


def test_is_large_reads_content_length():
    assert is_large(_req("1000"), 1000) and not is_large(_req("999"), 1000)
    assert not is_large(_req(None), 1000) and not is_large(_req("x"), 1000)
    assert not is_large(_req("5000000"), 0)


def test_uploads_are_counted_while_a_large_request_runs(monkeypatch):
    w = _worker()
    seen = []
    monkeypatch.setattr(ThreadWorker, "handle_request", lambda self, req, conn: seen.append(self.uploads) or True)
    assert w.handle_request(_req("5000"), None) is True
    assert w.handle_request(_req("10"), None) is True
    assert seen == [1, 0] and w.uploads == 0

    def boom(self, req, conn):
        raise OSError("client went away")

    monkeypatch.setattr(ThreadWorker, "handle_request", boom)
    with pytest.raises(OSError):
        w.handle_request(_req("5000"), None)
    assert w.uploads == 0                       # released on errors too


def test_a_worker_with_an_upload_lets_the_others_accept_first(monkeypatch):
    w = _worker()
    calls = []
    monkeypatch.setattr(ThreadWorker, "accept", lambda self, listener: calls.append("accept"))
    monkeypatch.setattr(balance.time, "sleep", lambda s: calls.append(s))
    w.accept(None)
    assert calls == ["accept"]                  # free: takes it at once
    calls.clear()
    w.uploads = 1
    w.accept(None)
    assert calls == [balance.ACCEPT_YIELD_S, "accept"]


def test_the_class_gunicorn_loads_is_a_thread_worker():
    cls = spreading_worker(4096)
    assert issubclass(cls, SpreadingThreadWorker) and issubclass(cls, ThreadWorker)
    assert cls.large_body == 4096 and SpreadingThreadWorker.large_body == 0
