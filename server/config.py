"""One declared table of settings, read from defaults, a TOML file and ``SYNTHPORT_*`` env vars.

Precedence (lowest to highest): the defaults below, the TOML file named by
``SYNTHPORT_CONFIG`` (or ``--config``), environment variables ``SYNTHPORT_<NAME>``
(upper-cased), then explicit overrides (command-line flags, ``create_app(config)``).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str


def _bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() in {"1", "true", "yes", "on"}


SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", "./synthport-data", "Folder for the SQLite database and blob files."),
    Setting("database_url", "", "SQLAlchemy URL; empty means SQLite at <data_dir>/synthport.db. "
            "Example: postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    Setting("http_host", "0.0.0.0", "Address the HTTP server binds to."),
    Setting("http_port", 8080, "HTTP port.", int),
    Setting("workers", 0, "gunicorn worker processes; 0 means twice the CPU cores (at least 2). "
            "More processes than cores keep both the write lock and the cores busy while "
            "transaction Bundles are posted (docs/architecture.md).", int),
    Setting("threads", 4, "Threads per gunicorn worker (gthread).", int),
    Setting("switch_interval_ms", 1.0, "Python's thread switch interval in each worker "
            "(sys.setswitchinterval; Python's default is 5 ms). A request thread returning "
            "from a socket or SQLite call waits up to this long for the GIL while another "
            "thread of its worker computes; 1 ms gave reads by id 2,620 against 2,330 "
            "requests/s (benchmarks/README.md).", float),
    Setting("http_close_after_bytes", 256 * 1024, "After a request whose body is at least this "
            "large (a transaction Bundle, a STOW-RS upload), close the client's connection, so "
            "that its next request goes to a worker not already running such an upload instead "
            "of the one its keep-alive connection is pinned to; 0 keeps every connection open.", int),
    Setting("public_base_url", "", "Base URL put in links (e.g. https://fhir.example.org); "
            "empty means taken from the request's Host header."),
    Setting("default_count", 50, "Default _count of a search page.", int),
    Setting("max_count", 1000, "Largest _count accepted (larger values are capped, with a warning).", int),
    Setting("max_body_bytes", 256 * 1024 * 1024, "Largest request body accepted (413 above).", int),
    Setting("max_bundle_entries", 100_000, "Largest transaction/batch Bundle accepted (413 above).", int),
    Setting("search_handling", "lenient", "Default for unknown search parameters: lenient or strict."),
    Setting("auto_migrate", True, "Apply alembic migrations when the server or a command starts.", _bool),
    Setting("dimse_port", 11112, "DIMSE listener port.", int),
    Setting("ae_title", "SYNTHPORT", "DIMSE AE title of the real source."),
    Setting("dimse_host", "", "Address the DIMSE listener binds to; empty means the same as http_host."),
    Setting("dimse_peers", "", "C-MOVE destinations, AE title to host:port: "
            "`ORTHANC=127.0.0.1:4242,PACS2=10.1.2.3:104`, or a TOML table "
            "`[synthport.dimse_peers]` (`ORTHANC = \"127.0.0.1:4242\"`). A C-MOVE to an AE title "
            "not listed answers 0xA801 (move destination unknown)."),
    Setting("dimse_allowed_aets", "", "Calling AE titles allowed to associate (comma list, or a "
            "TOML list). Empty (the default) accepts any calling AE title: fine on loopback or a "
            "trusted network, set it when the DIMSE port is reachable by others."),
    Setting("dimse_require_called_aet", True, "Reject associations whose called AE title is not "
            "one this server answers to (ae_title, later cohort AE titles); false serves such "
            "associations from the real source.", _bool),
    Setting("dimse_max_associations", 10, "Concurrent DIMSE associations; more are rejected "
            "(transient, local limit exceeded).", int),
    Setting("dimse_max_pdu", 65536, "Largest P-DATA PDU (bytes) the DIMSE listener accepts; "
            "larger PDUs cost fewer round trips per instance (pynetdicom's default is 16382, "
            "dcmtk's 16384); 0 means unlimited.", int),
    Setting("dimse_timeout", 60, "Seconds the DIMSE listener waits on a silent peer (network "
            "and DIMSE timeouts; at most 30 s for the association request) before aborting "
            "the association.", float),
    Setting("dimse_link_interval", 10.0, "C-STORE writes a study's FHIR ImagingStudy once per "
            "association (when the peer releases or drops it), and at most this many seconds "
            "after the first instance of a long association (docs/adr/0006).", float),
    Setting("synthetic_cache_patients", 1000, "Virtual patients whose generated records each "
            "worker keeps (LRU) per synthetic cohort.", int),
    Setting("synthetic_scan_budget", 200, "Most virtual patients one search page over a "
            "synthetic cohort generates (clinical types without a patient); the page may then "
            "hold fewer than _count entries, with a next link.", int),
    Setting("log_level", "info", "Logging level."),
    Setting("dicom_patient_id_system", "urn:synthport:dicom:patient-id",
            "Identifier system of the FHIR Patient linked to a DICOM PatientID."),
    Setting("dicom_timezone", "Z", "UTC offset assumed for DICOM dates/times without "
            "TimezoneOffsetFromUTC when writing FHIR dateTimes (e.g. +01:00)."),
    Setting("dicomweb_cors_origins", "*", "Origins allowed to call DICOMweb from a browser "
            "(comma-separated, * = any, empty = no CORS headers)."),
    # --- access control, audit, consent, de-identification (docs/security.md) -----------
    Setting("auth", "required", "Access to the real source: required (SMART on FHIR v2 bearer "
            "tokens) or off (development mode: everyone may do everything; loud warning)."),
    Setting("synthetic_auth", "off", "Access to synthetic cohorts: off (open) or required."),
    Setting("auth_key_file", "", "The server's signing key (JWK, private) for access tokens and "
            "signed audit tree heads; empty means <data_dir>/keys/server-es384.jwk, created on "
            "first use. Every worker and host must share it."),
    Setting("auth_token_lifetime", 300, "Seconds an access token stays valid.", int),
    Setting("auth_assertion_max_lifetime", 300, "Longest client assertion accepted "
            "(exp - now, seconds; SMART Backend Services says at most 5 minutes).", int),
    Setting("auth_jwks_cache_seconds", 300, "Seconds a client's JWKS URL response is cached.", int),
    Setting("audit", True, "Record every interaction with the real source in the audit log "
            "(IHE BALP AuditEvents in an RFC 9162 Merkle tree).", _bool),
    Setting("audit_synthetic", True, "Also audit interactions with synthetic cohorts.", _bool),
    Setting("audit_spool", True, "SQLite: entries of reads and searches are spooled to "
            "<database file>-audit-spool/ and merged into the log in batches, rather than one write "
            "transaction each (docs/audit.md). Off: every entry is written before the answer. "
            "PostgreSQL always writes them at once.", _bool),
    Setting("audit_spool_interval", 0.2, "Seconds between background merges of the audit "
            "spool (readers of the log always merge first).", float),
    Setting("consent_default", "opt-out", "Research use without a Consent: opt-out (patients "
            "take part unless an active research Consent denies) or opt-in (only patients "
            "with an active research Consent that permits)."),
    Setting("pseudonym_key_file", "", "Key for reversible pseudonyms (AES-SIV, 64 bytes, "
            "base64). Keep it outside the database and the data directory; only the data "
            "controller needs it to re-identify."),
    Setting("deid_config", "", "FHIR de-identification configuration (JSON, Microsoft FHIR "
            "Anonymizer format); empty means the shipped Safe Harbor + EHDS default."),
    Setting("dicom_deid_key_file", "", "Key for DICOM de-identification (HMAC-SHA256 of UIDs, "
            "pseudonyms and per-patient date offsets; base64 or 32+ raw bytes). Keep it outside "
            "the database; the same key gives the same de-identified UIDs (docs/deidentification.md)."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class Config(dict):
    """Resolved settings; attribute access for convenience (``cfg.data_dir``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    @property
    def resolved_workers(self) -> int:
        """``workers``, with 0 (the default) resolved to twice the CPU cores, at least 2."""
        n = int(self["workers"])
        return n if n > 0 else max(2, 2 * (os.cpu_count() or 1))

    @property
    def resolved_database_url(self) -> str:
        if self["database_url"]:
            return self["database_url"]
        path = Path(self["data_dir"]).resolve() / "synthport.db"
        return f"sqlite:///{path}"


def load_config(overrides: dict[str, Any] | None = None, toml_path: str | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Resolve every setting.

    Args:
        overrides: explicit values (highest precedence); ``None`` values are ignored.
        toml_path: a TOML file with a ``[synthport]`` table or top-level keys.
        environ: environment mapping (defaults to ``os.environ``).
    """
    env = os.environ if environ is None else environ
    cfg = Config({s.name: s.default for s in SETTINGS})
    toml_path = toml_path or env.get("SYNTHPORT_CONFIG")
    if toml_path:
        with open(toml_path, "rb") as fh:
            data = tomllib.load(fh)
        data = data.get("synthport", data)
        for key, value in data.items():
            if key in _BY_NAME:
                cfg[key] = value
            else:
                cfg.setdefault("extra", {})[key] = value
    for s in SETTINGS:
        raw = env.get("SYNTHPORT_" + s.name.upper())
        if raw is not None:
            cfg[s.name] = s.parse(raw)
    for key, value in (overrides or {}).items():
        if value is not None:
            s = _BY_NAME.get(key)
            cfg[key] = s.parse(value) if (s and isinstance(value, str) and s.parse is not str) else value
    return cfg


def settings_markdown() -> str:
    """The settings table as Markdown (used to keep docs/configuration.md true)."""
    rows = ["| setting | env var | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.name}` | `SYNTHPORT_{s.name.upper()}` | `{s.default}` | {s.help} |")
    return "\n".join(rows)
