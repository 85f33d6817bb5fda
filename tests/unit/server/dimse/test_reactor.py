"""The event-driven association reactors (server/dimse/reactor.py): they serve, they
still honour pynetdicom's timers although they block, and they leave no thread behind."""
from __future__ import annotations

import socket
import threading
import time

import pytest
from pynetdicom.sop_class import Verification

from server import errors as E
from server.dimse import reactor
from server.dimse.reactor import EventAssociation, EventDUL, WakingQueue
from server.dimse.server import build_ae, start_dimse

from .conftest import AE_TITLE, make_config, scu
from .test_dimse import _NoData, _echo


def _acceptors(port: int | None = None) -> list[threading.Thread]:
    """Live reactor threads, of the listener on ``port`` only when given (another test's
    association may still be open until its own timeout)."""
    def ours(t) -> bool:
        assoc = t if isinstance(t, EventAssociation) else getattr(t, "assoc", None)
        server = getattr(assoc, "_server", None)
        return port is None or (server is not None and server.server_address[1] == port)

    return [t for t in threading.enumerate()
            if isinstance(t, (EventAssociation, EventDUL)) and t.is_alive() and ours(t)]


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def listener(tmp_path):
    server = start_dimse(make_config(tmp_path, dimse_timeout=1), _NoData(), port=0)
    yield server.server_address[1]
    server.shutdown()


def test_served_by_event_association_and_no_thread_left(listener):
    held = scu("TESTSCU", [Verification]).associate("127.0.0.1", listener, ae_title=AE_TITLE)
    assert held.is_established
    # the acceptor side of this association runs our reactor, with its DUL
    assert any(isinstance(t, EventAssociation) and t.is_acceptor for t in _acceptors(listener))
    assert any(isinstance(t, EventDUL) for t in _acceptors(listener))
    assert held.send_c_echo().Status == E.DIMSE_SUCCESS
    held.release()
    for _ in range(20):
        assert _echo(listener) == E.DIMSE_SUCCESS
    # released associations end both their threads (kill() waits for the DUL's Sta1
    # on an event now, not on 10 ms polls)
    assert _wait_for(lambda: not _acceptors(listener), 10), _acceptors(listener)


def test_silent_established_peer_hits_the_network_timeout(listener):
    # dimse_timeout = 1 s: the reactors block on events, but still wake to check the
    # DUL idle timer and abort a peer that says nothing.
    ae = scu("TESTSCU", [Verification])
    assoc = ae.associate("127.0.0.1", listener, ae_title=AE_TITLE)
    assert assoc.is_established
    assert _wait_for(lambda: assoc.is_aborted or not assoc.is_established, 10)
    assert assoc.is_aborted


def test_silent_connection_is_closed_after_the_acse_timeout(listener):
    # A TCP connection that never sends an A-ASSOCIATE-RQ: the association thread
    # gives up after acse_timeout, the DUL's ARTIM timer closes the transport.
    with socket.create_connection(("127.0.0.1", listener), timeout=10) as s:
        s.settimeout(10)
        start = time.monotonic()
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"" and time.monotonic() - start < 9
    assert _wait_for(lambda: not _acceptors(listener), 10)
    assert _echo(listener) == E.DIMSE_SUCCESS


def test_wake_is_coalesced_and_consumed(monkeypatch):
    assoc = EventAssociation(build_ae({"ae_title": AE_TITLE}), "acceptor")
    dul = assoc.dul
    assert isinstance(dul.to_provider_queue, WakingQueue)
    dul.to_provider_queue.put("primitive")
    dul.event_queue.put("Evt1")
    dul.wake()
    dul._wake_r.setblocking(False)
    # three wakes, one byte: the reader drains it in one recv
    assert dul._wake_r.recv(100) == b"\0"
    with pytest.raises(BlockingIOError):
        dul._wake_r.recv(100)
    dul._wake_r.setblocking(True)
    dul._wake_pending = False
    dul.wake()
    monkeypatch.setattr(reactor, "TIMER_CHECK_S", 30.0)
    started = time.monotonic()
    dul._wait()                    # returns on the wake, not on the timer tick
    assert dul._wake_pending is False and time.monotonic() - started < 1
    # the association side: its queues set the reactor's event
    assert not assoc._wake_event.is_set()
    assoc.dimse.msg_queue.put((1, "msg"))
    assert assoc._wake_event.is_set()
    assoc._wake_event.clear()
    dul.to_user_queue.put("A-RELEASE")
    assert assoc._wake_event.is_set()
