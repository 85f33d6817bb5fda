"""Write and read the analysis tables: Parquet (pyarrow) with the metadata JSON beside.

Layout of an output folder::

    patients.parquet   patients.meta.json
    events.parquet     events.meta.json
    images.parquet     images.meta.json      (when an image table is given)
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mappings.tables import MappedTables

TABLES = ("patients", "events", "images")


def _write(df: pd.DataFrame, meta: dict, out: Path, name: str) -> list[Path]:
    pq, mj = out / f"{name}.parquet", out / f"{name}.meta.json"
    df.to_parquet(pq, engine="pyarrow", index=df.index.name is not None)
    mj.write_text(json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    return [pq, mj]


def write_tables(tables: MappedTables, out_dir: str | Path, images: pd.DataFrame | None = None,
                 image_meta: dict | None = None) -> list[Path]:
    """Write the tables of ``tables`` (and an optional image table) under ``out_dir``.

    Returns:
        The files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _write(tables.patients, tables.patient_meta, out, "patients")
    written += _write(tables.events, tables.event_meta, out, "events")
    if images is not None:
        if image_meta is None:
            from mappings.dicom import image_table_meta

            image_meta = image_table_meta(images)
        written += _write(images, image_meta, out, "images")
    return written


def read_table(out_dir: str | Path, name: str) -> tuple[pd.DataFrame, dict]:
    """One table and its metadata as written by :func:`write_tables`."""
    out = Path(out_dir)
    df = pd.read_parquet(out / f"{name}.parquet", engine="pyarrow")
    meta = json.loads((out / f"{name}.meta.json").read_text(encoding="utf-8"))
    return df, meta


def read_tables(out_dir: str | Path) -> MappedTables:
    """The patient and event tables of a folder written by :func:`write_tables`."""
    patients, pmeta = read_table(out_dir, "patients")
    events, emeta = read_table(out_dir, "events")
    return MappedTables(patients, events, pmeta, emeta)
