"""Helpers of the DIMSE end-to-end tests: find dcmtk's tools, write sample instances."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path


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


def samples(folder: Path) -> dict:
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
