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


def _fit(array: np.ndarray, matrix: tuple[int, int]) -> np.ndarray:
    """Upsample a square array to ``matrix`` keeping its aspect (resize, then centre crop)."""
    rows, cols = matrix
    a = np.asarray(array, dtype=np.float32)
    if a.ndim != 2:
        raise RenderError(f"expected a 2-D array, got shape {a.shape}")
    side = max(rows, cols)
    big = resize(a, (side, side)) if a.shape != (side, side) else a
    r0, c0 = (side - rows) // 2, (side - cols) // 2
    return np.clip(big[r0:r0 + rows, c0:c0 + cols], 0.0, 1.0)


def _pixels(v: np.ndarray, modality: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored values and the Image Pixel / Modality LUT / VOI LUT attributes (PS3.3 §C.7.6.3)."""
    if modality == "OP":
        # Fundus-like colours from the grey level (red dominates a retinal photograph).
        rgb = np.stack([v ** 0.7, 0.55 * v ** 1.2, 0.25 * v ** 2.0], axis=-1)
        return (rgb * 255.0 + 0.5).astype(np.uint8), {
            "SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0,
            "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0}
    if modality == "US":
        return (v * 255.0 + 0.5).astype(np.uint8), {
            "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
            "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0}
    attrs = {"SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
             "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0,
             "RescaleSlope": "1", "RescaleIntercept": "0"}
    if modality == "CT":
        # PS3.3 §C.8.2.1: HU = stored * slope + intercept; stored 0 is -1024 HU (air).
        stored = v * (CT_HU_MAX - CT_HU_MIN) + (CT_HU_MIN + 1024.0)
        attrs["RescaleIntercept"] = "-1024"
    else:
        stored = v * 4095.0
    return (stored + 0.5).astype(np.uint16), attrs


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
        z = -(inst - 1) * step
        half = spacing * ds.Rows / 2.0
        ds.ImagePositionPatient = [f"{-half:g}", f"{-half:g}", f"{z:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceThickness = f"{thickness:g}"
        ds.SpacingBetweenSlices = f"{step:g}"
        ds.SliceLocation = f"{z:g}"
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
    stored, pixel_attrs = _pixels(_fit(array, matrix), modality)
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
    ds.PixelData = stored.tobytes()
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
    out = []
    for i, array in enumerate(arrays):
        a = dict(attrs)
        a["InstanceNumber"] = first + i
        a["SOPInstanceUID"] = uids[i] if uids is not None else derived_uid(
            str(attrs["SeriesInstanceUID"]), "instance", str(first + i))
        out.append(render_instance(array, a, matrix))
    return out


def instance_bytes(ds: Dataset) -> bytes:
    """The PS3.10 file of ``ds`` (preamble, file meta, Explicit VR Little Endian)."""
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
