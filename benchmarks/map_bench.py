"""Mapping benchmark: the 200 patients of ehds-es-200-seed1001 -> patient + event tables.

Prints figures, never fails on time (target: <= 30 s for the 200 patients, archive to tables).

    python benchmarks/map_bench.py                       # from the archive
    python benchmarks/map_bench.py --limit 50            # fewer patients
    python benchmarks/map_bench.py --store               # also: load into a fresh SQLite store
                                                         # and map through the source protocol
    python benchmarks/map_bench.py --reverse             # also: tables -> FHIR records
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "ehds-es-200-seed1001.tar.xz"
TARGET_S = 30.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the Parquet tables here")
    ap.add_argument("--store", action="store_true", help="also map from a loaded SQLite store")
    ap.add_argument("--store-dir", type=Path, default=None,
                    help="with --store: keep the SQLite store here and reuse it when it exists "
                         "(the ~6 min load happens once)")
    ap.add_argument("--store-out", type=Path, default=None,
                    help="with --store: write the store's tables here (to compare runs)")
    ap.add_argument("--store-only", action="store_true",
                    help="with --store: skip the archive -> tables run")
    ap.add_argument("--reverse", action="store_true", help="also time tables -> FHIR")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes: archive -> tables with mappings.parallel.map_path (N workers); "
                         "with --store, export_tables(jobs=N) (this process + N-1 workers); "
                         "default 1 = this process only")
    ap.add_argument("--complete", action="store_true",
                    help="read complete records first (two passes), then map")
    args = ap.parse_args()
    if not args.archive.is_file():
        print(f"archive not found: {args.archive}", file=sys.stderr)
        return 2

    from mappings.records import iter_ehds_archive
    from mappings.tables import map_records

    if args.store and args.store_only:
        _store_bench(args)
        return 0
    t0, c0 = time.perf_counter(), time.process_time()
    if args.complete:
        records = list(iter_ehds_archive(args.archive, limit=args.limit))
        t_read, c_read = time.perf_counter() - t0, time.process_time() - c0
        print(f"  read complete records (2 streaming passes, kept in memory) "
              f"{t_read:7.2f} s  [{c_read:6.2f}]  {sum(len(r) for r in records):,} resources")
        source = records
    else:
        # one streaming pass: each document is mapped as soon as it is read
        source = iter_ehds_archive(args.archive, limit=args.limit, complete=False)
    if args.jobs > 1:
        from mappings.parallel import map_path

        print(f"  {args.jobs} worker processes (CPU figures below are the parent's only)")
        mt = map_path(args.archive, jobs=args.jobs, limit=args.limit)
    else:
        mt = map_records(source)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"archive {args.archive.name}: {mt.patients.shape[0]} patients -> {len(mt.events):,} events, "
          f"patient table {mt.patients.shape[0]} x {mt.patients.shape[1]}")
    import resource

    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = child.ru_utime + child.ru_stime
    print(f"  archive -> tables: {total:7.2f} s wall-clock, {cpu:6.2f} s CPU of this process"
          + (f" + {child_cpu:.2f} s CPU of the workers" if child_cpu else "")
          + f"  (target <= {TARGET_S:.0f} s for 200 patients); load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("  CPU s by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in mt.timings.items()))
    records = None
    if args.out:
        from mappings.io import write_tables

        t = time.perf_counter()
        write_tables(mt, args.out)
        print(f"  write Parquet                    {time.perf_counter() - t:7.2f} s -> {args.out}")
    if args.reverse:
        from mappings.reverse import tables_to_fhir

        t = time.perf_counter()
        n = sum(len(r) for r in tables_to_fhir(mt.patients, mt.events, id_prefix="b"))
        print(f"  tables -> FHIR                   {time.perf_counter() - t:7.2f} s   ({n:,} resources)")
    if args.store:
        _store_bench(args)
    return 0


def _store_bench(args) -> None:
    from mappings.records import iter_ehds_archive
    from server.mapping_export import export_tables
    from server.source import RequestContext
    from server.store import SqlStore

    with tempfile.TemporaryDirectory(prefix="map_bench_") as tmp:
        work = args.store_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        db = work / "synthport.db"
        reuse = args.store_dir is not None and db.is_file() and (work / "loaded").is_file()
        store = SqlStore.from_url(f"sqlite:///{db}")
        if reuse:
            print(f"  reusing the store in {work} (loaded earlier)")
        else:
            t = time.perf_counter()
            ctx = RequestContext()
            for rec in iter_ehds_archive(args.archive, limit=args.limit):
                entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r,
                            "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                           for r in rec if r.get("id") and r["resourceType"] != "Composition"]
                store.bundle(ctx, {"resourceType": "Bundle", "type": "transaction", "entry": entries})
            (work / "loaded").write_text("1\n")
            print(f"  load into SQLite (not part of the target)  {time.perf_counter() - t:7.2f} s")
        load0 = os.getloadavg()[0]
        t, c = time.perf_counter(), time.process_time()
        import inspect

        kw = {"jobs": args.jobs} if "jobs" in inspect.signature(export_tables).parameters else {}
        rep = export_tables(store, args.store_out or (Path(tmp) / "tables"),
                            limit=args.limit if reuse else None, **kw)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        import resource

        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"  store -> tables: {wall:.2f} s wall-clock incl. Parquet, {cpu:.2f} s CPU of this process"
              f" (+ {child.ru_utime + child.ru_stime:.2f} s of child processes)  (target <= {TARGET_S:.0f} s);"
              f" load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
        print(f"    read {rep.read_seconds:.2f} s ({rep.patients} patients, {rep.resources:,} resources), "
              f"map {rep.map_seconds:.2f} s ({rep.events:,} events, {rep.columns} patient columns), "
              f"write Parquet {getattr(rep, 'write_seconds', 0.0):.2f} s")
        if getattr(rep, "timings", None):
            print("    CPU s by mapping phase: " + ", ".join(f"{k} {v:.2f}" for k, v in rep.timings.items()))
        store.engine.dispose()
    os.sync()


if __name__ == "__main__":
    raise SystemExit(main())
