"""End-to-end: mutated DICOM files (tests/unit/server/dicom/fuzz.py) sent to the real
``synthport serve`` by STOW-RS over HTTP and by C-STORE (pynetdicom) to its DIMSE
listener, generated DICOMweb requests (queries, Accept headers, frame lists, rendering
parameters, broken multipart envelopes) through gunicorn, and generated C-FIND
identifiers: every answer is a PS3.18 status with a message or a named DIMSE status, what is stored is served, the
listener keeps answering, and the store stays whole.

A fixed seed and budget (about half a minute); ``benchmarks/fuzz_dicom.py`` runs more.
"""
from __future__ import annotations

import pytest

from tests.e2e.server import free_port, run_server
from tests.unit.server.dicom.fuzz import (cases, check_store, http_client, request_cases,
                                          request_targets, run_cfind, run_cstore, run_requests,
                                          run_stow)

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::UserWarning")]

STOW_CASES = 60
CSTORE_CASES = 60
REQUESTS = 200
CFIND_CASES = 100


def test_fuzzed_files_by_stow_and_c_store(tmp_path):
    """On SQLite only: the in-process fuzz (tests/unit/server/http/test_dicomweb_fuzz.py)
    runs on both databases; this one adds gunicorn, the listener and real clients."""
    db_url = f"sqlite:///{tmp_path}/synthport.db"
    dport = free_port()
    env = {"SYNTHPORT_DIMSE_PORT": str(dport), "SYNTHPORT_DIMSE_HOST": "127.0.0.1"}
    with run_server(tmp_path, db_url, extra_env=env) as fhir_base:
        base = fhir_base.removesuffix("/fhir") + "/dicomweb"
        post, get, send = http_client(base)
        stow = run_stow(cases(11, STOW_CASES, salt="stow"), post, get)
        assert not stow.findings, stow.summary()
        assert stow.stored and stow.refused, stow.summary()
        requests_ = run_requests(request_cases(13, REQUESTS, *request_targets(post)), send)
        assert not requests_.findings, requests_.summary()
        dimse = run_cstore(cases(12, CSTORE_CASES, salt="dimse"), "127.0.0.1", dport, "SYNTHPORT",
                           tmp_path / "cases", get)
        assert not dimse.findings, dimse.summary()
        assert dimse.stored and dimse.refused, dimse.summary()
        finds = run_cfind(14, CFIND_CASES, "127.0.0.1", dport, "SYNTHPORT")
        assert not finds.findings, finds.summary()
        assert finds.statuses.get("C-FIND 0") and finds.statuses.get("C-FIND 43264"), finds.summary()
    from server.db.engine import make_engine

    engine = make_engine(db_url)
    try:
        assert check_store(engine, tmp_path / "synthport-data" / "dicom") == []
    finally:
        engine.dispose()
