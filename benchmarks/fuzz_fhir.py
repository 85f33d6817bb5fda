"""Fuzz the FHIR REST API with schemathesis, from the OpenAPI document the server serves.

Starts ``synthport serve`` (gunicorn, SQLite in a temporary data dir, development mode)
unless ``--url`` names a running server, loads a few linked resources, then sends
``--max-examples`` generated requests per operation and generation mode (positive:
valid per the document; negative: invalid), plus a positive round with the id of an
existing resource for every operation on ``{id}``. Prints the operations covered,
requests sent, the status-code histogram and the findings (5xx, no answer, 4xx that is
not an OperationOutcome). Deterministic for a given server state (Hypothesis derandomized).

    python benchmarks/fuzz_fhir.py                          # default resource types, 50 each
    python benchmarks/fuzz_fhir.py --types all --max-examples 5
    python benchmarks/fuzz_fhir.py --url http://127.0.0.1:8080/fhir --token "$TOKEN"
    # a synthetic cohort: serve a data dir made by `synthport demo`, fuzz its FHIR base
    python benchmarks/fuzz_fhir.py --data-dir /tmp/demo-data --base-path /synthetic/demo/fhir
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.fuzz import discover_ids, fuzz, seed  # noqa: E402
from tests.e2e.server import run_server  # noqa: E402

DEFAULT_TYPES = ("Patient", "Observation", "Encounter", "Condition", "ImagingStudy", "Bundle",
                 "CodeSystem", "ValueSet", "ConceptMap", "Binary")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="FHIR base of a running server (default: start one)")
    ap.add_argument("--db-url", help="database of the server this script starts (default SQLite)")
    ap.add_argument("--data-dir", help="data dir for the server this script starts (default: a new one)")
    ap.add_argument("--base-path", default="/fhir", help="FHIR base path on that server (default /fhir; "
                    "a cohort: /synthetic/<name>/fhir)")
    ap.add_argument("--max-examples", type=int, default=50, help="per operation and mode (default 50)")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES),
                    help="resource types to fuzz, comma-separated, or 'all' (system paths always)")
    ap.add_argument("--modes", default="positive,negative", help="positive and/or negative")
    ap.add_argument("--token", help="bearer token sent with every request")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers of a started server")
    ap.add_argument("--no-seed", action="store_true", help="do not load the seed resources")
    ap.add_argument("--quiet", action="store_true", help="no line per operation")
    args = ap.parse_args(argv)

    types = None if args.types == "all" else set(args.types.split(","))
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None

    def select(op) -> bool:
        first = op.path.strip("/").split("/")[0]
        return types is None or first in types or not first[:1].isupper()

    with contextlib.ExitStack() as stack:
        base = args.url
        if not base:
            if args.data_dir:       # run_server serves <folder>/synthport-data
                data = Path(args.data_dir).resolve()
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-fhir-")))
                (folder / "synthport-data").symlink_to(data)
            else:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-fhir-")))
            base = stack.enter_context(run_server(folder, args.db_url, workers=args.workers))
            base = base.removesuffix("/fhir") + args.base_path
        base = base.rstrip("/")
        writable = "/synthetic/" not in base
        ids = seed(base, headers) if writable and not args.no_seed else {}
        ids = {**discover_ids(base, types or DEFAULT_TYPES, headers), **ids}
        print(f"fuzzing {base} (max_examples={args.max_examples}, modes={args.modes}, "
              f"types={args.types}, cpus={os.cpu_count()})", flush=True)
        report = fuzz(f"{base}/openapi.json", max_examples=args.max_examples,
                      modes=args.modes.split(","), select=select, headers=headers, fixed_ids=ids,
                      log=None if args.quiet else (lambda line: print(line, flush=True)))
    print(report.summary(limit=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
