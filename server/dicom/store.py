"""The real DICOM source: Part 10 files in a blob folder, their index in SQL, linked to FHIR.

Layout:

* files: ``<data_dir>/dicom/<2 hex>/<sha256(SOPInstanceUID)>.dcm``. No path is ever
  built from a tag value (only from the hash), a file is written to a temporary name
  in its final folder and moved into place with ``os.replace``, so readers see the old
  or the new file, never half of one.
* SQL (``server/db/schema.py``, migration 0002): ``dicom_patient``, ``dicom_study``,
  ``dicom_series``, ``dicom_instance`` with the matching keys as indexed columns, the
  counts QIDO returns, and each instance's DICOM JSON (no bulk data), so QIDO-RS,
  C-FIND and WADO-RS ``/metadata`` never read a file.
* FHIR: in the same SQL transaction as the DICOM rows, the Patient (matched by
  identifier, created from the header when absent) and exactly one ImagingStudy per
  study (rewritten from the rows) plus one DICOMweb Endpoint (see
  :mod:`server.dicom.fhirlink`). An ImagingStudy loaded through FHIR without files
  stays FHIR-only: QIDO lists studies with stored instances only.

Concurrency: a store takes the FHIR conditional-write locks of its Patient and
ImagingStudy criteria (SQLite: the database write lock at BEGIN IMMEDIATE;
PostgreSQL: transaction-scoped advisory locks), so the same study arriving on two
connections, or a FHIR conditional create of the same Patient, cannot duplicate rows.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import io
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import orjson
from pydicom import Dataset, config as pydicom_config, dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from sqlalchemy import bindparam, exists, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from server.db import schema as S
from server.db.engine import begin_write, is_sqlite
from server.dicom import attributes as A
from server.dicom import fhirlink
from server.dicom.dicomjson import from_stored, json_text, stored_json_obj
from server.fhir.extract import extract
from server.fhir.ids import new_id
from server.dicom.matching import (IS_MAX, Criterion, fold, name_tokens, parse, sql_condition,
                                   time_key)
from server.dicom.source import LEVELS, FindResult, InstanceRef, StoreOutcome
from server.errors import (InsufficientStorage, InstanceRefused, InvalidRequest, InvalidResource,
                           NotFound, SopClassMismatch)
from server.source import RequestContext
from server.store import PendingWrite, SqlStore, strip_meta

log = logging.getLogger("synthport.dicom")

P, ST, SE, I = S.dicom_patient, S.dicom_study, S.dicom_series, S.dicom_instance
_BLOB_RE = re.compile(r"^[0-9a-f]{64}$")
_EXECUTABLE_PREAMBLES = (b"MZ", b"\x7fELF")
_NO_VALIDATION = pydicom_config.IGNORE

# Where each matching key lives: (table, column) and, for person names, the
# lower-cased / folded / token columns.
_COLUMNS: dict[str, tuple[Any, str]] = {
    "PatientID": (P, "patient_id"), "IssuerOfPatientID": (P, "issuer"),
    "PatientName": (P, "patient_name"), "PatientBirthDate": (P, "birth_date"),
    "PatientSex": (P, "sex"),
    "StudyInstanceUID": (ST, "study_uid"), "StudyDate": (ST, "study_date"),
    "StudyTime": (ST, "study_time_key"), "AccessionNumber": (ST, "accession_number"),
    "StudyID": (ST, "study_id"), "StudyDescription": (ST, "study_description"),
    "ReferringPhysicianName": (ST, "referring_physician"), "ModalitiesInStudy": (ST, "modalities"),
    "SeriesInstanceUID": (SE, "series_uid"), "Modality": (SE, "modality"),
    "SeriesNumber": (SE, "series_number"), "SeriesDescription": (SE, "series_description"),
    "BodyPartExamined": (SE, "body_part"), "Laterality": (SE, "laterality"),
    "SeriesDate": (SE, "series_date"),
    "PerformedProcedureStepStartDate": (SE, "pps_start_date"),
    "PerformedProcedureStepStartTime": (SE, "pps_start_time_key"),
    "RequestAttributesSequence.ScheduledProcedureStepID": (SE, "sps_id"),
    "RequestAttributesSequence.RequestedProcedureID": (SE, "requested_procedure_id"),
    "SOPInstanceUID": (I, "sop_uid"), "SOPClassUID": (I, "sop_class_uid"),
    "InstanceNumber": (I, "instance_number"), "Rows": (I, "pixel_rows"),
    "Columns": (I, "pixel_columns"), "BitsAllocated": (I, "bits_allocated"),
    "NumberOfFrames": (I, "number_of_frames"),
}
_PN_COLUMNS = {"PatientName": ("patient_name_ci", "patient_name_fold", "patient_name_tokens"),
               "ReferringPhysicianName": ("referring_physician_ci", None, None)}
_FUZZY_KEYS = frozenset({"PatientName"})

# Return attributes read from columns: keyword -> (table, column).
_RETURN_COLUMNS: dict[str, tuple[Any, str]] = {
    **{k: v for k, v in _COLUMNS.items() if "." not in k},
    "StudyTime": (ST, "study_time"), "SeriesTime": (SE, "series_time"),
    "PerformedProcedureStepStartTime": (SE, "pps_start_time"),
    "TimezoneOffsetFromUTC": (ST, "timezone_offset"),
    "NumberOfStudyRelatedSeries": (ST, "num_series"),
    "NumberOfStudyRelatedInstances": (ST, "num_instances"),
    "NumberOfSeriesRelatedInstances": (SE, "num_instances"),
    "AvailableTransferSyntaxUID": (I, "transfer_syntax_uid"),
}
_TABLE_LEVEL = {P: "PATIENT", ST: "STUDY", SE: "SERIES", I: "IMAGE"}
_LEVEL_TABLE = {v: k for k, v in _TABLE_LEVEL.items()}
_CONSTANTS = {"SpecificCharacterSet": "ISO_IR 192", "InstanceAvailability": "ONLINE"}
_PATIENT_COUNTS = A.COUNTS["PATIENT"]
# Keyword -> DICOM JSON key (8 hex digits) of the attributes parse_instance reads.
_TAG_HEX = {kw: f"{tag_for_keyword(kw):08X}" for kw in (
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "ReferringPhysicianName", "StudyTime", "StudyDate", "AccessionNumber", "StudyID",
    "StudyDescription", "TimezoneOffsetFromUTC", "RequestAttributesSequence",
    "ScheduledProcedureStepID", "RequestedProcedureID", "PerformedProcedureStepStartTime",
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "Laterality",
    "SeriesDate", "SeriesTime", "PerformedProcedureStepStartDate", "InstanceNumber", "Rows",
    "Columns", "BitsAllocated", "NumberOfFrames")}


# --------------------------------------------------------------------------- parsing
@dataclass
class ParsedInstance:
    """Everything the store needs from one instance, read once before any lock."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    patient: dict
    study: dict
    series: dict
    instance: dict
    metadata: bytes
    warnings: list[str] = field(default_factory=list)


def _text(ds: Dataset, keyword: str) -> str:
    """A string value (first value of a multi-valued one), stripped; "" when absent."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - malformed value
        return ""
    if value is None:
        return ""
    value = getattr(value, "value", value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return str(value).strip().strip("\x00").strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    return _int_of(_text(ds, keyword))


def _int_of(text: str) -> int | None:
    try:
        n = int(float(text)) if text else None
    except ValueError:
        return None
    return n if n is None or -IS_MAX <= n <= IS_MAX else None


def _clip(value: str, n: int) -> str:
    return value[:n]


def _raw_text(ds: Dataset, keyword: str) -> str:
    """:func:`_text` of a UID element, from its bytes as read while pydicom has not
    converted it: the conversion (value validation, a ``UID`` object) cost about 15 us
    an element, six per stored instance. UIDs are ASCII in every character set
    (PS3.5 §9.1), so no decoding rule is skipped; what is not a UID fails ``A.is_uid``."""
    try:
        elem = ds.get_item(_KEYWORD_TAG[keyword])
    except Exception:  # noqa: BLE001 - malformed value
        return ""
    if type(elem) is RawDataElement and elem.value is not None:
        return elem.value.split(b"\\", 1)[0].decode("ascii", "replace").strip().strip("\x00").strip()
    return _text(ds, keyword)


_KEYWORD_TAG = {k: tag_for_keyword(k) for k in (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID",
    "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")}


def _check_complete(ds: Dataset, size: int) -> None:
    """Refuse a file cut short: pydicom reads what is there without complaint, so a
    transfer that stopped inside an element would be stored as if whole.

    The last top-level element must end where the file ends (PS3.10 §7.1: the file
    holds the data set and nothing after it). A last element that pydicom already read
    as a sequence carries no offsets and is not checked; a file cut exactly between two
    elements is a whole, shorter data set, which no reader can tell from one sent so.

    Raises:
        InvalidResource: the last element's value is shorter than its length, or bytes
            follow it (an element header cut short).
    """
    if not ds._dict:
        return
    tag = max(ds._dict)
    raw = ds._dict[tag]
    if type(raw) is not RawDataElement or raw.value is None or raw.value_tell is None:
        return
    where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    if raw.length == 0xFFFFFFFF:
        # PS3.5 §7.5.2: an undefined length ends with an 8-byte Sequence Delimitation Item
        end = raw.value_tell + len(raw.value) + 8
    elif len(raw.value) < raw.length:
        raise InvalidResource(f"The file ends inside element {where}: {len(raw.value)} of its "
                              f"{raw.length} bytes are there (a transfer cut short?)")
    else:
        end = raw.value_tell + raw.length
    if end > size:
        raise InvalidResource(f"The file ends inside element {where} (its sequence "
                              "delimiter is missing: a transfer cut short?)")
    if end < size:
        raise InvalidResource(f"{size - end} byte(s) follow the last element {where}: not a "
                              "whole element (a file cut short inside an element header?)")


def _uid(ds: Dataset, keyword: str, what: str) -> str:
    value = _raw_text(ds, keyword)
    if not value:
        raise InvalidResource(f"The instance has no {what} ({keyword})")
    if not A.is_uid(value):
        raise InvalidResource(f"{keyword} '{value[:80]}' is not a valid UID")
    return value


@functools.lru_cache(maxsize=None)
def _stmt(kind: str, table=None, key: Any = None):
    """The statements of the one-instance write path (C-STORE), built once with bound
    parameters: building them per instance (SQLAlchemy's construction, coercion and
    cache key) cost about as much as running them on SQLite."""
    if kind == "old_instance":
        return (select(I.c.pk, I.c.series_pk, I.c.study_pk, I.c.sop_class_uid)
                .where(I.c.sop_uid == bindparam("b_uid")))
    if kind == "hierarchy":       # key: the columns wanted of (series, study, patient)
        cols = [t.c[name].label(f"{prefix}{name}") for t, prefix, names in
                zip((SE, ST, P), ("se_", "st_", "p_"), key) for name in ("pk", *names)]
        return (select(*cols)
                .select_from(SE.join(ST, ST.c.pk == SE.c.study_pk).join(P, P.c.pk == ST.c.patient_pk))
                .where(SE.c.series_uid == bindparam("b_key")))
    if kind == "row_by":
        return select(table).where(table.c[key] == bindparam("b_key"))
    if kind == "insert":
        return insert(table)
    if kind == "insert_pk":
        return insert(table).returning(table.c.pk)
    if kind == "add_series":
        return (update(SE).where(SE.c.pk == bindparam("b_pk"))
                .values(num_instances=SE.c.num_instances + bindparam("b_k")))
    if kind == "add_study":
        return (update(ST).where(ST.c.pk == bindparam("b_pk"))
                .values(num_instances=ST.c.num_instances + bindparam("b_k"),
                        updated=bindparam("b_now"), fhir_pending=bindparam("b_pending")))
    raise ValueError(kind)


def parse_instance(data: bytes) -> ParsedInstance:
    """Validate a Part 10 file and extract what the SQL rows and FHIR need.

    Raises:
        InstanceRefused: executable preamble.
        InvalidResource: not a DICOM file, or required UIDs missing or invalid.
        SopClassMismatch: file meta and data set disagree on SOP class or instance.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InvalidResource("Not a DICOM PS3.10 file (no 128-byte preamble and 'DICM' prefix)")
    if data[:2] == _EXECUTABLE_PREAMBLES[0] or data[:4] == _EXECUTABLE_PREAMBLES[1]:
        raise InstanceRefused("Refused: the file preamble holds an executable header "
                              "(PS3.10 §7.5 security; re-send with a zeroed preamble)")
    try:
        ds = dcmread(io.BytesIO(data))
    except (InvalidDicomError, Exception) as exc:  # noqa: BLE001 - any parse failure
        raise InvalidResource(f"Cannot parse the DICOM file: {type(exc).__name__}: {exc}") from None
    _check_complete(ds, len(data))
    meta = ds.file_meta
    ts = str(meta.get("TransferSyntaxUID", "") or "").strip()
    if not ts:
        raise InvalidResource("The file meta information has no Transfer Syntax UID")
    sop_uid = _uid(ds, "SOPInstanceUID", "SOP Instance UID")
    sop_class = _uid(ds, "SOPClassUID", "SOP Class UID")
    meta_class = _raw_text(meta, "MediaStorageSOPClassUID")
    meta_inst = _raw_text(meta, "MediaStorageSOPInstanceUID")
    if meta_class and meta_class != sop_class:
        raise SopClassMismatch(f"Media Storage SOP Class UID {meta_class} differs from the data "
                               f"set's SOP Class UID {sop_class}")
    if meta_inst and meta_inst != sop_uid:
        raise SopClassMismatch(f"Media Storage SOP Instance UID {meta_inst} differs from the data "
                               f"set's SOP Instance UID {sop_uid}")
    study_uid = _uid(ds, "StudyInstanceUID", "Study Instance UID")
    series_uid = _uid(ds, "SeriesInstanceUID", "Series Instance UID")
    # First, while most elements are still as read: the JSON of values repeated from
    # earlier instances comes from a cache (see dicomjson.to_json), without conversion.
    # The row values are then read from that JSON, not from the dataset (converting
    # each element again cost about a fifth of the parse).
    obj = stored_json_obj(ds, study_uid, series_uid, sop_uid)
    metadata = orjson.dumps(obj)
    warnings: list[str] = []

    def text(keyword: str) -> str:
        return json_text(obj, _TAG_HEX[keyword])

    def num(keyword: str) -> int | None:
        return _int_of(text(keyword))

    pid = text("PatientID")
    if len(pid) > 64:
        raise InvalidResource("PatientID longer than 64 characters")
    name = text("PatientName")
    patient = {"patient_id": pid, "issuer": text("IssuerOfPatientID"),
               "patient_name": name, "patient_name_ci": name.lower(),
               "patient_name_fold": fold(name), "patient_name_tokens": name_tokens(name),
               "birth_date": _clip(text("PatientBirthDate"), 16),
               "sex": _clip(text("PatientSex"), 16)}
    ref = text("ReferringPhysicianName")
    st_time = _clip(text("StudyTime"), 32)
    study = {"study_uid": study_uid, "study_date": _clip(text("StudyDate"), 16),
             "study_time": st_time, "study_time_key": time_key(st_time),
             "accession_number": _clip(text("AccessionNumber"), 64),
             "study_id": _clip(text("StudyID"), 64),
             "study_description": text("StudyDescription"),
             "referring_physician": ref, "referring_physician_ci": ref.lower(),
             "timezone_offset": _clip(text("TimezoneOffsetFromUTC"), 16)}
    sps_id = rp_id = ""
    ras = (obj.get(_TAG_HEX["RequestAttributesSequence"]) or {}).get("Value")
    if ras and isinstance(ras[0], dict):
        sps_id = _clip(json_text(ras[0], _TAG_HEX["ScheduledProcedureStepID"]), 64)
        rp_id = _clip(json_text(ras[0], _TAG_HEX["RequestedProcedureID"]), 64)
    pps_time = _clip(text("PerformedProcedureStepStartTime"), 32)
    series = {"series_uid": series_uid, "modality": _clip(text("Modality"), 16),
              "series_number": num("SeriesNumber"),
              "series_description": text("SeriesDescription"),
              "body_part": _clip(text("BodyPartExamined"), 64),
              "laterality": _clip(text("Laterality"), 16),
              "series_date": _clip(text("SeriesDate"), 16),
              "series_time": _clip(text("SeriesTime"), 32),
              "pps_start_date": _clip(text("PerformedProcedureStepStartDate"), 16),
              "pps_start_time": pps_time, "pps_start_time_key": time_key(pps_time),
              "sps_id": sps_id, "requested_procedure_id": rp_id}
    instance = {"sop_uid": sop_uid, "sop_class_uid": sop_class,
                "instance_number": num("InstanceNumber"), "transfer_syntax_uid": ts,
                "size": len(data), "pixel_rows": num("Rows"),
                "pixel_columns": num("Columns"), "bits_allocated": num("BitsAllocated"),
                "number_of_frames": num("NumberOfFrames")}
    return ParsedInstance(sop_uid, sop_class, study_uid, series_uid, ts, patient, study, series,
                          instance, metadata, warnings)


def blob_key(sop_uid: str) -> str:
    """The file name stem of an instance: sha256 of its SOP Instance UID (hex)."""
    return hashlib.sha256(sop_uid.encode("utf-8")).hexdigest()


def _escape(value: str) -> str:
    """Escape a value for a FHIR search parameter (``\\``, ``,``, ``|``, ``$``)."""
    for ch in ("\\", ",", "|", "$"):
        value = value.replace(ch, "\\" + ch)
    return value


def _token(system: str, value: str) -> str:
    """A FHIR token search value ``system|value`` with both parts escaped."""
    return f"{_escape(system)}|{_escape(value)}"


# --------------------------------------------------------------------------- the store
class DicomStore:
    """SQL + blob implementation of :class:`server.dicom.source.DicomSource` (real data).

    Args:
        sql_store: the FHIR store (its engine holds the DICOM tables too).
        config: resolved settings (``data_dir``, ``ae_title``, ``dicom_patient_id_system``,
            ``dicom_timezone``, ``public_base_url``, ``http_port``).
    """

    name = "real"
    writable = True

    def __init__(self, sql_store: SqlStore, config: Mapping[str, Any] | None = None):
        cfg = dict(config or {})
        self.sql = sql_store
        self.engine = sql_store.engine
        self.sqlite = is_sqlite(self.engine)
        self.ae_title = str(cfg.get("ae_title") or "SYNTHPORT").strip()
        self.blob_root = Path(cfg.get("data_dir") or "./synthport-data").resolve() / "dicom"
        self.patient_system = str(cfg.get("dicom_patient_id_system") or "urn:synthport:dicom:patient-id")
        self.default_tz = _fhir_tz(str(cfg.get("dicom_timezone") or "Z"))
        self.public_base_url = str(cfg.get("public_base_url") or "").rstrip("/")
        self.http_port = cfg.get("http_port") or 8080
        self._endpoint_known: str | None = None

    # ------------------------------------------------------------------ files
    def blob_path(self, key: str) -> Path:
        """Path of a blob from its hex key (never from a tag value)."""
        if not _BLOB_RE.match(key):
            raise ValueError("invalid blob key")
        return self.blob_root / key[:2] / f"{key}.dcm"

    def _write_temp(self, key: str, data: bytes) -> tuple[Path, Path]:
        final = self.blob_path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".tmp", dir=final.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage("Out of disk space for DICOM files") from None
            raise
        return Path(tmp), final

    # ------------------------------------------------------------------ writes
    def store_instance(self, ctx: RequestContext, data: bytes, *,
                       defer_link: bool = False) -> StoreOutcome:
        """Store one Part 10 file (see :meth:`DicomSource.store_instance`).

        Args:
            defer_link: mark the study as pending instead of writing its ImagingStudy
                now (see :class:`server.dicom.source.DeferredLinkSource`); the caller
                must call :meth:`link_pending` later.
        """
        parsed = parse_instance(bytes(data))
        return self._store_parsed(ctx, parsed, data, defer_link)

    def _store_parsed(self, ctx: RequestContext, parsed: ParsedInstance, data: bytes,
                      defer_link: bool = False) -> StoreOutcome:
        tmp, final = self._write_temp(blob_key(parsed.sop_uid), data)
        try:
            for attempt in range(3):
                try:
                    replaced = self._store_rows(ctx, [(parsed, tmp, final)], defer_link)[0]
                    break
                except (IntegrityError, OperationalError) as exc:
                    # A concurrent first store of the same patient/series on PostgreSQL
                    # (unique keys), or a deadlock victim: the retry sees the other's rows.
                    if attempt == 2:
                        raise
                    log.info("retrying store of %s after %s", parsed.sop_uid, type(exc).__name__)
        finally:
            if tmp.exists():
                tmp.unlink(missing_ok=True)
        return _outcome(parsed, replaced)

    def store_many(self, ctx: RequestContext, items: list[bytes]) -> list[StoreOutcome | Exception]:
        """Store several Part 10 files (see :class:`server.dicom.source.BatchStoreSource`).

        Every part is parsed and validated first (a part that fails gets its error at
        its place in the result, the others go on). The good ones are written in ONE
        SQL transaction: their DICOM rows, then each affected study's Patient and
        ImagingStudy once (one ImagingStudy version per study per call). When that
        transaction fails, the good parts are stored one by one with the single-instance
        path, so each gets its own outcome or reason.

        Files: as in :meth:`store_instance`, each is written to a temporary name first
        and moved into place with ``os.replace`` just before the commit; a commit that
        fails after the moves may leave a blob file whose row never committed (an
        orphan, or the new bytes of an instance whose old row stays: the same window
        :meth:`store_instance` has). The per-instance fallback rewrites them.

        Returns:
            One entry per item, in order: a :class:`StoreOutcome`, or the exception
            (a :class:`server.errors.SynthportError`, or another exception for an
            unexpected failure) that refused it.
        """
        results: list[StoreOutcome | Exception | None] = [None] * len(items)
        good: list[tuple[int, ParsedInstance, bytes]] = []
        for i, data in enumerate(items):
            try:
                good.append((i, parse_instance(bytes(data)), data))
            except Exception as exc:  # noqa: BLE001 - one bad part never fails the others
                results[i] = exc
        staged: list[tuple[int, ParsedInstance, bytes, Path, Path]] = []
        try:
            for i, parsed, data in good:
                try:
                    tmp, final = self._write_temp(blob_key(parsed.sop_uid), data)
                except Exception as exc:  # noqa: BLE001
                    results[i] = exc
                    continue
                staged.append((i, parsed, data, tmp, final))
            if len(staged) > 1:
                try:
                    replaced = self._store_rows(ctx, [(p, t, f) for _, p, _, t, f in staged])
                except Exception as exc:  # noqa: BLE001 - reported per instance below
                    log.info("batch store of %d instances failed (%s: %s); storing one by one",
                             len(staged), type(exc).__name__, exc)
                else:
                    for (i, parsed, *_), rep in zip(staged, replaced):
                        results[i] = _outcome(parsed, rep)
                    staged = []
        finally:
            for *_, tmp, _final in staged:
                if tmp.exists():
                    tmp.unlink(missing_ok=True)
        for i, parsed, data, _tmp, _final in staged:
            try:
                results[i] = self._store_parsed(ctx, parsed, data)
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
        return results  # type: ignore[return-value]

    def _store_rows(self, ctx: RequestContext, batch: list[tuple[ParsedInstance, Path, Path]],
                    defer_link: bool = False) -> list[bool]:
        """Write the rows of ``batch`` (parsed, temp file, final path), refresh the counts
        and link each affected study to FHIR once (or, with ``defer_link``, mark it
        pending), all in one transaction; move the files into place just before the
        commit. Returns, per item, whether it replaced a stored instance."""
        now = time.time()
        conn = begin_write(self.engine)
        try:
            with conn.begin():
                # Locks in one global order (every Patient key, then every study key,
                # sorted) so that concurrent batches cannot deadlock.
                pkeys = {_token(*fhirlink.patient_identifier(
                    self.patient_system, p.patient["patient_id"], p.study_uid)) for p, _, _ in batch}
                skeys = {_token(fhirlink.STUDY_UID_SYSTEM, f"urn:oid:{p.study_uid}")
                         for p, _, _ in batch}
                for key in sorted(pkeys):
                    self.sql.lock_condition(conn, f"Patient?identifier={key}")
                for key in sorted(skeys):
                    self.sql.lock_condition(conn, f"ImagingStudy?identifier={key}")
                replaced: list[bool] = []
                created_series = False
                left: list[int] = []      # studies a stored series moved out of
                new_per_series: dict[int, int] = {}
                new_per_study: dict[int, int] = {}
                series_pks: set[int] = set()
                study_pks: list[int] = []
                # study pk -> the instances new to it, or None: rebuild from the rows
                added: dict[int, list[dict] | None] = {}
                rows = self._instance_rows_many(conn, [p for p, _, _ in batch], now)
                for (parsed, _tmp, _final), (old, series_pk, study_pk, new_series,
                                             moved_from) in zip(batch, rows):
                    created_series |= new_series
                    replaced.append(old is not None)
                    if moved_from is not None:
                        # The series was filed under another study: both studies' counts
                        # and ImagingStudy are rebuilt from the rows.
                        left.append(moved_from)
                        for pk in (moved_from, study_pk):
                            if pk not in study_pks:
                                study_pks.append(pk)
                            added[pk] = None
                    if old is None:
                        new_per_series[series_pk] = new_per_series.get(series_pk, 0) + 1
                        new_per_study[study_pk] = new_per_study.get(study_pk, 0) + 1
                    series_pks.add(series_pk)
                    pks = [study_pk]
                    if old is not None:
                        series_pks.add(old.series_pk)
                        if old.study_pk != study_pk:
                            pks.append(old.study_pk)   # the instance moved to another study
                    for pk in pks:
                        if pk not in study_pks:
                            study_pks.append(pk)
                            added[pk] = []
                        if old is not None or moved_from is not None:
                            added[pk] = None
                        elif added[pk] is not None:
                            added[pk].append({"series_pk": series_pk, "sop_uid": parsed.sop_uid,
                                              "sop_class_uid": parsed.sop_class_uid,
                                              "instance_number": parsed.instance["instance_number"]})
                if any(replaced) or created_series or left:
                    self._refresh_counts(conn, series_pks, study_pks, now, pending=defer_link)
                else:
                    # Only new instances in existing series: the counts move by what
                    # was added (no COUNT over the study, the common C-STORE case).
                    self._add_counts(conn, new_per_series, new_per_study, now, defer_link)
                if not defer_link:
                    for pk in study_pks:
                        self._link_fhir(conn, ctx, pk, added[pk])
                else:
                    # A deferring caller links the studies it stored into (their UIDs are
                    # in its outcomes), not one a series left: link that one now.
                    for pk in dict.fromkeys(left):
                        self._link_fhir(conn, ctx, pk, None)
                        conn.execute(update(ST).where(ST.c.pk == pk).values(fhir_pending=False))
                for _parsed, tmp, final in batch:
                    if tmp.exists():      # not yet moved by an attempt whose commit failed
                        os.replace(tmp, final)
        finally:
            conn.close()
        return replaced

    def _instance_rows(self, conn, parsed: ParsedInstance, now: float):
        """Upsert the patient, study, series and instance rows of one instance (the
        caller holds its locks). Returns (the previous instance row or None, series pk,
        study pk, whether the series row was created, the pk of the study the series
        was filed under before when this instance moved it, else None)."""
        old = conn.execute(_stmt("old_instance"), {"b_uid": parsed.sop_uid}).first()
        if old is not None and old.sop_class_uid != parsed.sop_class_uid:
            raise SopClassMismatch(
                f"SOP Instance {parsed.sop_uid} is stored with SOP Class {old.sop_class_uid}, "
                f"not {parsed.sop_class_uid}")
        # The usual case, an instance of a series already stored: its series, study and
        # patient rows in one statement instead of three (the same rows _upsert finds:
        # each key is unique).
        wanted = ((*parsed.series, "study_pk"), (*parsed.study, "patient_pk"), tuple(parsed.patient))
        known = conn.execute(_stmt("hierarchy", None, wanted),
                             {"b_key": parsed.series_uid}).mappings().first()
        if (known is not None and known["st_study_uid"] == parsed.study_uid
                and known["p_patient_id"] == parsed.patient["patient_id"]):
            patient_pk = self._update_changed(conn, P, known, parsed.patient, now, "p_")
            study_pk = self._update_changed(conn, ST, known,
                                            {**parsed.study, "patient_pk": patient_pk}, now, "st_")
            series_pk = self._update_changed(conn, SE, known,
                                             {**parsed.series, "study_pk": study_pk}, now, "se_")
            new_series, moved_from = False, None
        else:
            patient_pk, _ = self._upsert(conn, P, "patient_id", parsed.patient, now)
            study_pk, _ = self._upsert(conn, ST, "study_uid",
                                       {**parsed.study, "patient_pk": patient_pk}, now)
            series_pk, new_series = self._upsert(conn, SE, "series_uid",
                                                 {**parsed.series, "study_pk": study_pk}, now)
            moved_from = self._moved_series(conn, series_pk, study_pk, known and known["se_study_pk"])
        row = {**parsed.instance, "series_pk": series_pk, "study_pk": study_pk,
               "blob_key": blob_key(parsed.sop_uid), "metadata": parsed.metadata}
        if old is None:
            conn.execute(_stmt("insert", I), {**row, "updated": now})
        else:
            conn.execute(update(I).where(I.c.pk == old.pk).values(**row, updated=now))
        return old, series_pk, study_pk, new_series, moved_from

    @staticmethod
    def _moved_series(conn, series_pk: int, study_pk: int, before: int | None) -> int | None:
        """When an instance filed its (stored) series under another study, move the
        series' other instances with it (their ``study_pk``); returns the study it left."""
        if before is None or before == study_pk:
            return None
        conn.execute(update(I).where(I.c.series_pk == series_pk).values(study_pk=study_pk))
        return before

    def _instance_rows_many(self, conn, batch: list[ParsedInstance], now: float) -> list[tuple]:
        """:meth:`_instance_rows` for several instances with a few statements: one read of
        the stored instances, one upsert per distinct patient, study and series (the
        values of the latest instance that has them win, as when stored one by one),
        one multi-row insert of the new instances. Same result, per instance, as
        calling :meth:`_instance_rows` in order."""
        uids = [p.sop_uid for p in batch]
        series_uids = {p.series_uid for p in batch}
        if (len(batch) < 2 or len(set(uids)) != len(uids)
                or len({(p.series_uid, p.study_uid) for p in batch}) != len(series_uids)):
            # One instance, or a SOP Instance UID twice in one request (the second
            # replaces the first), or a series under two studies (the later one moves
            # it, with the earlier instances): only the one-by-one path sees the order.
            return [self._instance_rows(conn, p, now) for p in batch]
        olds = {}
        for i in range(0, len(uids), 500):
            for r in conn.execute(select(I.c.pk, I.c.sop_uid, I.c.series_pk, I.c.study_pk,
                                         I.c.sop_class_uid).where(I.c.sop_uid.in_(uids[i:i + 500]))):
                olds[r.sop_uid] = r
        for p in batch:
            old = olds.get(p.sop_uid)
            if old is not None and old.sop_class_uid != p.sop_class_uid:
                raise SopClassMismatch(
                    f"SOP Instance {p.sop_uid} is stored with SOP Class {old.sop_class_uid}, "
                    f"not {p.sop_class_uid}")
        series_study = {r.series_uid: r.study_pk for r in conn.execute(
            select(SE.c.series_uid, SE.c.study_pk).where(
                SE.c.series_uid.in_(sorted(series_uids))))}
        patients = self._upsert_many(conn, P, "patient_id", [p.patient for p in batch], now)
        studies = self._upsert_many(conn, ST, "study_uid", [
            {**p.study, "patient_pk": patients[p.patient["patient_id"]][0]} for p in batch], now)
        series = self._upsert_many(conn, SE, "series_uid", [
            {**p.series, "study_pk": studies[p.study_uid][0]} for p in batch], now)
        out, new_rows, first_of_series = [], [], set()
        for p in batch:
            old = olds.get(p.sop_uid)
            study_pk = studies[p.study_uid][0]
            series_pk, created = series[p.series_uid]
            row = {**p.instance, "series_pk": series_pk, "study_pk": study_pk,
                   "blob_key": blob_key(p.sop_uid), "metadata": p.metadata, "updated": now}
            if old is None:
                new_rows.append(row)
            else:
                conn.execute(update(I).where(I.c.pk == old.pk).values(**row))
            new_series = created and series_pk not in first_of_series
            moved_from = None
            if series_pk not in first_of_series:
                moved_from = self._moved_series(conn, series_pk, study_pk,
                                                series_study.get(p.series_uid))
            first_of_series.add(series_pk)
            out.append((old, series_pk, study_pk, new_series, moved_from))
        if new_rows:
            conn.execute(insert(I), new_rows)
        return out

    def _upsert_many(self, conn, table, key: str, values: list[dict],
                     now: float) -> dict[str, tuple[int, bool]]:
        """:meth:`_upsert` of each distinct key once, with the values of ``values`` (in
        order) merged: a later non-empty value overrides. Returns key -> (pk, created)."""
        merged: dict[str, dict] = {}
        for v in values:
            m = merged.get(v[key])
            if m is None:
                merged[v[key]] = dict(v)
            else:
                m.update((k, x) for k, x in v.items() if x not in ("", None))
        found = {r[key]: r for r in conn.execute(
            select(table).where(table.c[key].in_(list(merged)))).mappings()}
        out = {}
        for k, v in merged.items():
            row = found.get(k)
            if row is None:
                out[k] = (conn.execute(insert(table).values(**v, updated=now)
                                       .returning(table.c.pk)).scalar_one(), True)
                continue
            changes = {c: x for c, x in v.items() if x not in ("", None) and row[c] != x}
            if changes:
                conn.execute(update(table).where(table.c.pk == row["pk"]).values(**changes, updated=now))
            out[k] = (row["pk"], False)
        return out

    def _upsert(self, conn, table, key: str, values: dict, now: float) -> tuple[int, bool]:
        """Insert a row, or update the existing one with the values that are not empty
        (an instance that lacks an attribute does not blank what its siblings gave).
        Returns (pk, whether the row was created)."""
        row = conn.execute(_stmt("row_by", table, key), {"b_key": values[key]}).mappings().first()
        if row is None:
            pk = conn.execute(_stmt("insert_pk", table), {**values, "updated": now}).scalar_one()
            return pk, True
        return self._update_changed(conn, table, row, values, now), False

    @staticmethod
    def _update_changed(conn, table, row: Mapping[str, Any], values: dict, now: float,
                        prefix: str = "") -> int:
        """Update the row of ``table`` read as ``row`` (its columns labelled ``prefix`` +
        name) with the values that are not empty and differ; returns its pk."""
        # Most instances repeat their series' values: write only what changed.
        changes = {k: v for k, v in values.items() if v not in ("", None) and row[prefix + k] != v}
        pk = row[prefix + "pk"]
        if changes:
            conn.execute(update(table).where(table.c.pk == pk).values(**changes, updated=now))
        return pk

    def _add_counts(self, conn, new_per_series: dict[int, int], new_per_study: dict[int, int],
                    now: float, pending: bool) -> None:
        """Counts after adding instances to series that existed before this transaction
        (modalities and the number of series cannot have changed)."""
        for pk, k in new_per_series.items():
            conn.execute(_stmt("add_series"), {"b_pk": pk, "b_k": k})
        for pk, k in new_per_study.items():
            conn.execute(_stmt("add_study"), {"b_pk": pk, "b_k": k, "b_now": now,
                                              "b_pending": pending})

    def _refresh_counts(self, conn, series_pks: set[int], study_pks: list[int], now: float,
                        pending: bool = False) -> None:
        for pk in series_pks:
            n = conn.execute(select(func.count()).select_from(I).where(I.c.series_pk == pk)).scalar_one()
            if n:
                conn.execute(update(SE).where(SE.c.pk == pk).values(num_instances=n))
            else:
                conn.execute(SE.delete().where(SE.c.pk == pk))
        for pk in study_pks:
            n_inst = conn.execute(select(func.count()).select_from(I)
                                  .where(I.c.study_pk == pk)).scalar_one()
            mods = conn.execute(select(SE.c.modality).where(SE.c.study_pk == pk, SE.c.modality != "")
                                .distinct().order_by(SE.c.modality)).scalars().all()
            n_series = conn.execute(select(func.count()).select_from(SE)
                                    .where(SE.c.study_pk == pk)).scalar_one()
            conn.execute(update(ST).where(ST.c.pk == pk).values(
                num_instances=n_inst, num_series=n_series, modalities=_clip("\\".join(mods), 256),
                updated=now, fhir_pending=pending))

    def link_pending(self, ctx: RequestContext, study_uids: list[str] | None = None) -> int:
        """Write the ImagingStudy of every study stored with ``defer_link`` (see
        :class:`server.dicom.source.DeferredLinkSource`), each in its own transaction
        under the same locks as a store; returns how many studies were linked."""
        query = select(ST.c.pk, ST.c.study_uid, ST.c.patient_pk).where(ST.c.fhir_pending.is_(True))
        if study_uids is not None:
            if not study_uids:
                return 0
            query = query.where(ST.c.study_uid.in_(sorted(set(study_uids))))
        with self.engine.connect() as conn:
            todo = conn.execute(query.order_by(ST.c.pk)).all()
        done = 0
        for study_pk, study_uid, _patient_pk in todo:
            conn = begin_write(self.engine)
            try:
                with conn.begin():
                    prow = conn.execute(select(P.c.patient_id).join(ST, ST.c.patient_pk == P.c.pk)
                                        .where(ST.c.pk == study_pk)).first()
                    if prow is None:
                        continue
                    self.sql.lock_condition(conn, "Patient?identifier=" + _token(
                        *fhirlink.patient_identifier(self.patient_system, prow.patient_id, study_uid)))
                    self.sql.lock_condition(conn, "ImagingStudy?identifier=" + _token(
                        fhirlink.STUDY_UID_SYSTEM, f"urn:oid:{study_uid}"))
                    still = conn.execute(select(ST.c.fhir_pending).where(ST.c.pk == study_pk)).scalar()
                    if not still:
                        continue      # linked meanwhile by another association or a STOW
                    self._link_fhir(conn, ctx, study_pk, None)
                    conn.execute(update(ST).where(ST.c.pk == study_pk).values(fhir_pending=False))
                    done += 1
            finally:
                conn.close()
        return done

    # ------------------------------------------------------------------ FHIR link
    def _dicomweb_base(self, ctx: RequestContext) -> str:
        if self.public_base_url:
            return f"{self.public_base_url}/dicomweb"
        if ctx.base_url and ctx.base_url.rstrip("/").endswith("/dicomweb"):
            return ctx.base_url.rstrip("/")
        return f"http://localhost:{self.http_port}/dicomweb"

    def _current(self, conn, res_type: str, res_id: str | None):
        if not res_id:
            return None
        row = self.sql.current_rows(conn, [(res_type, res_id)]).get((res_type, res_id))
        return row if row is not None and not row.deleted else None

    def _endpoint_id(self, conn, ctx: RequestContext) -> str:
        known = self._endpoint_known
        if known is not None and self._current(conn, "Endpoint", known) is not None:
            return known          # one indexed read instead of a locked search
        self._endpoint_known = res_id = self._find_or_create_endpoint(conn, ctx)
        return res_id

    def _find_or_create_endpoint(self, conn, ctx: RequestContext) -> str:
        query = _token(fhirlink.ENDPOINT_IDENTIFIER_SYSTEM, "dicomweb")
        self.sql.lock_condition(conn, f"Endpoint?identifier={query}")
        found = self.sql.match(conn, "Endpoint", [("identifier", query)])
        if found:
            return found[0][1]
        res_id = new_id()
        body = fhirlink.endpoint_resource(res_id, self._dicomweb_base(ctx))
        self.sql.write_versions(conn, [PendingWrite("Endpoint", res_id, body, "POST")])
        return res_id

    def _patient_id(self, conn, prow, study_uid: str) -> str:
        cur = self._current(conn, "Patient", prow.fhir_id)
        if cur is not None:
            return prow.fhir_id
        query = _token(*fhirlink.patient_identifier(self.patient_system, prow.patient_id, study_uid))
        found = self.sql.match(conn, "Patient", [("identifier", query)])
        if found:
            res_id = found[0][1]
        else:
            res_id = new_id()
            body = fhirlink.patient_resource(res_id, self.patient_system, prow.patient_id,
                                             prow.patient_name, prow.birth_date, prow.sex, study_uid)
            self.sql.write_versions(conn, [PendingWrite("Patient", res_id, body, "POST")])
        if prow.patient_id:
            conn.execute(update(P).where(P.c.pk == prow.pk).values(fhir_id=res_id))
        return res_id

    def _link_fhir(self, conn, ctx: RequestContext, study_pk: int,
                   added: list[dict] | None = None) -> None:
        """Create/update the Patient, Endpoint and ImagingStudy of one study.

        ``added`` (the instances new to this study in this transaction, in arrival
        order: series_pk, sop_uid, sop_class_uid, instance_number) lets the ImagingStudy
        be updated from its current body (each instance inserted in its series' list)
        rather than rebuilt from every instance row; whenever the current body does not
        match the rows' counts, or the order of a new entry is not certain, it is
        rebuilt as before.
        """
        study = conn.execute(select(ST).where(ST.c.pk == study_pk)).mappings().first()
        prow = conn.execute(select(P).where(P.c.pk == study["patient_pk"])).first()
        patient_id = self._patient_id(conn, prow, study["study_uid"])
        endpoint_id = self._endpoint_id(conn, ctx)
        series = conn.execute(select(SE).where(SE.c.study_pk == study_pk).order_by(
            func.coalesce(SE.c.series_number, IS_MAX), SE.c.pk)).mappings().all()
        cur = self._current(conn, "ImagingStudy", study["fhir_id"])
        if cur is None:
            query = _token(fhirlink.STUDY_UID_SYSTEM, f"urn:oid:{study['study_uid']}")
            found = self.sql.match(conn, "ImagingStudy", [("identifier", query)])
            if found:
                cur = self._current(conn, "ImagingStudy", found[0][1])
        res_id = cur.res_id if cur is not None else new_id()
        self.sql.lock_condition(conn, f"ImagingStudy/{res_id}")
        old = orjson.loads(cur.body) if cur is not None else None
        items = None
        if added and old is not None and study["fhir_id"] == res_id:
            items = _items_with(old, study, series, added)
        if items is None:
            instances = conn.execute(
                select(I.c.series_pk, I.c.sop_uid, I.c.sop_class_uid, I.c.instance_number)
                .where(I.c.study_pk == study_pk)
                .order_by(I.c.series_pk, func.coalesce(I.c.instance_number, IS_MAX), I.c.pk)
            ).mappings().all()
        else:
            instances = ()
        body = fhirlink.imaging_study_resource(res_id, dict(study), [dict(s) for s in series],
                                               [dict(i) for i in instances], f"Patient/{patient_id}",
                                               f"Endpoint/{endpoint_id}", self.default_tz,
                                               items_by_series=items)
        if old is not None:
            if strip_meta(old) == body:
                if study["fhir_id"] != res_id:
                    conn.execute(update(ST).where(ST.c.pk == study_pk).values(fhir_id=res_id))
                return
        self.sql.write_versions(conn, [_imaging_study_write(
            res_id, body, "PUT" if cur is not None else "POST",
            prev_pk=cur.pk if cur is not None else None,
            prev_version=cur.version if cur is not None else 0)])
        if study["fhir_id"] != res_id:
            conn.execute(update(ST).where(ST.c.pk == study_pk).values(fhir_id=res_id))

    # ------------------------------------------------------------------ queries
    def _criteria(self, query: Mapping[str, str], fuzzy: bool) -> tuple[list, list[str]]:
        """Parsed (keyword, kind, Criterion) triples and the canonical query keywords."""
        crits, names = [], []
        for name, value in (query or {}).items():
            if not name:
                continue
            kw = A.canonical_name(name)
            names.append(kw)
            mk = A.MATCH_KEYS.get(kw)
            if mk is None:
                continue          # not a supported matching key: universal, returned if known
            crit = parse(mk.kind, kw, "" if value is None else str(value),
                         fuzzy=fuzzy and kw in _FUZZY_KEYS)
            if crit is not None:
                crits.append((kw, mk.kind, crit))
        return crits, names

    def _condition(self, kw: str, kind: str, crit: Criterion, tables: dict):
        table, col = _COLUMNS[kw]
        t = tables[table]
        if kind == "modalities":
            se2 = SE.alias()
            return exists(select(literal(1)).where(
                se2.c.study_pk == t.c.pk,
                sql_condition(crit, se2.c.modality, sqlite=self.sqlite)))
        extra = {}
        if kw in _PN_COLUMNS:
            ci, fo, tok = _PN_COLUMNS[kw]
            extra = {"ci_col": t.c[ci], "fold_col": t.c[fo] if fo else t.c[ci],
                     "tokens_col": t.c[tok] if tok else t.c[ci]}
        return sql_condition(crit, t.c[col], sqlite=self.sqlite, **extra)

    def _conditions(self, level: str, crits: list, tables: dict) -> list:
        """WHERE terms: keys at or above ``level`` directly, lower levels through EXISTS."""
        depth = LEVELS.index(level)
        direct, below = [], {}
        for kw, kind, crit in crits:
            table = _COLUMNS[kw][0]
            lvl = LEVELS.index(_TABLE_LEVEL[table])
            if lvl <= depth:
                direct.append(self._condition(kw, kind, crit, tables))
            else:
                below.setdefault(lvl, []).append((kw, kind, crit))
        if below:
            deepest = max(below)
            sub = {}
            chain = [_LEVEL_TABLE[LEVELS[d]] for d in range(depth + 1, deepest + 1)]
            for tbl in chain:
                sub[tbl] = tbl.alias()
            inner = dict(tables)
            inner.update(sub)
            links = []
            parent = tables[_LEVEL_TABLE[level]]
            for tbl in chain:
                a = sub[tbl]
                if tbl is ST:
                    links.append(a.c.patient_pk == parent.c.pk)
                elif tbl is SE:
                    links.append(a.c.study_pk == parent.c.pk)
                else:
                    links.append(a.c.series_pk == parent.c.pk)
                parent = a
            terms = [self._condition(kw, kind, crit, inner)
                     for lvl in below for kw, kind, crit in below[lvl]]
            direct.append(exists(select(literal(1)).where(*links, *terms)))
        return direct

    def find(self, ctx: RequestContext, level: str, query: dict[str, str], *,
             includefields: set[str] | None = None, include_all: bool = False,
             fuzzy: bool = False, limit: int | None = None, offset: int = 0) -> list[Dataset]:
        """Query the index (see :meth:`DicomSource.find`); reads no file."""
        level = (level or "").upper()
        if level not in LEVELS:
            raise InvalidRequest(f"Unknown query level '{level}' (PATIENT, STUDY, SERIES, IMAGE)")
        if limit is not None and limit < 0 or offset < 0:
            raise InvalidRequest("limit and offset must not be negative")
        crits, names = self._criteria(query, fuzzy)
        wanted = self._wanted(level, names, includefields)
        depth = LEVELS.index(level)
        tables = {t: t for t in (P, ST, SE, I)[:depth + 1]}
        stmt = _base_select(level)
        where = self._conditions(level, crits, tables)
        if level == "PATIENT":
            st2 = ST.alias()
            where.append(exists(select(literal(1)).where(st2.c.patient_pk == P.c.pk,
                                                         st2.c.num_instances > 0)))
            order = [P.c.patient_id, P.c.pk]
        elif level == "STUDY":
            where.append(ST.c.num_instances > 0)
            order = [ST.c.study_date.desc(), ST.c.study_time_key.desc(), ST.c.pk.desc()]
        elif level == "SERIES":
            where.append(SE.c.num_instances > 0)
            order = [ST.c.pk, func.coalesce(SE.c.series_number, IS_MAX), SE.c.pk]
        else:
            order = [ST.c.pk, func.coalesce(SE.c.series_number, IS_MAX), SE.c.pk,
                     func.coalesce(I.c.instance_number, IS_MAX), I.c.pk]
        stmt = stmt.where(*where).order_by(*order)
        if limit is not None:
            stmt = stmt.limit(limit)
        if offset:
            stmt = stmt.offset(offset)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(stmt).mappings()]
            if not rows:
                return FindResult()
            extra = self._patient_counts(conn, rows) if level == "PATIENT" else {}
            meta = self._representative_metadata(conn, level, rows, wanted, include_all)
        # The FHIR Patient of each match comes with the rows: the access guard audits it
        # without a query of its own.
        links = {r["PA_patient_id"]: r["PA_fhir_id"] for r in rows
                 if r["PA_fhir_id"] and r["PA_patient_id"]}
        return FindResult((self._dataset(level, row, wanted, include_all, extra.get(row["PA_pk"]),
                                         meta.get(self._entity_pk(level, row))) for row in rows),
                          patient_links=links)

    @staticmethod
    def _entity_pk(level: str, row: dict) -> int:
        return row[{"PATIENT": "PA_pk", "STUDY": "ST_pk", "SERIES": "SE_pk", "IMAGE": "IM_pk"}[level]]

    @staticmethod
    def _wanted(level: str, names: list[str], includefields: set[str] | None) -> list[str]:
        """Keywords (or hex tags) to return, top-level (``Seq.Attr`` -> ``Seq``)."""
        out: list[str] = list(A.DEFAULTS[level])
        for lvl in LEVELS[:LEVELS.index(level) + 1]:
            out.append(A.LEVEL_UNIQUE_KEY[lvl])
        explicit = []
        for name in list(names) + [A.canonical_name(f) for f in (includefields or ()) if f]:
            top = name.split(".", 1)[0]
            explicit.append(top)
        seen = set()
        ordered = []
        for kw in out + explicit:
            if kw not in seen:
                seen.add(kw)
                ordered.append(kw)
        return ordered

    def _patient_counts(self, conn, rows: list[dict]) -> dict[int, tuple[int, int, int]]:
        pks = [r["PA_pk"] for r in rows]
        q = (select(ST.c.patient_pk, func.count(), func.sum(ST.c.num_series),
                    func.sum(ST.c.num_instances))
             .where(ST.c.patient_pk.in_(pks), ST.c.num_instances > 0).group_by(ST.c.patient_pk))
        return {pk: (int(a or 0), int(b or 0), int(c or 0)) for pk, a, b, c in conn.execute(q)}

    def _representative_metadata(self, conn, level: str, rows: list[dict], wanted: list[str],
                                 include_all: bool) -> dict[int, bytes]:
        """Stored JSON of one instance per entity, when some wanted attribute is not a
        column (IMAGE: the instance itself; SERIES/STUDY/PATIENT: its first instance)."""
        needs = include_all or any(
            kw not in _RETURN_COLUMNS and kw not in _CONSTANTS and kw not in A.COUNTS[level]
            and kw not in _PATIENT_COUNTS and kw not in ("RequestAttributesSequence", "RetrieveAETitle")
            and not _below(kw, level) for kw in wanted)
        if not needs:
            return {}
        if level == "IMAGE":
            pks = [r["IM_pk"] for r in rows]
            q = select(I.c.pk, I.c.metadata).where(I.c.pk.in_(pks))
            return {pk: raw for pk, raw in conn.execute(q)}
        col = {"SERIES": I.c.series_pk, "STUDY": I.c.study_pk}.get(level)
        keys = [self._entity_pk(level, r) for r in rows]
        if level == "PATIENT":
            first = (select(ST.c.patient_pk.label("k"), func.min(I.c.pk).label("ipk"))
                     .select_from(I.join(ST, I.c.study_pk == ST.c.pk))
                     .where(ST.c.patient_pk.in_(keys)).group_by(ST.c.patient_pk)).subquery()
        else:
            first = (select(col.label("k"), func.min(I.c.pk).label("ipk"))
                     .where(col.in_(keys)).group_by(col)).subquery()
        q = select(first.c.k, I.c.metadata).join(first, I.c.pk == first.c.ipk)
        return {k: raw for k, raw in conn.execute(q)}

    def _dataset(self, level: str, row: dict, wanted: list[str], include_all: bool,
                 pcounts: tuple | None, raw_meta: bytes | None) -> Dataset:
        depth = LEVELS.index(level)
        ds = Dataset()
        if raw_meta is not None:
            if include_all and level == "IMAGE":
                ds = from_stored(raw_meta)
            else:
                allowed = None
                if include_all:
                    allowed = {"STUDY": A.STUDY_LEVEL_KEYWORDS, "SERIES": A.SERIES_LEVEL_KEYWORDS,
                               "PATIENT": {k for k in A.STUDY_LEVEL_KEYWORDS
                                           if k.startswith(("Patient", "Issuer", "Other", "Ethnic"))}
                               }.get(level, set())
                tags = {A.tag_of(k) for k in wanted} | {A.tag_of(k) for k in (allowed or ())}
                ds = from_stored(raw_meta, keep={t for t in tags if t is not None})
        for kw in wanted:
            if _below(kw, level):
                continue          # a key of a lower level has no single value here
            value, known = self._column_value(kw, level, depth, row, pcounts)
            tag = A.tag_of(kw)
            if tag is None:
                continue
            if known:
                if value in (None, "", []) and kw in A.OMIT_WHEN_EMPTY and tag not in ds:
                    continue
                _put(ds, kw, value)
            elif tag not in ds:
                if kw in A.OMIT_WHEN_EMPTY or (kw in A.DEFAULTS[level] and kw not in _CONSTANTS):
                    continue
                _put(ds, kw, None)
        if include_all and level == "IMAGE":
            _put(ds, "AvailableTransferSyntaxUID", row.get("IM_transfer_syntax_uid"))
            _put(ds, "InstanceAvailability", "ONLINE")
            for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                value, _ = self._column_value(kw, level, depth, row, None)
                _put(ds, kw, value)
        return ds

    def _column_value(self, kw: str, level: str, depth: int, row: dict,
                      pcounts: tuple | None) -> tuple[Any, bool]:
        """(value, known): the value of ``kw`` for this entity from the row, if the row
        holds it (known=False: look in the stored metadata)."""
        if kw in _CONSTANTS:
            return _CONSTANTS[kw], True
        if kw == "RetrieveAETitle":
            return self.ae_title, True
        if kw in _PATIENT_COUNTS:
            if level != "PATIENT":
                return None, False
            idx = _PATIENT_COUNTS.index(kw)
            return (pcounts or (0, 0, 0))[idx], True
        if kw == "RequestAttributesSequence":
            if depth < 2:
                return None, False
            sps, rp = row.get("SE_sps_id"), row.get("SE_requested_procedure_id")
            if not (sps or rp):
                return [], True
            item = Dataset()
            item.ScheduledProcedureStepID = sps or ""
            item.RequestedProcedureID = rp or ""
            return Sequence([item]), True
        loc = _RETURN_COLUMNS.get(kw)
        if loc is None:
            return None, False
        table, col = loc
        lvl = LEVELS.index(_TABLE_LEVEL[table])
        if lvl > depth:
            return None, False
        value = row.get(f"{_TABLE_LEVEL[table][:2]}_{col}")
        if kw == "ModalitiesInStudy":
            return ([m for m in (value or "").split("\\") if m]), True
        return value, True

    # ------------------------------------------------------------------ retrieve
    def _instance_query(self, study_uid, series_uid, sop_uid, patient_id, *cols):
        stmt = (select(*cols).select_from(I.join(SE, I.c.series_pk == SE.c.pk)
                                          .join(ST, I.c.study_pk == ST.c.pk)
                                          .join(P, ST.c.patient_pk == P.c.pk)))
        if study_uid is not None:
            stmt = stmt.where(ST.c.study_uid == study_uid)
        if series_uid is not None:
            stmt = stmt.where(SE.c.series_uid == series_uid)
        if sop_uid is not None:
            stmt = stmt.where(I.c.sop_uid == sop_uid)
        if patient_id is not None:
            stmt = stmt.where(P.c.patient_id == patient_id)
        return stmt.order_by(ST.c.pk, func.coalesce(SE.c.series_number, IS_MAX), SE.c.pk,
                             func.coalesce(I.c.instance_number, IS_MAX), I.c.pk)

    @staticmethod
    def _not_found(study_uid, series_uid, sop_uid, patient_id) -> NotFound:
        named = (("patient", patient_id), ("study", study_uid), ("series", series_uid),
                 ("instance", sop_uid))
        parts = [f"{k} {v}" for k, v in named if v is not None]
        return NotFound("No stored instances for " + ", ".join(parts))

    def instance_refs(self, ctx: RequestContext, study_uid: str | None = None,
                      series_uid: str | None = None, sop_uid: str | None = None, *,
                      patient_id: str | None = None) -> list[InstanceRef]:
        """Stored instances under the given UIDs (see :meth:`DicomSource.instance_refs`)."""
        stmt = self._instance_query(study_uid, series_uid, sop_uid, patient_id,
                                    P.c.patient_id, ST.c.study_uid, SE.c.series_uid, I.c.sop_uid,
                                    I.c.sop_class_uid, I.c.transfer_syntax_uid, I.c.instance_number,
                                    I.c.size)
        with self.engine.connect() as conn:
            refs = [InstanceRef(*r) for r in conn.execute(stmt)]
        if not refs and any(v is not None for v in (study_uid, series_uid, sop_uid, patient_id)):
            raise self._not_found(study_uid, series_uid, sop_uid, patient_id)
        return refs

    def metadata_json(self, ctx: RequestContext, study_uid: str, series_uid: str | None = None,
                      sop_uid: str | None = None) -> list[bytes]:
        """Stored DICOM JSON per instance (the ``/metadata`` fast path, no file read)."""
        stmt = self._instance_query(study_uid, series_uid, sop_uid, None, I.c.metadata)
        with self.engine.connect() as conn:
            out = [bytes(r[0]) for r in conn.execute(stmt)]
        if not out:
            raise self._not_found(study_uid, series_uid, sop_uid, None)
        return out

    def open_instance(self, ctx: RequestContext, ref: InstanceRef) -> bytes:
        """The stored Part 10 bytes (see :meth:`DicomSource.open_instance`)."""
        try:
            return self.blob_path(blob_key(ref.sop_uid)).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"Instance {ref.sop_uid} is not stored") from None


@functools.lru_cache(maxsize=None)
def _base_select(level: str):
    """SELECT of every column (but the metadata) of the tables down to ``level``, joined:
    built once per level (statements are immutable; where/order/limit make new ones)."""
    depth = LEVELS.index(level)
    cols = [c for t in (P, ST, SE, I)[:depth + 1] for c in t.c if c.name not in ("metadata",)]
    stmt = select(*[c.label(f"{_TABLE_LEVEL[c.table][:2]}_{c.name}") for c in cols])
    if depth >= 1:
        stmt = stmt.select_from(P.join(ST, ST.c.patient_pk == P.c.pk))
    if depth >= 2:
        stmt = stmt.join(SE, SE.c.study_pk == ST.c.pk)
    if depth >= 3:
        stmt = stmt.join(I, I.c.series_pk == SE.c.pk)
    return stmt


_ITEM_KEYS = frozenset({"uid", "sopClass", "number"})


def _imaging_study_write(res_id: str, body: dict, method: str, **prev) -> PendingWrite:
    """The version of an ImagingStudy built here, prepared with its search index.

    FHIRPath extraction over every ``series.instance`` costs ~0.1 ms per instance (0.1 s
    for a 1,000-instance study, at every stored instance). The instance entries built
    by :func:`fhirlink.instance_item` give exactly two parameters, ``instance`` (uid)
    and ``dicom-class`` (sopClass), so the rest of the body is extracted without them
    and their token rows are added directly; any other shape is extracted in full.
    """
    pw = PendingWrite("ImagingStudy", res_id, body, method, **prev)
    items = [i for se in body.get("series") or () for i in se.get("instance") or ()]
    for item in items:
        sop = item.get("sopClass")
        if (not isinstance(item, dict) or not item.keys() <= _ITEM_KEYS
                or not isinstance(item.get("uid"), str) or not item["uid"]
                or not isinstance(sop, dict) or sop.keys() != {"system", "code"}
                or not isinstance(sop["system"], str) or not isinstance(sop["code"], str)
                or not sop["system"] or not sop["code"]):
            return pw             # prepared (extract in full) by write_versions
    light = {**body, "series": [{k: v for k, v in se.items() if k != "instance"}
                                for se in body.get("series") or ()]}
    if not light["series"]:
        del light["series"]
    light["id"] = res_id
    index = extract(light)
    tokens = list(index.get("token") or ())
    tokens += dict.fromkeys(("dicom-class", i["sopClass"]["system"], i["sopClass"]["code"],
                             None, None, None) for i in items)
    tokens += dict.fromkeys(("instance", None, i["uid"], None, None, None) for i in items)
    index["token"] = tokens
    body["id"] = res_id
    meta = dict(body.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    pw.meta = meta
    pw.rest = orjson.dumps({k: v for k, v in body.items() if k not in ("resourceType", "id", "meta")})
    pw.index = index
    return pw


def _items_with(old: dict, study, series, added: list[dict]) -> dict[int, list[dict]] | None:
    """The ``series.instance`` entries per series pk of a stored ImagingStudy body plus
    the new instances ``added`` (in arrival order) at their places (instance number,
    then arrival), or None when the body does not hold exactly the instances the rows
    count before these ones."""
    try:
        if old.get("numberOfInstances") != study["num_instances"] - len(added):
            return None
        by_uid = {e["uid"]: e.get("instance") or [] for e in old.get("series") or ()}
        if len(by_uid) != len(old.get("series") or ()):
            return None
        new_per_series: dict[int, int] = {}
        for a in added:
            new_per_series[a["series_pk"]] = new_per_series.get(a["series_pk"], 0) + 1
        out: dict[int, list[dict]] = {}
        for se in series:
            n = (se["num_instances"] or 0) - new_per_series.get(se["pk"], 0)
            items = list(by_uid.pop(se["series_uid"], ()))
            if len(items) != n:
                return None
            out[se["pk"]] = items
        if by_uid or not new_per_series.keys() <= out.keys():
            return None
        # Whether every entry of a series has a number (checked once per series, then
        # kept up to date: a scan per added instance made a batch O(n * k)).
        numbered = {pk: all(isinstance(i.get("number"), int) for i in items)
                    for pk, items in out.items()}
        for a in added:
            items = out[a["series_pk"]]
            new = fhirlink.instance_item(a)
            number = a["instance_number"]
            if number is None:
                items.append(new)             # no number: after the others, by arrival
                numbered[a["series_pk"]] = False   # a later numbered one cannot be placed
                continue
            if number < 0 or not numbered[a["series_pk"]]:
                return None
            pos = len(items)
            while pos and items[pos - 1]["number"] > number:
                pos -= 1
            items.insert(pos, new)
        return out
    except (KeyError, TypeError, AttributeError):
        return None


def _outcome(parsed: ParsedInstance, replaced: bool) -> StoreOutcome:
    return StoreOutcome(parsed.sop_class_uid, parsed.sop_uid, parsed.study_uid,
                        parsed.series_uid, replaced,
                        "; ".join(parsed.warnings) if parsed.warnings else None)


def _below(keyword: str, level: str) -> bool:
    """Whether a matching key belongs to a level below ``level``."""
    key_level = A.level_of(keyword)
    return key_level is not None and LEVELS.index(key_level) > LEVELS.index(level)


def _fhir_tz(value: str) -> str:
    """The ``dicom_timezone`` setting as a FHIR offset (``Z``, ``+01:00``; ``+0100`` is
    accepted); an invalid value falls back to ``Z`` with a log line."""
    value = value.strip()
    if value == "Z" or re.fullmatch(r"[+-]\d{2}:\d{2}", value):
        return value
    if re.fullmatch(r"[+-]\d{4}", value):
        return f"{value[:3]}:{value[3:]}"
    log.warning("dicom_timezone '%s' is not an offset like +01:00; using Z", value)
    return "Z"


def _put(ds: Dataset, keyword: str, value: Any) -> None:
    """Set an attribute by keyword or hex tag with its dictionary VR."""
    tag = A.tag_of(keyword)
    if tag is None:
        return
    vr = A.vr_of(keyword)
    if vr == "SQ":
        value = value if value else []
    elif value is not None and vr in ("IS", "US", "UL", "SS", "SL") \
            and not isinstance(value, (list, Sequence)):
        try:
            value = int(value)
        except (TypeError, ValueError):
            value = None
    try:
        # Values come from the index (read from stored instances): no validation of
        # each one again (a regex per value, and a warning per odd one, per response).
        ds[tag] = DataElement(tag, vr, value, validation_mode=_NO_VALIDATION)
    except Exception:  # noqa: BLE001 - a value the VR refuses: return the key empty
        ds.add_new(tag, vr, None)


__all__ = ["DicomStore", "parse_instance", "blob_key"]
