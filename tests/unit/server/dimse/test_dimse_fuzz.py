"""The DIMSE listener under mutated associations (tests/unit/server/dicom/fuzz.py): the
PDUs of a real one (C-ECHO, C-STORE, C-FIND, release) recorded, then sent with bytes
flipped, lengths changed, PDUs cut, retyped, dropped, repeated or swapped. The listener
must keep answering, and every association thread must end once its peer has closed."""
from __future__ import annotations

import threading
import time

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from server.dicom.store import DicomStore
from server.dimse.server import start_dimse
from server.store import SqlStore
from tests.unit.server.dicom.fuzz import pdu_cases, record_pdus, run_pdus

from .conftest import AE_TITLE, make_config

CASES = 60


def _association(port: int) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ae = AE(ae_title="FUZZ")
    ae.add_requested_context(Verification)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0 and assoc.send_c_store(ds).Status == 0
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    assert [int(s.Status) for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)] \
        == [0xFF00, 0x0000]
    assoc.release()


def _echo(port: int) -> bool:
    ae = AE(ae_title="FUZZ")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    ok = assoc.is_established and assoc.send_c_echo().Status == 0
    if assoc.is_established:
        assoc.release()
    return ok


# An exception that ends a DUL thread unhandled is an error here: each must become an
# A-ABORT (PS3.8 §9.3.8), the peer told why the association ended.
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_mutated_associations_never_stop_the_listener(tmp_path):
    # The default timeouts (60 s): every association must end when its peer closes,
    # not when a timer expires (one that did held its slot for the whole timeout).
    cfg = make_config(tmp_path, dimse_timeout=60)
    sql = SqlStore.from_url(f"sqlite:///{tmp_path}/db.sqlite", {})
    server = start_dimse(cfg, DicomStore(sql, {"data_dir": str(tmp_path / "data")}), port=0)
    port = server.server_address[1]
    try:
        pdus = record_pdus("127.0.0.1", port, _association)
        # A-ASSOCIATE-RQ, P-DATA (echo, store command and data set, find), A-RELEASE-RQ
        assert pdus[0][0] == 1 and pdus[-1][0] == 5 and {p[0] for p in pdus[1:-1]} == {4}
        baseline = threading.active_count()
        report = run_pdus(pdu_cases(7, CASES, pdus), "127.0.0.1", port, lambda: _echo(port), wait=0.1)
        assert not report.findings, report.summary()
        assert report.statuses.get("first answer PDU 2"), report.summary()     # A-ASSOCIATE-AC
        assert _echo(port)
        # every association of the run ends soon after its peer closed
        deadline = time.monotonic() + 10
        while threading.active_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.2)
        assert threading.active_count() <= baseline, [t.name for t in threading.enumerate()]
    finally:
        server.shutdown()
        sql.engine.dispose()


def test_a_peer_that_never_asks_for_an_association_leaves_no_thread_behind(tmp_path):
    """Peers that send something else than an A-ASSOCIATE-RQ, or a request cut short,
    and close: each acceptor thread waited for the request until the ACSE timeout
    (60 s), so a stream of such connections piled up threads and sockets."""
    import socket

    cfg = make_config(tmp_path, dimse_timeout=60)
    sql = SqlStore.from_url(f"sqlite:///{tmp_path}/db.sqlite", {})
    server = start_dimse(cfg, DicomStore(sql, {"data_dir": str(tmp_path / "data")}), port=0)
    port = server.server_address[1]
    try:
        baseline = threading.active_count()
        for payload in (b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03",   # P-DATA-TF
                        b"\x08\x00\x00\x00\x00\x04\x00\x00\x00\x00",           # no such PDU type
                        b"\x01\x00\xff\xff\xff\xff\x00"):                        # A-ASSOCIATE-RQ, cut
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(payload)
                    s.settimeout(0.5)
                    try:
                        s.recv(100)     # an A-ABORT (PS3.8 Table 9-10, Sta2: AA-1), or nothing
                    except OSError:
                        pass
        deadline = time.monotonic() + 5
        while threading.active_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threading.active_count() <= baseline, [t.name for t in threading.enumerate()]
        assert _echo(port)
    finally:
        server.shutdown()
        sql.engine.dispose()
