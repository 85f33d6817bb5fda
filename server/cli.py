"""The ``synthport`` command line."""
from __future__ import annotations

import logging
import os
import sys

import click

from server.config import load_config


def _common(f):
    f = click.option("--data-dir", default=None, help="Data folder (SQLite database, blobs).")(f)
    f = click.option("--config", "config_file", default=None, type=click.Path(exists=True),
                     help="TOML settings file.")(f)
    return f


def _cfg(data_dir=None, config_file=None, **extra):
    if config_file:
        os.environ["SYNTHPORT_CONFIG"] = os.path.abspath(config_file)
    if data_dir:
        # Workers re-read settings from the environment; pass the data dir down.
        os.environ["SYNTHPORT_DATA_DIR"] = os.path.abspath(data_dir)
    return load_config({"data_dir": data_dir, **extra})


@click.group()
def main():
    """synthport: FHIR R4 / DICOMweb / DIMSE over real and synthetic health data."""
    logging.basicConfig(level=os.environ.get("SYNTHPORT_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@_common
@click.option("--http-port", type=int, default=None, help="HTTP port (default 8080).")
@click.option("--http-host", default=None, help="Bind address (default 0.0.0.0).")
@click.option("--dimse-port", type=int, default=None,
              help="DIMSE port (default 11112; 0 switches the DIMSE listener off).")
@click.option("--workers", type=int, default=None, help="gunicorn worker processes.")
@click.option("--threads", type=int, default=None, help="Threads per worker.")
def serve(data_dir, config_file, http_port, http_host, dimse_port, workers, threads):
    """Run the HTTP server under gunicorn (never Flask's development server) and the
    DIMSE listener (a child process of its own, stopped with the server)."""
    from gunicorn.app.base import BaseApplication

    from server.db.engine import make_engine, migrate

    cfg = _cfg(data_dir, config_file, http_port=http_port, http_host=http_host,
               dimse_port=dimse_port, workers=workers, threads=threads)
    engine = make_engine(cfg.resolved_database_url)
    migrate(engine)          # once, in the master, before workers start
    engine.dispose()
    os.environ["SYNTHPORT_AUTO_MIGRATE"] = "false"
    for key in ("http_port", "workers", "threads"):
        os.environ[f"SYNTHPORT_{key.upper()}"] = str(cfg[key])

    class _App(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{cfg.http_host}:{cfg.http_port}")
            self.cfg.set("workers", cfg.workers)
            self.cfg.set("threads", cfg.threads)
            self.cfg.set("worker_class", "gthread" if cfg.threads > 1 else "sync")
            self.cfg.set("timeout", 300)
            self.cfg.set("keepalive", 30)
            self.cfg.set("accesslog", os.environ.get("SYNTHPORT_ACCESS_LOG") or None)
            self.cfg.set("limit_request_line", 16384)

        def load(self):
            from server.app import create_app
            return create_app()

    click.echo(f"synthport: FHIR at http://{cfg.http_host}:{cfg.http_port}/fhir "
               f"({cfg.workers} workers, database {_redact(cfg.resolved_database_url)})", err=True)
    dimse = None
    if cfg.dimse_port:
        from server.dimse.server import spawn_dimse, stop_dimse

        try:
            dimse = spawn_dimse(cfg)
        except (RuntimeError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"synthport: DIMSE AE {cfg.ae_title} on "
                   f"{cfg.dimse_host or cfg.http_host}:{cfg.dimse_port}", err=True)
    try:
        _App().run()
    finally:
        if dimse is not None:
            stop_dimse(dimse)


@main.command()
@_common
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--jobs", "-j", type=int, default=None, help="Parallel loader processes (default: cores).")
def load(data_dir, config_file, paths, jobs):
    """Load FHIR JSON files, folders, .json.bz2, .tar.xz archives and NDJSON."""
    from server.loader import load_paths

    cfg = _cfg(data_dir, config_file)
    report = load_paths(cfg, list(paths), jobs=jobs)
    sys.exit(0 if not report.failed else 1)


@main.group()
def terminology():
    """Code systems for $lookup, $expand, :below/:in (see docs/terminology.md)."""


@terminology.command("import")
@_common
@click.option("--format", "fmt", required=True,
              type=click.Choice(["rf2", "loinc", "claml", "dcm", "ucum"]),
              help="rf2: SNOMED CT RF2 snapshot (folder or zip); loinc: Loinc.csv (file, folder "
                   "or zip); claml: WHO ICD-10 ClaML XML; dcm: DICOM DCM (bundled, PATH "
                   "optional); ucum: UCUM units (ucum-essence.xml, PATH optional).")
@click.argument("path", required=False, type=click.Path(exists=True))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def terminology_import(data_dir, config_file, fmt, path, quiet):
    """Import a code system release into the store; re-running replaces it."""
    import importlib

    from server.store import SqlStore
    from server.terminology.importer import import_codesystem

    module = {"rf2": "snomed_rf2", "loinc": "loinc_csv", "claml": "icd10_claml",
              "dcm": "dicom_dcm", "ucum": "ucum"}[fmt]
    if path is None and fmt not in ("dcm", "ucum"):
        raise click.UsageError(f"--format {fmt} needs a PATH")
    cfg = _cfg(data_dir, config_file)
    store = SqlStore.from_url(cfg.resolved_database_url, cfg, auto_migrate=bool(cfg["auto_migrate"]))
    reader = importlib.import_module(f"terminologies.importers.{module}")
    meta, concepts = reader.read(path)
    result = import_codesystem(store, meta, concepts, progress=not quiet)
    click.echo(f"imported {result.concepts:,} concepts and {result.edges:,} is-a edges of "
               f"{result.url}" + (f" version {result.version}" if result.version else "")
               + f" as CodeSystem/{result.res_id} in {result.seconds:.1f} s")


@terminology.command("supplement")
@_common
@click.option("--quiet", is_flag=True, help="No progress bar.")
def terminology_supplement(data_dir, config_file, quiet):
    """Write a CodeSystem supplement per code system used in the store (codes + displays)."""
    from server.store import SqlStore
    from server.terminology.importer import build_supplement

    cfg = _cfg(data_dir, config_file)
    store = SqlStore.from_url(cfg.resolved_database_url, cfg, auto_migrate=bool(cfg["auto_migrate"]))
    report = build_supplement(store, progress=not quiet)
    for system, n, how in report:
        click.echo(f"{system}: {n:,} codes ({how})")
    click.echo(f"{len(report)} supplements, {sum(n for _, n, _ in report):,} codes")


@main.command("map")
@_common
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for patients/events .parquet and their .meta.json.")
@click.option("--source", "source_name", default="real", type=click.Choice(["real"]),
              help="Where the patients are read from (the real store).")
@click.option("--limit", type=int, default=None, help="Map at most N patients.")
@click.option("--spec", default=None, help="Mapping spec file or name (default: mappings/specs/default.toml).")
@click.option("--top-k", type=int, default=None, help="Codes per domain with their own column.")
@click.option("--min-count", type=int, default=None, help="Fewer patients than this: 'other'.")
def map_command(data_dir, config_file, out_dir, source_name, limit, spec, top_k, min_count):
    """Map patients (through the source protocol) to analysis tables in Parquet."""
    from mappings.errors import MappingError
    from server.mapping_export import export_tables
    from server.store import SqlStore

    cfg = _cfg(data_dir, config_file)
    store = SqlStore.from_url(cfg.resolved_database_url, cfg, auto_migrate=bool(cfg["auto_migrate"]))
    voc = {k: v for k, v in (("top_k", top_k), ("min_count", min_count)) if v is not None}
    try:
        report = export_tables(store, out_dir, limit=limit, spec=spec, **voc)
    except MappingError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"mapped {report.patients} patients ({report.resources:,} resources, "
               f"{report.events:,} events, {report.columns} patient columns) in "
               f"{report.read_seconds + report.map_seconds:.1f} s "
               f"(read {report.read_seconds:.1f} s, map {report.map_seconds:.1f} s) -> {out_dir}")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


if __name__ == "__main__":  # pragma: no cover
    main()
