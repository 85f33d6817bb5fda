"""End-to-end: mutated DICOM files (tests/unit/server/dicom/fuzz.py) sent to the real
``synthport serve`` by STOW-RS over HTTP and by C-STORE (pynetdicom) to its DIMSE
listener: every answer is a PS3.18 status or a named C-STORE status, what is stored is
served, the listener keeps answering, and the store stays whole.

A fixed seed and budget (about half a minute); ``benchmarks/fuzz_dicom.py`` runs more.
"""
from __future__ import annotations

import pytest

from tests.e2e.server import free_port, run_server
from tests.unit.server.dicom.fuzz import cases, check_store, http_pair, run_cstore, run_stow

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore::UserWarning")]

STOW_CASES = 60
CSTORE_CASES = 60


def test_fuzzed_files_by_stow_and_c_store(tmp_path, db_url):
    dport = free_port()
    env = {"SYNTHPORT_DIMSE_PORT": str(dport), "SYNTHPORT_DIMSE_HOST": "127.0.0.1"}
    with run_server(tmp_path, db_url, extra_env=env) as fhir_base:
        base = fhir_base.removesuffix("/fhir") + "/dicomweb"
        post, get = http_pair(base)
        stow = run_stow(cases(11, STOW_CASES, salt="stow"), post, get)
        assert not stow.findings, stow.summary()
        assert stow.stored and stow.refused, stow.summary()
        dimse = run_cstore(cases(12, CSTORE_CASES, salt="dimse"), "127.0.0.1", dport, "SYNTHPORT",
                           tmp_path / "cases", get)
        assert not dimse.findings, dimse.summary()
        assert dimse.stored and dimse.refused, dimse.summary()
    from server.db.engine import make_engine

    engine = make_engine(db_url)
    try:
        assert check_store(engine, tmp_path / "synthport-data" / "dicom") == []
    finally:
        engine.dispose()
