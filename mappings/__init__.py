"""synthport mappings: FHIR records and DICOM <-> analysis tables (see docs/mappings.md).

* :func:`map_records` - patient records -> patient table + event table (+ metadata);
* :func:`to_fhir_record` / :func:`tables_to_fhir` - table rows -> FHIR R4 records;
* :func:`image_table`, :func:`load_pixels`, :func:`row_to_dataset` - DICOM;
* :mod:`mappings.records` - group Bundles, Synthea folders and EHDS archives into records;
* :mod:`mappings.io` - Parquet + metadata JSON.

Imports only ``terminologies`` of synthport's own packages.
"""
from __future__ import annotations

from mappings.errors import MappingError, SpecError
from mappings.spec import MappingSpec, load_spec, parse_spec

__all__ = ["MappingError", "SpecError", "MappingSpec", "load_spec", "parse_spec", "map_records",
           "MappedTables", "to_fhir_record", "tables_to_fhir", "validate_record", "image_table",
           "load_pixels", "row_to_dataset", "iter_records", "records_from_bundle"]

_LAZY = {
    "map_records": "mappings.tables", "MappedTables": "mappings.tables",
    "to_fhir_record": "mappings.reverse", "tables_to_fhir": "mappings.reverse",
    "validate_record": "mappings.reverse",
    "image_table": "mappings.dicom", "load_pixels": "mappings.dicom",
    "row_to_dataset": "mappings.dicom",
    "iter_records": "mappings.records", "records_from_bundle": "mappings.records",
}


def __getattr__(name: str):
    # pandas/pydicom are imported only when a table function is first used.
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'mappings' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)
