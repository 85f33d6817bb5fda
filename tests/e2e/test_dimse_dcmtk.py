"""End-to-end: the DIMSE listener of the real `synthport serve`, driven by dcmtk's
echoscu, storescu, findscu, getscu and movescu (with a dcmtk storescp as the C-MOVE
destination, configured through SYNTHPORT_DIMSE_PEERS)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.e2e.dimse_tools import dcmtk, samples
from tests.e2e.server import free_port, run_server

pytestmark = pytest.mark.e2e

AE = "SYNTHPORT"
DEST = "STORESCP"
TOOLS = ("echoscu", "storescu", "findscu", "getscu", "movescu", "storescp")


def _run(*args: str, ok: bool = True, **kw) -> subprocess.CompletedProcess:
    tool = dcmtk(args[0])
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.run([tool, *args[1:]], capture_output=True, text=True, timeout=120,
                          env=env, **kw)
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


@contextlib.contextmanager
def storescp(folder: Path, port: int):
    folder.mkdir()
    log = open(folder.parent / "storescp.log", "wb")
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", DEST, "+xa", "-od", str(folder), str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.1)
        yield folder
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _sop_uids(folder: Path) -> set[str]:
    from pydicom import dcmread

    return {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in folder.iterdir()}


def test_dcmtk_echo_store_find_get_move(tmp_path, db_url):
    missing = [t for t in TOOLS if not dcmtk(t)]
    if missing:
        pytest.skip(f"dcmtk tools not installed: {', '.join(missing)} (apt-get install dcmtk)")
    data = samples(tmp_path / "in")
    dport, sport = free_port(), free_port()
    env = {"SYNTHPORT_DIMSE_PORT": str(dport), "SYNTHPORT_DIMSE_HOST": "127.0.0.1",
           "SYNTHPORT_DIMSE_PEERS": f"{DEST}=127.0.0.1:{sport}"}
    with run_server(tmp_path, db_url, extra_env=env) as fhir_base, \
            storescp(tmp_path / "moved", sport) as moved:
        addr = ["-aet", "DCMTK", "-aec", AE, "127.0.0.1", str(dport)]
        _run("echoscu", *addr)
        # storescu proposes uncompressed syntaxes unless told: -xr (RLE) and -xw (JPEG 2000)
        # make it send those two as they are, so that they are stored compressed
        _run("storescu", *addr, *map(str, data["files"][:3]))
        _run("storescu", "-xr", *addr, str(data["files"][3]))
        _run("storescu", "-xw", *addr, str(data["files"][4]))

        # what came in by C-STORE is served by DICOMweb too (same store)
        r = requests.get(fhir_base.removesuffix("/fhir") + "/dicomweb/studies",
                         params={"StudyInstanceUID": data["ct_study"]},
                         headers={"Accept": "application/dicom+json"}, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 1
        assert r.json()[0]["00201208"]["Value"] == [3]

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

        # C-GET of the study; of the JPEG 2000 one too, which getscu (proposing only
        # uncompressed syntaxes) receives decompressed
        got = tmp_path / "got"
        got.mkdir()
        _run("getscu", "-S", *addr, "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={data['ct_study']}", "-od", str(got))
        assert _sop_uids(got) == set(data["ct_sops"])
        _run("getscu", "-S", *addr, "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={data['j2k'].StudyInstanceUID}", "-od", str(got))
        assert _sop_uids(got) == set(data["ct_sops"]) | {data["j2k"].SOPInstanceUID}

        # C-MOVE of the study and of the JPEG 2000 instance to storescp
        for study in (data["ct_study"], data["j2k"].StudyInstanceUID):
            _run("movescu", "-S", *addr, "-aem", DEST, "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={study}")
        assert _sop_uids(moved) == set(data["ct_sops"]) | {data["j2k"].SOPInstanceUID}
        [j2k] = [dcmread(p) for p in moved.iterdir()
                 if dcmread(p, stop_before_pixels=True).SOPInstanceUID == data["j2k"].SOPInstanceUID]
        assert j2k.file_meta.TransferSyntaxUID == data["j2k"].file_meta.TransferSyntaxUID
        assert j2k.PixelData == data["j2k"].PixelData          # moved as stored

        # unknown destination: refused with 0xA801
        proc = _run("movescu", "-v", "-S", *addr, "-aem", "NOWHERE", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={data['ct_study']}", ok=False)
        out = proc.stdout + proc.stderr
        assert "MoveDestinationUnknown" in out, out           # dcmtk's name for 0xA801
