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

    from server.http.balance import close_after_large_body, spreading_worker

    class _App(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{cfg.http_host}:{cfg.http_port}")
            self.cfg.set("workers", cfg.resolved_workers)
            self.cfg.set("threads", cfg.threads)
            self.cfg.set("worker_class", spreading_worker(cfg.http_close_after_bytes)
                         if cfg.threads > 1 else "sync")
            self.cfg.set("timeout", 300)
            self.cfg.set("keepalive", 30)
            self.cfg.set("accesslog", os.environ.get("SYNTHPORT_ACCESS_LOG") or None)
            self.cfg.set("limit_request_line", 16384)
            self.cfg.set("pre_request", close_after_large_body(cfg.http_close_after_bytes))

        def load(self):
            from server.app import create_app
            from server.fhir.validation import tune_gc

            app = create_app()
            tune_gc()   # in each worker: FHIR writes validate many short-lived models
            if cfg.switch_interval_ms > 0:
                sys.setswitchinterval(cfg.switch_interval_ms / 1000.0)
            return app

    click.echo(f"synthport: FHIR at http://{cfg.http_host}:{cfg.http_port}/fhir "
               f"({cfg.resolved_workers} workers, database {_redact(cfg.resolved_database_url)})", err=True)
    merger = _spawn_audit_merger(cfg)
    from server.dimse.server import stop_dimse

    dimse = None
    if cfg.dimse_port:
        from server.dimse.server import spawn_dimse

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
        if merger is not None:
            stop_dimse(merger)


def _spawn_audit_merger(cfg):
    """Start ``synthport audit merge --every`` beside the workers when the audit spool is
    used (SQLite): merging off the workers' threads keeps it from holding up requests."""
    import subprocess

    from sqlalchemy.engine import make_url

    from server.access import MERGER_ENV, spools_audit

    if not spools_audit(cfg, make_url(cfg.resolved_database_url)):
        return None
    proc = subprocess.Popen([sys.executable, "-c", "from server.cli import main; main()", "audit",
                             "merge", "--every", str(cfg["audit_spool_interval"])],
                            stdin=subprocess.DEVNULL)
    os.environ[MERGER_ENV] = str(proc.pid)   # the workers' own merge thread is a fallback
    return proc


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
@click.option("--jobs", "-j", type=int, default=1, show_default=True,
              help="Processes reading and extracting records (more help on idle cores; "
                   "the tables are the same for any number).")
def map_command(data_dir, config_file, out_dir, source_name, limit, spec, top_k, min_count, jobs):
    """Map patients (through the source protocol) to analysis tables in Parquet."""
    from mappings.errors import MappingError
    from server.mapping_export import export_tables
    from server.store import SqlStore

    cfg = _cfg(data_dir, config_file)
    store = SqlStore.from_url(cfg.resolved_database_url, cfg, auto_migrate=bool(cfg["auto_migrate"]))
    voc = {k: v for k, v in (("top_k", top_k), ("min_count", min_count)) if v is not None}
    try:
        report = export_tables(store, out_dir, limit=limit, spec=spec, jobs=jobs, **voc)
    except MappingError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"mapped {report.patients} patients ({report.resources:,} resources, "
               f"{report.events:,} events, {report.columns} patient columns) in "
               f"{report.read_seconds + report.map_seconds:.1f} s "
               f"(read {report.read_seconds:.1f} s, map {report.map_seconds:.1f} s) -> {out_dir}")


def _synthetic_env(data_dir, config_file):
    from server.dicom.store import DicomStore
    from server.store import SqlStore
    from server.synthetic.registry import Registry

    cfg = _cfg(data_dir, config_file)
    store = SqlStore.from_url(cfg.resolved_database_url, cfg, auto_migrate=bool(cfg["auto_migrate"]))
    return cfg, store, DicomStore(store, cfg), Registry(store.engine, cfg.data_dir)


@main.command()
@_common
@click.option("--name", required=True, help="Model name (a new version is added each run).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--epochs", type=int, default=200, show_default=True, help="Patient model epochs.")
@click.option("--event-epochs", type=int, default=20, show_default=True)
@click.option("--image-epochs", type=int, default=60, show_default=True)
@click.option("--limit", type=int, default=None, help="Train on at most N patients.")
@click.option("--backend", type=click.Choice(["argn", "ctgan"]), default="argn", show_default=True,
              help="Patient-level model; ctgan is an optional extra under BUSL-1.1.")
@click.option("--holdout", type=float, default=0.2, show_default=True,
              help="Fraction of patients held out from training (for synthport evaluate).")
@click.option("--holdout-seed", type=int, default=0, show_default=True)
@click.option("--dp-epsilon", type=float, default=None,
              help="Train the patient model with differential privacy to this epsilon "
                   "(docs/synthetic.md, 'Differential privacy').")
@click.option("--dp-delta", type=float, default=None,
              help="DP delta (default min(1e-5, 1/(10 n))).")
@click.option("--dp-clip", type=float, default=1.0, show_default=True,
              help="DP-SGD per-patient gradient clipping norm.")
@click.option("--allow-non-dp-events", is_flag=True,
              help="With --dp-epsilon: also train the event and image models, which are NOT "
                   "differentially private (served resources say so).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(data_dir, config_file, name, device, epochs, event_epochs, image_epochs, limit,
          backend, holdout, holdout_seed, dp_epsilon, dp_delta, dp_clip, allow_non_dp_events,
          quiet):
    """Fit the patient, event and image models on the real store and register them."""
    from server.errors import SynthportError
    from server.synthetic.training import TrainSettings, train as run_train

    cfg, store, dicom, reg = _synthetic_env(data_dir, config_file)
    settings = TrainSettings(device=device, epochs=epochs, event_epochs=event_epochs,
                             image_epochs=image_epochs, limit=limit, backend=backend,
                             holdout=holdout, holdout_seed=holdout_seed, progress=not quiet,
                             dp_epsilon=dp_epsilon, dp_delta=dp_delta, dp_clip=dp_clip,
                             allow_non_dp=allow_non_dp_events)
    try:
        run_train(reg, store, dicom, name, settings, echo=click.echo)
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc


@main.command()
@_common
@click.argument("name")
@click.option("--version", "model_version", type=int, default=None, help="Default: the newest.")
@click.option("--n", "n", type=int, default=None,
              help="Synthetic patients to sample (default: as many as were trained on).")
@click.option("--baselines", default=",".join(("gaussian_copula", "sdv_gaussian_copula", "ctgan",
                                               "tabularargn")), show_default=True,
              help="Comma-separated baselines fitted on the same rows ('none': no baseline).")
@click.option("--baseline-epochs", type=int, default=None, help="Epochs of CTGAN/TabularARGN.")
@click.option("--event-patients", type=int, default=200, show_default=True,
              help="Synthetic patients whose events are generated and compared.")
@click.option("--target", default=None, help="Binary column for TSTR (default: a condition flag).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-images", is_flag=True, help="Skip the image model's metric.")
@click.option("--privacy-folds", type=int, default=0, show_default=True,
              help="Also cross-fitted privacy risks: refit the patient model on K-1 of K parts of "
                   "the real patients, K times, each part the control set once (0: off).")
@click.option("--privacy-repeats", type=int, default=1, show_default=True,
              help="Passes of the cross-fit, each with its own random split (R x K refits): "
                   "averages the refitted generators' randomness out of the risks.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Also write report.json and report.html here.")
def evaluate(data_dir, config_file, name, model_version, n, baselines, baseline_epochs,
             event_patients, target, seed, no_images, privacy_folds, privacy_repeats, out_dir):
    """Evaluate model NAME against the real store (fidelity, privacy, utility, baselines);
    the report is stored with the model and written as report.json + report.html."""
    from server.errors import SynthportError
    from server.synthetic.evaluation import EvaluateSettings, evaluate_model

    cfg, store, dicom, reg = _synthetic_env(data_dir, config_file)
    names = [b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none"]
    settings = EvaluateSettings(n=n, seed=seed, baselines=names, baseline_epochs=baseline_epochs,
                                event_patients=event_patients, target=target, images=not no_images,
                                privacy_folds=privacy_folds, privacy_repeats=privacy_repeats)
    try:
        report = evaluate_model(reg, store, dicom, name, model_version, settings, out_dir,
                                echo=click.echo)
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc
    s = report["summary"]
    for label, row in [("synthport", s["model"])] + list(s["baselines"].items()):
        if row.get("status") != "ok":
            click.echo(f"  {label:20s} {row.get('status')}")
            continue
        click.echo(f"  {label:20s} quality {_fmt(row['quality'])}  exact copies {row['exact_copies']}  "
                   f"DCR<p5 {_fmt(row['dcr_share_closer_than_holdout_p5'])}  singling-out "
                   f"{_fmt(row['singling_out_risk'])}  linkability {_fmt(row['linkability_risk'])}  "
                   f"inference {_fmt(row['inference_risk_max'])}  TSTR/TRTR {_fmt(row['tstr_trtr_ratio'])}")
    m = s["model"]
    if m.get("crossfit_inference_risk_max") is not None:
        rep = f" x {privacy_repeats}" if privacy_repeats > 1 else ""
        click.echo(f"  cross-fitted ({privacy_folds} folds{rep}): singling-out "
                   f"{_fmt(m['crossfit_singling_out_risk'])}  linkability "
                   f"{_fmt(m['crossfit_linkability_risk'])}  inference "
                   f"{_fmt(m['crossfit_inference_risk_max'])}")
    click.echo(f"  event order violations {s['order_violations']}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


@main.group()
def cohort():
    """Synthetic cohorts: (model, seed, size) served at /synthetic/NAME/..."""


@cohort.command("create")
@_common
@click.argument("name")
@click.option("--model", required=True, help="Registered model name.")
@click.option("--model-version", type=int, default=None, help="Default: the newest.")
@click.option("--size", type=int, required=True, help="Number of virtual patients.")
@click.option("--seed", type=int, default=0, show_default=True)
def cohort_create(data_dir, config_file, name, model, model_version, size, seed):
    """Register cohort NAME and build its patient-level index."""
    from server.errors import SynthportError
    from server.synthetic.cohort import create_cohort

    cfg, store, _, reg = _synthetic_env(data_dir, config_file)
    try:
        info = create_cohort(reg, name, model, size, seed, model_version)
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"cohort {name}: {size:,} virtual patients of {info.model_name} "
               f"v{info.model_version}, seed {seed}, index built in "
               f"{info.settings['build_seconds']:.1f} s")
    click.echo(f"  FHIR     /synthetic/{name}/fhir\n  DICOMweb /synthetic/{name}/dicomweb\n"
               f"  DIMSE    AE title {info.ae_title}")


@cohort.command("list")
@_common
def cohort_list(data_dir, config_file):
    """The registered cohorts."""
    _, _, _, reg = _synthetic_env(data_dir, config_file)
    for c in reg.cohorts():
        click.echo(f"{c.name}\t{c.model_name} v{c.model_version}\tseed {c.seed}\t"
                   f"size {c.size}\t{c.status}\tAE {c.ae_title}")


@main.command()
@_common
@click.option("--patients", type=int, default=60, show_default=True,
              help="Size of the made-up 'real' population (when the store is empty).")
@click.option("--size", type=int, default=1000, show_default=True, help="Cohort size.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--cohort", "cohort_name", default="demo", show_default=True)
@click.option("--load", "load_path", default=None, type=click.Path(exists=True),
              help="Load these FHIR files as the real population instead (e.g. ../shared/data).")
@click.option("--serve", "then_serve", is_flag=True, help="Start the server afterwards.")
@click.option("--http-port", type=int, default=None)
@click.option("--dimse-port", type=int, default=None)
@click.pass_context
def demo(ctx, data_dir, config_file, patients, size, seed, cohort_name, load_path, then_serve,
         http_port, dimse_port):
    """From an empty data dir to a served synthetic cohort in one command."""
    from server.errors import SynthportError
    from server.synthetic.demo import run_demo

    cfg, store, dicom, reg = _synthetic_env(data_dir, config_file)
    if load_path:
        from server.loader import load_paths

        load_paths(cfg, [load_path])
    try:
        info = run_demo(store, dicom, reg, patients=patients, cohort=cohort_name, size=size,
                        seed=seed, echo=click.echo)
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc
    port = http_port or cfg.http_port
    base = f"http://127.0.0.1:{port}"
    click.echo(f"\nsynthetic cohort '{info.name}' is ready:\n"
               f"  FHIR     {base}/synthetic/{info.name}/fhir/Patient/{info.name}-0\n"
               f"  DICOMweb {base}/synthetic/{info.name}/dicomweb/studies\n"
               f"  DIMSE    AE title {info.ae_title} on port {dimse_port or cfg.dimse_port}\n"
               f"  admin    {base}/admin/cohorts")
    store.engine.dispose()
    if then_serve:
        ctx.invoke(serve, data_dir=data_dir, config_file=config_file, http_port=http_port,
                   http_host=None, dimse_port=dimse_port, workers=None, threads=None)
    else:
        click.echo("start it with: synthport serve" + (f" --data-dir {data_dir}" if data_dir else ""))


# --- SMART Backend Services clients and tokens (docs/security.md) ----------------------
def _auth_env(data_dir, config_file):
    from server.auth.tokens import TokenService
    from server.db.engine import make_engine, migrate

    cfg = _cfg(data_dir, config_file)
    engine = make_engine(cfg.resolved_database_url)
    if cfg["auto_migrate"]:
        migrate(engine)
    return TokenService(engine, cfg)


@main.group()
def client():
    """Clients that may ask for access tokens (SMART Backend Services)."""


@client.command("add")
@_common
@click.argument("client_id")
@click.option("--jwks", "jwks_file", type=click.Path(exists=True, dir_okay=False),
              help="The client's public keys (JWKS JSON file).")
@click.option("--jwks-url", default=None, help="Where the client publishes its JWKS (https).")
@click.option("--scope", "scopes", required=True,
              help='The most it may be granted, e.g. "system/*.rs".')
@click.option("--ae-title", "ae_titles", multiple=True,
              help="DIMSE calling AE title that acts as this client (repeatable).")
@click.option("--purpose", type=click.Choice(["research"]), default=None,
              help="Purpose of use carried into its tokens.")
@click.option("--deidentified", is_flag=True, help="Its tokens see de-identified data only.")
@click.option("--name", default="", help="A label.")
def client_add(data_dir, config_file, client_id, jwks_file, jwks_url, scopes, ae_titles, purpose,
               deidentified, name):
    """Register CLIENT_ID with its public keys (--jwks FILE or --jwks-url URL), or as a
    DIMSE-only client known by its calling AE title(s)."""
    import orjson

    from server.auth.clients import Client
    from server.errors import SynthportError

    if jwks_file and jwks_url:
        raise click.UsageError("give one of --jwks FILE and --jwks-url URL, not both")
    if not (jwks_file or jwks_url or ae_titles):
        raise click.UsageError("give --jwks FILE or --jwks-url URL (or --ae-title for a "
                               "DIMSE-only client)")
    jwks = None
    if jwks_file:
        try:
            with open(jwks_file, "rb") as fh:
                jwks = orjson.loads(fh.read())
        except orjson.JSONDecodeError as exc:
            raise click.ClickException(f"{jwks_file} is not JSON: {exc}") from exc
    service = _auth_env(data_dir, config_file)
    try:
        c = service.clients.add(Client(client_id, name, jwks, jwks_url, scopes, list(ae_titles),
                                       purpose or "", deidentified))
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        service.engine.dispose()
    click.echo(f"client {c.client_id} registered: scopes {c.scopes}")


@client.command("list")
@_common
def client_list(data_dir, config_file):
    """The registered clients (id, scopes, keys, AE titles, flags)."""
    service = _auth_env(data_dir, config_file)
    try:
        for c in service.clients.list():
            keys = c.jwks_url or (f"jwks ({len(c.jwks['keys'])} keys)" if c.jwks else "DIMSE only")
            flags = ",".join(f for f, on in (("research", c.purpose == "research"),
                                             ("deidentified", c.deidentified),
                                             ("inactive", not c.active)) if on) or "-"
            click.echo(f"{c.client_id}\t{c.scopes}\t{keys}\t"
                       f"AE {','.join(c.ae_titles) or '-'}\t{flags}")
    finally:
        service.engine.dispose()


@client.command("remove")
@_common
@click.argument("client_id")
def client_remove(data_dir, config_file, client_id):
    """Remove CLIENT_ID (tokens it holds expire on their own, within auth_token_lifetime)."""
    from server.errors import SynthportError

    service = _auth_env(data_dir, config_file)
    try:
        service.clients.remove(client_id)
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc
    finally:
        service.engine.dispose()
    click.echo(f"client {client_id} removed")


@main.command()
@_common
@click.option("--scope", required=True, help='e.g. "system/*.rs" (space-separated).')
@click.option("--patient", default=None, help="Patient context (a Patient id).")
@click.option("--purpose", type=click.Choice(["research"]), default=None)
@click.option("--deidentified", is_flag=True)
@click.option("--lifetime", type=int, default=None, help="Seconds (default auth_token_lifetime).")
@click.option("--client-id", default="synthport-cli", show_default=True)
def token(data_dir, config_file, scope, patient, purpose, deidentified, lifetime, client_id):
    """Print an access token signed with the server's own key (local use and tests)."""
    from server.auth.tokens import TokenService
    from server.errors import SynthportError

    cfg = _cfg(data_dir, config_file)
    try:
        click.echo(TokenService(None, cfg).mint(scope, patient, client_id, purpose or "",
                                                deidentified, lifetime))
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc


@main.group()
def audit():
    """The tamper-evident audit log (docs/audit.md)."""


def _audit_log(data_dir, config_file):
    from server.audit.log import AuditLog
    from server.db.engine import make_engine, migrate

    cfg = _cfg(data_dir, config_file)
    engine = make_engine(cfg.resolved_database_url)
    if cfg["auto_migrate"]:
        migrate(engine)
    from server.access import audit_writer

    # A running server may still hold spooled entries: readers here merge them first.
    return audit_writer(AuditLog(engine, cfg), cfg, interval=0)


@audit.command("verify")
@_common
def audit_verify(data_dir, config_file):
    """Check every entry, the tree and every signed tree head; exit 1 at the first problem."""
    log = _audit_log(data_dir, config_file)
    report = log.verify()
    log.engine.dispose()
    if report.ok:
        click.echo(f"{report.checked} entries checked: OK")
        return
    click.echo(f"FAILED at {report.first_bad}: {report.reason} "
               f"({report.checked} entries checked before it)", err=True)
    sys.exit(1)


@audit.command("merge")
@_common
@click.option("--every", type=float, default=None,
              help="Keep merging every this many seconds until stopped (SIGTERM) or the "
                   "parent process is gone; default: merge once and exit.")
def audit_merge(data_dir, config_file, every):
    """Merge the audit spool (SQLite, docs/audit.md) into the log; ``synthport serve``
    runs this with --every beside its workers."""
    import signal
    import threading

    log = _audit_log(data_dir, config_file)
    if not hasattr(log, "follow"):
        click.echo("this store writes audit entries directly (no spool): nothing to merge")
        return
    if every is None:
        click.echo(f"{log.flush()} entries merged")
    else:
        # Background work: under a burst the workers get the CPU and the spool absorbs the
        # entries; the merge catches up when the burst is over (docs/audit.md).
        os.nice(10)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        log.follow(every, stop, parent=os.getppid())
    log.engine.dispose()


@audit.command("sth")
@_common
def audit_sth(data_dir, config_file):
    """Sign (if the log grew) and print the current signed tree head as JSON."""
    import orjson

    log = _audit_log(data_dir, config_file)
    click.echo(orjson.dumps(log.sign_tree_head(), option=orjson.OPT_INDENT_2).decode())
    log.engine.dispose()


@main.command("deidentify-dicom")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the de-identified files (<new SOP Instance UID>.dcm).")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Secret key (base64 or 32+ raw bytes); default: setting dicom_deid_key_file.")
@click.option("--no-retain-dates", is_flag=True, help="Remove dates instead of shifting them.")
@click.option("--no-retain-patient-chars", is_flag=True,
              help="Remove sex, age, size, weight and other patient characteristics.")
@click.option("--no-clean-descriptors", is_flag=True,
              help="Remove descriptions instead of cleaning them.")
@click.option("--retain-uids", is_flag=True, help="Keep the original UIDs.")
@click.option("--pixel-rules", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON regions to blank in images with burned-in annotation.")
def deidentify_dicom(inputs, out_dir, key_file, no_retain_dates, no_retain_patient_chars,
                     no_clean_descriptors, retain_uids, pixel_rules):
    """De-identify DICOM files and folders (PS3.15 Annex E, docs/deidentification.md)."""
    from server.deid.dicom import (DicomDeidOptions, deidentify_files, key_from_file,
                                   load_pixel_rules)
    from server.errors import SynthportError

    key_file = key_file or load_config().get("dicom_deid_key_file")
    if not key_file:
        raise click.UsageError("--key-file (or the setting dicom_deid_key_file) is required")
    try:
        options = DicomDeidOptions(
            retain_long_modified_dates=not no_retain_dates,
            retain_patient_chars=not no_retain_patient_chars,
            clean_descriptors=not no_clean_descriptors, retain_uids=retain_uids,
            pixel_rules=load_pixel_rules(pixel_rules) if pixel_rules else [])
        key = key_from_file(key_file)
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc
    done, failed = deidentify_files(inputs, out_dir, key, options,
                                    report=lambda line: click.echo(line, err=True))
    click.echo(f"{done} de-identified, {failed} refused or failed", err=True)
    sys.exit(1 if failed else 0)


@main.command("deidentify")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (same file names and layout as the input).")
@click.option("--config", "deid_config", default=None,
              help="De-identification config (Microsoft FHIR Anonymizer JSON format), or "
                   "'safe-harbor-strict' (dates kept as years only); default: the setting "
                   "deid_config, else the shipped Safe Harbor + EHDS one.")
@click.option("--pseudonym-key", "key_file", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="Pseudonym key file (default: the setting pseudonym_key_file).")
def deidentify(inputs, out_dir, deid_config, key_file):
    """De-identify FHIR JSON resources, Bundles and NDJSON files or folders
    (docs/deidentification.md)."""
    from server.deid.fhir import DeidConfig, DeidEngine
    from server.deid.files import deidentify_paths
    from server.deid.pseudonym import load_key
    from server.errors import SynthportError

    settings = load_config()
    key_file = key_file or settings.get("pseudonym_key_file")
    try:
        engine = DeidEngine(DeidConfig.load(deid_config or settings.get("deid_config") or None),
                            pseudonym_key=load_key(key_file) if key_file else None)
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc
    if engine.ephemeral_keys:
        click.echo("synthport: no pseudonym key: pseudonymize rules fall back, and "
                   f"{', '.join(engine.ephemeral_keys)} use a random key of this run only",
                   err=True)
    done, failed = deidentify_paths(inputs, out_dir, engine,
                                    report=lambda line: click.echo(line, err=True))
    click.echo(f"{done} file(s) de-identified, {failed} failed", err=True)
    sys.exit(1 if failed or not done else 0)


@main.command("reidentify")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--pseudonym-key", "key_file", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="The pseudonym key the files were de-identified with.")
@click.option("--context", "contexts", multiple=True,
              help="Context of pseudonymize rules that set one (default: value).")
def reidentify(inputs, out_dir, key_file, contexts):
    """Turn the pseudonyms of de-identified FHIR files back (for the key holder only)."""
    from server.deid.files import reidentify_paths
    from server.deid.pseudonym import load_key
    from server.errors import SynthportError

    try:
        key = load_key(key_file)
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc
    done, failed = reidentify_paths(inputs, out_dir, key,
                                    report=lambda line: click.echo(line, err=True),
                                    contexts=tuple(contexts) + ("value",))
    click.echo(f"{done} file(s) re-identified, {failed} failed", err=True)
    sys.exit(1 if failed or not done else 0)


@main.command("new-pseudonym-key")
@click.argument("path", type=click.Path(dir_okay=False))
def new_pseudonym_key(path):
    """Create a pseudonym key file (64 random bytes, mode 0600; never overwrites).
    Keep it outside the database and the data directory."""
    from server.deid.pseudonym import new_key_file
    from server.errors import SynthportError

    try:
        new_key_file(path)
    except SynthportError as exc:
        raise click.ClickException(exc.message) from exc
    click.echo(f"pseudonym key written to {path}", err=True)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


if __name__ == "__main__":  # pragma: no cover
    main()
