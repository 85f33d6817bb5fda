"""DICOM attribute catalogue for query and retrieve: names, matching keys, return sets.

Shared by every :class:`server.dicom.source.DicomSource` implementation and by the
DICOMweb layer: which attributes are matching keys at which level (PS3.18 Table
10.6.1-5, PS3.4 C.6.2.1), which are returned by default (PS3.18 Tables 10.6.3-3..5),
and how a query-parameter name (keyword, ``00100020`` or a dotted sequence path) maps
to a keyword. Nothing here touches storage.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from server.errors import InvalidRequest

_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")
# PS3.5 §9.1 asks for digits only; letters, '_' and '-' are tolerated as some devices
# write them. Components are never empty: no '..', no leading or trailing dot (a UID of
# '..' would name the parent folder in a URL path).
_UID_RE = re.compile(r"^(?=.{1,64}$)[0-9A-Za-z_\-]+(\.[0-9A-Za-z_\-]+)*$")


def is_uid(value: str) -> bool:
    """Whether ``value`` is usable as a UID here (see ``_UID_RE``)."""
    return bool(_UID_RE.match(value))


@dataclass(frozen=True)
class MatchKey:
    """A matching key the stores support.

    Attributes:
        keyword: DICOM keyword (a sequence item attribute as ``Seq.Attr``).
        level: the entity level it belongs to.
        kind: matching rule: ``uid`` (list), ``str`` (single/wildcard), ``pn`` (person
            name, case-insensitive, fuzzy), ``cs`` (code string, list of single or
            wildcard values), ``date`` / ``time`` (single or range), ``int`` (list),
            ``modalities`` (ModalitiesInStudy: any series' modality).
    """

    keyword: str
    level: str
    kind: str


MATCH_KEYS: dict[str, MatchKey] = {k.keyword: k for k in (
    MatchKey("PatientID", "PATIENT", "str"),
    MatchKey("IssuerOfPatientID", "PATIENT", "str"),
    MatchKey("PatientName", "PATIENT", "pn"),
    MatchKey("PatientBirthDate", "PATIENT", "date"),
    MatchKey("PatientSex", "PATIENT", "cs"),
    MatchKey("StudyInstanceUID", "STUDY", "uid"),
    MatchKey("StudyDate", "STUDY", "date"),
    MatchKey("StudyTime", "STUDY", "time"),
    MatchKey("AccessionNumber", "STUDY", "str"),
    MatchKey("StudyID", "STUDY", "str"),
    MatchKey("StudyDescription", "STUDY", "str"),
    MatchKey("ReferringPhysicianName", "STUDY", "pn"),
    MatchKey("ModalitiesInStudy", "STUDY", "modalities"),
    MatchKey("SeriesInstanceUID", "SERIES", "uid"),
    MatchKey("Modality", "SERIES", "cs"),
    MatchKey("SeriesNumber", "SERIES", "int"),
    MatchKey("SeriesDescription", "SERIES", "str"),
    MatchKey("BodyPartExamined", "SERIES", "cs"),
    MatchKey("Laterality", "SERIES", "cs"),
    MatchKey("SeriesDate", "SERIES", "date"),
    MatchKey("PerformedProcedureStepStartDate", "SERIES", "date"),
    MatchKey("PerformedProcedureStepStartTime", "SERIES", "time"),
    MatchKey("RequestAttributesSequence.ScheduledProcedureStepID", "SERIES", "str"),
    MatchKey("RequestAttributesSequence.RequestedProcedureID", "SERIES", "str"),
    MatchKey("SOPInstanceUID", "IMAGE", "uid"),
    MatchKey("SOPClassUID", "IMAGE", "uid"),
    MatchKey("InstanceNumber", "IMAGE", "int"),
    MatchKey("Rows", "IMAGE", "int"),
    MatchKey("Columns", "IMAGE", "int"),
    MatchKey("BitsAllocated", "IMAGE", "int"),
    MatchKey("NumberOfFrames", "IMAGE", "int"),
)}

#: The unique key of each level (PS3.4 C.6.1.1.x).
LEVEL_UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
                    "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}

#: Query/Retrieve levels top-down.
LEVEL_ORDER = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# Default return attributes per level: PS3.18 Table 10.6.3-3 (study), -4 (series),
# -5 (instance) minus RetrieveURL (added by the DICOMweb layer, it needs the base URL),
# plus StudyDescription (most viewers list it), plus the PS3.4 patient level.
DEFAULTS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate",
                "PatientSex", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"),
    "STUDY": ("SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber",
              "InstanceAvailability", "ModalitiesInStudy", "ReferringPhysicianName",
              "TimezoneOffsetFromUTC", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("SpecificCharacterSet", "Modality", "TimezoneOffsetFromUTC", "SeriesDescription",
               "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
               "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
               "RequestAttributesSequence", "StudyInstanceUID"),
    "IMAGE": ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
              "TimezoneOffsetFromUTC", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
              "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID"),
}

#: Default attributes that are left out when the entity has no value for them.
OMIT_WHEN_EMPTY = frozenset({"TimezoneOffsetFromUTC", "NumberOfFrames", "Rows", "Columns",
                             "BitsAllocated", "RequestAttributesSequence",
                             "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"})

# Attributes of the Patient and Study modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2, C.7.1.3,
# C.7.2.3) and of the Series-level modules (C.7.3.1, C.7.4.1, C.7.5.1, C.7.3.2):
# ``includefield=all`` at STUDY / SERIES level returns these from a stored instance.
STUDY_LEVEL_KEYWORDS = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthDate",
    "PatientBirthTime", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    "PatientComments", "EthnicGroup", "PatientSpeciesDescription", "PatientBreedDescription",
    "ResponsiblePerson", "ResponsibleOrganization", "PatientIdentityRemoved",
    "DeidentificationMethod", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence", "AdmittingDiagnosesDescription",
    "AdditionalPatientHistory", "Occupation", "MedicalAlerts", "Allergies", "PregnancyStatus",
    "SmokingStatus", "TimezoneOffsetFromUTC", "ReferencedStudySequence",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription", "SpecificCharacterSet",
})
SERIES_LEVEL_KEYWORDS = frozenset({
    "Modality", "SeriesInstanceUID", "SeriesNumber", "Laterality", "SeriesDate", "SeriesTime",
    "PerformingPhysicianName", "ProtocolName", "SeriesDescription",
    "SeriesDescriptionCodeSequence", "OperatorsName", "ReferencedPerformedProcedureStepSequence",
    "BodyPartExamined", "PatientPosition", "AnatomicalOrientationType",
    "PerformedProcedureStepID", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepDescription",
    "RequestAttributesSequence", "FrameOfReferenceUID", "PositionReferenceIndicator",
    "Manufacturer", "InstitutionName", "InstitutionAddress", "StationName",
    "InstitutionalDepartmentName", "ManufacturerModelName", "DeviceSerialNumber",
    "SoftwareVersions", "SpatialResolution", "ClinicalTrialSeriesID",
    "ClinicalTrialSeriesDescription", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "SpecificCharacterSet", "StudyInstanceUID",
})

#: Attributes computed by a store, never read from an instance header.
COUNTS = {
    "PATIENT": ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"),
    "STUDY": ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "ModalitiesInStudy"),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
    "IMAGE": (),
}


def level_of(name: str) -> str | None:
    """The level a matching key belongs to, or None for an unsupported key."""
    key = MATCH_KEYS.get(name)
    return key.level if key else None


def canonical_name(name: str) -> str:
    """A query-parameter or include-field name as a keyword path.

    ``PatientID``, ``00100020`` and ``0010,0020`` give ``PatientID``; a dotted path
    (``00400275.00400009``) gives ``RequestAttributesSequence.ScheduledProcedureStepID``;
    a tag without a keyword (private) stays as eight upper-case hex digits.

    Raises:
        InvalidRequest: not a DICOM keyword or tag.
    """
    parts = [p.strip() for p in name.split(".")]
    out = []
    for part in parts:
        compact = part.replace(",", "").replace("(", "").replace(")", "")
        if _TAG_RE.match(compact):
            tag = int(compact, 16)
            out.append(keyword_for_tag(tag) or f"{tag:08X}")
        elif part and tag_for_keyword(part) is not None:
            out.append(part)
        else:
            raise InvalidRequest(f"'{name}' is not a DICOM attribute keyword or tag")
    return ".".join(out)


@functools.lru_cache(maxsize=4096)
def tag_of(name: str) -> int | None:
    """The tag of a keyword or 8-hex-digit tag string (first element of a path)."""
    first = name.split(".", 1)[0]
    if _TAG_RE.match(first):
        return int(first, 16)
    return tag_for_keyword(first)


@functools.lru_cache(maxsize=4096)
def vr_of(name: str) -> str:
    """The dictionary VR of a keyword/tag (first of ``US or SS`` style alternatives)."""
    tag = tag_of(name)
    try:
        vr = dictionary_VR(tag) if tag is not None else "UN"
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def qido_includefields(level: str, study_in_path: bool, series_in_path: bool) -> set[str]:
    """Attributes a QIDO-RS response adds for the levels above the searched one when they
    are not fixed by the path (PS3.18 §10.6.3.3: ``/series`` carries the study
    attributes, ``/instances`` the study and series attributes)."""
    extra: set[str] = set()
    if level in ("SERIES", "IMAGE") and not study_in_path:
        extra |= set(DEFAULTS["STUDY"])
    if level == "IMAGE" and not series_in_path:
        extra |= set(DEFAULTS["SERIES"])
    return extra
