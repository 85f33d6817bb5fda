"""DICOM end-to-end figures against a real ``synthport serve`` (prints figures, never pass/fail).

Builds N (default 1000) ~39 KB CT instances of one study (pydicom's ``CT_small.dcm``
with new UIDs), starts ``synthport serve`` on SQLite in a temporary data dir, and measures:

* C-STORE: dcmtk ``storescu`` sending all N files on one association
  (``TCP_NODELAY=1``, ``-aec SYNTHPORT``), instances/s;
* STOW-RS: another N instances (a second study) in multipart batches of 50, instances/s;
* QIDO-RS ``/studies`` p50; WADO-RS instance retrievals/s; series ``/metadata`` p50;
  ``/frames/1`` retrievals/s;
* C-FIND at STUDY level with dcmtk ``findscu`` (a new association per query) p50;
* with ``--studies K``: K more one-instance studies (stored by STOW-RS, not timed), then
  QIDO-RS ``/studies`` (all of them) and ``/studies?PatientID=...`` (one match) p50.

With ``--orthanc`` the same phases, on the same files, run against Orthanc from Debian
(``orthanc`` + ``orthanc-dicomweb``, SQLite index, ``TcpNoDelay`` true) started on free
ports beside synthport, side by side: both servers run at once and every phase gives
them its requests in alternating blocks (ABBA order, four blocks of consecutive requests
per server; C-STORE, one association each, takes turns), so that a change of machine
load during the run hits both alike. After each phase that stores data, the run waits
until both servers are idle (work done after answering, such as Orthanc's jobs, is not
timed against the other server). A table of ratios synthport / Orthanc is printed; each
phase line carries the 1-minute load average.

Usage::

    python benchmarks/dicom_bench.py [--n 1000] [--workers 2] [--reads 200] [--orthanc]
        [--studies 1000] [--phases cstore,stow,qido,wado,metadata,frames,cfind]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from tests.e2e.dimse_tools import dcmtk  # noqa: E402
from tests.e2e.orthanc import OrthancMissing, dicomweb_plugin, run_orthanc  # noqa: E402
from tests.e2e.server import free_port, run_server, synthport_command  # noqa: E402


def build(folder: Path, n: int, prefix: str) -> tuple[str, str, list[Path]]:
    """N instances of one new study/series from CT_small.dcm."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    study, series = generate_uid(), generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID = f"BENCH-{prefix}"
    files = []
    for i in range(n):
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        path = folder / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, series, files


def p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1000 if xs else float("nan")


def timed(fn, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


@contextlib.contextmanager
def orthanc_server(folder: Path, sync: bool = True):
    """Orthanc with the DICOMweb plugin on free ports: (dicomweb base, DICOM port, AE)."""
    try:
        plugin = dicomweb_plugin()
        # Orthanc fsyncs every stored file by default; synthport does not (SQLite WAL
        # with synchronous=NORMAL, files moved into place without fsync).
        # Orthanc answers C-FIND only to calling AE titles listed in DicomModalities: it
        # aborts dcmtk's FINDSCU otherwise (its log: "This AET is not listed"), and an
        # abort is no query (runs before 2026-11-29 afternoon timed that abort).
        # Orthanc's TcpNoDelay option is for its HTTP server; its DICOM sockets are dcmtk's,
        # which switch Nagle off only when TCP_NODELAY is set in the environment. Without
        # it each C-FIND/C-STORE response written in pieces waits ~40 ms for the peer's
        # delayed ACK (Orthanc's C-STORE ran at ~20 instances/s here, 0.46 -> 43 ms a find).
        with run_orthanc(folder, env={"TCP_NODELAY": "1"}, Plugins=[plugin], TcpNoDelay=True,
                         StorageCompression=False,
                         ConcurrentJobs=2, SyncStorageArea=sync,
                         DicomModalities={"findscu": ["FINDSCU", "127.0.0.1", 104],
                                          "storescu": ["STORESCU", "127.0.0.1", 104]},
                         DicomWeb={"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                                   "SeriesMetadata": "Full"}) as (base, dicom):
            yield f"{base}/dicom-web", dicom, "ORTHANC"
    except OrthancMissing as exc:
        raise SystemExit(str(exc)) from None


@contextlib.contextmanager
def synthport_server(folder: Path, workers: int):
    dimse_port = free_port()
    os.environ.setdefault("PYTEST_CURRENT_TEST", "")  # run_server reports through pytest
    with run_server(folder, None, {"SYNTHPORT_DIMSE_PORT": str(dimse_port), "SYNTHPORT_AUTH": "required"},
                    workers=workers) as fhir_base:
        # As in production (docs/security.md): dcmtk's calling AE titles act as a registered
        # client, DICOMweb requests carry a token; every request is checked and audited.
        data_dir = str(folder / "synthport-data")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHPORT_")}
        subprocess.run(synthport_command() + ["client", "add", "bench", "--data-dir", data_dir,
                                              "--ae-title", "STORESCU", "--ae-title", "FINDSCU",
                                              "--scope", "system/ImagingStudy.cruds"],
                       env=env, check=True, capture_output=True)
        token = subprocess.run(synthport_command() + ["token", "--data-dir", data_dir, "--scope",
                                                      "system/*.cruds", "--lifetime", "86400"],
                               env=env, check=True, capture_output=True, text=True).stdout.strip()
        os.environ["BENCH_TOKEN"] = token
        yield fhir_base.rsplit("/fhir", 1)[0] + "/dicomweb", dimse_port, "SYNTHPORT"


def stow(s: requests.Session, web: str, files: list[Path], batch: int) -> int:
    bad = 0
    for i in range(0, len(files), batch):
        boundary = uuid.uuid4().hex
        parts = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes()
                 + b"\r\n" for f in files[i:i + batch]]
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        r = s.post(f"{web}/studies", data=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
        bad += r.status_code != 200
    return bad


def build_studies(folder: Path, k: int) -> list[Path]:
    """K one-instance studies (new Study/Series/SOP UIDs, PatientID BENCH-S<i>)."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    out = []
    for i in range(k):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = f"BENCH-S{i}"
        path = folder / f"s{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


@dataclass
class Target:
    """One server under test: its DICOMweb base, DIMSE port and AE title, an HTTP session."""

    name: str
    web: str
    dimse_port: int
    aet: str
    session: requests.Session
    sops: list[str] = field(default_factory=list)


def target(name: str, web: str, dimse_port: int, aet: str, token: str | None = None) -> Target:
    s = requests.Session()
    if token:
        s.headers["Authorization"] = "Bearer " + token
    return Target(name, web, dimse_port, aet, s)


def _descendants_cpu() -> float:
    """CPU seconds (user + system) used so far by every process below this one."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def _children_cpu() -> float:
    """CPU seconds of this process's finished (waited-for) children."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def settle(limit: float = 90.0) -> float:
    """Wait until the servers under test are idle (less than 5 % of a core over half a
    second), so that work a server does after answering (indexing, caches, jobs) is not
    timed in the next phase, against another server. Returns the seconds waited."""
    if not os.path.isdir("/proc"):
        return 0.0
    start = time.perf_counter()
    before = _descendants_cpu()
    while time.perf_counter() - start < limit:
        time.sleep(0.5)
        now = _descendants_cpu()
        if now - before < 0.025:
            break
        before = now
    return time.perf_counter() - start


def inode_settle(folder: Path, limit: float = 330.0, threshold_us: float = 80.0) -> str:
    """Wait until creating a file under ``folder`` is cheap again; returns what it saw.

    On an ext4 file system without a journal (this project's CI and session machines:
    ``/proc/fs/jbd2`` is empty), the inode allocator skips every inode freed in the last
    60-300 s (``recently_deleted`` in fs/ext4/ialloc.c, reading its inode table block),
    so after a run deleted thousands of files each new file costs 0.1-1 ms of kernel CPU
    in the process that creates it: for a few minutes the store phases time the previous
    run's clean-up, not the servers (seen here: 20 us a create when settled, 300-1,000 us
    after a clean-up; ``perf`` shows ``find_inode_bit`` -> ``recently_deleted``). The
    probe files are kept (deleting them would start the clock again) and go with
    ``folder``.
    """
    probe = folder / ".inode-probe"
    probe.mkdir(parents=True, exist_ok=True)
    start, seen = time.perf_counter(), []
    while True:
        t = time.perf_counter()
        for _ in range(50):
            fd, _name = tempfile.mkstemp(dir=probe)
            os.close(fd)
        per = (time.perf_counter() - t) / 50 * 1e6
        seen.append(per)
        if per < threshold_us or time.perf_counter() - start > limit:
            break
        time.sleep(10)
    waited = time.perf_counter() - start
    return (f"file create {seen[-1]:.0f} us" + (f" after {waited:.0f} s (first {seen[0]:.0f} us)"
                                                if len(seen) > 1 else ""))


def side_by_side(targets: list[Target], count: int, call, rounds: int = 4) -> dict[str, list[float]]:
    """``count`` calls of ``call(target, i)`` per target, in ``rounds`` rounds; each round
    gives every target one block of consecutive calls, in ABBA order (AB, BA, AB, BA),
    so that a change of machine load during the phase hits every server alike while each
    still sees back-to-back requests. Returns the call durations (s) per target name."""
    out: dict[str, list[float]] = {t.name: [] for t in targets}
    bounds = [count * r // rounds for r in range(rounds + 1)]
    for r in range(rounds):
        for t in (targets if r % 2 == 0 else targets[::-1]):
            for i in range(bounds[r], bounds[r + 1]):
                start = time.perf_counter()
                call(t, i)
                out[t.name].append(time.perf_counter() - start)
    return out


def run_phases(targets: list[Target], data: dict, args, phases: set) -> dict[str, dict[str, float]]:
    """Every phase against every target, side by side; figures per target name
    (throughputs in /s, latencies in ms)."""
    storescu, findscu = dcmtk("storescu"), dcmtk("findscu")
    st1, se1, files1 = data["a"]
    _st2, _se2, files2 = data["b"]
    res: dict[str, dict[str, float]] = {t.name: {} for t in targets}
    acc = {"Accept": "application/dicom+json"}
    nodelay = {**os.environ, "TCP_NODELAY": "1"}

    def say(t: Target, text: str) -> None:
        print(f"[{t.name}] {text}  (load {os.getloadavg()[0]:.2f})", flush=True)

    if "cstore" in phases and storescu:
        # One association of N instances per server cannot be interleaved: the servers
        # take turns, in the order of the target list.
        for t in targets:
            print(f"(inodes: {inode_settle(files1[0].parent.parent)})", flush=True)
            cpu0, client0 = _descendants_cpu(), _children_cpu()
            start = time.perf_counter()
            proc = subprocess.run([storescu, "-aec", t.aet, "127.0.0.1", str(t.dimse_port),
                                   *map(str, files1)], env=nodelay, capture_output=True, text=True)
            dt = time.perf_counter() - start
            # The client waits for each response: wall time ~ server CPU + client CPU.
            server_ms = (_descendants_cpu() - cpu0) / args.n * 1000
            client_ms = (_children_cpu() - client0) / args.n * 1000
            res[t.name]["C-STORE inst/s"] = args.n / dt
            say(t, f"C-STORE   {args.n} instances, one association: {dt:.2f} s = {args.n / dt:.1f}/s; "
                   f"CPU per instance: server {server_ms:.2f} ms, storescu {client_ms:.2f} ms"
                + ("" if proc.returncode == 0 and "E:" not in proc.stdout + proc.stderr
                   else f" FAILED rc={proc.returncode} {(proc.stdout + proc.stderr)[-300:]}"))
            print(f"(servers idle after {settle():.1f} s)", flush=True)
    else:
        for t in targets:
            stow(t.session, t.web, files1, args.batch)   # the read phases need study a
        settle()
    if "stow" in phases:
        print(f"(inodes: {inode_settle(files1[0].parent.parent)})", flush=True)
        batches = [files2[i:i + args.batch] for i in range(0, len(files2), args.batch)]
        bad = {t.name: 0 for t in targets}

        def post(t: Target, i: int) -> None:
            bad[t.name] += stow(t.session, t.web, batches[i], args.batch)

        for name, xs in side_by_side(targets, len(batches), post).items():
            t = next(x for x in targets if x.name == name)
            res[name]["STOW-RS inst/s"] = args.n / sum(xs)
            say(t, f"STOW-RS   {args.n} instances in batches of {args.batch}: {sum(xs):.2f} s = "
                   f"{args.n / sum(xs):.1f}/s{f'; {bad[name]} requests not 200' if bad[name] else ''}")
        print(f"(servers idle after {settle():.1f} s)", flush=True)

    def get(t: Target, path: str, headers=acc, **params) -> None:
        t.session.get(f"{t.web}{path}", headers=headers, params=params or None).raise_for_status()

    if "qido" in phases:
        for name, xs in side_by_side(targets, args.reads, lambda t, i: get(t, "/studies")).items():
            res[name]["QIDO /studies p50 ms"] = p50(xs)
            say(next(x for x in targets if x.name == name), f"QIDO-RS   /studies (2 studies) p50 {p50(xs):.2f} ms")
    if {"wado", "frames"} & phases:
        for t in targets:
            r = t.session.get(f"{t.web}/studies/{st1}/series/{se1}/instances", headers=acc)
            t.sops = [d["00080018"]["Value"][0] for d in r.json()] if r.ok else []
    live = [t for t in targets if t.sops]
    inst = f"/studies/{st1}/series/{se1}/instances/"
    if "wado" in phases and live:
        dicom = {"Accept": 'multipart/related; type="application/dicom"'}
        for name, xs in side_by_side(live, args.reads, lambda t, i: get(
                t, inst + t.sops[i % len(t.sops)], headers=dicom)).items():
            res[name]["WADO-RS instance req/s"] = args.reads / sum(xs)
            say(next(x for x in live if x.name == name),
                f"WADO-RS   instance retrieval: {args.reads / sum(xs):.1f} req/s")
    if "metadata" in phases:
        for name, xs in side_by_side(targets, max(10, args.reads // 10), lambda t, i: get(
                t, f"/studies/{st1}/series/{se1}/metadata")).items():
            res[name]["series metadata p50 ms"] = p50(xs)
            say(next(x for x in targets if x.name == name),
                f"WADO-RS   series metadata ({args.n} instances) p50 {p50(xs):.2f} ms")
    if "frames" in phases and live:
        octet = {"Accept": 'multipart/related; type="application/octet-stream"'}
        for name, xs in side_by_side(live, args.reads, lambda t, i: get(
                t, inst + t.sops[i % len(t.sops)] + "/frames/1", headers=octet)).items():
            res[name]["frames/1 req/s"] = args.reads / sum(xs)
            say(next(x for x in live if x.name == name), f"WADO-RS   frames/1: {args.reads / sum(xs):.1f} req/s")
    if "cfind" in phases and findscu:
        def find(t: Target, i: int) -> None:
            proc = subprocess.run([findscu, "-S", "-aec", t.aet, "-k", "QueryRetrieveLevel=STUDY",
                                   "-k", "StudyInstanceUID", "-k", "PatientName", "127.0.0.1",
                                   str(t.dimse_port)], capture_output=True, text=True, env=nodelay)
            # findscu exits 0 on a rejected or aborted query too; it logs "E:" lines then
            if proc.returncode or "E:" in proc.stdout + proc.stderr:
                raise SystemExit(f"[{t.name}] C-FIND failed: {(proc.stdout + proc.stderr)[-400:]}")

        for name, xs in side_by_side(targets, max(10, args.reads // 10), find).items():
            res[name]["C-FIND study p50 ms"] = p50(xs)
            say(next(x for x in targets if x.name == name),
                f"C-FIND    STUDY level incl. association setup p50 {p50(xs):.2f} ms")
    if data.get("studies"):
        k = len(data["studies"])
        bad = {t.name: stow(t.session, t.web, data["studies"], args.batch) for t in targets}
        settle()
        lists = side_by_side(targets, max(10, args.reads // 10), lambda t, i: get(t, "/studies"))
        one = side_by_side(targets, args.reads, lambda t, i: get(t, "/studies", PatientID=f"BENCH-S{k // 2}"))
        for t in targets:
            xs, xs2 = lists[t.name], one[t.name]
            res[t.name][f"QIDO /studies ({k + 2} studies) p50 ms"] = p50(xs)
            res[t.name][f"QIDO PatientID= ({k + 2} studies) p50 ms"] = p50(xs2)
            say(t, f"QIDO-RS   on {k + 2} studies: /studies p50 {p50(xs):.2f} ms, ?PatientID= p50 "
                   f"{p50(xs2):.2f} ms{f'; {bad[t.name]} STOW requests not 200' if bad[t.name] else ''}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="instances per store phase")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    ap.add_argument("--reads", type=int, default=200, help="requests per read phase")
    ap.add_argument("--batch", type=int, default=50, help="STOW-RS instances per request")
    ap.add_argument("--studies", type=int, default=0, help="more one-instance studies for QIDO")
    ap.add_argument("--orthanc", action="store_true", help="run the same phases against Orthanc")
    ap.add_argument("--orthanc-no-sync", action="store_true",
                    help="Orthanc with SyncStorageArea false (synthport's durability level)")
    ap.add_argument("--phases", default="cstore,stow,qido,wado,metadata,frames,cfind")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    print(f"dcmtk storescu: {dcmtk('storescu') or 'not found'}; findscu: {dcmtk('findscu') or 'not found'}")

    with tempfile.TemporaryDirectory(prefix="dicom-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        data = {"a": build(tmp / "a", args.n, "a"), "b": build(tmp / "b", args.n, "b")}
        if args.studies:
            data["studies"] = build_studies(tmp / "studies", args.studies)
        size = sum(f.stat().st_size for f in data["a"][2]) / args.n
        print(f"built 2 x {args.n} instances ({size / 1024:.1f} KB each)"
              f"{f' and {args.studies} one-instance studies' if args.studies else ''} in "
              f"{time.perf_counter() - t:.1f} s")
        with contextlib.ExitStack() as stack:
            web, port, aet = stack.enter_context(synthport_server(tmp / "srv", args.workers))
            targets = [target("synthport", web, port, aet, os.environ.get("BENCH_TOKEN"))]
            if args.orthanc:
                web, port, aet = stack.enter_context(
                    orthanc_server(tmp / "orthanc", sync=not args.orthanc_no_sync))
                targets.append(target("orthanc", web, port, aet))
            print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            res = run_phases(targets, data, args, phases)
            print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if not args.orthanc:
            return 0
        ours, theirs = res["synthport"], res["orthanc"]
    print("\n| figure | synthport | Orthanc | ratio synthport/Orthanc | goal |")
    print("|---|---|---|---|---|")
    for key, value in ours.items():
        other = theirs.get(key)
        ratio = value / other if other else float("nan")
        goal = "<= 1.0 (latency)" if key.endswith("ms") else ">= 1.0 (throughput)"
        print(f"| {key} | {value:.1f} | {other if other is None else round(other, 1)} | {ratio:.2f} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
