"""The DIMSE listener over the real DicomStore (SQLite and PostgreSQL), driven by
pynetdicom SCUs: C-ECHO, C-STORE as received, C-FIND at every level, C-GET, C-MOVE,
refusals, and a listener that survives bad peers."""
from __future__ import annotations

import socket
import time

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  PatientRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, Verification)

from server import errors as E
from server.dimse import handlers
from server.source import RequestContext

from .conftest import AE_TITLE, DEST_AE, make_config, scu, store_all

CTX = RequestContext(caller="test")
STUDY_FIND = StudyRootQueryRetrieveInformationModelFind
PATIENT_FIND = PatientRootQueryRetrieveInformationModelFind


def _find(port: int, model, **keys) -> tuple[list[Dataset], int, Dataset]:
    """C-FIND; (pending identifiers, final status, final status dataset)."""
    ae = scu(contexts=[model])
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    q = Dataset()
    for key, value in keys.items():
        setattr(q, key, value)
    found, final = [], None
    try:
        for st, ident in assoc.send_c_find(q, model):
            if st.Status == E.DIMSE_PENDING:
                found.append(ident)
            else:
                final = st
    finally:
        assoc.release()
    return found, final.Status, final


def test_echo_store_as_received_and_find_every_level(dimse, testdata):
    # C-ECHO, and TCP_NODELAY on the accepted socket while the association is open
    ae = scu(contexts=[Verification])
    assoc = ae.associate("127.0.0.1", dimse.port, ae_title=AE_TITLE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == E.DIMSE_SUCCESS
    accepted = [a.dul.socket.socket for a in dimse.server.active_associations]
    assert accepted and all(
        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)
    assoc.release()

    # C-STORE: every instance in its own transfer syntax, stored as received
    assert store_all(dimse.port, testdata.files) == [E.DIMSE_SUCCESS] * len(testdata.files)
    for path in (testdata.mr_rle, testdata.j2k):
        sent = dcmread(path)
        [ref] = dimse.store.instance_refs(CTX, sop_uid=sent.SOPInstanceUID)
        assert ref.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
        stored = dcmread(__import__("io").BytesIO(dimse.store.open_instance(CTX, ref)))
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert stored.PixelData == sent.PixelData           # compressed bytes untouched
        assert stored.file_meta.SourceApplicationEntityTitle == "TESTSCU"

    mr = dcmread(testdata.mr_rle, stop_before_pixels=True)
    nm = dcmread(testdata.j2k, stop_before_pixels=True)

    # STUDY level: a study with 3 instances is ONE match, with RetrieveAETitle
    found, st, _ = _find(dimse.port, STUDY_FIND, QueryRetrieveLevel="STUDY",
                         StudyInstanceUID=testdata.ct_study, PatientName="",
                         NumberOfStudyRelatedInstances="")
    assert st == E.DIMSE_SUCCESS and len(found) == 1
    assert found[0].StudyInstanceUID == testdata.ct_study
    assert found[0].RetrieveAETitle == AE_TITLE and found[0].QueryRetrieveLevel == "STUDY"
    assert str(found[0].PatientName) == "CompressedSamples^CT1"
    assert int(found[0].NumberOfStudyRelatedInstances) == 3

    # date range, wildcard, UID list
    found, st, _ = _find(dimse.port, STUDY_FIND, QueryRetrieveLevel="STUDY",
                         StudyDate="20040801-20040831", StudyInstanceUID="")
    assert st == E.DIMSE_SUCCESS
    assert {d.StudyInstanceUID for d in found} == {mr.StudyInstanceUID, nm.StudyInstanceUID}
    found, _, _ = _find(dimse.port, STUDY_FIND, QueryRetrieveLevel="STUDY",
                        PatientName="CompressedSamples^C*", StudyInstanceUID="")
    assert [d.StudyInstanceUID for d in found] == [testdata.ct_study]
    found, _, _ = _find(dimse.port, STUDY_FIND, QueryRetrieveLevel="STUDY",
                        StudyInstanceUID=[testdata.ct_study, nm.StudyInstanceUID])
    assert {d.StudyInstanceUID for d in found} == {testdata.ct_study, nm.StudyInstanceUID}

    # PATIENT level (Patient Root only)
    found, st, _ = _find(dimse.port, PATIENT_FIND, QueryRetrieveLevel="PATIENT",
                         PatientName="CompressedSamples*", PatientID="")
    assert st == E.DIMSE_SUCCESS
    assert {d.PatientID for d in found} == {"1CT1", "4MR1", "8NM1"}
    found, st, final = _find(dimse.port, STUDY_FIND, QueryRetrieveLevel="PATIENT", PatientID="")
    assert st == E.DIMSE_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS and not found
    assert "Study Root" in final.ErrorComment

    # SERIES and IMAGE levels
    found, _, _ = _find(dimse.port, STUDY_FIND, QueryRetrieveLevel="SERIES",
                        StudyInstanceUID=testdata.ct_study, SeriesInstanceUID="", Modality="")
    assert [(d.SeriesInstanceUID, d.Modality) for d in found] == [(testdata.ct_series, "CT")]
    found, _, _ = _find(dimse.port, PATIENT_FIND, QueryRetrieveLevel="IMAGE", PatientID="1CT1",
                        StudyInstanceUID=testdata.ct_study, SeriesInstanceUID=testdata.ct_series,
                        SOPInstanceUID="", InstanceNumber="")
    assert sorted(d.SOPInstanceUID for d in found) == sorted(testdata.ct_sops)
    assert sorted(int(d.InstanceNumber) for d in found) == [1, 2, 3]
    assert all(d.QueryRetrieveLevel == "IMAGE" for d in found)

    # a bad level answers a failure with a comment, not a crash
    found, st, final = _find(dimse.port, STUDY_FIND, QueryRetrieveLevel="FRAME")
    assert st == E.DIMSE_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS and "QueryRetrieveLevel" in final.ErrorComment


def test_get_and_move(dimse, testdata, receiver, monkeypatch):
    assert store_all(dimse.port, testdata.files) == [E.DIMSE_SUCCESS] * len(testdata.files)
    ct = dcmread(testdata.files[0], stop_before_pixels=True)
    nm = dcmread(testdata.j2k)

    # C-GET of a study (Study Root), instances come back on the same association
    got: dict[str, tuple[str, Dataset]] = {}

    def on_store(event):
        got[event.request.AffectedSOPInstanceUID] = (event.context.transfer_syntax, event.dataset)
        return 0x0000

    ae = scu(contexts=[StudyRootQueryRetrieveInformationModelGet,
                       PatientRootQueryRetrieveInformationModelGet,
                       (ct.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
                       (nm.SOPClassUID, [nm.file_meta.TransferSyntaxUID])])
    roles = [build_role(ct.SOPClassUID, scp_role=True), build_role(nm.SOPClassUID, scp_role=True)]
    assoc = ae.associate("127.0.0.1", dimse.port, ae_title=AE_TITLE, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = testdata.ct_study
    rsps = [st for st, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    assert rsps[-1].Status == E.DIMSE_SUCCESS
    assert rsps[-1].NumberOfCompletedSuboperations == 3
    assert sorted(got) == sorted(testdata.ct_sops)
    # Patient Root, IMAGE level: the JPEG 2000 instance, still compressed
    got.clear()
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.PatientID = nm.PatientID
    q.StudyInstanceUID = nm.StudyInstanceUID
    q.SeriesInstanceUID = nm.SeriesInstanceUID
    q.SOPInstanceUID = nm.SOPInstanceUID
    rsps = [st for st, _ in assoc.send_c_get(q, PatientRootQueryRetrieveInformationModelGet)]
    assert rsps[-1].Status == E.DIMSE_SUCCESS
    ts, ds = got[nm.SOPInstanceUID]
    assert ts == nm.file_meta.TransferSyntaxUID and ds.PixelData == nm.PixelData
    # no unique key: a failure with a comment
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    rsps = [st for st, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    assert rsps[-1].Status == E.DIMSE_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "StudyInstanceUID" in rsps[-1].ErrorComment
    assoc.release()

    # C-MOVE to the configured destination; the sub-association has TCP_NODELAY
    nodelay = []
    real = handlers.set_nodelay

    def spy(sock):
        real(sock)
        if sock is not None:
            nodelay.append((sock.getpeername()[1], sock.getsockopt(socket.IPPROTO_TCP,
                                                                     socket.TCP_NODELAY)))

    monkeypatch.setattr(handlers, "set_nodelay", spy)
    ae = scu(contexts=[StudyRootQueryRetrieveInformationModelMove])
    assoc = ae.associate("127.0.0.1", dimse.port, ae_title=AE_TITLE)
    assert assoc.is_established
    for study in (testdata.ct_study, nm.StudyInstanceUID):
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study
        rsps = [st for st, _ in assoc.send_c_move(q, DEST_AE, StudyRootQueryRetrieveInformationModelMove)]
        assert rsps[-1].Status == E.DIMSE_SUCCESS, rsps[-1]
    assert sorted(receiver.received) == sorted(testdata.ct_sops + [nm.SOPInstanceUID])
    assert receiver.received[nm.SOPInstanceUID][0] == nm.file_meta.TransferSyntaxUID
    assert (receiver.port, 1) in [(p, bool(v)) for p, v in nodelay]

    # unknown destination: 0xA801 with an Error Comment
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = testdata.ct_study
    rsps = [st for st, _ in assoc.send_c_move(q, "NOWHERE", StudyRootQueryRetrieveInformationModelMove)]
    assert rsps[-1].Status == E.DIMSE_MOVE_DESTINATION_UNKNOWN
    assert "NOWHERE" in rsps[-1].ErrorComment
    # a study that is not stored: zero sub-operations
    q.StudyInstanceUID = "1.2.3.4.5.6.7"
    rsps = [st for st, _ in assoc.send_c_move(q, DEST_AE, StudyRootQueryRetrieveInformationModelMove)]
    assert rsps[-1].Status == E.DIMSE_SUCCESS and rsps[-1].NumberOfCompletedSuboperations == 0
    assoc.release()


# --------------------------------------------------------------------------- listener only


class _NoData:
    """A source with nothing stored: enough for tests of the listener itself."""

    name, writable, ae_title = "real", False, AE_TITLE

    def store_instance(self, ctx, data):
        raise E.MethodNotAllowed("read-only source")

    def find(self, ctx, level, query, **kw):
        return []

    def instance_refs(self, ctx, *a, **kw):
        return []

    def open_instance(self, ctx, ref):
        raise E.NotFound("nothing stored")


@pytest.fixture
def bare(tmp_path):
    from server.dimse.server import start_dimse

    server = start_dimse(make_config(tmp_path, dimse_allowed_aets="TESTSCU,OTHER",
                                     dimse_max_associations=2), _NoData(), port=0)
    yield server.server_address[1]
    server.shutdown()


def _echo(port: int, calling: str = "TESTSCU", called: str = AE_TITLE) -> int | None:
    assoc = scu(calling, [Verification]).associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def test_listener_survives_garbage_and_aborts(bare):
    import random

    rnd = random.Random(1234)
    for payload in (bytes(rnd.randrange(256) for _ in range(4096)),
                    b"\x01\x00\x00\x00\xff\xff" + b"x" * 100,     # A-ASSOCIATE-RQ, absurd length
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", bare), timeout=5) as s:
            s.sendall(payload)
            s.settimeout(2)
            try:
                s.recv(100)
            except OSError:
                pass
    # abort in the middle of a C-STORE data set
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ae = scu(contexts=[(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])])
    assoc = ae.associate("127.0.0.1", bare, ae_title=AE_TITLE)
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(b"\x04\x00\x00\x00\x40\x00")     # P-DATA header, then nothing
    assoc.abort()
    assert _echo(bare) == E.DIMSE_SUCCESS


def test_refused_store_and_association_rules(bare):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ae = scu(contexts=[(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])])
    assoc = ae.associate("127.0.0.1", bare, ae_title=AE_TITLE)
    st = assoc.send_c_store(ds)
    assoc.release()
    assert st.Status == E.DIMSE_REFUSED_NOT_AUTHORIZED and "read-only" in st.ErrorComment
    assert _echo(bare, calling="STRANGER") is None            # not in dimse_allowed_aets
    assert _echo(bare, called="SOMEONEELSE") is None          # not our AE title
    # dimse_max_associations = 2: the third at once is rejected (transient)
    held = [scu("TESTSCU", [Verification]).associate("127.0.0.1", bare, ae_title=AE_TITLE)
            for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        assert _echo(bare) is None
    finally:
        for a in held:
            a.release()
    time.sleep(0.2)
    assert _echo(bare) == E.DIMSE_SUCCESS


def test_parse_peers_and_aets():
    assert handlers.parse_peers("ORTHANC=127.0.0.1:4242, PACS2=10.1.2.3:104") == {
        "ORTHANC": ("127.0.0.1", 4242), "PACS2": ("10.1.2.3", 104)}
    assert handlers.parse_peers({"A": "[::1]:104", "B": ["h", 11112],
                                 "C": {"host": "h2", "port": 5}}) == {
        "A": ("::1", 104), "B": ("h", 11112), "C": ("h2", 5)}
    assert handlers.parse_peers("") == {}
    for bad in ("NOPORT=host", "A=host:0", "=h:1", "TOOLONGAETITLE1234=h:1", "A"):
        with pytest.raises(ValueError):
            handlers.parse_peers(bad)
    assert handlers.parse_aet_list(" A, B ,,") == ["A", "B"]
    assert handlers.parse_aet_list(["X"]) == ["X"]


def test_peers_from_toml_table(tmp_path):
    from server.config import load_config

    toml = tmp_path / "s.toml"
    toml.write_text('[synthport.dimse_peers]\nORTHANC = "127.0.0.1:4242"\n')
    cfg = load_config(toml_path=str(toml), environ={})
    assert handlers.parse_peers(cfg.dimse_peers) == {"ORTHANC": ("127.0.0.1", 4242)}
    cfg = load_config(environ={"SYNTHPORT_DIMSE_PEERS": "X=h:1"})
    assert handlers.parse_peers(cfg.dimse_peers) == {"X": ("h", 1)}


def test_requestors_syntax_order_wins_without_touching_the_listeners_contexts(dimse):
    from pydicom.uid import JPEG2000Lossless
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    def order(uid):
        return [list(cx.transfer_syntax) for cx in dimse.server.contexts if cx.abstract_syntax == uid]

    before = order(CTImageStorage)
    assert before[0][0] != JPEG2000Lossless          # ours lists it later
    seen = {}

    def spy(event):
        seen["supported"] = [cx.abstract_syntax for cx in event.assoc.acceptor.supported_contexts]

    for assoc in list(dimse.server.active_associations):
        assoc.release()
    dimse.server.bind(evt.EVT_ACCEPTED, spy)
    try:
        ae = scu(contexts=[(CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian]),
                           (Verification, [ImplicitVRLittleEndian])])
        assoc = ae.associate("127.0.0.1", dimse.port, ae_title=AE_TITLE)
        assert assoc.is_established
        accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assoc.release()
    finally:
        dimse.server.unbind(evt.EVT_ACCEPTED, spy)
    assert accepted == {CTImageStorage: JPEG2000Lossless, Verification: ImplicitVRLittleEndian}
    # the association negotiated on copies of the proposed contexts only ...
    assert sorted(seen["supported"]) == sorted([CTImageStorage, Verification])
    # ... and the listener's shared list, used by the next association, is unchanged
    assert order(CTImageStorage) == before and MRImageStorage in [
        cx.abstract_syntax for cx in dimse.server.contexts]


@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", "1.2.840.10008.5.1.4.1.1.2." + "9" * 38])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"])
@pytest.mark.parametrize("aet", ["", "STORESCU", "ODD"])
def test_file_meta_encoding_is_pydicoms(sop_instance, ts, aet):
    """encode_file_meta writes exactly what pydicom's writer writes for pynetdicom's
    event.file_meta (plus the Source AE Title), odd and even value lengths alike."""
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                            transfer_syntax=ts)
    if aet:
        meta.SourceApplicationEntityTitle = aet
    expected = BytesIO()
    write_file_meta_info(expected, meta, enforce_standard=True)
    got = handlers.encode_file_meta(sop_class, sop_instance, ts, aet)
    assert got == expected.getvalue()
    back = dcmread(BytesIO(b"\0" * 128 + b"DICM" + got))
    assert back.file_meta.MediaStorageSOPInstanceUID == sop_instance
    assert back.file_meta.TransferSyntaxUID == ts
    assert back.file_meta.get("SourceApplicationEntityTitle", "") == aet


def test_pynetdicom_formats_nothing_that_its_logger_drops(monkeypatch):
    """At WARNING, pynetdicom's logging handlers and its identifier dumps are off; at
    DEBUG they stay as pynetdicom sets them."""
    import logging

    from pynetdicom import _config

    from server.dimse.server import quiet_pynetdicom_handlers

    for name in ("LOG_HANDLER_LEVEL", "LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS"):
        monkeypatch.setattr(_config, name, getattr(_config, name))
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    try:
        logger.setLevel(logging.DEBUG)
        _config.LOG_HANDLER_LEVEL, _config.LOG_REQUEST_IDENTIFIERS = "standard", True
        _config.LOG_RESPONSE_IDENTIFIERS = True
        quiet_pynetdicom_handlers()
        assert (_config.LOG_HANDLER_LEVEL, _config.LOG_REQUEST_IDENTIFIERS,
                _config.LOG_RESPONSE_IDENTIFIERS) == ("standard", True, True)
        logger.setLevel(logging.WARNING)
        quiet_pynetdicom_handlers()
        assert (_config.LOG_HANDLER_LEVEL, _config.LOG_REQUEST_IDENTIFIERS,
                _config.LOG_RESPONSE_IDENTIFIERS) == ("none", False, False)
    finally:
        logger.setLevel(level)
