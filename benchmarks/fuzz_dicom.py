"""Fuzz the DICOM store paths of a real ``synthport serve`` with mutated files.

Starts ``synthport serve`` (gunicorn, SQLite in a temporary data dir unless ``--db-url``,
auth off) with its DIMSE listener, then sends ``--n`` mutated files by STOW-RS (one per
request, each stored one retrieved, its metadata, frames, rendered and thumbnail asked
for), ``--requests`` generated DICOMweb requests (queries, Accept headers, frame lists,
rendering parameters, broken multipart envelopes; no 5xx, every 4xx says why) and
``--n`` more files by C-STORE (pynetdicom) and ``--finds`` C-FIND requests with
generated identifiers, and checks the store at the end: every
row has its blob, every count is right, no temporary file is left
(tests/unit/server/dicom/fuzz.py says what each mutation and rule is). Prints the
answers and the findings; deterministic for a ``--seed``.

    python benchmarks/fuzz_dicom.py                 # 1,000 + 1,000 files, seed 1
    python benchmarks/fuzz_dicom.py --n 5000 --seed 7 --mutations flip,length
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.db.engine import make_engine  # noqa: E402
from tests.e2e.server import free_port, run_server  # noqa: E402
from tests.unit.server.dicom.fuzz import (MUTATIONS, cases, check_store, http_client,  # noqa: E402
                                          request_cases, request_targets, run_cfind,
                                          run_cstore, run_requests, run_stow)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="files per path (default 1000)")
    ap.add_argument("--requests", type=int, default=2000,
                    help="generated DICOMweb requests (default 2000)")
    ap.add_argument("--finds", type=int, default=1000,
                    help="C-FIND requests with generated identifiers (default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mutations", default=",".join(MUTATIONS))
    ap.add_argument("--db-url", help="database of the server (default SQLite in its data dir)")
    ap.add_argument("--no-dimse", action="store_true", help="STOW-RS only")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")     # pydicom's warnings about the hostile values
    mutations = tuple(args.mutations.split(","))
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-dicom-") as tmp:
        folder = Path(tmp)
        dport = free_port()
        env = {"SYNTHPORT_DIMSE_PORT": str(dport), "SYNTHPORT_DIMSE_HOST": "127.0.0.1",
               "SYNTHPORT_AUTH": "off"}
        with run_server(folder, args.db_url, extra_env=env) as fhir_base:
            base = fhir_base.removesuffix("/fhir") + "/dicomweb"
            post, get, send = http_client(base)
            t0 = time.monotonic()
            stow = run_stow(cases(args.seed, args.n, mutations=mutations, salt="stow"), post, get)
            print(f"[STOW-RS] {time.monotonic() - t0:.0f} s\n{stow.summary(40)}", flush=True)
            failed += len(stow.findings)
            t0 = time.monotonic()
            reqs = run_requests(request_cases(args.seed, args.requests, *request_targets(post)), send)
            print(f"[requests] {time.monotonic() - t0:.0f} s\n{reqs.summary(40)}", flush=True)
            failed += len(reqs.findings)
            if not args.no_dimse:
                t0 = time.monotonic()
                dimse = run_cstore(cases(args.seed + 1, args.n, mutations=mutations, salt="dimse"),
                                   "127.0.0.1", dport, "SYNTHPORT", folder / "cases", get)
                print(f"[C-STORE] {time.monotonic() - t0:.0f} s\n{dimse.summary(40)}", flush=True)
                failed += len(dimse.findings)
                t0 = time.monotonic()
                finds = run_cfind(args.seed, args.finds, "127.0.0.1", dport, "SYNTHPORT")
                print(f"[C-FIND] {time.monotonic() - t0:.0f} s\n{finds.summary(40)}", flush=True)
                failed += len(finds.findings)
        data_dir = folder / "synthport-data"
        engine = make_engine(args.db_url or f"sqlite:///{data_dir / 'synthport.db'}")
        problems = check_store(engine, data_dir / "dicom")
        engine.dispose()
        print("[store] " + ("whole" if not problems else "\n".join(problems[:40])))
        failed += len(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
