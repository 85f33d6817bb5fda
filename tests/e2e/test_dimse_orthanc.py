"""End-to-end: Orthanc as a real PACS against the DIMSE listener of `synthport serve`.

Orthanc (Debian package ``orthanc``) knows synthport as a DICOM modality and
synthport knows Orthanc as a C-MOVE destination (SYNTHPORT_DIMSE_PEERS). Orthanc
C-ECHOes, C-FINDs (one answer per study), retrieves with C-MOVE (synthport pushes the
instances to Orthanc) and C-STOREs an instance to synthport. Skips without Orthanc.
"""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import requests

from tests.e2e.server import free_port, run_server
from tests.e2e.dimse_tools import dcmtk, samples
from tests.e2e.orthanc import OrthancMissing, run_orthanc

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def orthanc(folder: Path, synthport_port: int):
    """Orthanc on free ports (HTTP, DICOM), AE title ORTHANC, synthport as a modality."""
    try:
        # TCP_NODELAY: Orthanc's dcmtk sockets keep Nagle on otherwise (docs/dimse.md)
        with run_orthanc(folder, env={"TCP_NODELAY": "1"},
                         DicomModalities={"synthport": ["SYNTHPORT", "127.0.0.1", synthport_port]},
                         DicomScuTimeout=30, ConcurrentJobs=1) as running:
            yield running
    except OrthancMissing as exc:
        pytest.skip(str(exc))


def test_orthanc_echo_find_move_and_store(tmp_path, db_url):
    if not dcmtk("storescu"):
        pytest.skip("dcmtk storescu not installed")
    data = samples(tmp_path / "in")
    dport = free_port()
    with orthanc(tmp_path / "orthanc", dport) as (obase, odicom):
        env = {"SYNTHPORT_DIMSE_PORT": str(dport), "SYNTHPORT_DIMSE_HOST": "127.0.0.1",
               "SYNTHPORT_DIMSE_PEERS": f"ORTHANC=127.0.0.1:{odicom}"}
        with run_server(tmp_path, db_url, extra_env=env):
            subprocess.run([dcmtk("storescu"), "-aec", "SYNTHPORT", "127.0.0.1", str(dport),
                            *map(str, data["files"][:3])], check=True, capture_output=True,
                           timeout=60)

            r = requests.post(f"{obase}/modalities/synthport/echo", data="{}", timeout=30)
            assert r.ok, r.text

            # C-FIND from Orthanc: one answer for the study of 3 instances
            r = requests.post(f"{obase}/modalities/synthport/query", timeout=30, json={
                "Level": "Study",
                "Query": {"StudyInstanceUID": data["ct_study"], "PatientName": "",
                          "StudyDate": ""}})
            assert r.ok, r.text
            query = r.json()["ID"]
            answers = requests.get(f"{obase}/queries/{query}/answers?expand", timeout=30).json()
            assert len(answers) == 1
            assert answers[0]["0020,000d"]["Value"] == data["ct_study"]

            # C-MOVE from Orthanc: synthport pushes the 3 instances to Orthanc
            r = requests.post(f"{obase}/queries/{query}/retrieve", timeout=120,
                              json={"TargetAet": "ORTHANC", "Synchronous": True})
            assert r.ok, r.text
            stored = requests.get(f"{obase}/instances?expand", timeout=30).json()
            assert {i["MainDicomTags"]["SOPInstanceUID"] for i in stored} == set(data["ct_sops"])

            # C-STORE from Orthanc to synthport (the JPEG 2000 instance, kept compressed)
            j2k = data["files"][4].read_bytes()
            r = requests.post(f"{obase}/instances", data=j2k, timeout=30)
            assert r.ok, r.text
            r = requests.post(f"{obase}/modalities/synthport/store", timeout=60,
                              json={"Resources": [r.json()["ID"]], "Synchronous": True})
            assert r.ok, r.text
            r = requests.post(f"{obase}/modalities/synthport/query", timeout=30, json={
                "Level": "Instance",
                "Query": {"SOPInstanceUID": data["j2k"].SOPInstanceUID, "StudyInstanceUID": "",
                          "SeriesInstanceUID": ""}})
            answers = requests.get(f"{obase}/queries/{r.json()['ID']}/answers?expand",
                                   timeout=30).json()
            assert len(answers) == 1
