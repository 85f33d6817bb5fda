"""The DIMSE listener: one pynetdicom AE serving a :class:`DicomSource`.

:func:`start_dimse` runs it in-process (tests, embedding); :func:`spawn_dimse` runs it
as the child process that ``synthport serve`` starts beside gunicorn (gunicorn forks
its workers, so the listener lives in a process of its own, with its own engine).

What the AE accepts:

* Verification; every storage SOP class pynetdicom knows, in every transfer syntax
  pydicom knows (the requestor's order decides, so data are stored as sent:
  uncompressed, deflated, JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG...);
* Patient Root and Study Root Query/Retrieve FIND, GET and MOVE in the uncompressed
  syntaxes. The storage contexts allow SCP/SCU role selection, so a C-GET requestor
  can receive the instances on its own association.
* TCP_NODELAY on every accepted socket (and on C-MOVE sub-associations), which
  pynetdicom does not set: with Nagle on, loopback C-STORE stalls near 11
  instances/s (delayed-ACK interplay).
* Limits: ``dimse_max_associations`` concurrent associations, ``dimse_max_pdu``,
  ``dimse_timeout`` on silent peers, optional calling AE title allow-list.
  One bad association (garbage bytes, an abort mid-transfer) only ends its own
  thread; the listener keeps accepting.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from typing import Any, Mapping

from pydicom.uid import (AllTransferSyntaxes, DeflatedExplicitVRLittleEndian,
                         ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  PatientRootQueryRetrieveInformationModelGet,
                                  PatientRootQueryRetrieveInformationModelMove,
                                  StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, Verification)
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from server.dimse.handlers import bind, parse_aet_list, parse_peers, set_nodelay
from server.dimse.reactor import EventRequestHandler
from server.source import RequestContext

log = logging.getLogger("synthport.dimse")

#: Identifiers and commands: the uncompressed syntaxes.
QR_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
               ExplicitVRBigEndian]
#: Storage: everything pydicom names except the JPIP "referenced" syntaxes, which carry
#: a URL instead of pixel data.
STORAGE_SYNTAXES = [ts for ts in AllTransferSyntaxes if "JPIP" not in ts.name]
QR_MODELS = [PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelGet,
             PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelFind,
             StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove]


class NoDelayAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY on every accepted socket."""

    def get_request(self):
        client, address = super().get_request()
        set_nodelay(client)
        return client, address

    def process_request(self, request, client_address) -> None:
        # The request handler only builds the Association and starts its thread (which
        # starts the DUL thread): do that here instead of in one more thread per
        # connection (ThreadingMixIn's), one thread start less before the
        # A-ASSOCIATE-RQ is read.
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - as ThreadingMixIn.process_request_thread
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def service_actions(self) -> None:
        # pynetdicom runs a full gc.collect() every 60 turns of the accept loop, under
        # the GIL: 10-80 ms in a process holding SQLAlchemy, pydicom and the FHIR models,
        # stalling every association it lands in. Python's own generational collector
        # already frees the association threads' reference cycles.
        pass

    def handle_error(self, request, client_address) -> None:
        # One broken connection must never stop the listener; log it, quietly.
        log.warning("DIMSE connection from %s failed", client_address, exc_info=True)


class _Context(PresentationContext):
    """A presentation context that copies fast.

    pynetdicom deep-copies every supported context for every association; with ~170
    storage SOP classes times ~35 transfer syntaxes that is 60+ ms per association.
    UIDs are immutable strings, so copying the list is enough. synthport copies only
    the contexts an association proposes (handlers.prefer_requestor_syntaxes).
    """

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._transfer_syntax = list(self._transfer_syntax)
        return new


def _fast_copying(cx: PresentationContext) -> _Context:
    new = object.__new__(_Context)
    new.__dict__.update(copy.deepcopy(cx).__dict__)
    return new


class ListenerAE(AE):
    """pynetdicom's AE, counting only live associations against the limit.

    A peer that sends garbage gets an A-ABORT and its connection closed at once, but
    pynetdicom's association thread then still waits ``acse_timeout`` for an
    A-ASSOCIATE that can never come, and counts as active meanwhile: a few bad peers
    would lock everybody out (``dimse_max_associations``). Threads whose DUL is gone
    before any association was established are left out of the count.
    """

    @property
    def active_associations(self):
        return [a for a in super().active_associations
                if a.is_established or not a.is_acceptor or a.dul.is_alive()
                or not getattr(a, "_started_dul", False)]


def build_ae(config: Mapping[str, Any]) -> AE:
    """The AE with every context and limit the listener supports (see module doc)."""
    ae = ListenerAE(ae_title=str(config.get("ae_title") or "SYNTHPORT").strip())
    ae.maximum_associations = max(1, int(config.get("dimse_max_associations") or 10))
    ae.maximum_pdu_size = int(config.get("dimse_max_pdu") or 0)
    timeout = float(config.get("dimse_timeout") or 60)
    ae.acse_timeout = min(timeout, 30.0)
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.require_calling_aet = parse_aet_list(config.get("dimse_allowed_aets"))
    ae.require_called_aet = bool(config.get("dimse_require_called_aet", True))
    ae.add_supported_context(Verification, QR_SYNTAXES)
    for model in QR_MODELS:
        ae.add_supported_context(model, QR_SYNTAXES)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, STORAGE_SYNTAXES,
                                 scu_role=True, scp_role=True)
    return ae


def start_dimse(config: Mapping[str, Any], source: Any, *, block: bool = False,
                port: int | None = None) -> NoDelayAssociationServer:
    """Start the DIMSE listener for ``source`` (or a mapping AE title -> source).

    Args:
        config: resolved settings (``ae_title``, ``dimse_host`` / ``http_host``,
            ``dimse_port``, ``dimse_peers``, ``dimse_allowed_aets``, limits).
        source: the DicomSource to serve.
        block: serve in this thread until KeyboardInterrupt (or ``shutdown()`` from
            another thread); otherwise serve in a daemon thread and return at once.
        port: overrides ``dimse_port`` (0 = any free port; read it back from
            ``server.server_address``).

    Returns:
        The running server; ``server.shutdown()`` stops it and closes the socket.
    """
    parse_peers(config.get("dimse_peers"))          # fail now on a bad peer table
    link_leftovers(source)
    quiet_pynetdicom_handlers()
    ae = build_ae(config)
    host = str(config.get("dimse_host") or config.get("http_host") or "0.0.0.0")
    port = int(config.get("dimse_port", 11112) if port is None else port)
    server = ae.make_server((host, port), ae_title=ae.ae_title, evt_handlers=bind(source, config),
                            contexts=[_fast_copying(cx) for cx in ae.supported_contexts],
                            server_class=NoDelayAssociationServer,
                            request_handler=EventRequestHandler)
    ae._servers.append(server)      # as AE.start_server does, so server.shutdown() works
    log.info("DIMSE listener %s on %s:%d", ae.ae_title, *server.server_address[:2])
    if block:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.shutdown()
    else:
        threading.Thread(target=server.serve_forever, name=f"dimse-{server.server_address[1]}",
                         daemon=True).start()
    return server


def quiet_pynetdicom_handlers() -> None:
    """Unless pynetdicom's logger shows INFO, do not bind its standard logging handlers.

    pynetdicom binds them to every association and server (``_config.LOG_HANDLER_LEVEL``,
    "standard"): they decode and format every PDU and DIMSE message, under the AE-wide
    lock, for log lines that a WARNING logger then drops. Its service classes likewise
    decode and pretty-print every C-FIND/C-GET/C-MOVE request identifier (logged at
    INFO) and every C-FIND response identifier (DEBUG) whatever the level
    (``LOG_REQUEST_IDENTIFIERS``, ``LOG_RESPONSE_IDENTIFIERS``).
    """
    from pynetdicom import _config

    logger = logging.getLogger("pynetdicom")
    if not logger.isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = False
    if not logger.isEnabledFor(logging.DEBUG):
        _config.LOG_RESPONSE_IDENTIFIERS = False


def link_leftovers(source: Any) -> None:
    """Link the studies a previous run stored over C-STORE but could not link (the
    listener stopped mid-association): their ``fhir_pending`` mark is still set."""
    sources = source.values() if isinstance(source, Mapping) else [source]
    for src in sources:
        link = getattr(src, "link_pending", None)
        if callable(link):
            try:
                n = link(RequestContext(caller="synthport-dimse"))
            except Exception:  # noqa: BLE001 - they stay pending; next start retries
                log.exception("could not link pending DICOM studies to FHIR")
                continue
            if n:
                log.info("linked %d DICOM study(ies) left pending by an earlier run", n)


# --------------------------------------------------------------------------- child process
#
# `synthport serve` starts the listener as a plain subprocess (`python -m server.dimse`),
# not a multiprocessing.Process: gunicorn forks its workers from the same master, and a
# multiprocessing child would be "inherited" by every worker's atexit bookkeeping.

CHILD_CONFIG_ENV = "SYNTHPORT_DIMSE_CHILD_CONFIG"


def child_main(config: dict, ready_fd: int) -> int:
    """The listener process: start, report ``ok <port>`` or ``error <why>`` on
    ``ready_fd``, serve until SIGTERM/SIGINT or until the parent is gone."""
    from server.dicom.store import DicomStore
    from server.store import SqlStore

    logging.basicConfig(level=str(config.get("log_level", "info")).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if str(config.get("log_level", "info")).lower() != "debug":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)   # a line per PDU otherwise
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with os.fdopen(ready_fd, "w") as ready:
        try:
            sql = SqlStore.from_url(config["database_url"], config, auto_migrate=False)
            from server.synthetic.dicom import dimse_sources

            # The real store under ae_title, each synthetic cohort under its own AE title.
            from server.access import guard_dimse_sources, security_layer

            dicom = DicomStore(sql, config)
            sec = security_layer(config, sql, dicom)
            server = start_dimse(config, guard_dimse_sources(config, sec, dimse_sources(
                config, sql, dicom)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which exits
            log.debug("DIMSE listener failed to start", exc_info=True)
            ready.write("error " + " ".join(f"{type(exc).__name__}: {exc}".split()) + "\n")
            return 1
        ready.write(f"ok {server.server_address[1]}\n")
    # What start-up loaded (models, dictionaries, the engine) lives as long as the
    # process: keep it out of the collector's full passes.
    gc.freeze()
    from server.synthetic.dicom import refresh_dimse_sources

    ticks = 0
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.info("synthport serve is gone: DIMSE listener stops")
            break
        ticks += 1
        if ticks % 10 == 0:      # cohorts created since the start get their AE title
            try:
                refresh_dimse_sources(server, config, sql)
            except Exception:  # noqa: BLE001 - retried at the next tick
                log.exception("could not refresh the cohort AE titles")
    server.shutdown()
    sql.engine.dispose()
    return 0


def spawn_dimse(config: Mapping[str, Any], timeout: float = 60.0) -> subprocess.Popen:
    """Start the listener as a child process and wait until it listens.

    Returns:
        The child; stop it with :func:`stop_dimse`.

    Raises:
        RuntimeError: the listener could not start (port taken, bad settings...).
    """
    cfg = dict(config)
    cfg["database_url"] = getattr(config, "resolved_database_url", None) or config["database_url"]
    read_fd, write_fd = os.pipe()
    env = {**os.environ, CHILD_CONFIG_ENV: json.dumps(cfg, default=str)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "server.dimse", str(write_fd)], env=env,
                                pass_fds=(write_fd,), stdin=subprocess.DEVNULL)
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        line = ready.readline() if select.select([ready], [], [], timeout)[0] else ""
    kind, _, detail = line.strip().partition(" ")
    if kind != "ok":
        stop_dimse(proc)
        why = detail or (f"no answer within {timeout:.0f} s" if proc.poll() is None
                         else f"exit status {proc.returncode}")
        raise RuntimeError(f"the DIMSE listener did not start: {why}")
    log.info("DIMSE listener process %d on port %s", proc.pid, detail)
    return proc


def stop_dimse(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Stop the child started by :func:`spawn_dimse` (SIGTERM, then SIGKILL)."""
    if proc is None:
        return
    for stop in (proc.terminate, proc.kill):
        if proc.poll() is not None:       # exited (or reaped by gunicorn's SIGCHLD handler)
            return
        try:
            stop()
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
        except (ProcessLookupError, ChildProcessError):
            return


__all__ = ["build_ae", "start_dimse", "spawn_dimse", "stop_dimse", "child_main",
           "NoDelayAssociationServer", "ListenerAE"]
