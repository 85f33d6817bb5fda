"""Map Bundle files and EHDS archives with several worker processes.

The parent streams the input (one ``tarfile`` pass, or one file after another) and hands raw
document bytes to workers, which decompress (``.bz2``/``.gz``), parse, group and extract
events; the parent merges their results in input order, so the tables are the same as with
:func:`mappings.tables.map_records` in one process, and builds the tables. Workers are
started with ``spawn`` (no fork of a process that may hold library threads).
"""
from __future__ import annotations

import bz2
import gzip
import multiprocessing as mp
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import orjson

from mappings.events import EventExtractor
from mappings.records import _EHDS_NAME, bundle_resources, group_records
from mappings.spec import MappingSpec
from mappings.tables import MappedTables, finish_tables, resolve_spec

_SPEC: MappingSpec | None = None


def _init(spec_json: str) -> None:
    global _SPEC
    _SPEC = MappingSpec.model_validate_json(spec_json)


def _work(raw: bytes, codec: str | None) -> dict:
    import gc

    gc.disable()  # JSON trees hold no cycles (see map_records)
    try:
        if codec == "bz2":
            raw = bz2.decompress(raw)
        elif codec == "gz":
            raw = gzip.decompress(raw)
        ex = EventExtractor(_SPEC)
        for rec in group_records(bundle_resources(orjson.loads(raw))):
            ex.add_record(rec)
        return ex.export_state()
    finally:
        gc.enable()


def _documents(path: Path, limit: int | None) -> Iterator[tuple[bytes, str | None]]:
    """Raw documents of an EHDS archive (one pass) or a folder of Bundle files."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("0-")
                       and p.name.endswith((".json", ".json.bz2", ".json.gz")))
        for p in files[:limit] if limit is not None else files:
            codec = "bz2" if p.name.endswith(".bz2") else "gz" if p.name.endswith(".gz") else None
            yield p.read_bytes(), codec
        return
    wanted: set[str] = set()
    with tarfile.open(path, mode="r|*") as tf:
        for m in tf:
            mt = _EHDS_NAME.match(m.name) if m.isfile() else None
            if not mt:
                continue
            if mt["cat"] == "patient-summary":
                if limit is not None and len(wanted) >= limit:
                    continue
                wanted.add(mt["stem"])
            elif limit is not None and mt["stem"] not in wanted:
                continue
            yield tf.extractfile(m).read(), None


def map_path(path: str | Path, spec: MappingSpec | str | None = None, *, jobs: int | None = None,
             limit: int | None = None, **vocabulary) -> MappedTables:
    """Map a Synthea-style folder of Bundle files or an EHDS archive with ``jobs`` processes.

    Args:
        jobs: worker processes (default: the number of CPUs); 1 maps in this process.
        limit: the first N patient files (folder) or patient summaries (archive).
    """
    spec = resolve_spec(spec, **vocabulary)
    path = Path(path)
    jobs = jobs or os.cpu_count() or 1
    c0 = time.process_time()
    ex = EventExtractor(spec)
    if jobs <= 1:
        _init(spec.model_dump_json())
        for raw, codec in _documents(path, limit):
            ex.merge_state(_work(raw, codec))
        return finish_tables(ex, spec, {"read_and_extract": time.process_time() - c0})
    window = 2 * jobs
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             initializer=_init, initargs=(spec.model_dump_json(),)) as pool:
        pending = []
        for raw, codec in _documents(path, limit):
            pending.append(pool.submit(_work, raw, codec))
            if len(pending) >= window:            # bounded memory; merge in input order
                ex.merge_state(pending.pop(0).result())
        for f in pending:
            ex.merge_state(f.result())
    # parent CPU only: the workers' CPU time is not in this figure
    return finish_tables(ex, spec, {"read_and_merge_parent": time.process_time() - c0})
