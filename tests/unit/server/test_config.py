"""Settings: one declared table, env vars and TOML, docs kept in step."""
from pathlib import Path

from server.config import SETTINGS, load_config, settings_markdown

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_env_toml_and_overrides(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[synthport]\nhttp_port = 9000\nworkers = 3\n')
    cfg = load_config(environ={})
    assert cfg.http_port == 8080 and cfg.data_dir == "./synthport-data"
    cfg = load_config(toml_path=str(toml), environ={"SYNTHPORT_WORKERS": "5"})
    assert cfg.http_port == 9000 and cfg.workers == 5
    cfg = load_config({"workers": 7}, toml_path=str(toml), environ={"SYNTHPORT_WORKERS": "5"})
    assert cfg.workers == 7


def test_database_url_default_is_sqlite_in_data_dir(tmp_path):
    cfg = load_config({"data_dir": str(tmp_path)}, environ={})
    assert cfg.resolved_database_url == f"sqlite:///{tmp_path.resolve()}/synthport.db"
    cfg = load_config(environ={"SYNTHPORT_DATABASE_URL": "postgresql+psycopg://u@h/db"})
    assert cfg.resolved_database_url == "postgresql+psycopg://u@h/db"


def test_every_setting_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert settings_markdown() in doc
    assert all(s.help for s in SETTINGS)


def test_workers_zero_means_twice_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert load_config(environ={}).resolved_workers == 6
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert load_config(environ={}).resolved_workers == 2      # never fewer than 2
    assert load_config({"workers": 5}, environ={}).resolved_workers == 5
