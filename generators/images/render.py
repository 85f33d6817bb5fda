"""Synthetic pixel arrays to valid DICOM instances (PS3.3 IODs, PS3.10 files).

``render_instance`` takes an array in [0, 1] (from :class:`ImageModel`) and the
study's identifying attributes and returns a ``pydicom.Dataset`` of the IOD that fits
the modality:

=========  ===================================================  ==========================
Modality   SOP Class (PS3.4 Annex B)                             pixels
=========  ===================================================  ==========================
CT         CT Image Storage                                      16/12 bit, HU, intercept -1024
MR         MR Image Storage                                      16/12 bit
CR         Computed Radiography Image Storage                    16/12 bit
DX         Digital X-Ray Image Storage - For Presentation       16/12 bit
US         Ultrasound Image Storage                              8 bit
OP         Ophthalmic Photography 8 Bit Image Storage            RGB 8 bit
others     Secondary Capture Image Storage (Conversion SYN)      16/12 bit
=========  ===================================================  ==========================

Everything is deterministic: no clock is read, derived UIDs (Frame of Reference, the
SOP Instance UIDs of a series when not given) are hashes of the given UIDs, so the same
input gives byte-identical files. Every instance says it is synthetic in Image Comments.
``tests/unit/generators/images/test_render.py`` checks the output with dciodvfy.
"""
from __future__ import annotations

import functools
import hashlib
import io
import uuid
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from .data import CT_HU_MAX, CT_HU_MIN, norm_body_part, norm_modality, resize

# PS3.4 Annex B.5 Standard SOP Classes.
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "OP": "1.2.840.10008.5.1.4.1.1.77.1.5.1",
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CROSS_SECTIONAL = {"CT", "MR"}
COMMENT = "synthetic image (synthport)"
SOFTWARE_VERSION = "synthport 0.1"

# Usual matrix (rows, cols) and field of view in mm (rows direction) per modality.
DEFAULT_MATRIX = {"CT": (512, 512), "MR": (256, 256), "CR": (2500, 2048), "DX": (2500, 2048),
                  "US": (600, 800), "OP": (1536, 2048), "MG": (3328, 2560)}
FIELD_OF_VIEW_MM = {"CT": 400.0, "MR": 240.0, "CR": 375.0, "DX": 375.0, "US": 150.0,
                    "OP": 12.0, "MG": 240.0}
HEAD_FOV_MM = {"CT": 250.0, "MR": 220.0}
# CT windows (centre, width) in HU by body part; soft tissue otherwise.
CT_WINDOWS = {"HEAD": (40, 80), "BRAIN": (40, 80), "CHEST": (-600, 1500), "LUNG": (-600, 1500)}
# Body Part Examined (PS3.16 Annex L) to SNOMED CT for Anatomic Region Sequence (CID 4031).
ANATOMY = {
    "CHEST": ("43799004", "Chest"), "HEAD": ("69536005", "Head"), "BRAIN": ("12738006", "Brain"),
    "ABDOMEN": ("818981001", "Abdomen"), "PELVIS": ("816092008", "Pelvis"),
    "EXTREMITY": ("66019005", "Limb"), "CSPINE": ("122494005", "Cervical spine"),
    "LSPINE": ("122496007", "Lumbar spine"), "TSPINE": ("122495006", "Thoracic spine"),
    "KNEE": ("72696002", "Knee"), "HAND": ("85562004", "Hand"), "FOOT": ("56459004", "Foot"),
    "SHOULDER": ("16982005", "Shoulder"), "HIP": ("29836001", "Hip"), "NECK": ("45048000", "Neck"),
    "BREAST": ("76752008", "Breast"), "EYE": ("81745001", "Eye"), "HEART": ("80891009", "Heart"),
    "KIDNEY": ("64033007", "Kidney"), "LIVER": ("10200004", "Liver"),
    "WHOLEBODY": ("38266002", "Entire body"),
}
# Attributes copied from ``attrs`` as given (the rest of ``attrs`` may name any other
# DICOM keyword, which is set last and so overrides what the renderer chose).
IDENTIFYING = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "StudyTime",
               "AccessionNumber", "StudyDescription")
PAIRED = {"EXTREMITY", "KNEE", "HAND", "FOOT", "SHOULDER", "HIP", "BREAST", "EYE", "KIDNEY",
          "ELBOW", "WRIST", "ANKLE", "ARM", "LEG", "CLAVICLE", "LUNG", "FEMUR", "HUMERUS"}
PER_SLICE_TAGS = {0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010}
NOT_KEYWORDS = {"SOPInstanceUIDs", "SliceSpacing"}


class RenderError(ValueError):
    """The attributes or the array cannot make a valid instance."""


def derived_uid(*parts: str) -> str:
    """A deterministic ``2.25.`` UID from the given strings.

    PS3.5 §B.2: a UUID as a decimal integer under 2.25; here a name-based UUID
    (RFC 9562 version 5 layout over SHA-256 of the parts), so the same parts always
    give the same UID.
    """
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=5).int}"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@functools.lru_cache(maxsize=64)
def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bicubic (Keys, a = -0.5) upsampling weights, edges clamped.

    Upsampling a [S, S] array to [R, C] is then two BLAS products, ``Wr @ a @ Wc.T``:
    several times faster than PIL on a 2500 x 2048 radiograph.
    """
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(int)
    w = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    for k in range(-1, 3):
        t = np.abs(src - (base + k))
        wk = np.where(t <= 1, (1.5 * t - 2.5) * t * t + 1,
                      np.where(t < 2, ((-0.5 * t + 2.5) * t - 4) * t + 2, 0.0))
        np.add.at(w, (rows, np.clip(base + k, 0, n_in - 1)), wk.astype(np.float32))
    return w


def _fit(array: np.ndarray, matrix: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Resize a 2-D array to ``matrix`` keeping its aspect (fill the square, centre crop).

    Returns ``scale`` x the resized array, clipped to [0, scale].
    """
    rows, cols = matrix
    a = np.asarray(array, dtype=np.float32)
    if a.ndim != 2:
        raise RenderError(f"expected a 2-D array, got shape {a.shape}")
    side = max(rows, cols)
    r0, c0 = (side - rows) // 2, (side - cols) // 2
    if side >= max(a.shape):
        wr = _cubic_matrix(a.shape[0], side)[r0:r0 + rows]
        wc = _cubic_matrix(a.shape[1], side)[c0:c0 + cols]
        out = wr @ (a * np.float32(scale)) @ wc.T
    else:
        out = resize(a, (side, side))[r0:r0 + rows, c0:c0 + cols] * np.float32(scale)
    return np.clip(out, 0.0, scale, out=out)


def _pixels(array: np.ndarray, modality: str,
            matrix: tuple[int, int]) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored values and the Image Pixel / Modality LUT / VOI LUT attributes (PS3.3 §C.7.6.3)."""
    if modality == "OP":
        v = _fit(array, matrix)
        # Fundus-like colours from the grey level (red dominates a retinal photograph).
        rgb = np.stack([v ** 0.7, 0.55 * v ** 1.2, 0.25 * v ** 2.0], axis=-1)
        return (rgb * 255.0 + 0.5).astype(np.uint8), {
            "SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0,
            "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0}
    if modality == "US":
        return (_fit(array, matrix, 255.0) + 0.5).astype(np.uint8), {
            "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
            "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0}
    attrs = {"SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
             "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0,
             "RescaleSlope": "1", "RescaleIntercept": "0"}
    if modality == "CT":
        # PS3.3 §C.8.2.1: HU = stored * slope + intercept; stored 0 is -1024 HU (air), and
        # CT_HU_MIN is -1024, so stored = v * (CT_HU_MAX - CT_HU_MIN).
        stored = _fit(array, matrix, CT_HU_MAX - CT_HU_MIN)
        attrs["RescaleIntercept"] = "-1024"
    else:
        stored = _fit(array, matrix, 4095.0)
    stored += 0.5
    return stored.astype(np.uint16), attrs


def _window(modality: str, body_part: str) -> tuple[float, float] | None:
    if modality == "CT":
        return CT_WINDOWS.get(body_part, (40, 400))
    if modality in ("US", "OP"):
        return None if modality == "OP" else (128, 256)
    return (2048, 4096)


def _pixel_spacing(modality: str, body_part: str, matrix: tuple[int, int]) -> float:
    fov = HEAD_FOV_MM.get(modality, 0.0) if body_part in ("HEAD", "BRAIN") else 0.0
    fov = fov or FIELD_OF_VIEW_MM.get(modality, 300.0)
    return round(fov / matrix[0], 6)


def _header(attrs: dict[str, Any], modality: str, body_part: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # SOP Common (PS3.3 §C.12.1)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = str(attrs["SOPInstanceUID"])
    study_date, study_time = str(attrs.get("StudyDate", "")), str(attrs.get("StudyTime", ""))
    # Patient (§C.7.1.1)
    ds.PatientName = str(attrs.get("PatientName", ""))
    ds.PatientID = str(attrs.get("PatientID", ""))
    ds.PatientBirthDate = str(attrs.get("PatientBirthDate", ""))
    ds.PatientSex = str(attrs.get("PatientSex", ""))
    # General Study (§C.7.2.1)
    ds.StudyInstanceUID = str(attrs["StudyInstanceUID"])
    ds.StudyDate, ds.StudyTime = study_date, study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = str(attrs.get("StudyID") or attrs.get("AccessionNumber") or "1")[:16]
    ds.AccessionNumber = str(attrs.get("AccessionNumber", ""))[:16]
    if attrs.get("StudyDescription"):
        ds.StudyDescription = str(attrs["StudyDescription"])[:64]
    # General Series (§C.7.3.1)
    ds.Modality = modality
    ds.SeriesInstanceUID = str(attrs["SeriesInstanceUID"])
    ds.SeriesNumber = int(attrs.get("SeriesNumber", 1) or 1)
    ds.SeriesDate, ds.SeriesTime = study_date, study_time
    if attrs.get("SeriesDescription"):
        ds.SeriesDescription = str(attrs["SeriesDescription"])[:64]
    if body_part:
        ds.BodyPartExamined = body_part[:16]
    if modality not in ("DX", "OP") and (not body_part or body_part in PAIRED):
        # PS3.3 §C.7.3.1: Type 2C, required for a paired (or unknown) body part; empty =
        # unknown. DX and OP carry Image Laterality instead.
        ds.Laterality = str(attrs.get("Laterality", ""))
    # General Equipment (§C.7.5.1); Enhanced General Equipment (§C.7.5.2) for OP.
    ds.Manufacturer = "synthport"
    ds.ManufacturerModelName = "synthport image model"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.InstitutionName = "synthport synthetic cohort"
    # General Image (§C.7.6.1)
    ds.InstanceNumber = int(attrs.get("InstanceNumber", 1) or 1)
    ds.ContentDate, ds.ContentTime = study_date, study_time
    ds.AcquisitionNumber = 1
    ds.ImageComments = COMMENT
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    return ds


def _anatomy(body_part: str) -> DicomSequence:
    code = ANATOMY.get(body_part)
    return DicomSequence([_code(code[0], "SCT", code[1])] if code else [])


def _place(ds: Dataset, instance_number: int, spacing: float, step: float) -> None:
    """Image Position (Patient) and Slice Location of slice ``instance_number`` (§C.7.6.2.1.1)."""
    z = -(instance_number - 1) * step
    half = spacing * ds.Rows / 2.0
    ds.ImagePositionPatient = [f"{-half:g}", f"{-half:g}", f"{z:g}"]
    ds.SliceLocation = f"{z:g}"


def _modality_specific(ds: Dataset, modality: str, body_part: str, attrs: dict[str, Any],
                       spacing: float) -> None:
    inst = ds.InstanceNumber
    if modality in CROSS_SECTIONAL:
        # Frame of Reference (§C.7.4.1) and Image Plane (§C.7.6.2): axial slices, head first
        # supine, slice k at z = -(k - 1) * spacing.
        ds.FrameOfReferenceUID = str(attrs.get("FrameOfReferenceUID")
                                     or derived_uid(ds.SeriesInstanceUID, "frame-of-reference"))
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        thickness = float(attrs.get("SliceThickness", 5.0 if modality == "CT" else 4.0))
        step = float(attrs.get("SliceSpacing", thickness))
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceThickness = f"{thickness:g}"
        ds.SpacingBetweenSlices = f"{step:g}"
        _place(ds, inst, spacing, step)
        ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
    else:
        ds.PatientOrientation = ["L", "F"] if modality in ("CR", "DX", "MG") else ""
        ds.ImageType = ["DERIVED", "PRIMARY"]
    if modality == "CT":
        # CT Image (§C.8.2.1)
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
    elif modality == "MR":
        # MR Image (§C.8.3.1): a spin-echo-like description of an imaginary acquisition.
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagingFrequency = "63.87"
        ds.ImagedNucleus = "1H"
    elif modality == "CR":
        # CR Series (§C.8.1.1) and CR Image (§C.8.1.2)
        ds.ViewPosition = str(attrs.get("ViewPosition", "PA" if body_part == "CHEST" else ""))
        ds.ImagerPixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
        ds.RescaleType = "US"
    elif modality == "DX":
        # DX Series (§C.8.11.1), DX Anatomy Imaged (§C.8.11.2), DX Image (§C.8.11.3),
        # DX Detector (§C.8.11.4).
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["DERIVED", "PRIMARY", ""]
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = _anatomy(body_part) or DicomSequence(
            [_code("38266002", "SCT", "Entire body")])
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.DetectorType = "DIRECT"
        ds.ImagerPixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
        ds.ViewPosition = str(attrs.get("ViewPosition", "PA" if body_part == "CHEST" else ""))
        ds.PositionerType = ""
        if ds.ViewPosition == "PA":  # CID 4010
            ds.ViewCodeSequence = DicomSequence([_code("399348003", "SCT", "postero-anterior")])
        ds.AcquisitionContextSequence = DicomSequence([])
    elif modality == "US":
        # US Image (§C.8.5.6)
        ds.ImageType = ["DERIVED", "PRIMARY", "ABDOMINAL"]
    elif modality == "OP":
        _ophthalmic(ds, attrs)
    if modality not in SOP_CLASS:
        # SC Equipment (§C.8.6.1): SYN = synthetic image.
        ds.ConversionType = "SYN"
        ds.RescaleType = "US"
    if modality in ("CT", "MR", "US", "CR", "DX"):
        ds.AnatomicRegionSequence = ds.get("AnatomicRegionSequence") or _anatomy(body_part)
        if not ds.AnatomicRegionSequence:
            del ds.AnatomicRegionSequence


def _ophthalmic(ds: Dataset, attrs: dict[str, Any]) -> None:
    """Ophthalmic Photography Series/Image/Acquisition modules (PS3.3 §C.8.17)."""
    # ORIGINAL: a DERIVED OP image would need a Source Image Sequence (§C.8.17.2).
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # Synchronization (§C.7.4.2), mandatory in the OP IOD.
    ds.SynchronizationFrameOfReferenceUID = "1.2.840.10008.15.1.1"  # UTC (PS3.6 Annex A)
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time (§C.7.6.6, Type 1 in Multi-frame)
    ds.FrameTime = "0"
    ds.ImageLaterality = str(attrs.get("ImageLaterality", "R"))
    ds.AnatomicRegionSequence = DicomSequence([_code("81745001", "SCT", "Eye")])
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = 45.0
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = ""
    ds.AcquisitionDeviceTypeCodeSequence = DicomSequence(
        [_code("409898007", "SCT", "Fundus Camera")])
    ds.IlluminationTypeCodeSequence = DicomSequence([])
    ds.LightPathFilterTypeStackCodeSequence = DicomSequence([])
    ds.ImagePathFilterTypeStackCodeSequence = DicomSequence([])
    ds.LensesCodeSequence = DicomSequence([])
    ds.DetectorType = "CCD"
    ds.AcquisitionDateTime = f"{ds.StudyDate}{ds.StudyTime}"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.RefractiveStateSequence = DicomSequence([])


def render_instance(array: np.ndarray, attrs: dict[str, Any],
                    matrix: tuple[int, int] | None = None) -> Dataset:
    """One DICOM instance from a [S, S] array in [0, 1].

    Args:
        array: grey image in [0, 1] (from :meth:`ImageModel.sample`).
        attrs: identifying attributes: PatientID, PatientName, PatientBirthDate,
            PatientSex, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, StudyDate,
            StudyTime, Modality, BodyPartExamined, SeriesNumber, InstanceNumber,
            AccessionNumber, StudyDescription; optional SliceThickness, SliceSpacing,
            FrameOfReferenceUID; any other DICOM keyword is set as given, last.
        matrix: (rows, columns) of the study; the modality's usual matrix by default.

    Returns:
        A dataset with file meta (Explicit VR Little Endian), ready for
        :func:`instance_bytes`.

    Raises:
        RenderError: a required UID is missing or the array is not 2-D.
    """
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not attrs.get(key):
            raise RenderError(f"{key} is required")
    modality = norm_modality(attrs.get("Modality"))
    body_part = norm_body_part(attrs.get("BodyPartExamined"))
    matrix = tuple(matrix or DEFAULT_MATRIX.get(modality, (512, 512)))
    sop_class = SOP_CLASS.get(modality, SECONDARY_CAPTURE)
    ds = _header(attrs, modality, body_part, sop_class)
    stored, pixel_attrs = _pixels(array, modality, matrix)
    ds.Rows, ds.Columns = matrix
    for key, value in pixel_attrs.items():
        setattr(ds, key, value)
    spacing = _pixel_spacing(modality, body_part, matrix)
    ds.PixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
    window = _window(modality, body_part)
    if window:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
        ds.VOILUTFunction = "LINEAR"
    _modality_specific(ds, modality, body_part, attrs, spacing)
    for key, value in attrs.items():
        if key in IDENTIFYING or key in NOT_KEYWORDS or key in ("Modality", "BodyPartExamined",
                                                                  "SeriesNumber", "InstanceNumber"):
            continue
        if pydicom.datadict.tag_for_keyword(key) is not None:
            setattr(ds, key, value)
    # PS3.5 §8.2: OW for 16-bit, OB for 8-bit native pixel data (set, not left ambiguous).
    ds.add_new(0x7FE00010, "OW" if ds.BitsAllocated > 8 else "OB", stored.tobytes())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "SYNTHPORT"
    ds.file_meta = meta
    return ds


def render_series(arrays: Sequence[np.ndarray] | np.ndarray, attrs: dict[str, Any],
                  matrix: tuple[int, int] | None = None) -> list[Dataset]:
    """A series of instances, one per array (slice), numbered from ``attrs["InstanceNumber"]``.

    SOP Instance UIDs come from ``attrs["SOPInstanceUIDs"]`` (one per slice) or are
    derived from the Series Instance UID and the slice index.
    """
    uids = attrs.get("SOPInstanceUIDs")
    if uids is not None and len(uids) != len(arrays):
        raise RenderError(f"{len(uids)} SOPInstanceUIDs for {len(arrays)} slices")
    first = int(attrs.get("InstanceNumber", 1) or 1)
    out: list[Dataset] = []
    for i, array in enumerate(arrays):
        number = first + i
        sop = str(uids[i]) if uids is not None else derived_uid(
            str(attrs["SeriesInstanceUID"]), "instance", str(number))
        if not out:
            out.append(render_instance(array, {**attrs, "InstanceNumber": number,
                                               "SOPInstanceUID": sop}, matrix))
            template = out[0]
            modality = template.Modality
            spacing = float(template.PixelSpacing[0])
            step = float(template.get("SpacingBetweenSlices") or 0.0)
            continue
        # The header is the first slice's: share its unchanged elements (a new dict of the
        # same DataElement objects) and drop those that differ per slice, so that setting
        # them makes new elements instead of changing the template's in place.
        ds = Dataset({t: e for t, e in template._dict.items() if t not in PER_SLICE_TAGS})
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = number
        if modality in CROSS_SECTIONAL:
            _place(ds, number, spacing, step)
        ds.add_new(0x7FE00010, template["PixelData"].VR,
                   _pixels(array, modality, (template.Rows, template.Columns))[0].tobytes())
        meta = FileMetaDataset({t: e for t, e in template.file_meta._dict.items()
                                if t != 0x00020003})
        meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta = meta
        out.append(ds)
    return out


def instance_bytes(ds: Dataset) -> bytes:
    """The PS3.10 file of ``ds`` (preamble, file meta, Explicit VR Little Endian)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def series_bytes(datasets: Sequence[Dataset]) -> list[bytes]:
    """The PS3.10 files of a series from :func:`render_series`, byte-identical to
    :func:`instance_bytes` of each, several times faster.

    The slices share most of their DataElement objects (the template's header), so each
    shared element is encoded once (pydicom's own element writer) and its bytes reused.
    """
    from pydicom.charset import convert_encodings
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import (correct_ambiguous_vr_element, write_data_element,
                                    write_file_meta_info)

    cache: dict[int, bytes] = {}
    shared = ({id(e) for e in datasets[1]._dict.values()} & {id(e) for e in datasets[0]._dict.values()}
              if len(datasets) > 1 else set())
    out = []
    for ds in datasets:
        encodings = convert_encodings(ds.get("SpecificCharacterSet"))
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        parts = [b"\0" * 128, b"DICM", meta.getvalue()]
        for tag in sorted(ds._dict):
            elem = ds._dict[tag]
            key = id(elem)
            if key in cache:
                parts.append(cache[key])
                continue
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_data_element(fp, correct_ambiguous_vr_element(ds[tag], ds, True), encodings)
            data = fp.getvalue()
            if key in shared:
                cache[key] = data
            parts.append(data)
        out.append(b"".join(parts))
    return out
