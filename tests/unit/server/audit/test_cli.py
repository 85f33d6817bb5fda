"""``synthport audit verify`` / ``synthport audit sth``: exit codes and what they print."""
from __future__ import annotations

import orjson
from click.testing import CliRunner
from sqlalchemy import text

from server.cli import main
from tests.unit.server.audit.conftest import fill


def run(monkeypatch, db_url, audit_cfg, *args):
    monkeypatch.setenv("SYNTHPORT_DATABASE_URL", db_url)
    monkeypatch.setenv("SYNTHPORT_DATA_DIR", audit_cfg["data_dir"])
    monkeypatch.delenv("SYNTHPORT_CONFIG", raising=False)
    return CliRunner().invoke(main, ["audit", *args])


def test_verify_ok_then_tampered(monkeypatch, db_url, audit_log, audit_cfg):
    fill(audit_log, 6)
    result = run(monkeypatch, db_url, audit_cfg, "sth")
    assert result.exit_code == 0, result.output
    sth = orjson.loads(result.stdout)
    assert sth["tree_size"] == 6 and audit_log.check_sth(sth)  # same key as the server's

    result = run(monkeypatch, db_url, audit_cfg, "verify")
    assert result.exit_code == 0, result.output
    assert "6 entries checked: OK" in result.output

    forged = audit_log.entry(2).replace(b'"action":"R"', b'"action":"D"')
    with audit_log.engine.begin() as conn:
        conn.execute(text("UPDATE audit_entry SET entry = :e WHERE seq = 2"), {"e": forged})
    result = run(monkeypatch, db_url, audit_cfg, "verify")
    assert result.exit_code == 1
    assert "FAILED at entry 2" in result.output and "OK" not in result.output
