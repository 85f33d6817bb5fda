"""Synthetic cohort benchmarks: serving a cohort over FHIR, building its index, rendering DICOM.

Usage (from the repository root, after ``pip install -e '.[test]'``)::

    python benchmarks/synthetic_bench.py                      # self-contained (see below)
    python benchmarks/synthetic_bench.py --url http://127.0.0.1:8080 --cohort demo

Without ``--url`` it prepares a fresh data dir with ``synthport demo``'s steps (a made-up
population of ``--patients`` patients, a small model, a cohort of ``--size`` virtual
patients, whose index build time is the "index of 100,000 patients" figure), then starts
``synthport serve`` (``--workers``) on it and measures against that server. With ``--url``
it measures a running server's cohort (the index and render figures are then taken
in-process on ``--data-dir``'s model, when given).

Figures (targets of issue 5 beside them, for reading; nothing passes or fails):

* ``GET Patient/{id}`` p50, cached (the same patient again) and cold (a patient no
  worker has generated yet);
* ``Patient/{id}/$everything`` p50, cold;
* paging through ``--page-n`` virtual Patients by search (``_count=1000`` and ``next``);
* cohort index build for ``--size`` patients;
* a 50-slice 256x256 CT series and one radiograph rendered to DICOM (PS3.10 bytes).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, base: str):
        u = urllib.parse.urlsplit(base)
        self.host, self.port = u.hostname, u.port or 80
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)

    def get(self, path: str) -> tuple[int, bytes, float]:
        t = time.perf_counter()
        self.conn.request("GET", path, headers={"Accept": "application/fhir+json"})
        r = self.conn.getresponse()
        body = r.read()
        return r.status, body, time.perf_counter() - t


def _p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1000.0


def measure(base: str, cohort: str, size: int, n: int, page_n: int) -> dict:
    c = Client(base)
    prefix = f"/synthetic/{cohort}/fhir"
    rnd = random.Random(7)
    ids = rnd.sample(range(size), min(size, 3 * n))
    out: dict = {}
    cold = [c.get(f"{prefix}/Patient/{cohort}-{i}")[2] for i in ids[:n]]
    hot_id = ids[0]
    c.get(f"{prefix}/Patient/{cohort}-{hot_id}")
    cached = [c.get(f"{prefix}/Patient/{cohort}-{hot_id}")[2] for _ in range(n)]
    out["read_patient_p50_ms_cached"] = round(_p50(cached), 2)
    out["read_patient_p50_ms_cold"] = round(_p50(cold), 2)
    ev, sizes = [], []
    for i in ids[n:2 * n]:
        status, body, dt_ = c.get(f"{prefix}/Patient/{cohort}-{i}/$everything")
        ev.append(dt_)
        sizes.append(json.loads(body).get("total", 0))
    out["everything_p50_ms_cold"] = round(_p50(ev), 1)
    out["everything_resources_median"] = statistics.median(sizes)
    out["everything_resources_max"] = max(sizes)
    ev_cached = [c.get(f"{prefix}/Patient/{cohort}-{ids[n]}/$everything")[2] for _ in range(5)]
    out["everything_p50_ms_cached"] = round(_p50(ev_cached), 1)
    got, t = 0, time.perf_counter()
    path = f"{prefix}/Patient?_count=1000"
    while path and got < page_n:
        status, body, _ = c.get(path)
        b = json.loads(body)
        got += len(b.get("entry", []))
        nxt = next((link["url"] for link in b["link"] if link["relation"] == "next"), None)
        path = None if not nxt else "/" + nxt.split("://", 1)[1].split("/", 1)[1]
    secs = time.perf_counter() - t
    out["paging_patients"] = got
    out["paging_resources_per_s"] = round(got / secs, 1)
    return out


def render_figures(cohort) -> dict:
    """Render a 50-slice CT series and one radiograph through the cohort's DICOM source."""
    from server.synthetic.cohort import make_uid
    from server.synthetic.dicom import SyntheticDicomSource

    src = SyntheticDicomSource(cohort)
    base = {"PatientID": f"{cohort.name}-0", "PatientName": "Bench^Mark",
            "PatientBirthDate": "19700101", "PatientSex": "F", "StudyDate": "20240101",
            "StudyTime": "101500", "AccessionNumber": "", "StudyDescription": "benchmark",
            "StudyID": "1", "SeriesNumber": 1}
    study = make_uid(cohort.key, 0, 200)
    series = make_uid(cohort.key, 0, 200, 1)
    out = {}
    t = time.perf_counter()
    total = 0
    for k in range(1, 51):
        inst = {**base, "StudyInstanceUID": study, "SeriesInstanceUID": series,
                "SOPInstanceUID": make_uid(cohort.key, 0, 200, 1, k), "Modality": "CT",
                "BodyPartExamined": "CHEST", "InstanceNumber": k,
                "NumberOfSeriesRelatedInstances": 50, "Rows": 256, "Columns": 256}
        total += len(src.render(inst))
    out["ct_50x256_render_s"] = round(time.perf_counter() - t, 3)
    out["ct_50x256_bytes"] = total
    times = []
    for k in range(5):
        inst = {**base, "StudyInstanceUID": study, "SeriesInstanceUID": make_uid(cohort.key, 0, 201, 1),
                "SOPInstanceUID": make_uid(cohort.key, 0, 201, 1, k + 1), "Modality": "DX",
                "BodyPartExamined": "CHEST", "InstanceNumber": 1,
                "NumberOfSeriesRelatedInstances": 1, "Rows": 1024, "Columns": 1024}
        t = time.perf_counter()
        src.render(inst)
        times.append(time.perf_counter() - t)
    out["radiograph_1024_render_ms_p50"] = round(_p50(times), 1)
    out["image_model_classes"] = [list(c) for c in cohort.images.classes]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server (http://host:port); default: start one")
    ap.add_argument("--cohort", default="bench")
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--patients", type=int, default=60, help="made-up training population")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=50, help="requests per latency figure")
    ap.add_argument("--page-n", type=int, default=10_000)
    ap.add_argument("--data-dir", help="data dir (kept); default: a temporary folder")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    figures: dict = {"cohort": args.cohort, "size": args.size}
    cohort = None
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="synthport-synth-bench-"))
    if args.url is None or args.data_dir:
        from server.config import load_config
        from server.dicom.store import DicomStore
        from server.store import SqlStore
        from server.synthetic.cohort import load_cohort
        from server.synthetic.demo import run_demo
        from server.synthetic.registry import Registry

        cfg = load_config({"data_dir": str(data_dir)}, environ={})
        store = SqlStore.from_url(cfg.resolved_database_url, cfg)
        reg = Registry(store.engine, data_dir)
        t = time.perf_counter()
        info = run_demo(store, DicomStore(store, cfg), reg, patients=args.patients,
                        cohort=args.cohort, size=args.size, seed=1, model="bench",
                        echo=lambda m: print(m, file=sys.stderr))
        figures["prepare_s"] = round(time.perf_counter() - t, 1)
        figures["index_build_s"] = info.settings.get("build_seconds")
        args.size = info.size
        figures["size"] = info.size
        cohort = load_cohort(reg, args.cohort)
        store.engine.dispose()
    if cohort is not None:
        figures.update(render_figures(cohort))
    if args.url:
        figures.update(measure(args.url, args.cohort, args.size, args.n, args.page_n))
    else:
        from tests.e2e.server import free_port, synthport_command
        import subprocess

        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHPORT_")}
        env["SYNTHPORT_DIMSE_PORT"] = "0"
        proc = subprocess.Popen(synthport_command() + [
            "serve", "--http-port", str(port), "--http-host", "127.0.0.1", "--data-dir",
            str(data_dir), "--workers", str(args.workers), "--dimse-port", "0"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if Client(base).get("/fhir/metadata")[0] == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            figures.update(measure(base, args.cohort, args.size, args.n, args.page_n))
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)
    targets = {"read_patient_p50_ms_cached": "<= 10", "read_patient_p50_ms_cold": "<= 100",
               "everything_p50_ms_cold": "<= 300", "paging_resources_per_s": ">= 2000",
               "index_build_s": "<= 60 (100,000 patients)", "ct_50x256_render_s": "<= 2",
               "radiograph_1024_render_ms_p50": "<= 200"}
    for k, v in figures.items():
        print(f"{k:34s} {v}" + (f"   (target {targets[k]})" if k in targets else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
