"""The gunicorn pre_request hook that closes connections after large uploads."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from server.http.balance import close_after_large_body


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
