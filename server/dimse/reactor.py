"""Event-driven reactors for pynetdicom's associations.

pynetdicom 3.0 polls: the DUL thread sleeps 1 ms whenever its socket and queues are
idle, and the association thread sleeps 1 ms on every turn of its loop. A message
crosses both threads at least once each way, so a C-FIND association (request,
find, release) waits ~8 ms in sleeps on the server side alone, more than all the
work it does (the C-FIND benchmark against Orthanc showed it: association set-up
4.1 ms, find 5.1 ms, release 2.0 ms, against Orthanc's 0.3 ms set-up).

Here the two threads block instead and are woken by what they wait for:

* the DUL thread waits in ``poll`` on its socket and on a wake-up socket pair,
  which every put on its event and provider queues signals (a primitive to send,
  an event from the association thread, a stop);
* the association thread waits on an :class:`threading.Event` that every put on its
  DIMSE message queue and on the DUL's user queue sets, and that the DUL thread
  sets when it ends.

Both still wake on a short timeout to check the ARTIM and idle timers, whose
resolution is seconds. The state machine, the PDU handling and every other part of
pynetdicom run unchanged: only the waiting differs.
"""
from __future__ import annotations

import queue
import select
import socket
import threading
from datetime import datetime
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.association import LOGGER as ASSOC_LOGGER, Association
from pynetdicom.dul import DULServiceProvider, LOGGER as DUL_LOGGER
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

#: Longest block between timer checks (ARTIM, network idle timeout, kill flags).
TIMER_CHECK_S = 0.05


class WakingQueue(queue.Queue):
    """A queue that calls ``wake`` after every put, so its reader can block."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class EventDUL(DULServiceProvider):
    """The DUL service provider, blocking on its socket and queues instead of polling."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._wake_closed = False
        self.event_queue = WakingQueue(self.wake)
        self.to_provider_queue = WakingQueue(self.wake)

    def wake(self) -> None:
        """Wake the reactor (thread-safe, cheap when it is already awake)."""
        with self._wake_lock:
            if self._wake_pending or self._wake_closed:
                return
            self._wake_pending = True
            try:
                self._wake_w.send(b"\0")
            except OSError:     # full or closed: the reactor wakes anyway
                pass

    def _wait(self) -> None:
        """Block until the socket is readable, a queue was fed, or the timer tick."""
        # poll, not select: a listener with many associations has descriptors above
        # select's FD_SETSIZE (1024)
        poller = select.poll()
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, select.POLLIN)
        sock = getattr(self.socket, "socket", None)
        if sock is not None and getattr(self.socket, "_is_connected", False):
            pending = getattr(sock, "pending", None)     # TLS may hold decoded bytes
            if pending is not None and pending():
                return
            fd = sock.fileno()
            if fd < 0:      # closed under us: let the loop see it now
                return
            poller.register(fd, select.POLLIN)
        try:
            ready = poller.poll(TIMER_CHECK_S * 1000)
        except OSError:
            return
        if any(fd == wake_fd for fd, _ in ready):
            with self._wake_lock:
                self._wake_pending = False
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
            if threading.current_thread() is not self:
                self.join()
            return True
        return False

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (dul.py ``run_reactor``) with ``_wait`` for its sleep."""
        try:
            self._run()
        finally:
            with self._wake_lock:
                self._wake_closed = True
                self._wake_r.close()
                self._wake_w.close()
            # An acceptor waits for the peer's A-ASSOCIATE-RQ in `receive_pdu(wait=True,
            # timeout=acse_timeout)` (association.py `run_reactor`), which no `wake`
            # reaches: a peer that sent something else and closed held the thread, and
            # an association slot, for the whole timeout. None ends that wait as the
            # timeout would; nothing else will come from a DUL that has stopped, and
            # an established association ignores it (it checks `dul.is_alive()`).
            self.to_user_queue.put(None)
            wake = getattr(self.assoc, "wake", None)
            if wake is not None:
                wake()      # the association thread checks `dul.is_alive()`

    def _abort(self, exc: Exception) -> None:
        """Send an A-ABORT (service-provider initiated, PS3.8 §9.3.8) and end the
        association, bypassing the state machine, as pynetdicom's DUL does."""
        DUL_LOGGER.error("Exception in DUL.run(), aborting association")
        DUL_LOGGER.exception(exc)
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        try:
            self.socket.send(abort_pdu.encode())
        except Exception:  # noqa: BLE001 - the peer may be gone already
            pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    def _run(self) -> None:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # One primitive sent or one PDU read per turn, as pynetdicom does
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort, bypassing the FSM
                self._abort(exc)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            try:
                self.state_machine.do_action(event)
            except Exception as exc:  # noqa: BLE001 - pynetdicom lets these end the thread
                # A P-DATA whose DIMSE command set lacks CommandField, an event the state
                # has no action for (InvalidEventError)...: abort as above, rather than
                # close the connection from an unhandled exception in this thread.
                self._abort(exc)
                return
            idle = False
            if self.state_machine.current_state == "Sta1":
                wake = getattr(self.assoc, "wake", None)
                if wake is not None:
                    wake()      # an association thread in kill() waits for Sta1


class EventAssociation(Association):
    """An association whose reactor thread blocks until there is work."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._wake_event = threading.Event()
        self.dul = EventDUL(self)
        self.dul.to_user_queue = WakingQueue(self.wake)
        self.dimse.msg_queue = WakingQueue(self.wake)
        # The timeouts' setters configure the DUL's timers: apply them to the new DUL.
        self.acse_timeout = self.ae.acse_timeout           # ARTIM
        self.network_timeout = self.ae.network_timeout     # idle timer

    def wake(self) -> None:
        """Wake the association reactor."""
        self._wake_event.set()

    def kill(self) -> None:
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        # pynetdicom polls every 10 ms until the DUL reaches Sta1; wait for the DUL's
        # events instead (it reaches Sta1 when the peer closes, or when ARTIM expires).
        while self.dul.is_alive() and not self.dul.stop_dul():
            self._wake_event.wait(TIMER_CHECK_S)
            self._wake_event.clear()

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (association.py ``_run_reactor``), waiting on
        ``_wake_event`` instead of sleeping 1 ms per turn."""
        self._is_paused = False
        self._wake_event.set()
        while not self._kill:
            self._wake_event.wait(TIMER_CHECK_S)
            self._wake_event.clear()

            # Paused while a send_*() on another thread uses the association
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)
                self._wake_event.set()      # more may be queued: look again at once

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                ASSOC_LOGGER.info("Association Aborted"
                                  + (" (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else ""))
                self.dul.receive_pdu(wait=False)     # so EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                DUL_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class EventRequestHandler(RequestHandler):
    """pynetdicom's request handler, building an :class:`EventAssociation`."""

    def _create_association(self) -> Association:
        # As transport.py RequestHandler._create_association, with our class.
        assoc = EventAssociation(self.ae, "acceptor")
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = self.server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        # Shared, not deep-copied as pynetdicom does (0.5 ms of ~180 contexts per
        # association): negotiation only reads them, and EVT_REQUESTED
        # (handlers.prefer_requestor_syntaxes) replaces the list with copies of the
        # proposed ones before anything reorders a context.
        acceptor.supported_contexts = self.server.contexts
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:
                    assoc.bind(event, handler, args)
        return assoc


__all__ = ["EventAssociation", "EventDUL", "EventRequestHandler", "WakingQueue", "TIMER_CHECK_S"]
