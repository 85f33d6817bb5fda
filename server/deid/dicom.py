"""DICOM de-identification: PS3.15 Annex E Basic Application Level Confidentiality Profile.

Options (PS3.15 §E.3): Retain Longitudinal Temporal Information with Modified Dates,
Retain Patient Characteristics and Clean Descriptors (on by default), Retain UIDs (off by
default), Clean Pixel Data through operator-written region rules. The output carries
Patient Identity Removed (0012,0062) = YES, De-identification Method (0012,0063) and
De-identification Method Code Sequence (0012,0064) (PS3.15 §E.1.1 step 6).

Where the actions come from:

* **Basic Profile column** of PS3.15 Table E.1-1: the tables of the ``dicomanonymizer``
  package (``dicomfields_2026c``: one list per action code). Its action *functions* are
  not used: they replace UIDs at random through a module-global dictionary (not
  reproducible across workers or calls), write dummy dates ``00010101`` instead of
  removing or shifting them, walk only the top level for most tags, and know none of the
  option columns.
* **Option columns** (Rtn. UIDs, Rtn. Pat. Chars., Rtn. Long. Modif. Dates, Clean Desc.)
  are not in that package; the sets below are taken from the same table of the standard.
  Dates and times are also handled by VR, as Table E.1-1 Note 4 suggests, so attributes
  added to the standard later are not missed.

Choices where the table leaves one (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``): without the
IOD module tables the choice that keeps every IOD conformant is taken (Z for X/Z, D
otherwise); ``X/Z/U*`` sequences are kept and their UIDs replaced.

synthport's own rules (all keyed: one secret key file, never the database):

* UIDs: ``2.25.<decimal>`` of a UUID built from HMAC-SHA256(key, UID) (PS3.5 §B.2), so
  one UID maps the same way in every instance, sequence, file meta and call. Every
  instance UID is replaced, not only those that the table lists; class and transfer
  syntax UIDs and UIDs registered in PS3.6 are kept.
* Dates: shifted by a per-patient number of days (HMAC of the key and the original
  Patient ID; 365 to 3650 days back), times kept (PS3.15 §E.3.6).
* Patient ID and Patient's Name: pseudonyms derived from the key and the Patient ID.
* Clean (C): free text keeps its words except the identifying values of the same data
  set (names, IDs, addresses, institution, station, serial numbers) and anything shaped
  like a date, a long number, a phone number, an e-mail address or a UID.
* Private attributes, overlays, curves and public attributes unknown to the data
  dictionary are removed.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import io
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom import Dataset
from pydicom.datadict import dictionary_has_tag, repeater_has_tag, tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, UID, UID_dictionary,
                         ExplicitVRLittleEndian)

from server.errors import InstanceRefused, InternalError, InvalidRequest, SynthportError

__all__ = [
    "DicomDeidOptions", "PixelRule", "deidentify_dataset", "deidentify_bytes",
    "deidentify_json", "deidentify_files", "load_pixel_rules", "key_from_file",
    "deidentified_uid", "pseudonym_patient_id", "pseudonym_patient_name",
    "date_offset_days", "method_codes",
]

# --- PS3.15 Table E.1-1 -----------------------------------------------------------------

BASIC_TABLE_VERSION = "dicomfields_2026c"      # dicomanonymizer's copy of the Basic column

_CATEGORY_CODES = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U",
                   "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D",
                   "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}


def _load_basic_profile() -> dict[int, str]:
    db = dicom_anonymization_database_selector(BASIC_TABLE_VERSION)
    table: dict[int, str] = {}
    for category, code in _CATEGORY_CODES.items():
        for tag in db[category]:
            if len(tag) == 2:            # masked rows (50xx, 60xx) are handled by group below
                table[(tag[0] << 16) | tag[1]] = code
    return table


def _tags(text: str) -> frozenset[int]:
    """``"gggg,eeee gggg,eeee ..."`` as a set of tags."""
    return frozenset(int(t.replace(",", ""), 16) for t in text.split())


BASIC_PROFILE: dict[int, str] = _load_basic_profile()
# Encrypted Attributes Sequence: the identities encrypted for a re-identifying party
# (PS3.15 §E.1.1 step 4) have no place in data handed out as de-identified.
BASIC_PROFILE.setdefault(0x04000500, "X")

# Where the table offers a choice, take the one that keeps any IOD conformant (the IOD
# module tables, which would tell Type 1/2/3 apart, are not available here).
_CHOICE = {"Z/D": "D", "X/Z": "Z", "X/D": "D", "X/Z/D": "D", "X/Z/U*": "K"}

# Rtn. Pat. Chars. Opt. column (PS3.15 Table E.1-1; §E.3.4).
PATIENT_CHARS_KEEP = _tags("""
    0010,0040 0010,1010 0010,1020 0010,1030 0010,2160 0010,2203 0010,21C0 0010,21A0""")
PATIENT_CHARS_CLEAN = _tags("0010,2110 0038,0500 0040,0012 0038,0050")

# Rtn. Long. Modif. Dates Opt. column: C (dates shifted, times kept) (§E.3.6).
LONG_MODIFIED_DATES = _tags("""
    0008,0020 0008,0021 0008,0022 0008,0023 0008,0024 0008,0025 0008,002A 0008,0015
    0008,0030 0008,0031 0008,0032 0008,0033 0008,0034 0008,0035 0008,0201 0010,21D0
    0016,008D 0018,9369 0018,936A 0018,9516 0018,9517 0034,0007 0038,0020 0038,0021
    003A,0314 0040,0002 0040,0003 0040,0004 0040,0005 0040,0244 0040,0245 0040,0250
    0040,0251 0040,4005 0040,4008 0040,4010 0040,4011 0040,4050 0040,4051 0040,4052
    0040,A192 0040,A193 3006,0008 3006,0009 3008,0054 3008,0056 3008,0250 3008,0251
    300A,0006 300A,0007 300A,0736 300A,073A 300A,0741 300A,0760 3010,004C 3010,004D""")
# Never shifted nor kept: the table gives them no option (Patient's Birth Date is Z,
# Patient's Birth Time X); Patient's Age is what Retain Patient Characteristics keeps.
DATES_NOT_RETAINED = _tags("0010,0030 0010,0032")

# Clean Desc. Opt. column (§E.3.5).
CLEAN_DESCRIPTORS = _tags("""
    0008,1030 0008,103E 0008,1080 0008,1084 0008,2111 0008,4000 0010,2000 0010,2110
    0010,2180 0010,21B0 0010,4000 0012,0051 0012,0072 0016,002B 0016,004B 0018,0010
    0018,1030 0018,11BB 0018,1400 0018,4000 0018,937B 0018,937F 0018,9185 0018,9424
    0018,9937 0018,A003 0020,4000 0020,9158 0032,1030 0032,1060 0032,1066 0032,1067
    0032,1070 0032,4000 0038,0040 0038,0062 0038,0500 0038,4000 0040,0007 0040,0254
    0040,0275 0040,0280 0040,0310 0040,051A 0040,0600 0040,0602 0040,1002 0040,100A
    0040,1400 0040,2001 0040,2400 0050,0021 2200,0002 3006,0002 3006,0004 3006,0006
    3006,0026 3006,0028 3006,0038 3006,0085 3006,0088 300A,0002 300A,0003 300A,0004
    300A,000E 300A,0016 300A,0072 300A,00C3 300A,00DD 300A,0196 300A,01A6 300A,01B2
    300A,02EB 300A,0608 300A,0619 300A,0623 300A,062A 300A,0676 300A,067C 300A,067D
    300A,0734 300A,0742 300A,0783 300C,0113 3010,000F 3010,0017 3010,0033 3010,0034
    3010,0035 3010,0036 3010,0037 3010,0038 3010,0054 3010,0056 3010,005A 3010,005C
    3010,0061 3010,0077 3010,007A 3010,007B 3010,007F 3010,0081 4008,010B 4008,0115
    4008,0300 4008,4000""")

# Referenced Patient Sequence stays X with Retain UIDs (its Rtn. UIDs column says X).
_REFERENCED_PATIENT_SEQUENCE = 0x00081120

# De-identification Method Code Sequence values (PS3.16 CID 7050).
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_CLEAN_PIXELS = ("113101", "Clean Pixel Data Option")
CODE_CLEAN_DESCRIPTORS = ("113105", "Clean Descriptors Option")
CODE_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CODE_PATIENT_CHARS = ("113108", "Retain Patient Characteristics Option")
CODE_RETAIN_UIDS = ("113110", "Retain UIDs Option")

# --- attributes synthport writes itself ---------------------------------------------------

_T = tag_for_keyword
PATIENT_ID = _T("PatientID")
PATIENT_NAME = _T("PatientName")
STUDY_ID = _T("StudyID")
ACQUISITION_CONTEXT_SEQUENCE = _T("AcquisitionContextSequence")
_WRITTEN = frozenset({_T("PatientIdentityRemoved"), _T("DeidentificationMethod"),
                      _T("DeidentificationMethodCodeSequence"),
                      _T("LongitudinalTemporalInformationModified"), _T("BurnedInAnnotation")})
_META_KEPT_IN_BODY = frozenset({0x00020002, 0x00020003, 0x00020010})
_CODE_KEYWORDS = frozenset({"CodeValue", "LongCodeValue", "URNCodeValue",
                            "CodingSchemeDesignator", "CodingSchemeVersion",
                            "ContextIdentifier", "ContextUID", "MappingResource"})
# UIDs that name a kind of thing, not an instance: never replaced.
_UID_KEEP_KEYWORDS = frozenset({
    "TransferSyntaxUID", "ImplementationClassUID", "CodingSchemeUID", "ContextUID",
    "MappingResourceUID", "PrivateInformationCreatorUID", "SegmentationTemplateUID",
    "SOPClassesInStudy", "SOPClassesSupported", "PertinentSOPClassesInStudy",
    "PertinentSOPClassesInSeries"})
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_MAX_LEN = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UC": None, "UT": None, "PN": 64}
_DUMMY_DATE, _DUMMY_TIME, _DUMMY_DATETIME = "19000101", "000000", "19000101000000"
_DUMMY_TEXT = "ANONYMIZED"
_REDACTED = "***"
_BULK_PREFIX = "\x00synthport-bulk:"

# Identifying values of a data set that Clean removes from its free text.
_IDENTIFYING_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber", "StudyID",
    "AdmissionID", "ServiceEpisodeID", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "PatientAddress",
    "PatientTelephoneNumbers", "MedicalRecordLocator", "RequestedProcedureID",
    "PerformedProcedureStepID", "ScheduledProcedureStepID", "ClinicalTrialSubjectID",
    "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "PersonAddress",
    "PersonTelephoneNumbers", "RegionOfResidence", "DetectorID", "GantryID", "PlateID",
    "CassetteID", "GeneratorID"})
# One pass each, in this order (a phone number pattern must not eat half a date).
_SHAPES = tuple(re.compile(p) for p in (
    r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b",               # e-mail addresses
    r"\b\d+(?:\.\d+){3,}\b",                           # UIDs
    r"\b\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b",             # 12/03/2021, 2021-03-12
    r"\+?\(?\d[\d ()\-]{6,}\d",                        # phone numbers
    r"\b\d{5,}\b",                                     # record numbers, IDs, 20210312
))


# --- options and pixel rules ----------------------------------------------------------------

@dataclass(frozen=True)
class PixelRule:
    """Where a kind of image carries burned-in text, and what to blank (PS3.15 §E.3.1).

    A rule matches an instance when every criterion given (not ``None``) equals the
    instance's value (strings compared without case and surrounding spaces).

    Attributes:
        modality: Modality (0008,0060), e.g. ``US``.
        manufacturer: Manufacturer (0008,0070).
        manufacturer_model_name: Manufacturer's Model Name (0008,1090).
        rows: Rows (0028,0010).
        columns: Columns (0028,0011).
        regions: rectangles ``(x, y, width, height)`` in pixels, set to 0 in every frame.
        name: a label for reports.
    """
    modality: str | None = None
    manufacturer: str | None = None
    manufacturer_model_name: str | None = None
    rows: int | None = None
    columns: int | None = None
    regions: tuple[tuple[int, int, int, int], ...] = ()
    name: str = ""

    def __post_init__(self):
        regions = tuple(tuple(int(v) for v in r) for r in self.regions)
        if not regions:
            raise InvalidRequest(f"Pixel rule {self.name or ''}: no region to blank")
        for r in regions:
            if len(r) != 4 or r[0] < 0 or r[1] < 0 or r[2] <= 0 or r[3] <= 0:
                raise InvalidRequest(f"Pixel rule {self.name or ''}: region {list(r)} is not "
                                     "(x >= 0, y >= 0, width > 0, height > 0)")
        object.__setattr__(self, "regions", regions)

    def matches(self, ds: Dataset) -> bool:
        """Whether this rule applies to ``ds``."""
        for keyword, want in (("Modality", self.modality), ("Manufacturer", self.manufacturer),
                              ("ManufacturerModelName", self.manufacturer_model_name)):
            if want is not None and str(ds.get(keyword, "") or "").strip().upper() \
                    != str(want).strip().upper():
                return False
        for keyword, want in (("Rows", self.rows), ("Columns", self.columns)):
            if want is not None and ds.get(keyword) != int(want):
                return False
        return True


@dataclass
class DicomDeidOptions:
    """Which PS3.15 Annex E options to apply on top of the Basic Profile.

    Attributes:
        retain_long_modified_dates: Retain Longitudinal Temporal Information, Modified
            Dates Option (§E.3.6): dates shifted per patient, times kept.
        retain_patient_chars: Retain Patient Characteristics Option (§E.3.4).
        clean_descriptors: Clean Descriptors Option (§E.3.5).
        retain_uids: Retain UIDs Option (§E.3.9); off means UIDs replaced (keyed).
        pixel_rules: regions to blank in instances with Burned In Annotation YES.
    """
    retain_long_modified_dates: bool = True
    retain_patient_chars: bool = True
    clean_descriptors: bool = True
    retain_uids: bool = False
    pixel_rules: list[PixelRule] = field(default_factory=list)


_RULE_KEYS = {"modality": "modality", "Modality": "modality",
              "manufacturer": "manufacturer", "Manufacturer": "manufacturer",
              "manufacturer_model_name": "manufacturer_model_name",
              "ManufacturerModelName": "manufacturer_model_name",
              "rows": "rows", "Rows": "rows", "columns": "columns", "Columns": "columns",
              "regions": "regions", "name": "name"}


def load_pixel_rules(path: str | os.PathLike) -> list[PixelRule]:
    """Read pixel-cleaning rules from a JSON file.

    The file holds a list of rules, or ``{"rules": [...]}``; a rule is an object with any
    of ``modality``, ``manufacturer``, ``manufacturer_model_name``, ``rows``, ``columns``
    (DICOM keywords are accepted too), an optional ``name`` and ``regions``: a list of
    ``[x, y, width, height]`` or ``{"x":, "y":, "width":, "height":}``.

    Raises:
        InvalidRequest: unreadable JSON, unknown keys or bad regions.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"Pixel rules {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("rules")
    if not isinstance(data, list):
        raise InvalidRequest(f"Pixel rules {path}: expected a list of rules or "
                             '{"rules": [...]}')
    rules = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidRequest(f"Pixel rules {path}: rule {i} is not an object")
        unknown = set(item) - set(_RULE_KEYS)
        if unknown:
            raise InvalidRequest(f"Pixel rules {path}: rule {i} has unknown keys {sorted(unknown)}")
        kwargs = {_RULE_KEYS[k]: v for k, v in item.items()}
        regions = []
        for r in kwargs.get("regions") or []:
            if isinstance(r, dict):
                r = [r.get("x"), r.get("y"), r.get("width", r.get("w")),
                     r.get("height", r.get("h"))]
            try:
                regions.append(tuple(int(v) for v in r))
            except (TypeError, ValueError) as exc:
                raise InvalidRequest(f"Pixel rules {path}: rule {i}: bad region {r!r}") from exc
        kwargs["regions"] = tuple(regions)
        kwargs.setdefault("name", f"rule {i}")
        rules.append(PixelRule(**kwargs))
    return rules


def key_from_file(path: str | os.PathLike) -> bytes:
    """The de-identification key in a file: base64 text (``openssl rand -base64 32``) or
    at least 32 raw bytes.

    Raises:
        InternalError: the file cannot be read or holds fewer than 32 bytes of key.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InternalError(f"De-identification key file {path}: {exc.strerror}") from exc
    key = raw
    try:
        decoded = base64.b64decode(raw.strip(), validate=True)
        if len(decoded) >= 32:
            key = decoded
    except ValueError:
        pass
    if len(key) < 32:
        raise InternalError(f"De-identification key file {path}: fewer than 32 bytes of key")
    return key


# --- keyed values -------------------------------------------------------------------------

def _mac(key: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(key, purpose.encode() + b"\x00" + value.encode("utf-8", "surrogateescape"),
                    hashlib.sha256).digest()


def deidentified_uid(key: bytes, uid: str) -> str:
    """The replacement of ``uid`` under ``key``: ``2.25.`` and the integer of a UUID (PS3.5
    §B.2) made of HMAC-SHA256 (RFC 9562 version 8 layout). UIDs registered in PS3.6
    (classes, transfer syntaxes, well-known frames of reference) are returned unchanged."""
    uid = str(uid).strip().rstrip("\x00")
    if not uid or uid in UID_dictionary:
        return uid
    n = int.from_bytes(_mac(key, "uid", uid)[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)          # version 8
    n = (n & ~(0x3 << 62)) | (0x2 << 62)          # RFC variant
    return f"2.25.{n}"


def pseudonym_patient_id(key: bytes, patient_id: str) -> str:
    """The Patient ID that replaces ``patient_id`` under ``key``."""
    return "DEID-" + _mac(key, "patient-id", str(patient_id)).hex()[:20].upper()


def pseudonym_patient_name(key: bytes, patient_id: str) -> str:
    """The Patient's Name of the patient whose original Patient ID is ``patient_id``."""
    return "DEID^" + pseudonym_patient_id(key, patient_id)[5:]


def date_offset_days(key: bytes, patient_id: str) -> int:
    """Days added to every date of the patient (negative: 365 to 3650 days back)."""
    n = int.from_bytes(_mac(key, "date-offset", str(patient_id))[:8], "big")
    return -(365 + n % (3650 - 365 + 1))


def method_codes(options: DicomDeidOptions, pixels_cleaned: bool = False) -> list[tuple[str, str]]:
    """(code value, meaning) of CID 7050 for what ``options`` apply."""
    codes = [CODE_BASIC]
    if pixels_cleaned:
        codes.append(CODE_CLEAN_PIXELS)
    if options.clean_descriptors:
        codes.append(CODE_CLEAN_DESCRIPTORS)
    if options.retain_long_modified_dates:
        codes.append(CODE_MODIFIED_DATES)
    if options.retain_patient_chars:
        codes.append(CODE_PATIENT_CHARS)
    if options.retain_uids:
        codes.append(CODE_RETAIN_UIDS)
    return codes


# --- the engine -----------------------------------------------------------------------------

def _patient_key(ds: Dataset) -> str:
    """What identifies the patient for pseudonyms and the date offset: the Patient ID, else
    name and birth date, else the study (each study of an unnamed patient on its own)."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return pid
    name = str(ds.get("PatientName", "") or "").strip()
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    if name or birth:
        return f"\x00name:{name}|{birth}"
    return f"\x00study:{ds.get('StudyInstanceUID', '')}"


def _words_of_names(value: Any) -> Iterable[str]:
    for part in re.split(r"[\^=\s,]+", str(value)):
        if len(part.strip(".")) >= 2:
            yield part.strip(".")


def _collect(ds: Dataset, names: set[str], uids: set[str]) -> None:
    for tag in list(ds.keys()):
        if tag.is_private:
            continue                               # removed anyway; not worth decoding
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value or []:
                _collect(item, names, uids)
            continue
        if elem.value in (None, "", b""):
            continue
        values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
        if elem.VR == "PN":
            for v in values:
                names.update(_words_of_names(v))
        elif elem.VR == "UI":
            uids.update(str(v) for v in values)
        elif elem.keyword in _IDENTIFYING_KEYWORDS:
            names.update(s for s in (str(v).strip() for v in values) if len(s) >= 3)


def _shift_date(value: str, days: int) -> str | None:
    m = re.fullmatch(r"(\d{4})\.?(\d{2})\.?(\d{2})", value.strip())
    if not m:
        return None
    try:
        d = date(int(m[1]), int(m[2]), int(m[3])) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _shift_datetime(value: str, days: int) -> str | None:
    m = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(.*)", value.strip())
    if not m:
        return None
    try:
        d = date(int(m[1]), int(m[2] or 1), int(m[3] or 1)) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    out = f"{d.year:04d}" + (f"{d.month:02d}" if m[2] else "") + (f"{d.day:02d}" if m[3] else "")
    return out + m[4]


def _dummy(vr: str) -> Any:
    if vr in ("DA",):
        return _DUMMY_DATE
    if vr == "TM":
        return _DUMMY_TIME
    if vr == "DT":
        return _DUMMY_DATETIME
    if vr in ("DS", "IS"):
        return "0"
    if vr == "AS":
        return "000Y"
    if vr == "UR":
        return "urn:synthport:removed"
    if vr in ("FL", "FD", "SL", "SS", "UL", "US", "SV", "UV") or " or " in vr:
        return 0
    if vr in _BINARY_VRS:
        return b"\x00" * 8
    if vr == "PN":
        return f"{_DUMMY_TEXT}^{_DUMMY_TEXT}"      # one-component names are the retired form
    return _DUMMY_TEXT


class _Deidentifier:
    """One data set's de-identification (the keyed values of its patient, its texts)."""

    def __init__(self, ds: Dataset, key: bytes, options: DicomDeidOptions):
        self.key = key
        self.options = options
        self.patient_key = _patient_key(ds)
        self.days = date_offset_days(key, self.patient_key)
        names: set[str] = set()
        self.original_uids: set[str] = set()
        _collect(ds, names, self.original_uids)
        self.identifiers = None
        if names:
            alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
            self.identifiers = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    # action of Table E.1-1 with the options applied
    def action(self, tag: int, vr: str, keyword: str) -> str:
        o = self.options
        basic = BASIC_PROFILE.get(tag)
        if vr == "UI" and basic != "X":
            # Every instance UID, listed or not (U); kinds of things (classes, syntaxes) kept.
            if o.retain_uids or "SOPClass" in keyword or "TransferSyntax" in keyword \
                    or keyword.endswith("ClassUID") or keyword in _UID_KEEP_KEYWORDS:
                return "K"
            return "U"
        if basic == "X/Z/U*":
            return "K"                             # kept; the UIDs inside follow their rows
        if o.retain_patient_chars:
            if tag in PATIENT_CHARS_KEEP:
                return "K"
            if tag in PATIENT_CHARS_CLEAN:
                return "C"
        if o.retain_long_modified_dates and tag not in DATES_NOT_RETAINED:
            if vr in ("DA", "DT"):
                return "S"                         # shifted
            if vr == "TM" or tag in LONG_MODIFIED_DATES:
                return "K"
        if o.clean_descriptors and tag in CLEAN_DESCRIPTORS:
            return "C"
        if basic == "X/Z" and vr == "SQ":
            # An empty sequence conforms only where it is Type 2: Acquisition Context
            # Sequence (Acquisition Context Module); elsewhere (Referenced Study Sequence in
            # the General Study Module) it is Type 3 and goes.
            return "Z" if tag == ACQUISITION_CONTEXT_SEQUENCE else "X"
        if basic is not None:
            return _CHOICE.get(basic, basic)
        if vr in ("DA", "DT", "TM"):
            return "X"                             # Table E.1-1 Note 4: dates by their VR
        return "K*"                                # not in the table: kept

    def basic_fallback(self, tag: int) -> str:
        basic = BASIC_PROFILE.get(tag, "X")
        return _CHOICE.get(basic, basic)

    def map_uid(self, value: Any) -> Any:
        if isinstance(value, (list, MultiValue)):
            return [deidentified_uid(self.key, v) for v in value]
        return deidentified_uid(self.key, value) if value else value

    def clean_text(self, value: str) -> str | None:
        """``value`` without identifying content; ``None`` where nothing useful is left."""
        if value.startswith(_BULK_PREFIX):
            return None
        text = value
        if self.identifiers is not None:
            text = self.identifiers.sub(_REDACTED, text)
        for shape in _SHAPES:
            text = shape.sub(_REDACTED, text)
        text = re.sub(r"(?:\*{3}[\s,;:/-]*){2,}", _REDACTED + " ", text).strip()
        if not re.search(r"[^\W_]", text.replace(_REDACTED, "")):
            return None
        return text

    def _text_values(self, elem, transform: Callable[[str], str | None]) -> bool:
        values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
        out = []
        for v in values:
            if v in (None, ""):
                out.append(v)
                continue
            new = transform(str(v))
            if new is None:
                return False
            limit = _MAX_LEN.get(elem.VR)
            out.append(new[:limit] if limit else new)
        elem.value = out if len(out) > 1 else out[0]
        return True

    def shift(self, elem) -> bool:
        fn = _shift_date if elem.VR == "DA" else _shift_datetime
        return self._text_values(elem, lambda v: fn(v, self.days))

    def process(self, ds: Dataset, mode: str = "keep", top: bool = True) -> None:
        """Apply the profile to ``ds`` and, recursively, to every sequence item.

        ``mode`` says what happens to text that the table leaves alone inside a sequence
        whose own action is D (``dummy``: dummy values, codes kept; ``dummy-codes``: codes
        too) or C (``clean``: cleaned, codes kept).
        """
        for base_tag in list(ds.keys()):
            tag = int(base_tag)
            group = tag >> 16
            if base_tag.is_private or (tag & 0xFFFF) == 0 \
                    or (0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E) and group % 2 == 0:
                # Private attributes (X, no Retain Safe Private), group lengths; Curve Data
                # (50xx) and Overlay Data/Comments (60xx) are X: the planes go whole.
                del ds[base_tag]
                continue
            elem = ds[base_tag]
            if group == 0x0002:
                if tag not in _META_KEPT_IN_BODY:
                    del ds[elem.tag]
                    continue
            elif not (dictionary_has_tag(tag) or repeater_has_tag(tag)):
                del ds[elem.tag]                   # public but unknown: cannot be judged
                continue
            if tag == PATIENT_ID:
                if top:
                    elem.value = pseudonym_patient_id(self.key, self.patient_key)
                elif elem.value:
                    elem.value = pseudonym_patient_id(self.key, str(elem.value).strip())
                continue
            if tag == PATIENT_NAME:
                elem.value = pseudonym_patient_name(self.key, self.patient_key) if top else ""
                continue
            if top and tag == STUDY_ID and elem.value:
                # Z allows a dummy; one per study keeps the Study entity consistent across its
                # instances (§E.1.1 note 3) and lets DICOMDIRs be built.
                elem.value = _mac(self.key, "study-id", str(ds.get("StudyInstanceUID", ""))
                                  ).hex()[:12].upper()
                continue
            if top and tag in _WRITTEN:
                continue
            self.apply(ds, elem, self.action(tag, elem.VR, elem.keyword), mode)

    def apply(self, ds: Dataset, elem, act: str, mode: str) -> None:
        vr = elem.VR
        if act == "X":
            del ds[elem.tag]
        elif act == "Z":
            elem.value = [] if vr == "SQ" else None
        elif act == "U":
            elem.value = self.map_uid(elem.value)
        elif act == "S":
            if not self.shift(elem):
                self.apply(ds, elem, self.basic_fallback(int(elem.tag)), mode)
        elif act == "D":
            if vr == "SQ":
                # Codes are not identifying (Table E.1-1 note 10) except those of people.
                inner = "dummy-codes" if elem.keyword.endswith("IdentificationCodeSequence") \
                    else "dummy"
                for item in elem.value or []:
                    self.process(item, inner, top=False)
            elif vr == "UI":
                elem.value = self.map_uid(elem.value)
            elif vr in ("DA", "DT") and self.options.retain_long_modified_dates \
                    and int(elem.tag) not in DATES_NOT_RETAINED:
                if not self.shift(elem):
                    elem.value = _dummy(vr)
            elif vr == "TM" and self.options.retain_long_modified_dates:
                pass
            else:
                elem.value = _dummy(vr)
        elif act == "C":
            if vr == "SQ":
                for item in elem.value or []:
                    self.process(item, "clean", top=False)
            elif vr not in _TEXT_VRS or not self._text_values(elem, self.clean_text):
                self.apply(ds, elem, self.basic_fallback(int(elem.tag)), mode)
        elif vr == "SQ":                            # K, K*: the items go through the profile
            for item in elem.value or []:
                self.process(item, mode, top=False)
        elif act == "K*" and mode != "keep" and vr in _TEXT_VRS:
            if mode in ("clean", "dummy") and elem.keyword in _CODE_KEYWORDS:
                return
            if mode != "clean" or not self._text_values(elem, self.clean_text):
                if elem.value not in (None, ""):
                    elem.value = _dummy(vr)

    def stamp(self, ds: Dataset, pixels_cleaned: bool) -> None:
        """The attributes that say how the data set was de-identified (PS3.15 §E.1.1 step 6)."""
        o = self.options
        if "PatientName" not in ds:
            ds.PatientName = pseudonym_patient_name(self.key, self.patient_key)
        if "PatientID" not in ds:
            ds.PatientID = pseudonym_patient_id(self.key, self.patient_key)
        ds.PatientIdentityRemoved = "YES"
        codes = method_codes(o, pixels_cleaned)
        ds.DeidentificationMethod = ["synthport PS3.15 Annex E"] + [m for _, m in codes]
        previous = [item for item in ds.get("DeidentificationMethodCodeSequence", None) or []
                    if (item.get("CodingSchemeDesignator"), item.get("CodeValue"))
                    not in {("DCM", c) for c, _ in codes}]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(previous + items)
        ds.LongitudinalTemporalInformationModified = \
            "MODIFIED" if o.retain_long_modified_dates else "REMOVED"
        if pixels_cleaned:
            ds.BurnedInAnnotation = "NO"

    def rewrite_uri(self, uri: str) -> str:
        """A BulkDataURI with the UIDs of this data set replaced in its path."""
        if self.options.retain_uids:
            return uri

        def repl(m: re.Match) -> str:
            seg = m.group(0)
            return deidentified_uid(self.key, seg) if seg in self.original_uids else seg
        return re.sub(r"(?<=[/=])[0-9]+(?:\.[0-9]+)+(?=[/?&#]|$)", repl, uri)


def _matching_rule(ds: Dataset, options: DicomDeidOptions) -> PixelRule | None:
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned != "YES":
        return None
    for rule in options.pixel_rules:
        if rule.matches(ds):
            return rule
    raise InstanceRefused(
        "Refused: Burned In Annotation (0028,0301) is YES and no pixel-cleaning rule matches "
        f"(Modality={ds.get('Modality', '')!s}, Manufacturer={ds.get('Manufacturer', '')!s}, "
        f"ManufacturerModelName={ds.get('ManufacturerModelName', '')!s}, "
        f"Rows={ds.get('Rows', '')}, Columns={ds.get('Columns', '')}); identifying text in "
        "the pixels cannot be removed (PS3.15 §E.1.1 note 5).")


def _clean_pixels(ds: Dataset, rule: PixelRule) -> None:
    """Set the rule's regions to 0 in every frame; compressed pixel data end up as
    Explicit VR Little Endian (pixels are not re-encoded: no second lossy step)."""
    if "PixelData" not in ds:
        return
    if int(ds.get("BitsAllocated", 0) or 0) not in (8, 16, 32):
        raise InstanceRefused("Refused: burned-in annotation cannot be cleaned in pixel data "
                              f"with Bits Allocated {ds.get('BitsAllocated')}")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise InstanceRefused("Refused: burned-in annotation cannot be cleaned in a data set "
                              "without a Transfer Syntax UID (0002,0010)")
    ts = UID(meta.TransferSyntaxUID)
    try:
        if ts.is_compressed:
            # PS3.5 §8.2: decompressed YBR becomes RGB (pydicom updates the attributes).
            ds.decompress(generate_instance_uid=False)
        ds.pixel_array_options(raw=True)
        arr = ds.pixel_array.copy()
    except Exception as exc:   # noqa: BLE001 - any decoder failure refuses the instance
        raise InstanceRefused(f"Refused: the pixel data ({ts.name}) cannot be decoded to "
                              f"clean burned-in annotation: {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    for x, y, w, h in rule.regions:
        if frames > 1:
            arr[:, y:y + h, x:x + w, ...] = 0
        else:
            arr[y:y + h, x:x + w, ...] = 0
    # Native pixel data go back in the byte order of their (unchanged) transfer syntax.
    order = "<" if UID(ds.file_meta.TransferSyntaxUID).is_little_endian else ">"
    ds.PixelData = arr.astype(arr.dtype.newbyteorder(order), copy=False).tobytes()
    ds["PixelData"].VR = "OW" if arr.dtype.itemsize > 1 else "OB"
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        ds.PlanarConfiguration = 0
        if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
            ds.PhotometricInterpretation = "YBR_FULL"     # the array holds every sample
    if ts.is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _deidentify_in_place(ds: Dataset, key: bytes, options: DicomDeidOptions, *,
                         pixels: bool) -> _Deidentifier:
    rule = _matching_rule(ds, options)
    if rule is not None:
        if pixels:
            _clean_pixels(ds, rule)
        elif "PixelData" in ds and not (ds["PixelData"].value or b"").startswith(
                _BULK_PREFIX.encode()):
            del ds.PixelData                       # inline pixels that are not cleaned here
    engine = _Deidentifier(ds, key, options)
    engine.process(ds)
    engine.stamp(ds, pixels_cleaned=rule is not None)
    return engine


def deidentify_dataset(ds: Dataset, key: bytes,
                       options: DicomDeidOptions | None = None) -> Dataset:
    """A de-identified copy of ``ds`` (``ds`` itself is left as it was).

    Args:
        ds: a data set, with or without file meta information.
        key: the secret key (:func:`key_from_file`).
        options: the profile options; default :class:`DicomDeidOptions`.

    Raises:
        InstanceRefused: Burned In Annotation YES without a matching pixel rule, or pixel
            data that a matching rule cannot be applied to.
    """
    options = options or DicomDeidOptions()
    out = copy.deepcopy(ds)
    original_meta = copy.deepcopy(getattr(out, "file_meta", None) or Dataset())
    engine = _deidentify_in_place(out, key, options, pixels=True)
    if "TransferSyntaxUID" in (getattr(out, "file_meta", None) or {}):
        _replace_file_meta(out, UID(out.file_meta.TransferSyntaxUID), original_meta, engine)
    return out


def _replace_file_meta(ds: Dataset, ts: UID, original: Dataset, engine: _Deidentifier) -> None:
    # PS3.15 §E.1.1 step 7: file meta information and preamble describe the de-identifier.
    sop_class = ds.get("SOPClassUID") or original.get("MediaStorageSOPClassUID")
    sop = ds.get("SOPInstanceUID")
    if not sop and original.get("MediaStorageSOPInstanceUID"):
        sop = original.MediaStorageSOPInstanceUID
        if not engine.options.retain_uids:
            sop = deidentified_uid(engine.key, sop)
    if not sop_class or not sop:
        raise InvalidRequest("Not a DICOM instance: no SOP Class UID or SOP Instance UID")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SYNTHPORT_DEID"
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128


def deidentify_bytes(data: bytes, key: bytes, options: DicomDeidOptions | None = None) -> bytes:
    """De-identify one PS3.10 file: the stored bytes in, the de-identified file out.

    The transfer syntax is kept, except when a pixel rule changes compressed (or big
    endian) pixel data: those are written as Explicit VR Little Endian.

    Raises:
        InvalidRequest: not a DICOM PS3.10 file.
        InstanceRefused: see :func:`deidentify_dataset`; also DICOMDIR files.
    """
    options = options or DicomDeidOptions()
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        ts = UID(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:   # noqa: BLE001 - pydicom raises many kinds on bad input
        raise InvalidRequest(f"Not a DICOM PS3.10 file: {exc}") from exc
    if ds.file_meta.get("MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":
        raise InstanceRefused("Refused: a DICOMDIR is not de-identified; build a new one "
                              "from the de-identified files")
    original_meta = copy.deepcopy(ds.file_meta)
    engine = _deidentify_in_place(ds, key, options, pixels=True)
    _replace_file_meta(ds, UID(ds.file_meta.TransferSyntaxUID), original_meta, engine)
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except Exception as exc:   # noqa: BLE001 - values pydicom cannot encode
        raise InvalidRequest(f"The de-identified instance cannot be written: {exc}") from exc
    return buf.getvalue()


def deidentify_json(obj: dict, key: bytes, options: DicomDeidOptions | None = None) -> dict:
    """De-identify one instance's DICOM JSON (PS3.18 §F.2) as :func:`deidentify_bytes` does
    the instance: same UIDs, dates, pseudonyms and refusals.

    ``BulkDataURI`` values are kept, with the UIDs of the instance in their paths replaced
    (unless UIDs are retained), so they point at the de-identified resource. Pixels are not
    touched here; an instance that a pixel rule cleans says so (Burned In Annotation NO,
    code 113101) as its de-identified file does.

    Raises:
        InvalidRequest: not a DICOM JSON object.
        InstanceRefused: see :func:`deidentify_dataset`.
    """
    options = options or DicomDeidOptions()
    uris: list[str] = []

    def bulk(tag: str, vr: str, uri: str):
        uris.append(uri)
        token = f"{_BULK_PREFIX}{len(uris) - 1}"
        if vr in _BINARY_VRS:
            raw = token.encode()
            return raw + b" " * (-len(raw) % 8)
        return token

    try:
        ds = Dataset.from_json(obj, bulk_data_uri_handler=bulk)
    except Exception as exc:   # noqa: BLE001
        raise InvalidRequest(f"Not a DICOM JSON data set: {exc}") from exc
    engine = _deidentify_in_place(ds, key, options, pixels=False)
    out = ds.to_json_dict(bulk_data_threshold=1 << 62)

    def restore(node: dict) -> None:
        for element in node.values():
            if "InlineBinary" in element:
                raw = base64.b64decode(element["InlineBinary"])
                text = raw.rstrip(b" ").decode("latin-1")
                if text.startswith(_BULK_PREFIX):
                    del element["InlineBinary"]
                    element["BulkDataURI"] = engine.rewrite_uri(uris[int(text[len(_BULK_PREFIX):])])
            values = element.get("Value")
            if element.get("vr") == "SQ":
                for item in values or []:
                    restore(item)
            elif values and isinstance(values[0], str) and values[0].startswith(_BULK_PREFIX):
                del element["Value"]
                index = int(values[0][len(_BULK_PREFIX):])
                element["BulkDataURI"] = engine.rewrite_uri(uris[index])
    restore(out)
    return out


# --- files and folders (the ``synthport deidentify-dicom`` command) --------------------------

def _is_part10(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def deidentify_files(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                     key: bytes, options: DicomDeidOptions | None = None,
                     report: Callable[[str], None] = print) -> tuple[int, int]:
    """De-identify files and folders (recursively) into ``out_dir``.

    Output files are named ``<new SOP Instance UID>.dcm`` (input names may identify the
    patient). Files inside folders that are not PS3.10 files are skipped; every failure
    is reported with its reason and the run goes on.

    Returns:
        (files written, files refused or failed).
    """
    options = options or DicomDeidOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = failed = 0
    todo: list[tuple[Path, bool]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                todo.extend((Path(root) / f, False) for f in sorted(files) if not f.startswith("."))
        else:
            todo.append((p, True))
    for path, explicit in todo:
        if not explicit and not _is_part10(path):
            report(f"skipped {path}: not a DICOM PS3.10 file")
            continue
        try:
            data = deidentify_bytes(path.read_bytes(), key, options)
            sop = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
            (out / f"{sop}.dcm").write_bytes(data)
            done += 1
        except SynthportError as exc:
            failed += 1
            report(f"refused {path}: {exc.message}")
        except OSError as exc:
            failed += 1
            report(f"failed {path}: {exc.strerror or exc}")
    return done, failed
