"""synthport client add|list|remove and synthport token."""
from __future__ import annotations

import json

from click.testing import CliRunner
from joserfc.jwk import KeySet

from server.auth.tokens import TokenService
from server.cli import main
from server.config import load_config


def test_client_commands_and_token(db_url, tmp_path, client_keys, monkeypatch):
    monkeypatch.setenv("SYNTHPORT_DATABASE_URL", db_url)
    data = str(tmp_path / "data")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(KeySet(list(client_keys)).as_dict(private=False)))
    run = CliRunner().invoke

    r = run(main, ["client", "add", "backend-1", "--data-dir", data, "--jwks", str(jwks),
                   "--scope", "system/*.read", "--ae-title", "MOD1", "--ae-title", "MOD2",
                   "--purpose", "research", "--deidentified", "--name", "Lab"])
    assert r.exit_code == 0, r.output
    assert "system/*.read" in r.output
    r = run(main, ["client", "add", "backend-2", "--data-dir", data,
                   "--jwks-url", "https://keys.example.org/jwks.json", "--scope", "system/Patient.rs"])
    assert r.exit_code == 0, r.output
    r = run(main, ["client", "add", "backend-3", "--data-dir", data, "--scope", "system/*.rs"])
    assert r.exit_code != 0 and "--jwks" in r.output
    r = run(main, ["client", "add", "backend-3", "--data-dir", data, "--jwks", str(jwks),
                   "--scope", "system/*.dus"])
    assert r.exit_code != 0 and "order" in r.output

    r = run(main, ["client", "list", "--data-dir", data])
    lines = r.output.splitlines()
    assert r.exit_code == 0 and [l.split("\t")[0] for l in lines] == ["backend-1", "backend-2"]
    assert "MOD1,MOD2" in lines[0] and "research,deidentified" in lines[0]
    assert "https://keys.example.org/jwks.json" in lines[1]

    r = run(main, ["client", "remove", "backend-2", "--data-dir", data])
    assert r.exit_code == 0
    r = run(main, ["client", "remove", "backend-2", "--data-dir", data])
    assert r.exit_code != 0 and "No client" in r.output
    r = run(main, ["client", "list", "--data-dir", data])
    assert [l.split("\t")[0] for l in r.output.splitlines()] == ["backend-1"]

    r = run(main, ["token", "--data-dir", data, "--scope", "patient/*.read", "--patient", "p1",
                   "--lifetime", "120", "--deidentified"])
    assert r.exit_code == 0, r.output
    tok = r.output.strip()
    assert "\n" not in tok and tok.count(".") == 2
    cfg = load_config({"data_dir": data}, environ={})
    c = TokenService(None, cfg).verify(tok)
    assert (c.client_id, c.scope, c.patient, c.deidentified, c.exp - c.iat) == \
        ("synthport-cli", "patient/*.rs", "p1", True, 120)
    r = run(main, ["token", "--data-dir", data, "--scope", "patient/*.dus"])
    assert r.exit_code != 0
