"""Fixtures for the DIMSE tests: a listener on a free port over a DicomStore on
``db_url`` (SQLite and PostgreSQL), a pynetdicom storage SCP as C-MOVE destination,
and a small set of instances from pydicom's test files."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")

from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pynetdicom import AE, AllStoragePresentationContexts, evt  # noqa: E402

from server.config import load_config  # noqa: E402
from server.dimse.server import STORAGE_SYNTAXES, start_dimse  # noqa: E402

AE_TITLE = "SYNTHPORT"
DEST_AE = "DESTSCP"


@dataclass
class Receiver:
    """A pynetdicom storage SCP: what it received, by SOP Instance UID."""

    port: int
    received: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # uid -> (ts, part10)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A C-STORE SCP on a free port (the C-MOVE destination ``DESTSCP``)."""
    ae = AE(ae_title=DEST_AE)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, STORAGE_SYNTAXES)
    rec = Receiver(port=0)

    def on_store(event):
        data = event.encoded_dataset()
        with rec.lock:
            rec.received[event.request.AffectedSOPInstanceUID] = (
                str(event.context.transfer_syntax), data)
        return 0x0000

    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    rec.port = server.server_address[1]
    try:
        yield rec
    finally:
        server.shutdown()


@dataclass
class Dimse:
    port: int
    store: Any
    server: Any
    config: Any


def make_config(tmp_path: Path, db_url: str | None = None, **extra) -> Any:
    return load_config({"data_dir": str(tmp_path / "data"), "database_url": db_url or "",
                        "ae_title": AE_TITLE, "dimse_host": "127.0.0.1", "dimse_timeout": 20,
                        **extra}, environ={})


@pytest.fixture
def dimse(db_url: str, tmp_path: Path, receiver: Receiver) -> Iterator[Dimse]:
    """``start_dimse`` on a free port over a DicomStore on ``db_url``."""
    from server.dicom.store import DicomStore
    from server.store import SqlStore

    cfg = make_config(tmp_path, db_url, dimse_peers=f"{DEST_AE}=127.0.0.1:{receiver.port}")
    sql = SqlStore.from_url(db_url, cfg)
    store = DicomStore(sql, cfg)
    server = start_dimse(cfg, store, port=0)
    try:
        yield Dimse(server.server_address[1], store, server, cfg)
    finally:
        server.shutdown()
        engine = getattr(sql, "engine", None)
        if engine is not None:
            engine.dispose()


# --------------------------------------------------------------------------- test data


@dataclass
class TestData:
    files: list[Path]                 # every file to C-STORE
    ct_study: str                     # a study with 3 CT instances in one series
    ct_series: str
    ct_sops: list[str]
    mr_rle: Path                      # RLE Lossless MR
    j2k: Path                         # JPEG 2000 secondary capture


@pytest.fixture
def testdata(tmp_path: Path) -> TestData:
    """CT_small.dcm as 3 instances of one series (new SOP Instance UIDs), the RLE MR
    and the JPEG 2000 instance from pydicom's test files."""
    from pydicom.uid import generate_uid

    out = tmp_path / "in"
    out.mkdir()
    files, sops = [], []
    ct = dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(3):
        uid = generate_uid(prefix="1.2.826.0.1.3680043.10.1234.")
        ct.SOPInstanceUID = uid
        ct.file_meta.MediaStorageSOPInstanceUID = uid
        ct.InstanceNumber = i + 1
        path = out / f"ct{i + 1}.dcm"
        ct.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(uid)
    mr = Path(get_testdata_file("MR_small_RLE.dcm"))
    j2k = Path(get_testdata_file("JPEG2000.dcm"))
    return TestData(files=files + [mr, j2k], ct_study=ct.StudyInstanceUID,
                    ct_series=ct.SeriesInstanceUID, ct_sops=sops, mr_rle=mr, j2k=j2k)


def scu(ae_title: str = "TESTSCU", contexts=(), **kw) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for cx in contexts:
        if isinstance(cx, tuple):
            ae.add_requested_context(*cx)
        else:
            ae.add_requested_context(cx)
    return ae


def store_all(port: int, files: list[Path]) -> list[int]:
    """C-STORE each file in its own transfer syntax; the statuses."""
    ae = scu()
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(path).Status for path in files]
    finally:
        assoc.release()
