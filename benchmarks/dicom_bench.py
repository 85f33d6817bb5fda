"""DICOM end-to-end figures against a real ``synthport serve`` (prints figures, never pass/fail).

Builds N (default 1000) ~39 KB CT instances of one study (pydicom's ``CT_small.dcm``
with new UIDs), starts ``synthport serve`` on SQLite in a temporary data dir, and measures:

* C-STORE: dcmtk ``storescu`` sending all N files on one association
  (``TCP_NODELAY=1``, ``-aec SYNTHPORT``), instances/s;
* STOW-RS: another N instances (a second study) in multipart batches of 50, instances/s;
* QIDO-RS ``/studies`` p50; WADO-RS instance retrievals/s; series ``/metadata`` p50;
  ``/frames/1`` retrievals/s;
* C-FIND at STUDY level with dcmtk ``findscu`` (a new association per query) p50.

Targets (issue 3, Orthanc's figures on the same machine): C-STORE >= 215 instances/s,
STOW-RS >= 133 instances/s. Orthanc is not run here.

Usage::

    python benchmarks/dicom_bench.py [--n 1000] [--workers 2] [--reads 200]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from tests.e2e.dimse_tools import dcmtk  # noqa: E402
from tests.e2e.server import free_port, run_server  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="instances per store phase")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    ap.add_argument("--reads", type=int, default=200, help="requests per read phase")
    ap.add_argument("--batch", type=int, default=50, help="STOW-RS instances per request")
    ap.add_argument("--phases", default="cstore,stow,qido,wado,metadata,frames,cfind")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    storescu, findscu = dcmtk("storescu"), dcmtk("findscu")
    print(f"dcmtk storescu: {storescu or 'not found'}; findscu: {findscu or 'not found'}")

    with tempfile.TemporaryDirectory(prefix="dicom-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        st1, se1, files1 = build(tmp / "a", args.n, "a")
        st2, se2, files2 = build(tmp / "b", args.n, "b")
        size = sum(f.stat().st_size for f in files1) / len(files1)
        print(f"built 2 x {args.n} instances ({size / 1024:.1f} KB each) in "
              f"{time.perf_counter() - t:.1f} s")
        dimse_port = free_port()
        os.environ.setdefault("PYTEST_CURRENT_TEST", "")  # run_server reports through pytest
        with run_server(tmp / "srv", None, {"SYNTHPORT_DIMSE_PORT": str(dimse_port)},
                        workers=args.workers) as fhir_base:
            web = fhir_base.rsplit("/fhir", 1)[0] + "/dicomweb"
            s = requests.Session()
            results = {}
            if "cstore" in phases and storescu:
                env = {**os.environ, "TCP_NODELAY": "1"}
                t = time.perf_counter()
                proc = subprocess.run([storescu, "-aec", "SYNTHPORT", "127.0.0.1", str(dimse_port),
                                       *map(str, files1)], env=env, capture_output=True, text=True)
                dt = time.perf_counter() - t
                ok = proc.returncode == 0
                results["C-STORE instances/s"] = args.n / dt
                print(f"C-STORE   {args.n} instances, one association: {dt:.2f} s = "
                      f"{args.n / dt:.1f} instances/s (target >= 215){'' if ok else ' rc=' + str(proc.returncode) + ' ' + proc.stderr[-500:]}")
            if "stow" in phases:
                t = time.perf_counter()
                bad = 0
                for i in range(0, len(files2), args.batch):
                    boundary = uuid.uuid4().hex
                    parts = []
                    for f in files2[i:i + args.batch]:
                        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
                                     .encode() + f.read_bytes() + b"\r\n")
                    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
                    r = s.post(f"{web}/studies", data=body, headers={
                        "Content-Type": f'multipart/related; type="application/dicom"; '
                                        f"boundary={boundary}",
                        "Accept": "application/dicom+json"})
                    bad += r.status_code != 200
                dt = time.perf_counter() - t
                results["STOW-RS instances/s"] = args.n / dt
                print(f"STOW-RS   {args.n} instances in batches of {args.batch}: {dt:.2f} s = "
                      f"{args.n / dt:.1f} instances/s (target >= 133){f'; {bad} requests not 200' if bad else ''}")
            acc = {"Accept": "application/dicom+json"}
            if "qido" in phases:
                xs = timed(lambda: s.get(f"{web}/studies", headers=acc).raise_for_status(), args.reads)
                print(f"QIDO-RS   /studies p50 {p50(xs):.2f} ms ({args.reads} requests)")
            sops = []
            if {"wado", "frames"} & phases:
                r = s.get(f"{web}/studies/{st1}/series/{se1}/instances", headers=acc)
                sops = [d["00080018"]["Value"][0] for d in r.json()] if r.ok else []
            if "wado" in phases and sops:
                n = args.reads
                t = time.perf_counter()
                for i in range(n):
                    s.get(f"{web}/studies/{st1}/series/{se1}/instances/{sops[i % len(sops)]}",
                          headers={"Accept": 'multipart/related; type="application/dicom"'}
                          ).raise_for_status()
                dt = time.perf_counter() - t
                print(f"WADO-RS   instance retrieval: {n / dt:.1f} req/s (one client, sequential)")
            if "metadata" in phases:
                xs = timed(lambda: s.get(f"{web}/studies/{st1}/series/{se1}/metadata",
                                         headers=acc).raise_for_status(), max(10, args.reads // 10))
                print(f"WADO-RS   series metadata ({args.n} instances) p50 {p50(xs):.2f} ms")
            if "frames" in phases and sops:
                n = args.reads
                t = time.perf_counter()
                for i in range(n):
                    s.get(f"{web}/studies/{st1}/series/{se1}/instances/{sops[i % len(sops)]}/frames/1",
                          headers={"Accept": 'multipart/related; type="application/octet-stream"'}
                          ).raise_for_status()
                dt = time.perf_counter() - t
                print(f"WADO-RS   frames/1: {n / dt:.1f} req/s (one client, sequential)")
            if "cfind" in phases and findscu:
                def find():
                    subprocess.run([findscu, "-S", "-aec", "SYNTHPORT", "-k", "QueryRetrieveLevel=STUDY",
                                    "-k", "StudyInstanceUID", "-k", "PatientName", "127.0.0.1",
                                    str(dimse_port)], capture_output=True, check=True)
                xs = timed(find, max(10, args.reads // 10))
                print(f"C-FIND    STUDY level incl. association setup p50 {p50(xs):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
