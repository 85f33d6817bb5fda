"""End-to-end: the DIMSE listener of the real `synthport serve`, driven by dcmtk's
echoscu, storescu, findscu, getscu and movescu (with a dcmtk storescp as the C-MOVE
destination, configured through SYNTHPORT_DIMSE_PEERS)."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.server import free_port, run_server

pytestmark = pytest.mark.e2e

AE = "SYNTHPORT"
DEST = "STORESCP"
TOOLS = ("echoscu", "storescu", "findscu", "getscu", "movescu", "storescp")


@functools.cache
def dcmtk(name: str) -> str | None:
    """The dcmtk binary ``name`` on PATH. pynetdicom installs Python apps of the same
    names (echoscu, storescu...) that may come first on PATH: those are skipped."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which(name, path=folder)
        if not path:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    return None


def _run(*args: str, ok: bool = True, **kw) -> subprocess.CompletedProcess:
    tool = dcmtk(args[0])
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.run([tool, *args[1:]], capture_output=True, text=True, timeout=120,
                          env=env, **kw)
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _samples(folder: Path) -> dict:
    """3 CT instances of one study (new SOP Instance UIDs), the RLE MR, the JPEG 2000 SC."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir()
    ct = dcmread(get_testdata_file("CT_small.dcm"))
    files, sops = [], []
    for i in range(3):
        uid = generate_uid(prefix="1.2.826.0.1.3680043.10.1234.")
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = uid
        ct.InstanceNumber = i + 1
        files.append(folder / f"ct{i + 1}.dcm")
        ct.save_as(files[-1], enforce_file_format=True)
        sops.append(uid)
    mr = Path(get_testdata_file("MR_small_RLE.dcm"))
    j2k = Path(get_testdata_file("JPEG2000.dcm"))
    return {"files": files + [mr, j2k], "ct_study": ct.StudyInstanceUID, "ct_sops": sops,
            "j2k": dcmread(j2k)}


@contextlib.contextmanager
def storescp(folder: Path, port: int):
    folder.mkdir()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", DEST, "+xa", "-od", str(folder), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.1)
        yield folder
    finally:
        proc.terminate()
        proc.wait(10)


def _sop_uids(folder: Path) -> set[str]:
    from pydicom import dcmread

    return {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in folder.iterdir()}


def test_dcmtk_echo_store_find_get_move(tmp_path, db_url):
    missing = [t for t in TOOLS if not dcmtk(t)]
    if missing:
        pytest.skip(f"dcmtk tools not installed: {', '.join(missing)} (apt-get install dcmtk)")
    data = _samples(tmp_path / "in")
    dport, sport = free_port(), free_port()
    env = {"SYNTHPORT_DIMSE_PORT": str(dport), "SYNTHPORT_DIMSE_HOST": "127.0.0.1",
           "SYNTHPORT_DIMSE_PEERS": f"{DEST}=127.0.0.1:{sport}"}
    with run_server(tmp_path, db_url, extra_env=env), storescp(tmp_path / "moved", sport) as moved:
        addr = ["-aet", "DCMTK", "-aec", AE, "127.0.0.1", str(dport)]
        _run("echoscu", *addr)
        _run("storescu", *addr, *map(str, data["files"]))

        # one study with 3 instances: exactly one C-FIND match
        finds = tmp_path / "find"
        finds.mkdir()
        _run("findscu", "-S", *addr, "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={data['ct_study']}", "-k", "PatientName",
             "-k", "NumberOfStudyRelatedInstances", "-X", "-od", str(finds))
        rsps = list(finds.iterdir())
        assert len(rsps) == 1
        from pydicom import dcmread

        rsp = dcmread(rsps[0])
        assert rsp.StudyInstanceUID == data["ct_study"] and rsp.RetrieveAETitle == AE
        assert int(rsp.NumberOfStudyRelatedInstances) == 3

        # C-GET of the study
        got = tmp_path / "got"
        got.mkdir()
        _run("getscu", "-S", *addr, "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={data['ct_study']}", "-od", str(got))
        assert _sop_uids(got) == set(data["ct_sops"])

        # C-MOVE of the study and of the JPEG 2000 instance to storescp
        for study in (data["ct_study"], data["j2k"].StudyInstanceUID):
            _run("movescu", "-S", *addr, "-aem", DEST, "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={study}")
        assert _sop_uids(moved) == set(data["ct_sops"]) | {data["j2k"].SOPInstanceUID}
        [j2k] = [p for p in moved.iterdir() if p.name.startswith("SC")] or [
            p for p in moved.iterdir()
            if dcmread(p, stop_before_pixels=True).SOPInstanceUID == data["j2k"].SOPInstanceUID]
        assert dcmread(j2k).file_meta.TransferSyntaxUID == data["j2k"].file_meta.TransferSyntaxUID

        # unknown destination: refused with 0xA801
        proc = _run("movescu", "-v", "-S", *addr, "-aem", "NOWHERE", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={data['ct_study']}", ok=False)
        out = proc.stdout + proc.stderr
        assert "0xa801" in out.lower() or "destination unknown" in out.lower(), out
