"""``synthport terminology import`` / ``supplement`` on the release fixtures (exact formats)."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from server.cli import main
from server.store import SqlStore
from terminologies.importers import loinc_csv, snomed_rf2

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "terminologies"
SCT = "http://snomed.info/sct"


@pytest.fixture
def run(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHPORT_DATABASE_URL", db_url)

    def invoke(*args):
        result = CliRunner().invoke(main, ["terminology", *args, "--data-dir", str(tmp_path), "--quiet"])
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output
    return invoke


def test_import_rf2_and_loinc_then_supplement(run, db_url):
    n_sct = sum(1 for _ in snomed_rf2.read(FIXTURES / "snomed_rf2")[1])
    n_loinc = sum(1 for _ in loinc_csv.read(FIXTURES / "loinc")[1])
    out = run("import", "--format", "rf2", str(FIXTURES / "snomed_rf2"))
    assert f"imported {n_sct} concepts" in out and SCT in out
    assert f"imported {n_sct} concepts" in run("import", "--format", "rf2", str(FIXTURES / "snomed_rf2"))
    assert f"imported {n_loinc} concepts" in run("import", "--format", "loinc", str(FIXTURES / "loinc"))
    store = SqlStore.from_url(db_url)
    try:
        prov = store.terminology.refresh()
        sct = prov.code_system(SCT)
        assert len(sct) == n_sct and sct.get("44054006").display == "Diabetes mellitus type 2"
        assert {"8801005", "44054006", "46635009"} <= sct.descendants("73211009")
        assert prov.code_system("http://loinc.org").get("2345-7").display.startswith("Glucose")
        with store.engine.connect() as conn:
            n = conn.exec_driver_sql("SELECT count(*) FROM resource WHERE res_type = 'CodeSystem'").scalar()
        assert n == 2                               # one resource per imported system, no duplicates
    finally:
        store.engine.dispose()
    assert "0 supplements" in run("supplement")     # nothing stored that uses codes yet


def test_import_needs_a_path(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHPORT_DATABASE_URL", db_url)
    result = CliRunner().invoke(main, ["terminology", "import", "--format", "rf2", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0 and "needs a PATH" in result.output
