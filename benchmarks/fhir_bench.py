"""End-to-end FHIR benchmarks of a real ``synthport serve`` on Synthea data. Prints figures.

Usage (from the repository root, after ``pip install -e '.[test]'``)::

    python benchmarks/fhir_bench.py
    python benchmarks/fhir_bench.py \\
        --db-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Phases (``--phases``, default all, always in this order):

``load``        ingest A: ``synthport load`` of the data folder into a fresh store
                (no server running); wall time, resources/s, first/last 10 %.
``post``        ingest B: a fresh store behind a fresh server; every bundle is POSTed as a
                transaction to ``/fhir`` (``0-*`` bundles first, one at a time, then the
                patients from ``--post-clients`` threads); resources/s, first/last 10 %.
``read``        GET ``/fhir/<Type>/<id>`` of random Patient/Observation ids from
                ``--read-clients`` keep-alive connections for ``--duration`` s
                (``wrk`` if installed, else a multi-process Python client).
``search``      a few searches, each ``--search-n`` times in sequence on one connection.
``everything``  ``Patient/<id>/$everything`` of the patient with the most resources, whole
                and paged with ``_count=1000``; median of ``--everything-n`` runs.

``read``/``search``/``everything`` run on the store of ``load`` (or of ``post`` when
``load`` is not among the phases). On PostgreSQL each store is a fresh schema
``bench_<random>_<a|b>`` (via ``?options=-csearch_path=...``), dropped at the end.

Nothing here passes or fails: the figures are printed (and written with ``--json``), the
targets of the issue beside them for reading. The exit status is 0 unless the benchmark
itself could not run (server did not start, no data).
"""
from __future__ import annotations

import argparse
import array
import bz2
import contextlib
import http.client
import json
import math
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from server.loader import rate_windows  # noqa: E402
from tests.e2e.server import synthport_command  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "synthea-us-120"
PG_EXAMPLE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PHASES = ("load", "post", "read", "search", "everything")
FHIR_JSON = "application/fhir+json"

# The targets of the issue, printed beside the figures (for reading; nothing is checked).
TARGETS = {
    "ingest": ">= 3000/s",
    "read_rps": ">= 1500/s",
    "read_p50": "<= 3 ms",
    "read_p99": "<= 20 ms",
    "obs_code_p50": "p50 <= 20 ms",
    "everything": "<= 1 s",
}


# ------------------------------------------------------------------ small helpers
AUTH_MODE = "required"     # --auth
SERVER_ENV: dict[str, str] = {}   # --server-env


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(sorted_vals, q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def median(vals) -> float:
    s = sorted(vals)
    if not s:
        return float("nan")
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def loadavg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "?"


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            parts = [float(x) for x in fh.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    total = sum(parts[:8])
    return total - idle, total


def proc_cpu() -> dict[int, tuple[str, int, float]]:
    """pid -> (command name, process group, user+system CPU seconds) of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        comm = raw[raw.find("(") + 1:raw.rfind(")")]
        rest = raw.rsplit(")", 1)[-1].split()
        if len(rest) > 13:
            out[int(d)] = (comm, int(rest[2]), (int(rest[11]) + int(rest[12])) / tick)
    return out


class Meter:
    """Wall time, machine CPU busy share, the server's CPU and the top CPU users over a phase.

    The machine may be shared: ``top`` names the processes (by command name; the server's
    process group as ``server``, this script as ``bench``) that used the most CPU during
    the phase, in cores, so a figure taken while something else ran can be recognised.
    Processes that started and ended inside the phase are not seen.
    """

    def __init__(self, server_pgid: int | None = None):
        self.pgid = server_pgid

    def __enter__(self):
        self.load_start = loadavg()
        self.procs0 = proc_cpu()
        self.t0 = time.perf_counter()
        self.busy0, self.total0 = cpu_times()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy1, total1 = cpu_times()
        procs1 = proc_cpu()
        self.busy = (busy1 - self.busy0) / (total1 - self.total0) if total1 > self.total0 else float("nan")
        me = os.getpid()
        by_name: dict[str, float] = {}
        srv = 0.0
        for pid, (comm, pgrp, sec) in procs1.items():
            before = self.procs0.get(pid)
            used = sec - (before[2] if before and before[0] == comm else 0.0)
            if used <= 0:
                continue
            if self.pgid and pgrp == self.pgid:
                srv += used
                name = "server"
            elif pid == me:
                name = "bench"
            else:
                name = comm
            by_name[name] = by_name.get(name, 0.0) + used
        self.srv_cores = srv / self.wall if self.pgid and self.wall > 0 else None
        self.top = sorted(((v / self.wall, k) for k, v in by_name.items() if self.wall > 0), reverse=True)[:4]
        self.load_end = loadavg()
        return False

    def note(self) -> str:
        s = f"load {self.load_start.split()[0]}->{self.load_end.split()[0]}, machine CPU {self.busy:.0%}"
        top = [f"{k} {v:.2f}" for v, k in self.top if v >= 0.02]
        if top:
            s += "; cores: " + ", ".join(top)
        return s


def windows(marks: list[tuple[float, int]], t0: float) -> tuple[float | None, float | None]:
    """Rate over the first and the last tenth of the resources (the loader's definition)."""
    return rate_windows(marks, t0)


# ------------------------------------------------------------------ stores (SQLite / PostgreSQL)
class Store:
    """One fresh store: a data dir and, on PostgreSQL, a fresh schema."""

    def __init__(self, root: Path, label: str, base_url: str | None):
        self.label = label
        self.data_dir = root / f"store-{label}" / "synthport-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.base_url = base_url
        self.schema = None
        if base_url:
            self.schema = f"bench_{secrets.token_hex(4)}_{label}"
            with pg_connect(base_url) as conn:
                conn.execute(f'CREATE SCHEMA "{self.schema}"')
            self.url = with_schema(base_url, self.schema)
        else:
            self.url = f"sqlite:///{self.data_dir / 'synthport.db'}"
        self._engine = None

    @property
    def kind(self) -> str:
        return "PostgreSQL" if self.schema else "SQLite"

    def engine(self):
        if self._engine is None:
            from server.db.engine import make_engine
            self._engine = make_engine(self.url)
        return self._engine

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHPORT_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["SYNTHPORT_DATA_DIR"] = str(self.data_dir)
        if self.schema:
            env["SYNTHPORT_DATABASE_URL"] = self.url
        return env

    def close(self, keep: bool = False) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self.schema and keep:
            print(f"PostgreSQL schema kept: {self.schema} (URL {self.url}); "
                  f'drop it with: DROP SCHEMA "{self.schema}" CASCADE')
        elif self.schema:
            drop_schema(self.base_url, self.schema)
            self.schema = None

    # ---- facts read straight from the store (not timed)
    def count_resources(self) -> int:
        from sqlalchemy import text
        with self.engine().connect() as c:
            return int(c.execute(text(
                "SELECT count(*) FROM resource WHERE superseded_by IS NULL AND NOT deleted")).scalar_one())

    def ids(self, types: tuple[str, ...]) -> list[tuple[str, str]]:
        from sqlalchemy import bindparam, text
        q = text("SELECT res_type, res_id FROM resource WHERE superseded_by IS NULL AND NOT deleted "
                 "AND res_type IN :types ORDER BY pk").bindparams(bindparam("types", expanding=True))
        with self.engine().connect() as c:
            return [(r[0], r[1]) for r in c.execute(q, {"types": list(types)})]

    def top_code(self, res_type: str) -> tuple[str, int] | None:
        from sqlalchemy import text
        q = text("SELECT t.system, t.code, count(*) AS n FROM idx_token t JOIN resource r ON r.pk = t.res_pk "
                 "WHERE t.res_type = :rt AND t.param = 'code' AND r.superseded_by IS NULL AND NOT r.deleted "
                 "AND t.code IS NOT NULL GROUP BY t.system, t.code ORDER BY n DESC, t.code LIMIT 1")
        with self.engine().connect() as c:
            row = c.execute(q, {"rt": res_type}).first()
        if row is None:
            return None
        return (f"{row[0]}|{row[1]}" if row[0] else row[1]), int(row[2])

    def family_names(self) -> list[str]:
        from sqlalchemy import text
        out = []
        with self.engine().connect() as c:
            for (body,) in c.execute(text("SELECT body FROM resource WHERE res_type = 'Patient' "
                                          "AND superseded_by IS NULL AND NOT deleted ORDER BY pk")):
                try:
                    doc = json.loads(bytes(body))
                    fam = (doc.get("name") or [{}])[0].get("family")
                except (ValueError, TypeError, AttributeError, IndexError):
                    fam = None
                if fam:
                    out.append(fam)
        return out

    def largest_patient(self) -> tuple[str, int] | None:
        """The Patient id referenced by the most current resources (its compartment size)."""
        from sqlalchemy import text
        q = text("SELECT x.target_id, count(DISTINCT x.res_pk) AS n FROM idx_reference x "
                 "JOIN resource r ON r.pk = x.res_pk WHERE x.target_type = 'Patient' "
                 "AND r.superseded_by IS NULL AND NOT r.deleted "
                 "GROUP BY x.target_id ORDER BY n DESC LIMIT 1")
        with self.engine().connect() as c:
            row = c.execute(q).first()
        return (row[0], int(row[1])) if row else None

    def read_plan(self, res_type: str, res_id: str) -> str:
        """The index the database picks for the read-by-id lookup (the server's own SQL shape).

        On SQLite without ``ANALYZE`` statistics the choice between equally ranked indexes
        follows their creation order, which is why this is printed beside the read figures.
        """
        from sqlalchemy import text
        # The shape of server.store.SqlStore._read_sql (its placeholders differ per driver).
        sql = ("SELECT res_type, res_id, version, last_updated, deleted, body, method FROM resource "
               "WHERE res_type = :t AND res_id = :i ORDER BY version DESC LIMIT 1")
        try:
            with self.engine().connect() as c:
                if self.schema:
                    lines = [r[0] for r in c.execute(text("EXPLAIN (COSTS OFF) " + sql), {"t": res_type, "i": res_id})]
                    plan = next((ln.strip() for ln in lines if "Scan" in ln), lines[0].strip() if lines else "?")
                else:
                    rows = c.execute(text("EXPLAIN QUERY PLAN " + sql), {"t": res_type, "i": res_id}).all()
                    plan = "; ".join(str(r[-1]) for r in rows)
                    has_stats = c.execute(text("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")
                                          ).scalar_one()
                    plan += "" if has_stats else " (no ANALYZE statistics)"
        except Exception as exc:  # noqa: BLE001 - a note only
            plan = f"? ({type(exc).__name__})"
        return plan

    def vacuum_analyze(self) -> float | None:
        """PostgreSQL: ``VACUUM (ANALYZE)`` every table of the schema; seconds taken."""
        if not self.schema:
            return None
        t = time.perf_counter()
        with pg_connect(self.base_url) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (self.schema,))]
            for tbl in tables:
                conn.execute(f'VACUUM (ANALYZE) "{self.schema}"."{tbl}"')
            # Flush the ingest's dirty pages now rather than in a WAL-triggered checkpoint
            # during the read phase (seen as a p99 of 300 ms). Needs superuser; else skipped.
            with contextlib.suppress(Exception):
                conn.execute("CHECKPOINT")
        return time.perf_counter() - t

    def db_version(self) -> str:
        if not self.schema:
            return f"SQLite {sqlite3.sqlite_version}"
        from sqlalchemy import text
        with self.engine().connect() as c:
            return "PostgreSQL " + str(c.execute(text("SHOW server_version")).scalar_one()).split()[0]


def pg_connect(url: str):
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username,
                           password=u.password, dbname=u.database, autocommit=True, connect_timeout=10)


def with_schema(url: str, schema: str) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    options = u.query.get("options", "")
    if isinstance(options, tuple):
        options = " ".join(options)
    options = (options + " " if options else "") + f"-csearch_path={schema}"
    return u.update_query_dict({"options": options, "application_name": f"synthport-bench-{schema}"}
                               ).render_as_string(hide_password=False)


def drop_schema(base: str, schema: str) -> None:
    import psycopg

    try:
        with pg_connect(base) as conn:
            conn.execute("SET lock_timeout = '5s'")
            try:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                return
            except psycopg.errors.LockNotAvailable:
                pass
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = %s AND pid <> pg_backend_pid()",
                         (f"synthport-bench-{schema}",))
            conn.execute("SET lock_timeout = '30s'")
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    except Exception as exc:  # noqa: BLE001 - report, do not hide the figures
        log(f"could not drop schema {schema}: {exc}")


# ------------------------------------------------------------------ the server
class Server:
    """``synthport serve`` in its own process group (same logic as tests/e2e/server.py)."""

    def __init__(self, store: Store, workers: int, threads: int | None, log_dir: Path):
        self.store = store
        self.port = free_port()
        self.cmd = synthport_command() + ["serve", "--data-dir", str(store.data_dir),
                                          "--http-port", str(self.port), "--http-host", "127.0.0.1"]
        if workers:
            self.cmd += ["--workers", str(workers)]
        if threads:
            self.cmd += ["--threads", str(threads)]
        self.log_path = log_dir / f"serve-{store.label}-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self):
        env = self.store.env()
        env["SYNTHPORT_DIMSE_PORT"] = str(free_port())
        env["SYNTHPORT_AUTH"] = AUTH_MODE
        env.update(SERVER_ENV)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"synthport serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/fhir/metadata", headers={"Accept": FHIR_JSON})
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    break
                last = f"HTTP {r.status}"
            except OSError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"synthport serve did not answer ({last}):\n{self.tail()}")
            time.sleep(0.2)
        self.pids = self.worker_pids()
        if AUTH_MODE == "required":
            # A token for the whole run (docs/security.md): every request carries it, as a
            # real client's would; the server verifies and audits each.
            out = subprocess.run(synthport_command() + [
                "token", "--data-dir", str(self.store.data_dir), "--scope", "system/*.cruds",
                "--lifetime", "86400"], env=env, capture_output=True, text=True, check=True)
            os.environ["BENCH_TOKEN"] = out.stdout.strip()
        return self

    def worker_pids(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != self.proc.pid:
                try:
                    with open(f"/proc/{d}/stat") as fh:
                        rest = fh.read().rsplit(")", 1)[-1].split()
                    if int(rest[2]) == self.proc.pid:
                        out.append(int(d))
                except (OSError, IndexError, ValueError):
                    pass
        return sorted(out)

    def tail(self, limit: int = 6000) -> str:
        try:
            t = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no output>"
        return t[-limit:]

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)

    def __exit__(self, *exc):
        self.stop()
        return False


class Client:
    """One keep-alive HTTP/1.1 connection; reconnects after a connection error."""

    def __init__(self, port: int, timeout: float = 600):
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes, float]:
        h = {"Accept": FHIR_JSON}
        if os.environ.get("BENCH_TOKEN"):
            h["Authorization"] = "Bearer " + os.environ["BENCH_TOKEN"]
        h.update(headers or {})
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            t = time.perf_counter()
            try:
                self.conn.request(method, path, body=body, headers=h)
                r = self.conn.getresponse()
                data = r.read()
                dt = time.perf_counter() - t
                if r.getheader("Connection", "").lower() == "close":
                    self.close()
                return r.status, data, dt
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ------------------------------------------------------------------ report
class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []   # (figure, value, target, notes)
        self.problems: list[str] = []
        self.data: dict = {}

    def section(self, title: str) -> None:
        self.rows.append((title, "", "", ""))

    def add(self, figure: str, value: str, target: str = "", notes: str = "") -> None:
        self.rows.append(("  " + figure, value, target, notes))

    def problem(self, text: str) -> None:
        self.problems.append(text)
        log("PROBLEM: " + text)

    def render(self, header: list[str]) -> str:
        body = [r for r in self.rows if r[1] or r[2] or r[3]]
        w0 = max([len(r[0]) for r in body] + [6])
        w1 = max([len(r[1]) for r in body] + [5])
        w2 = max([len(r[2]) for r in body] + [6])
        lines = list(header) + [""]
        lines.append(f"{'figure':<{w0}}  {'value':>{w1}}  {'target':<{w2}}  notes")
        lines.append("-" * (w0 + w1 + w2 + 40))
        for f, v, t, n in self.rows:
            if not v and not t and not n:
                lines.append(f)
            else:
                lines.append(f"{f:<{w0}}  {v:>{w1}}  {t:<{w2}}  {n}".rstrip())
        lines.append("")
        if self.problems:
            lines.append(f"problems ({len(self.problems)}):")
            shown = self.problems[:40]
            lines += [f"  - {p}" for p in shown]
            if len(self.problems) > len(shown):
                lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        else:
            lines.append("problems: none (every request answered 2xx, no loader failures)")
        return "\n".join(lines)


def fmt_ms(sec: float) -> str:
    return f"{sec * 1000:.1f} ms" if sec == sec else "n/a"


def fmt_rate(x: float | None) -> str:
    return f"{x:,.0f}/s" if x is not None else "n/a"


# ------------------------------------------------------------------ ingest A: synthport load
_SUMMARY_RE = re.compile(r"loaded (\d+) resources from (\d+) files in ([\d.]+) s \(([\d.]+) resources/s\); (\d+) failed")
_WINDOWS_RE = re.compile(r"first 10% of resources: ([\d.]+) resources/s; over the last 10%: ([\d.]+) resources/s")


def phase_load(args, store: Store, rep: Report, log_dir: Path) -> None:
    cmd = synthport_command() + ["load", "--data-dir", str(store.data_dir), str(args.data)]
    if args.load_jobs:
        cmd += ["--jobs", str(args.load_jobs)]
    log("ingest A: " + " ".join(cmd))
    out_path = log_dir / "load-a.log"
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Meter() as m, open(out_path, "wb") as out:
        proc = subprocess.run(cmd, env=store.env(), stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The loader and its worker processes (all reaped by now), in cores over the wall time.
    loader_cores = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / m.wall
    text = out_path.read_text(errors="replace")
    n_store = store.count_resources()
    rep.section(f"ingest A: synthport load ({args.load_jobs or os.cpu_count()} jobs), fresh {store.kind} store")
    ms = _SUMMARY_RE.search(text)
    mw = _WINDOWS_RE.search(text)
    if proc.returncode != 0:
        rep.problem(f"synthport load exited with {proc.returncode}")
    for line in text.splitlines():
        if line.startswith("FAILED "):
            rep.problem("load: " + line[:300])
    rep.add("wall time (process start to exit)", f"{m.wall:.1f} s", "",
            f"{m.note()}; synthport load and its workers {loader_cores:.2f} cores")
    rep.add("resources in store after load", f"{n_store:,}", "",
            f"loader counted {int(ms.group(1)):,} from {ms.group(2)} files" if ms else "no loader summary line")
    rep.add("resources/s, wall (store count / wall)", fmt_rate(n_store / m.wall), TARGETS["ingest"])
    if ms:
        rep.add("resources/s, loader's own figure", fmt_rate(float(ms.group(4))), TARGETS["ingest"],
                f"loader time {float(ms.group(3)):.1f} s (excl. interpreter start)")
    if mw:
        rep.add("first 10% / last 10% (loader)", f"{float(mw.group(1)):,.0f} / {float(mw.group(2)):,.0f}/s")
    rep.data["load"] = {"wall_s": m.wall, "store_resources": n_store,
                        "loader_rate": float(ms.group(4)) if ms else None,
                        "first_rate": float(mw.group(1)) if mw else None,
                        "last_rate": float(mw.group(2)) if mw else None,
                        "loader_cores": loader_cores, "machine_cpu": m.busy,
                        "load": [m.load_start, m.load_end]}


# ------------------------------------------------------------------ ingest B: POST transactions
def read_bundles(data: Path) -> tuple[list[tuple[str, bytes, int]], list[tuple[str, bytes, int]]]:
    """(first-phase bundles, patient bundles) as (name, JSON bytes, resources to write)."""
    files = sorted(p for p in data.rglob("*") if p.is_file() and p.name.lower().endswith((".json", ".json.bz2")))
    first, rest = [], []
    for p in files:
        raw = p.read_bytes()
        if p.name.lower().endswith(".bz2"):
            raw = bz2.decompress(raw)
        doc = json.loads(raw)
        n = sum(1 for e in doc.get("entry") or []
                if str((e.get("request") or {}).get("method", "")).upper() not in ("GET", "HEAD"))
        (first if p.name.startswith(("0-", "hospitalInformation", "practitionerInformation")) else rest
         ).append((p.name, raw, n))
    return first, rest


def phase_post(args, store: Store, rep: Report, log_dir: Path) -> None:
    log("ingest B: reading and decompressing bundles")
    first, rest = read_bundles(args.data)
    total_entries = sum(n for _, _, n in first + rest)
    mbytes = sum(len(b) for _, b, _ in first + rest) / 1e6
    headers = {"Content-Type": FHIR_JSON}
    if args.prefer:
        headers["Prefer"] = f"return={args.prefer}"
    marks: list[tuple[float, int]] = []
    times: list[float] = []
    lock = threading.Lock()
    local = threading.local()

    with Server(store, args.workers, args.threads, log_dir) as srv:
        log(f"ingest B: POST {len(first)} + {len(rest)} transaction bundles ({total_entries:,} entries, "
            f"{mbytes:.0f} MB) to {srv.base} from {args.post_clients} threads")

        def post(item):
            name, body, n = item
            cl = getattr(local, "client", None)
            if cl is None:
                cl = local.client = Client(srv.port)
            try:
                status, data, dt = cl.request("POST", "/fhir", body, headers)
            except (OSError, http.client.HTTPException) as exc:
                return name, n, 0, f"{type(exc).__name__}: {exc}", 0.0
            done = time.perf_counter()
            ok, why = 0, None
            if status != 200:
                why = f"HTTP {status}: {data[:300]!r}"
            else:
                try:
                    resp = json.loads(data)
                    bad = []
                    for i, e in enumerate(resp.get("entry") or []):
                        st = str((e.get("response") or {}).get("status", ""))
                        if st[:1] in ("2", "3"):
                            ok += 1
                        else:
                            bad.append(f"entry[{i}] {st}")
                    if bad:
                        why = f"{len(bad)} entries not 2xx: {', '.join(bad[:3])}"
                except ValueError as exc:
                    why = f"response is not JSON: {exc}"
            with lock:
                marks.append((done, ok))
                times.append(dt)
            return name, n, ok, why, dt

        with Meter(srv.proc.pid) as m:
            t0 = m.t0
            results = [post(item) for item in first]         # alone, in order
            with ThreadPoolExecutor(max_workers=args.post_clients) as pool:
                futs = [pool.submit(post, item) for item in rest]
                results += [f.result() for f in as_completed(futs)]
    loaded = sum(r[2] for r in results)
    for name, n, ok, why, _ in results:
        if why:
            rep.problem(f"POST {name}: {why}")
    n_store = store.count_resources()
    first_rate, last_rate = windows(marks, t0)
    times.sort()
    rep.section(f"ingest B: POST transaction bundles, {args.post_clients} client threads, fresh "
                f"{store.kind} store, Prefer: return={args.prefer or '(none)'}")
    rep.add("wall time (first POST to last answer)", f"{m.wall:.1f} s", "", m.note())
    rep.add("entries written (2xx) / sent", f"{loaded:,} / {total_entries:,}", "",
            f"{len(first) + len(rest)} bundles, {mbytes:.0f} MB JSON; store holds {n_store:,}")
    rep.add("resources/s", fmt_rate(loaded / m.wall), TARGETS["ingest"])
    rep.add("first 10% / last 10%", f"{first_rate or 0:,.0f} / {last_rate or 0:,.0f}/s")
    rep.add("time per bundle p50 / max", f"{pct(times, 50):.2f} s / {times[-1]:.2f} s" if times else "n/a")
    rep.data["post"] = {"wall_s": m.wall, "written": loaded, "sent": total_entries, "store_resources": n_store,
                        "rate": loaded / m.wall, "first_rate": first_rate, "last_rate": last_rate,
                        "server_cores": m.srv_cores, "machine_cpu": m.busy}


# ------------------------------------------------------------------ read by id
WRK_LUA = r"""
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS_FILE")) do ids[#ids + 1] = line end
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end
function init(args)
  math.randomseed((tonumber(os.getenv("BENCH_SEED")) or 1) * 1000 + (tid or 0))
end
request = function()
  local token = os.getenv("BENCH_TOKEN")
  local h = {["Accept"] = "application/fhir+json"}
  if token and token ~= "" then h["Authorization"] = "Bearer " .. token end
  return wrk.format("GET", ids[math.random(#ids)], h)
end
"""

_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _wrk_time(s: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s.strip())
    return float(m.group(1)) * _UNIT[m.group(2)] if m else float("nan")


def run_wrk(port: int, ids_file: Path, lua: Path, threads: int, conns: int, seconds: float,
            seed: int) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{int(round(seconds))}s", "--latency", "--timeout", "10s",
           "-s", str(lua), f"http://127.0.0.1:{port}"]
    env = dict(os.environ, BENCH_IDS_FILE=str(ids_file), BENCH_SEED=str(seed))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    out = p.stdout + p.stderr
    res = {"cmd": " ".join(cmd), "raw": out}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
    if m:
        res["requests"] = int(m.group(1))
        res["seconds"] = _wrk_time(m.group(2) + m.group(3))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else float("nan")
    dist = {}
    block = out.split("Latency Distribution", 1)[-1] if "Latency Distribution" in out else ""
    for q, v in re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)\s*$", block, re.M):
        dist[int(q)] = _wrk_time(v)
    res["dist"] = dist
    m = re.search(r"Latency\s+([\d.]+\w+)\s+([\d.]+\w+)\s+([\d.]+\w+)", out)
    res["avg"] = _wrk_time(m.group(1)) if m else float("nan")
    res["max"] = _wrk_time(m.group(3)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = m.group(1).strip() if m else ""
    res["rc"] = p.returncode
    return res


def _py_reader(port: int, paths: list[str], seconds: float, seed: int, q) -> None:
    rnd = random.Random(seed)
    lat = array.array("d")
    statuses: dict[int, int] = {}
    errors = 0
    cl = Client(port, timeout=30)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            st, _, dt = cl.request("GET", rnd.choice(paths))
        except (OSError, http.client.HTTPException):
            errors += 1
            continue
        lat.append(dt)
        statuses[st] = statuses.get(st, 0) + 1
    cl.close()
    q.put((lat.tobytes(), statuses, errors))


def run_python_readers(port: int, paths: list[str], clients: int, seconds: float, seed: int) -> dict:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_py_reader, args=(port, paths, seconds, seed * 1000 + i, q))
             for i in range(clients)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    parts = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    lat = array.array("d")
    statuses: dict[int, int] = {}
    errors = 0
    for raw, st, err in parts:
        a = array.array("d")
        a.frombytes(raw)
        lat.extend(a)
        for k, v in st.items():
            statuses[k] = statuses.get(k, 0) + v
        errors += err
    s = sorted(lat)
    return {"requests": len(s), "seconds": wall, "rps": len(s) / seconds,
            "dist": {50: pct(s, 50), 75: pct(s, 75), 90: pct(s, 90), 99: pct(s, 99)},
            "avg": sum(s) / len(s) if s else float("nan"), "max": s[-1] if s else float("nan"),
            "non2xx": sum(v for k, v in statuses.items() if not 200 <= k < 400),
            "socket_errors": f"{errors} connection errors" if errors else "", "statuses": statuses}


def phase_read(args, srv: Server, store: Store, rep: Report, work: Path) -> None:
    ids = store.ids(("Patient", "Observation"))
    n_pat = sum(1 for t, _ in ids if t == "Patient")
    paths = [f"/fhir/{t}/{urllib.parse.quote(i, safe='')}" for t, i in ids]
    if not paths:
        rep.problem("read: no Patient/Observation ids in the store")
        return
    ids_file = work / "read-ids.txt"
    ids_file.write_text("\n".join(paths) + "\n")
    # A sanity request: the first id must answer 200.
    st, _, _ = Client(srv.port).request("GET", paths[0])
    if st != 200:
        rep.problem(f"read: GET {paths[0]} answered {st}")
    use_wrk = args.read_client == "wrk" or (args.read_client == "auto" and shutil.which("wrk"))
    if args.read_client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--read-client wrk, but wrk is not installed (apt-get install -y wrk)")
    if use_wrk:
        lua = work / "read.lua"
        lua.write_text(WRK_LUA)
        client_desc = f"wrk -t{args.wrk_threads} -c{args.read_clients}"
        log(f"read: warm-up {args.warmup:.0f} s, then {args.duration:.0f} s with {client_desc}, "
            f"{len(paths):,} ids")
        if args.warmup > 0:
            run_wrk(srv.port, ids_file, lua, args.wrk_threads, args.read_clients, args.warmup, args.seed + 1)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        with Meter(srv.proc.pid) as m:
            res = run_wrk(srv.port, ids_file, lua, args.wrk_threads, args.read_clients, args.duration, args.seed)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res["client_cores"] = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / m.wall
        if res.get("rc") or "requests" not in res:
            rep.problem(f"read: wrk failed (rc {res.get('rc')}): {res['raw'][-500:]}")
    else:
        client_desc = f"Python, {args.read_clients} processes (http.client keep-alive)"
        log(f"read: warm-up {args.warmup:.0f} s, then {args.duration:.0f} s with {client_desc}")
        if args.warmup > 0:
            run_python_readers(srv.port, paths, args.read_clients, args.warmup, args.seed + 1)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        with Meter(srv.proc.pid) as m:
            res = run_python_readers(srv.port, paths, args.read_clients, args.duration, args.seed)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res["client_cores"] = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / m.wall
    if res.get("non2xx"):
        rep.problem(f"read: {res['non2xx']} responses not 2xx/3xx")
    if res.get("socket_errors"):
        rep.problem(f"read: socket errors: {res['socket_errors']}")
    d = res.get("dist", {})
    rep.section(f"read by id: GET /fhir/<Type>/<id>, random of {len(paths):,} ids ({n_pat} Patient, "
                f"rest Observation), {args.duration:.0f} s after {args.warmup:.0f} s warm-up")
    rep.add("client", client_desc, "", "keep-alive; client runs on the same machine")
    obs = next(((t, i) for t, i in ids if t == "Observation"), ids[0])
    rep.add("plan of the id lookup (Observation)", "", "", store.read_plan(*obs))
    rep.add("requests/s", f"{res.get('rps', float('nan')):,.0f}/s", TARGETS["read_rps"],
            f"{res.get('requests', 0):,} requests; {m.note()}; client {res.get('client_cores', 0):.2f} cores")
    rep.add("latency p50", fmt_ms(d.get(50, float("nan"))), TARGETS["read_p50"])
    rep.add("latency p75 / p90", f"{fmt_ms(d.get(75, float('nan')))} / {fmt_ms(d.get(90, float('nan')))}")
    rep.add("latency p99", fmt_ms(d.get(99, float("nan"))), TARGETS["read_p99"],
            f"max {fmt_ms(res.get('max', float('nan')))}")
    rep.data["read"] = {"client": client_desc, "rps": res.get("rps"), "requests": res.get("requests"),
                        "p50_ms": d.get(50, float("nan")) * 1000, "p99_ms": d.get(99, float("nan")) * 1000,
                        "non2xx": res.get("non2xx"), "server_cores": m.srv_cores, "machine_cpu": m.busy}


# ------------------------------------------------------------------ searches
def phase_search(args, srv: Server, store: Store, rep: Report) -> None:
    obs = store.top_code("Observation")
    cond = store.top_code("Condition")
    pat_ids = [i for _, i in store.ids(("Patient",))]
    families = sorted(set(store.family_names()))
    if not (obs and cond and pat_ids and families):
        rep.problem("search: store lacks Observation/Condition codes, patients or names")
        return
    q = urllib.parse.quote
    obs_code = q(obs[0], safe="")
    rnd = random.Random(args.seed)
    queries = [
        ("Observation?code=<top>&_count=50", f"most frequent Observation code {obs[0]} ({obs[1]:,} rows)",
         lambda i: f"/fhir/Observation?code={obs_code}&_count=50", TARGETS["obs_code_p50"]),
        ("Observation?code=<top>&_sort=-date&_count=50", "same code, newest first",
         lambda i: f"/fhir/Observation?code={obs_code}&_sort=-date&_count=50", ""),
        ("Observation?patient=<id>&_count=50", f"cycling over {len(pat_ids)} patients",
         lambda i: f"/fhir/Observation?patient={q(pat_ids[i % len(pat_ids)], safe='')}&_count=50", ""),
        ("Patient?name=<family>", f"cycling over {len(families)} family names",
         lambda i: f"/fhir/Patient?name={q(families[i % len(families)], safe='')}", ""),
        ("Condition?code=<top>", f"most frequent Condition code {cond[0]} ({cond[1]:,} rows)",
         lambda i: f"/fhir/Condition?code={q(cond[0], safe='')}", ""),
        ("Encounter?date=ge2015-01-01&_count=50", "",
         lambda i: "/fhir/Encounter?date=ge2015-01-01&_count=50", ""),
    ]
    rnd.shuffle(pat_ids)
    rep.section(f"search: each query {args.search_n} times in sequence, one keep-alive connection "
                f"(after {args.search_warmup} warm-up requests)")
    cl = Client(srv.port, timeout=120)
    rep.data["search"] = {}
    for label, desc, make, target in queries:
        for i in range(args.search_warmup):
            cl.request("GET", make(i))
        lat, bad, total, entries = [], {}, None, None
        with Meter(srv.proc.pid) as m:
            for i in range(args.search_n):
                st, data, dt = cl.request("GET", make(i))
                lat.append(dt)
                if st != 200:
                    bad[st] = bad.get(st, 0) + 1
                elif i == 0:
                    doc = json.loads(data)
                    total = doc.get("total")
                    entries = len(doc.get("entry") or [])
        if bad:
            rep.problem(f"search {label}: statuses {bad} ({sum(bad.values())}/{args.search_n} not 200)")
        lat.sort()
        rep.add(label, f"p50 {fmt_ms(pct(lat, 50))}", target,
                f"p95 {fmt_ms(pct(lat, 95))}, p99 {fmt_ms(pct(lat, 99))}, max {fmt_ms(lat[-1])}; "
                f"1st: total {total}, {entries} entries" + (f"; {desc}" if desc else ""))
        rep.data["search"][label] = {"p50_ms": pct(lat, 50) * 1000, "p95_ms": pct(lat, 95) * 1000,
                                     "p99_ms": pct(lat, 99) * 1000, "total": total, "entries": entries,
                                     "server_cores": m.srv_cores}
    cl.close()


# ------------------------------------------------------------------ $everything
def phase_everything(args, srv: Server, store: Store, rep: Report) -> None:
    big = store.largest_patient()
    if big is None:
        rep.problem("$everything: no patient in the store")
        return
    pid, comp = big
    path = f"/fhir/Patient/{urllib.parse.quote(pid, safe='')}/$everything"
    cl = Client(srv.port, timeout=600)
    rep.section(f"$everything of the largest patient Patient/{pid} ({comp:,} resources reference it), "
                f"median of {args.everything_n}")

    whole, n_whole, size = [], None, 0
    for _ in range(args.everything_n):
        st, data, dt = cl.request("GET", path)
        if st != 200:
            rep.problem(f"$everything (whole): HTTP {st}: {data[:200]!r}")
            break
        whole.append(dt)
        size = len(data)
        n_whole = len(json.loads(data).get("entry") or [])
    if whole:
        rep.add("whole, one Bundle (no _count)", f"{median(whole):.3f} s", TARGETS["everything"],
                f"{n_whole:,} entries, {size / 1e6:.1f} MB; min {min(whole):.3f} s, max {max(whole):.3f} s")

    paged, pages, n_paged = [], 0, 0
    for _ in range(args.everything_n):
        t = time.perf_counter()
        nxt: str | None = f"{path}?_count={args.everything_page}"
        pages, n_paged, failed = 0, 0, False
        while nxt:
            st, data, _ = cl.request("GET", nxt)
            if st != 200:
                rep.problem(f"$everything (paged) page {pages + 1}: HTTP {st}: {data[:200]!r}")
                failed = True
                break
            doc = json.loads(data)
            pages += 1
            n_paged += len(doc.get("entry") or [])
            link = next((l_["url"] for l_ in doc.get("link") or [] if l_.get("relation") == "next"), None)
            if link:
                u = urllib.parse.urlsplit(link)
                nxt = u.path + (f"?{u.query}" if u.query else "")
            else:
                nxt = None
            if pages > 10_000:
                rep.problem("$everything (paged): more than 10,000 pages, stopped")
                failed = True
                break
        if failed:
            break
        paged.append(time.perf_counter() - t)
    if paged:
        rep.add(f"paged, _count={args.everything_page}, all pages", f"{median(paged):.3f} s", TARGETS["everything"],
                f"{pages} pages, {n_paged:,} entries; min {min(paged):.3f} s, max {max(paged):.3f} s")
        if n_whole is not None and n_paged != n_whole:
            rep.problem(f"$everything: paged returned {n_paged} entries, whole {n_whole}")
    rep.data["everything"] = {"patient": pid, "compartment": comp, "whole_s": median(whole) if whole else None,
                              "whole_entries": n_whole, "paged_s": median(paged) if paged else None,
                              "pages": pages, "paged_entries": n_paged}
    cl.close()


# ------------------------------------------------------------------ main
def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help=f"Synthea folder of *.json.bz2 transaction bundles (default {DEFAULT_DATA})")
    ap.add_argument("--db-url", default=None,
                    help=f"empty: SQLite in a fresh data dir; a PostgreSQL URL (e.g. {PG_EXAMPLE}): "
                         "a fresh schema per store, dropped at the end")
    ap.add_argument("--workers", type=int, default=None,
                    help="gunicorn workers (default: the server's, twice the cores)")
    ap.add_argument("--auth", choices=["required", "off"], default="required",
                    help="the server's auth setting (default required: requests carry a token, "
                         "as in production; off = development mode, still audited)")
    ap.add_argument("--server-env", action="append", default=[], metavar="SYNTHPORT_X=V",
                    help="a setting for the servers (repeatable), e.g. SYNTHPORT_AUDIT=false to "
                         "measure without the audit log, SYNTHPORT_AUDIT_SPOOL=false for an "
                         "append per request")
    ap.add_argument("--threads", type=int, default=None, help="threads per worker (default: server's)")
    ap.add_argument("--load-jobs", type=int, default=None, help="synthport load --jobs (default: cores)")
    ap.add_argument("--post-clients", type=int, default=3, help="ingest B client threads (default 3)")
    ap.add_argument("--prefer", default="minimal", choices=["minimal", "representation", "OperationOutcome", ""],
                    help="Prefer: return=... of the POSTed transactions (default minimal; '' sends none)")
    ap.add_argument("--read-clients", type=int, default=8, help="concurrent read connections (default 8)")
    ap.add_argument("--read-client", choices=["auto", "wrk", "python"], default="auto",
                    help="auto: wrk if installed, else multi-process Python")
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--duration", type=float, default=15.0, help="read phase seconds (default 15)")
    ap.add_argument("--warmup", type=float, default=3.0, help="read warm-up seconds, not counted (default 3)")
    ap.add_argument("--search-n", type=int, default=200, help="requests per search (default 200)")
    ap.add_argument("--search-warmup", type=int, default=3, help="uncounted requests before each search")
    ap.add_argument("--everything-n", type=int, default=5, help="$everything repetitions (default 5)")
    ap.add_argument("--everything-page", type=int, default=1000, help="_count of paged $everything")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    ap.add_argument("--work-dir", type=Path, default=None, help="where the stores go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (SQLite files, server logs) and the PostgreSQL schemas")
    ap.add_argument("--no-vacuum", action="store_true",
                    help="PostgreSQL: no VACUUM (ANALYZE) + CHECKPOINT before the read phases")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if args.db_url == "pg":
        args.db_url = PG_EXAMPLE
    if args.db_url and not args.db_url.startswith("postgresql"):
        ap.error("--db-url: only PostgreSQL URLs (SQLite is the default, in a fresh data dir)")
    return args


def main(argv=None) -> int:
    global AUTH_MODE
    args = parse_args(argv)
    AUTH_MODE = args.auth
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("SYNTHPORT_"):
            raise SystemExit(f"--server-env wants SYNTHPORT_NAME=VALUE, not {item!r}")
        SERVER_ENV[key] = value
    if not args.data.is_dir():
        raise SystemExit(f"no data folder {args.data} (give --data)")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="synthport-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rep = Report()
    stores: list[Store] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = loadavg()
    db_desc = "?"
    try:
        def new_store(label: str) -> Store:
            s = Store(work, label, args.db_url)
            stores.append(s)
            return s

        data_store = None
        if "load" in args.phases:
            data_store = new_store("a")
            phase_load(args, data_store, rep, work)
        if "post" in args.phases:
            s = new_store("b")
            phase_post(args, s, rep, work)
            data_store = data_store or s
        if set(args.phases) & {"read", "search", "everything"}:
            if data_store is None:
                data_store = new_store("a")
                log("no load/post phase: loading the data with synthport load first (not reported)")
                subprocess.run(synthport_command() + ["load", "--data-dir", str(data_store.data_dir),
                                                      str(args.data)], env=data_store.env(), check=True,
                               stdout=subprocess.DEVNULL)
            if data_store.schema and not args.no_vacuum:
                log("VACUUM (ANALYZE) of the PostgreSQL store before the read phases")
                secs = data_store.vacuum_analyze()
                rep.section("maintenance before the read phases")
                rep.add("PostgreSQL VACUUM (ANALYZE) + CHECKPOINT", f"{secs:.1f} s", "",
                        "so that autovacuum and checkpoints of the ingest do not run during the "
                        "measurements (--no-vacuum: skip)")
            with Server(data_store, args.workers, args.threads, work) as srv:
                log(f"server for reads: {srv.base}, master pid {srv.proc.pid}, workers {srv.pids}")
                if "read" in args.phases:
                    phase_read(args, srv, data_store, rep, work)
                if "search" in args.phases:
                    phase_search(args, srv, data_store, rep)
                if "everything" in args.phases:
                    phase_everything(args, srv, data_store, rep)
                errors = [ln for ln in srv.tail(200_000).splitlines()
                          if " ERROR " in ln or "Traceback" in ln or "[CRITICAL]" in ln]
                for ln in errors[:10]:
                    rep.problem("server log: " + ln[:300])
        if stores:
            db_desc = stores[0].db_version()
    finally:
        for s in stores:
            s.close(keep=args.keep)
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    cores = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    store_desc = (f"{db_desc} (fresh schema per store, {shlex.quote(args.db_url)})" if args.db_url
                  else f"{db_desc} (file in a fresh data dir)")
    header = [
        f"synthport FHIR benchmark, {started}",
        "command: python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd())]
                                      + (sys.argv[1:] if argv is None else list(argv))),
        f"git {git_rev()}; Python {platform.python_version()}; {platform.platform()}",
        f"machine: {cores} cores, {mem:.0f} GiB; load average at start {load_start}, at end {loadavg()}",
        f"store: {store_desc}",
        "server: synthport serve "
        + (f"--workers {args.workers}" if args.workers
           else f"(workers: server default, 2 x {cores} cores)")
        + (f" --threads {args.threads}" if args.threads else " (threads: server default)")
        + "; client and server share the machine",
        f"data: {args.data}",
    ]
    out = rep.render(header)
    print(out, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "figures": rep.data, "problems": rep.problems},
                                        indent=2, default=str))
    if args.keep or args.work_dir:
        print(f"work dir kept: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
