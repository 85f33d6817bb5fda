"""Orthanc from Debian on free ports, for the PACS interop test and the DICOM benchmark."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import requests

from tests.e2e.server import free_port

DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancMissing(RuntimeError):
    """Orthanc (or a plugin it needs) is not installed."""


def dicomweb_plugin() -> str:
    """Path of Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)."""
    for path in DICOMWEB_PLUGINS:
        if Path(path).exists():
            return path
    raise OrthancMissing("Orthanc's DICOMweb plugin is missing (apt-get install orthanc-dicomweb)")


@contextlib.contextmanager
def run_orthanc(folder: Path, env: dict[str, str] | None = None,
                **config: Any) -> Iterator[tuple[str, int]]:
    """Start Orthanc (AE title ORTHANC, no authentication, loopback only) with ``config``
    merged into its configuration; yield (HTTP base URL, DICOM port); stop it after.
    ``env``: more environment variables for its process.

    Raises:
        OrthancMissing: no ``Orthanc`` executable.
        RuntimeError: it did not answer within 60 s (its log is in the message).
    """
    exe = shutil.which("Orthanc")
    if not exe:
        raise OrthancMissing("Orthanc is not installed (apt-get install orthanc)")
    folder.mkdir(parents=True)
    http, dicom = free_port(), free_port()
    settings = {"Name": "synthport-test", "StorageDirectory": str(folder / "db"),
                "IndexDirectory": str(folder / "db"), "HttpPort": http, "DicomPort": dicom,
                "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False, "HttpServerEnabled": True,
                "DicomServerEnabled": True, "Plugins": [], **config}
    (folder / "orthanc.json").write_text(json.dumps(settings))
    log = open(folder / "orthanc.log", "wb")
    proc = subprocess.Popen([exe, str(folder / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT, cwd=folder, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/system", timeout=2).ok:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Orthanc did not start:\n"
                                   + (folder / "orthanc.log").read_text()[-4000:])
            time.sleep(0.2)
        yield base, dicom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
