"""C-STORE writes a study's FHIR ImagingStudy once per association (docs/adr/0006):
on release (before the A-RELEASE response), on abort, every ``dimse_link_interval``
seconds, and at listener start for studies an earlier run left pending."""
from __future__ import annotations

import time

import orjson
from pydicom import dcmread

from server import errors as E
from server.dicom.fhirlink import STUDY_UID_SYSTEM
from server.dimse.server import start_dimse
from server.source import RequestContext

from .conftest import AE_TITLE, scu

CTX = RequestContext(caller="test")


def _study(store, study_uid: str) -> tuple[int, int] | None:
    """(versionId, numberOfInstances) of the study's current ImagingStudy, or None."""
    res = store.sql.search(CTX, "ImagingStudy", [("identifier", f"{STUDY_UID_SYSTEM}|urn:oid:{study_uid}")])
    if not res.matches:
        return None
    assert len(res.matches) == 1
    body = orjson.loads(res.matches[0].body)
    return int(body["meta"]["versionId"]), body["numberOfInstances"]


def _pending(store) -> int:
    from sqlalchemy import func, select

    from server.db.schema import dicom_study as ST
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(ST)
                            .where(ST.c.fhir_pending.is_(True))).scalar_one()


def _associate(port: int, files):
    ae = scu()
    ds = dcmread(files[0], stop_before_pixels=True)
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    return assoc


def test_one_imagingstudy_version_per_association(dimse, testdata, tmp_path):
    ct = testdata.files[:3]
    assoc = _associate(dimse.port, ct)
    assert [assoc.send_c_store(p).Status for p in ct[:2]] == [E.DIMSE_SUCCESS] * 2
    # stored and queryable over DICOM at once; FHIR waits for the association's end
    assert len(dimse.store.instance_refs(CTX, study_uid=testdata.ct_study)) == 2
    assert _study(dimse.store, testdata.ct_study) is None and _pending(dimse.store) == 1
    assert assoc.send_c_store(ct[2]).Status == E.DIMSE_SUCCESS
    assoc.release()
    # linked before the A-RELEASE response: no waiting needed
    assert _study(dimse.store, testdata.ct_study) == (1, 3)
    assert _pending(dimse.store) == 0

    # re-sending an instance changes nothing: no new version
    assoc = _associate(dimse.port, ct)
    assert assoc.send_c_store(ct[0]).Status == E.DIMSE_SUCCESS
    assoc.release()
    assert _study(dimse.store, testdata.ct_study) == (1, 3)

    # a second association adding two instances: one more version
    extra = []
    for n in (4, 5):
        ds = dcmread(ct[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.99.{n}{int(time.time())}"
        ds.InstanceNumber = n
        extra.append(tmp_path / f"ct{n}.dcm")
        ds.save_as(extra[-1], enforce_file_format=True)
    assoc = _associate(dimse.port, extra)
    assert [assoc.send_c_store(p).Status for p in extra] == [E.DIMSE_SUCCESS] * 2
    assoc.release()
    assert _study(dimse.store, testdata.ct_study) == (2, 5)


def test_aborted_association_is_linked(dimse, testdata):
    ct = testdata.files[:3]
    assoc = _associate(dimse.port, ct)
    assert assoc.send_c_store(ct[0]).Status == E.DIMSE_SUCCESS
    assoc.abort()
    deadline = time.monotonic() + 10
    while _study(dimse.store, testdata.ct_study) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _study(dimse.store, testdata.ct_study) == (1, 1)
    assert _pending(dimse.store) == 0


def test_link_interval_bounds_the_wait(tmp_path, db_url, testdata):
    from server.dicom.store import DicomStore
    from server.store import SqlStore

    from .conftest import make_config

    cfg = make_config(tmp_path, db_url, dimse_link_interval=0.000001)
    store = DicomStore(SqlStore.from_url(db_url, cfg), cfg)
    server = start_dimse(cfg, store, port=0)
    try:
        ct = testdata.files[:3]
        assoc = _associate(server.server_address[1], ct)
        assert assoc.send_c_store(ct[0]).Status == E.DIMSE_SUCCESS
        # interval elapsed: linked during the association, at the C-STORE itself
        assert _study(store, testdata.ct_study) == (1, 1)
        assert assoc.send_c_store(ct[1]).Status == E.DIMSE_SUCCESS
        assert _study(store, testdata.ct_study) == (2, 2)
        assoc.release()
    finally:
        server.shutdown()
        store.engine.dispose()


def test_leftovers_are_linked_when_the_listener_starts(tmp_path, db_url, testdata):
    from server.dicom.store import DicomStore
    from server.store import SqlStore

    from .conftest import make_config

    cfg = make_config(tmp_path, db_url)
    store = DicomStore(SqlStore.from_url(db_url, cfg), cfg)
    try:
        for path in testdata.files[:3]:      # as if the listener died mid-association
            store.store_instance(CTX, path.read_bytes(), defer_link=True)
        assert _study(store, testdata.ct_study) is None and _pending(store) == 1
        server = start_dimse(cfg, store, port=0)
        server.shutdown()
        assert _study(store, testdata.ct_study) == (1, 3)
        assert _pending(store) == 0
        assert store.link_pending(CTX) == 0            # nothing left, idempotent
    finally:
        store.engine.dispose()
