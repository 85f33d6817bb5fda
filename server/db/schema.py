"""SQL schema of the real store (SQLAlchemy Core, same on SQLite and PostgreSQL).

Every version of every resource is one row of ``resource``; a newer version (or a
delete tombstone) sets ``superseded_by`` on the row it replaces. Index rows are
written once per stored version and never rewritten, so a search can be evaluated
"as of" a snapshot (the largest ``pk`` when its first page was computed): paging
stays stable while others write (see docs/adr/0003-snapshot-paging.md).

Index tables carry ``res_pk`` (the version row), ``res_type`` and ``param`` (the
search parameter code) plus typed value columns. The column order of each table
after those three is the tuple order produced by :mod:`server.fhir.extract`.
"""
from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Column, Float, Index, Integer, LargeBinary,
                        MetaData, String, Table, Text)

metadata = MetaData()

# SQLite only aliases rowid for a column declared exactly INTEGER PRIMARY KEY.
PK = BigInteger().with_variant(Integer, "sqlite")

resource = Table(
    "resource", metadata,
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("res_type", String(64), nullable=False),
    Column("res_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", Float, nullable=False),       # epoch seconds, UTC
    Column("deleted", Boolean, nullable=False, default=False),
    Column("method", String(8), nullable=False),         # POST / PUT / PATCH / DELETE
    Column("superseded_by", BigInteger, nullable=True),  # pk of the next version; NULL = current
    Column("body", LargeBinary, nullable=True),          # JSON bytes incl. meta; NULL when deleted
    Index("ux_resource_type_id_version", "res_type", "res_id", "version", unique=True),
    Index("ix_resource_updated", "last_updated"),
    Index("ix_resource_type_updated", "res_type", "last_updated"),
    Index("ix_resource_current", "res_type", "superseded_by", "deleted", "pk"),
)

# Column tuples (after res_pk, res_type, param) per index kind. Keep in step with extract.py.
INDEX_COLUMNS: dict[str, tuple[str, ...]] = {
    "string": ("value", "exact"),
    "token": ("system", "code", "text", "type_system", "type_code"),
    "date": ("low", "high"),
    "reference": ("target_type", "target_id", "url", "ident_system", "ident_value"),
    "quantity": ("value", "system", "code", "unit"),
    "number": ("value",),
    "uri": ("value",),
    "composite": ("c1_system", "c1_code", "num", "q_system", "q_code",
                  "c2_system", "c2_code", "low", "high", "text"),
}

_TYPES = {
    "value": String(512), "exact": String(512),
    "system": String(512), "code": String(512), "text": Text(), "type_system": String(512),
    "type_code": String(128),
    "low": Float, "high": Float,
    "target_type": String(64), "target_id": String(64), "url": String(1024),
    "ident_system": String(512), "ident_value": String(512),
    "unit": String(128), "num": Float,
    "c1_system": String(512), "c1_code": String(512), "q_system": String(512),
    "q_code": String(128), "c2_system": String(512), "c2_code": String(512),
}
_NUMERIC_VALUE = {"quantity", "number"}


def _index_table(kind: str, *indexes: tuple[str, ...]) -> Table:
    cols = []
    for name in INDEX_COLUMNS[kind]:
        typ = Float if (name == "value" and kind in _NUMERIC_VALUE) else _TYPES[name]
        if name == "value" and kind == "uri":
            typ = String(1024)
        cols.append(Column(name, typ, nullable=True))
    name = f"idx_{kind}"
    idx = [Index(f"ix_{name}_{'_'.join(c)}", *c) for c in indexes]
    return Table(name, metadata,
                 Column("res_pk", BigInteger, nullable=False),
                 Column("res_type", String(64), nullable=False),
                 Column("param", String(64), nullable=False),
                 *cols,
                 Index(f"ix_{name}_res_pk", "res_pk"),
                 *idx)


# Value indexes end in res_pk so they cover the lookup "which versions have this value".
idx_string = _index_table("string", ("res_type", "param", "value", "res_pk"))
idx_token = _index_table("token", ("res_type", "param", "code", "system", "res_pk"))
idx_date = _index_table("date", ("res_type", "param", "low", "res_pk"),
                        ("res_type", "param", "high", "res_pk"))
idx_reference = _index_table("reference", ("res_type", "param", "target_id", "target_type", "res_pk"),
                             ("target_id", "target_type", "res_pk"))
idx_quantity = _index_table("quantity", ("res_type", "param", "code", "value", "res_pk"))
idx_number = _index_table("number", ("res_type", "param", "value", "res_pk"))
idx_uri = _index_table("uri", ("res_type", "param", "value", "res_pk"))
idx_composite = _index_table("composite", ("res_type", "param", "c1_code", "res_pk"))

INDEX_TABLES: dict[str, Table] = {
    "string": idx_string, "token": idx_token, "date": idx_date, "reference": idx_reference,
    "quantity": idx_quantity, "number": idx_number, "uri": idx_uri, "composite": idx_composite,
}


# --------------------------------------------------------------------------- DICOM
# The DICOM store (server/dicom/store.py): one row per patient, study, series and
# instance; the Part 10 files live in the blob folder, never in SQL. Columns are the
# attributes QIDO-RS/C-FIND match on (PS3.18 Table 10.6.1-5, PS3.4 C.6) plus the counts
# that QIDO returns, so a search reads no file. Text matching keys have a normalised copy
# (``*_ci`` lower-cased, ``*_fold`` lower-cased without accents, ``*_tokens`` name
# components) because DICOM matching rules differ from SQL collations. Created by
# migration 0002.
UID = String(64)

dicom_patient = Table(
    "dicom_patient", metadata,
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("patient_id", String(64), nullable=False),         # "" when the header has none
    Column("issuer", Text, nullable=False, default=""),
    Column("patient_name", Text, nullable=False, default=""),
    Column("patient_name_ci", Text, nullable=False, default=""),
    Column("patient_name_fold", Text, nullable=False, default=""),
    Column("patient_name_tokens", Text, nullable=False, default=""),
    Column("birth_date", String(16), nullable=False, default=""),
    Column("sex", String(16), nullable=False, default=""),
    Column("fhir_id", String(64), nullable=True),               # linked FHIR Patient
    Column("updated", Float, nullable=False),
    Index("ux_dicom_patient_id", "patient_id", unique=True),
)

dicom_study = Table(
    "dicom_study", metadata,
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("study_uid", UID, nullable=False),
    Column("patient_pk", BigInteger, nullable=False),
    Column("study_date", String(16), nullable=False, default=""),
    Column("study_time", String(32), nullable=False, default=""),
    Column("study_time_key", String(16), nullable=False, default=""),  # HHMMSS.ffffff
    Column("accession_number", String(64), nullable=False, default=""),
    Column("study_id", String(64), nullable=False, default=""),
    Column("study_description", Text, nullable=False, default=""),
    Column("referring_physician", Text, nullable=False, default=""),
    Column("referring_physician_ci", Text, nullable=False, default=""),
    Column("timezone_offset", String(16), nullable=False, default=""),
    Column("modalities", String(256), nullable=False, default=""),     # "CT\\SR"
    Column("num_series", Integer, nullable=False, default=0),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("fhir_id", String(64), nullable=True),                       # linked ImagingStudy
    # Instances stored since the ImagingStudy was last written (C-STORE links once per
    # association, see DicomStore.link_pending); migration 0004.
    Column("fhir_pending", Boolean, nullable=False, default=False),
    Column("updated", Float, nullable=False),
    Index("ux_dicom_study_uid", "study_uid", unique=True),
    Index("ix_dicom_study_pending", "fhir_pending"),
    Index("ix_dicom_study_patient", "patient_pk"),
    Index("ix_dicom_study_date", "study_date", "study_time_key"),
    Index("ix_dicom_study_accession", "accession_number"),
)

dicom_series = Table(
    "dicom_series", metadata,
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("series_uid", UID, nullable=False),
    Column("study_pk", BigInteger, nullable=False),
    Column("modality", String(16), nullable=False, default=""),
    Column("series_number", Integer, nullable=True),
    Column("series_description", Text, nullable=False, default=""),
    Column("body_part", String(64), nullable=False, default=""),
    Column("laterality", String(16), nullable=False, default=""),
    Column("series_date", String(16), nullable=False, default=""),
    Column("series_time", String(32), nullable=False, default=""),
    Column("pps_start_date", String(16), nullable=False, default=""),
    Column("pps_start_time", String(32), nullable=False, default=""),
    Column("pps_start_time_key", String(16), nullable=False, default=""),
    Column("sps_id", String(64), nullable=False, default=""),           # RequestAttributeSequence[0]
    Column("requested_procedure_id", String(64), nullable=False, default=""),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("updated", Float, nullable=False),
    Index("ux_dicom_series_uid", "series_uid", unique=True),
    Index("ix_dicom_series_study", "study_pk", "series_number"),
    Index("ix_dicom_series_modality", "modality", "study_pk"),
)

dicom_instance = Table(
    "dicom_instance", metadata,
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("sop_uid", UID, nullable=False),
    Column("series_pk", BigInteger, nullable=False),
    Column("study_pk", BigInteger, nullable=False),
    Column("sop_class_uid", UID, nullable=False),
    Column("instance_number", Integer, nullable=True),
    Column("transfer_syntax_uid", UID, nullable=False),
    Column("blob_key", String(64), nullable=False),          # sha256(SOPInstanceUID), hex
    Column("size", BigInteger, nullable=False),
    Column("pixel_rows", Integer, nullable=True),
    Column("pixel_columns", Integer, nullable=True),
    Column("bits_allocated", Integer, nullable=True),
    Column("number_of_frames", Integer, nullable=True),
    Column("metadata", LargeBinary, nullable=False),         # DICOM JSON (PS3.18 F.2), no bulk data
    Column("updated", Float, nullable=False),
    Index("ux_dicom_instance_uid", "sop_uid", unique=True),
    Index("ix_dicom_instance_series", "series_pk", "instance_number"),
    Index("ix_dicom_instance_study", "study_pk"),
    Index("ix_dicom_instance_class", "sop_class_uid"),
)

DICOM_TABLES = ("dicom_patient", "dicom_study", "dicom_series", "dicom_instance")


# --------------------------------------------------------------------------- terminology
# Bulk concept storage for large imported code systems (server/terminology/, migration
# 0003, docs/adr/0005-terminology-storage.md). The CodeSystem resource itself stays in
# ``resource`` (``content: not-present``); these rows hold its concepts and is-a edges,
# keyed by the code system row so (system, code) lookups are one index probe. Small
# CodeSystems POSTed with inline concepts have no rows here.
term_codesystem = Table(
    "term_codesystem", metadata,
    Column("pk", PK, primary_key=True, autoincrement=True),
    Column("url", String(512), nullable=False),
    Column("version", String(128), nullable=False, default=""),   # "" = no version
    Column("res_id", String(64), nullable=False),                 # the CodeSystem resource
    Column("name", String(256), nullable=False, default=""),
    Column("content", String(16), nullable=False, default="complete"),  # of the import
    Column("concept_count", Integer, nullable=False, default=0),
    Column("updated", Float, nullable=False),                     # epoch s; cache generation
    Index("ux_term_codesystem_url_version", "url", "version", unique=True),
)

term_concept = Table(
    "term_concept", metadata,
    Column("cs_pk", BigInteger, nullable=False),
    Column("code", String(256), nullable=False),
    Column("seq", Integer, nullable=False),          # source order (expansions list in it)
    Column("display", Text, nullable=True),
    Column("inactive", Boolean, nullable=False, default=False),
    Column("data", LargeBinary, nullable=True),    # JSON: {"designations": [...], "properties": [...]}
    Index("ux_term_concept_cs_code", "cs_pk", "code", unique=True),
)

term_parent = Table(
    "term_parent", metadata,
    Column("cs_pk", BigInteger, nullable=False),
    Column("child", String(256), nullable=False),
    Column("parent", String(256), nullable=False),
    Index("ix_term_parent_child", "cs_pk", "child", "parent"),
    Index("ix_term_parent_parent", "cs_pk", "parent", "child"),
)

TERMINOLOGY_TABLES = ("term_codesystem", "term_concept", "term_parent")
