"""The DICOM source protocol: what DICOMweb routes and DIMSE handlers talk to.

The real store (:class:`server.dicom.store.DicomStore`) and, later, synthetic cohorts
implement :class:`DicomSource`; the HTTP and DIMSE layers never know which one they
hold. Every method takes the caller's :class:`server.source.RequestContext` (access
control and audit hook in here) and raises :class:`server.errors.SynthportError`
subclasses, which both layers translate with :data:`server.errors.ERROR_TABLE`
(``dicomweb_status`` / ``dimse_status``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import pydicom

from server.source import RequestContext

QueryLevel = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[str, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True)
class StoreOutcome:
    """What :meth:`DicomSource.store_instance` did with one instance.

    Attributes:
        sop_class_uid: SOP Class UID (0008,0016) of the stored instance.
        sop_instance_uid: SOP Instance UID (0008,0018).
        study_uid: Study Instance UID (0020,000D).
        series_uid: Series Instance UID (0020,000E).
        replaced: True when an instance with this SOP Instance UID was already stored
            and has been replaced (no duplicate rows or files).
        warning: a human-readable warning (stored anyway), or None.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    replaced: bool = False
    warning: str | None = None

    @property
    def warnings(self) -> list[str]:
        """``[warning]`` or ``[]`` (convenience for callers that collect several)."""
        return [self.warning] if self.warning else []


@dataclass(frozen=True)
class InstanceRef:
    """Where one stored instance sits in the hierarchy, without reading it.

    Attributes:
        patient_id: Patient ID (0010,0020); ``""`` when the instance has none.
        study_uid: Study Instance UID.
        series_uid: Series Instance UID.
        sop_uid: SOP Instance UID.
        sop_class_uid: SOP Class UID.
        transfer_syntax_uid: the transfer syntax the instance is stored in.
        instance_number: Instance Number (0020,0013), or None.
        size: size in bytes of the stored Part 10 file.
    """

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    size: int


class FindResult(list):
    """What :meth:`DicomSource.find` may return instead of a plain list: the matches,
    with ``patient_links`` (DICOM PatientID -> linked FHIR Patient id, for the matches
    whose patient is linked), so that the access guard audits the FHIR patients without
    another query. A source that does not know the links returns a plain list."""

    def __init__(self, items=(), patient_links: dict[str, str] | None = None):
        super().__init__(items)
        self.patient_links: dict[str, str] = dict(patient_links or {})


class DicomSource(Protocol):
    """A source of DICOM data: the real store or a synthetic cohort.

    Attributes:
        name: ``real`` or the cohort name.
        writable: whether :meth:`store_instance` may succeed (synthetic cohorts: False,
            it raises :class:`server.errors.MethodNotAllowed`).
        ae_title: the DIMSE AE title this source answers to.
    """

    name: str
    writable: bool
    ae_title: str

    def store_instance(self, ctx: RequestContext, data: bytes) -> StoreOutcome:
        """Store one DICOM PS3.10 file exactly as received.

        Args:
            ctx: the caller.
            data: the Part 10 bytes (128-byte preamble, ``DICM``, file meta, data set).

        Returns:
            What was stored (and whether it replaced an earlier copy).

        Raises:
            InvalidResource: not DICOM PS3.10, or no SOP Instance/Class, Study or Series
                UID (PS3.4 C000 "cannot understand").
            SopClassMismatch: the file meta and the data set name different SOP classes
                or instances, or the SOP Instance UID is stored with another SOP class
                (A900).
            InstanceRefused: the preamble holds an executable (``MZ``, ``\\x7fELF``).
            InsufficientStorage: out of disk space (A700).
            MethodNotAllowed: the source is read-only.
        """
        ...

    def find(self, ctx: RequestContext, level: QueryLevel, query: dict[str, str], *,
             includefields: set[str] | None = None, include_all: bool = False,
             fuzzy: bool = False, limit: int | None = None,
             offset: int = 0) -> list[pydicom.Dataset]:
        """Query with DICOM matching semantics (PS3.4 C.2.2.2), one result per entity.

        Args:
            ctx: the caller.
            level: ``PATIENT``, ``STUDY``, ``SERIES`` or ``IMAGE``.
            query: DICOM keyword (``PatientName``; a sequence item attribute as
                ``RequestAttributeSequence.ScheduledProcedureStepID``) -> match value:
                single value, wildcards ``*``/``?``, range ``a-b``/``a-``/``-b`` (DA, TM),
                UID list (``\\``, also ``,``), empty or ``*`` = universal. Keys of other
                levels restrict the entities (a study matches when one of its series
                does).
            includefields: more attributes to return (keywords or 8-hex-digit tags).
            include_all: return every attribute known at this level.
            fuzzy: fuzzy matching of person names (case- and accent-insensitive,
                each query word a prefix of a name component).
            limit: at most this many results; None = no limit.
            offset: skip this many results first.

        Returns:
            One dataset per matching entity at ``level``: the level's default return
            attributes (PS3.18 Table 10.6.3-3..5), the unique keys of the level and the
            levels above, the matching keys, the include fields, and the counts
            (NumberOfStudyRelatedSeries/Instances, NumberOfSeriesRelatedInstances,
            ModalitiesInStudy, NumberOfPatientRelated*).

        Raises:
            InvalidRequest: a bad level, key or value.
        """
        ...

    def instance_refs(self, ctx: RequestContext, study_uid: str | None = None,
                      series_uid: str | None = None, sop_uid: str | None = None, *,
                      patient_id: str | None = None) -> list[InstanceRef]:
        """The stored instances under the given UIDs, by series then instance number.

        Raises:
            NotFound: a UID (or the patient id) was given and nothing matches it.
        """
        ...

    def open_instance(self, ctx: RequestContext, ref: InstanceRef) -> bytes:
        """The Part 10 bytes of an instance, as stored.

        Raises:
            NotFound: the instance is not (or no longer) stored.
        """
        ...


@runtime_checkable
class StoredMetadataSource(Protocol):
    """Optional fast path for WADO-RS ``/metadata`` (not part of :class:`DicomSource`).

    A source that keeps each instance's DICOM JSON may serve it without building
    datasets. Values it left out as bulk data carry ``"BulkDataURI":
    "synthport-bulk:<path>"`` where ``<path>`` is relative to the DICOMweb base
    (``studies/{s}/series/{se}/instances/{i}/bulkdata/{tag path}``); the DICOMweb
    layer makes them absolute. Sources without it are served through
    ``find(ctx, "IMAGE", ..., include_all=True)``.
    """

    def metadata_json(self, ctx: RequestContext, study_uid: str, series_uid: str | None = None,
                      sop_uid: str | None = None) -> list[bytes]:
        """One DICOM JSON object (bytes) per instance, ordered like ``instance_refs``.

        Raises:
            NotFound: nothing stored under these UIDs.
        """
        ...


@runtime_checkable
class BatchStoreSource(Protocol):
    """Optional batch store for STOW-RS (not part of :class:`DicomSource`).

    A source that can store a request's instances together (one transaction, one
    FHIR ImagingStudy version per study per request) offers this; STOW-RS uses it when
    present and otherwise calls :meth:`DicomSource.store_instance` per part.
    """

    def store_many(self, ctx: RequestContext, items: list[bytes]) -> list[StoreOutcome | Exception]:
        """Store several Part 10 files; one entry per item, in order: its
        :class:`StoreOutcome`, or the exception that refused it (a
        :class:`server.errors.SynthportError` as :meth:`DicomSource.store_instance`
        raises, or another exception for an unexpected failure). A refused item never
        keeps the others from being stored.
        """
        ...


@runtime_checkable
class DeferredLinkSource(Protocol):
    """Optional for C-STORE (not part of :class:`DicomSource`): store now, link later.

    DIMSE sends one C-STORE per instance; writing the study's FHIR ImagingStudy at each
    one costs a version (body and index) that grows with the study, O(n^2) per study.
    A source offering this stores each instance with ``defer_link=True`` (the instance
    rows and file in one transaction, the study marked as pending) and writes each
    pending study's ImagingStudy once when :meth:`link_pending` is called: by the DIMSE
    layer when the association ends (before the A-RELEASE response), every
    ``dimse_link_interval`` seconds during a long association, and when the listener
    starts (a crash between the two leaves the mark set, never a lost link).
    """

    def store_instance(self, ctx: RequestContext, data: bytes, *,
                       defer_link: bool = False) -> StoreOutcome:
        ...

    def link_pending(self, ctx: RequestContext, study_uids: list[str] | None = None) -> int:
        """Write the ImagingStudy (and Patient) of each pending study, among
        ``study_uids`` when given; returns how many studies were linked."""
        ...
