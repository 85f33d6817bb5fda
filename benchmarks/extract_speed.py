"""Throughput of search-index extraction (server.fhir.extract) on Synthea data, one core.

Usage:
    python benchmarks/extract_speed.py [BUNDLE.json.bz2 ...] [--repeat N]

Defaults to the largest patient bundle of ../shared/data/synthea-us-120. References to
``urn:uuid`` fullUrls are first rewritten to ``Type/id``, as transaction processing does before
indexing. Prints resources/s (best of the repeats; the first figure is the one that counts:
value caches cleared, as every value is new to ingest) and index rows per resource. The
ingest target is 3,000 resources/s overall, which needs >= 15,000 resources/s here.
"""
from __future__ import annotations

import argparse
import bz2
import collections
import json
import time
from pathlib import Path

from server.fhir import extract as ex
from server.fhir.transaction import resolve_local_references

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synthea-us-120"


def load(path: Path) -> list[dict]:
    return resolve_local_references(json.loads(bz2.decompress(path.read_bytes())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    paths = args.bundles or [max(DATA.glob("[!0]*.json.bz2"), key=lambda p: p.stat().st_size)]
    resources = [r for p in paths for r in load(p)]
    types = collections.Counter(r["resourceType"] for r in resources)
    names = ", ".join(p.name for p in paths) if len(paths) <= 3 else f"{len(paths)} bundles"
    print(f"{len(resources)} resources from {names}")
    print("  " + ", ".join(f"{t} {n}" for t, n in types.most_common()))
    print(f"compiled: {ex.COMPILE_STATS.fast} definitions, "
          f"fhirpathpy fallback: {len(ex.COMPILE_STATS.fallback)}")

    n_rows = sum(len(v) for r in resources for v in ex.extract(r).values())

    def rate(clear_caches: bool) -> float:
        """Best of the repeats, resources per CPU second."""
        best = float("inf")
        for _ in range(args.repeat):
            if clear_caches:     # as in ingest, where each value is seen for the first time
                ex._DATE_CACHE.clear(), ex._NORM_CACHE.clear(), ex._REF_CACHE.clear()
            t0 = time.process_time()      # CPU time: per core, whatever else runs
            for r in resources:
                ex.extract(r)
            best = min(best, time.process_time() - t0)
        return len(resources) / best

    cold = rate(clear_caches=True)
    print(f"{cold:,.0f} resources/s ({1e6 / cold:.1f} µs and {n_rows / len(resources):.1f} "
          f"index rows per resource; value caches cleared before each pass)")
    print(f"{rate(clear_caches=False):,.0f} resources/s with warm value caches")


if __name__ == "__main__":
    main()
