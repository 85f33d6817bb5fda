"""Stored and served instances pass dciodvfy (dicom3tools) wherever the input did.

Each sample file of the pydicom wheel is stored through STOW-RS, then fetched back as
stored (WADO-RS, ``transfer-syntax=*``) and transcoded to Explicit VR Little Endian
where the source is uncompressed; dciodvfy must report no error the input did not have.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from server.app import create_app
from server.dicom.multipart import parse_media_type, split_multipart
from tests.unit.server.dicom.factory import multipart, sample_path

pytestmark = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                reason="dciodvfy (Debian package dicom3tools) is not installed")

# rtplan.dcm is left out: its Media Storage SOP Instance UID differs from its SOP Instance
# UID, which the store refuses (PS3.10 §7.1; tested in test_store.py).
SAMPLES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm"]
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def dciodvfy_errors(path: Path) -> set[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return {re.sub(r"\s+", " ", line.strip()) for line in lines if line.startswith("Error")}


@pytest.fixture
def client(db_url, tmp_path):
    app = create_app({"database_url": db_url, "data_dir": str(tmp_path / "data")})
    yield app.test_client()
    app.extensions["synthport"]["store"].engine.dispose()


@pytest.mark.parametrize("name", SAMPLES)
def test_served_instances_are_as_valid_as_the_input(client, tmp_path, name):
    src = sample_path(name)
    ds = pydicom.dcmread(src)
    before = dciodvfy_errors(src)
    ctype, body = multipart([src.read_bytes()])
    r = client.post("/dicomweb/studies", data=body, content_type=ctype,
                    headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200, r.data
    url = (f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")
    accepts = ['multipart/related; type="application/dicom"; transfer-syntax=*']
    if ds.file_meta.TransferSyntaxUID in UNCOMPRESSED:
        accepts.append('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1')
    for i, accept in enumerate(accepts):
        r = client.get(url, headers={"Accept": accept})
        assert r.status_code == 200, r.data
        ctype = parse_media_type(r.headers["Content-Type"])
        [part] = split_multipart(r.get_data(), ctype.params["boundary"])
        served = tmp_path / f"served-{i}.dcm"
        served.write_bytes(part.content)
        assert pydicom.dcmread(served).SOPInstanceUID == ds.SOPInstanceUID
        new_errors = dciodvfy_errors(served) - before
        assert not new_errors, (accept, new_errors)
