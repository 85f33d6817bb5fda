"""DICOM <-> image table: one row per instance, a pixel loader, and a row -> Dataset mapping.

Attributes follow PS3.3 (Patient, General Study, General Series, SOP Common, Image Pixel,
Image Plane modules). Pixel values are normalised the way a viewer displays them:
Modality LUT (rescale), VOI LUT (window), MONOCHROME1 inversion (PS3.3 C.7.6.3.1.2).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from mappings.errors import MappingError

IMAGE_COLUMNS = ["patient_id", "study_uid", "series_uid", "sop_uid", "sop_class_uid", "modality",
                 "body_part", "rows", "columns", "frames", "pixel_spacing_row",
                 "pixel_spacing_col", "slice_thickness", "photometric", "samples_per_pixel",
                 "bits_allocated", "bits_stored", "pixel_representation", "rescale_slope",
                 "rescale_intercept", "window_center", "window_width", "study_date",
                 "series_number", "instance_number", "transfer_syntax", "path"]
_INT_COLS = ["rows", "columns", "frames", "samples_per_pixel", "bits_allocated", "bits_stored",
             "pixel_representation", "series_number", "instance_number"]
_FLOAT_COLS = ["pixel_spacing_row", "pixel_spacing_col", "slice_thickness", "rescale_slope",
               "rescale_intercept", "window_center", "window_width"]
_CAT_COLS = ["modality", "body_part", "photometric", "sop_class_uid", "transfer_syntax"]

IMAGE_COLUMN_META = {
    "patient_id": {"kind": "key", "tag": "(0010,0020)"},
    "study_uid": {"kind": "key", "tag": "(0020,000D)"},
    "series_uid": {"kind": "key", "tag": "(0020,000E)"},
    "sop_uid": {"kind": "key", "tag": "(0008,0018)"},
    "sop_class_uid": {"kind": "categorical", "tag": "(0008,0016)"},
    "modality": {"kind": "categorical", "tag": "(0008,0060)",
                 "system": "http://dicom.nema.org/resources/ontology/DCM"},
    "body_part": {"kind": "categorical", "tag": "(0018,0015)"},
    "rows": {"kind": "numerical", "integer": True, "tag": "(0028,0010)"},
    "columns": {"kind": "numerical", "integer": True, "tag": "(0028,0011)"},
    "frames": {"kind": "numerical", "integer": True, "tag": "(0028,0008)"},
    "pixel_spacing_row": {"kind": "numerical", "unit": "mm", "tag": "(0028,0030)[0]"},
    "pixel_spacing_col": {"kind": "numerical", "unit": "mm", "tag": "(0028,0030)[1]"},
    "slice_thickness": {"kind": "numerical", "unit": "mm", "tag": "(0018,0050)"},
    "photometric": {"kind": "categorical", "tag": "(0028,0004)"},
    "samples_per_pixel": {"kind": "numerical", "integer": True, "tag": "(0028,0002)"},
    "bits_allocated": {"kind": "numerical", "integer": True, "tag": "(0028,0100)"},
    "bits_stored": {"kind": "numerical", "integer": True, "tag": "(0028,0101)"},
    "pixel_representation": {"kind": "categorical", "tag": "(0028,0103)"},
    "rescale_slope": {"kind": "numerical", "tag": "(0028,1053)"},
    "rescale_intercept": {"kind": "numerical", "tag": "(0028,1052)"},
    "window_center": {"kind": "numerical", "tag": "(0028,1050)[0]"},
    "window_width": {"kind": "numerical", "tag": "(0028,1051)[0]"},
    "study_date": {"kind": "datetime", "tag": "(0008,0020)"},
    "series_number": {"kind": "numerical", "integer": True, "tag": "(0020,0011)"},
    "instance_number": {"kind": "numerical", "integer": True, "tag": "(0020,0013)"},
    "transfer_syntax": {"kind": "categorical", "tag": "(0002,0010)"},
    "path": {"kind": "key", "description": "file the row was read from (None for datasets)"},
}


def _read(src: Any, pixels: bool) -> tuple[Dataset, str | None]:
    if isinstance(src, Dataset):
        return src, None
    try:
        return pydicom.dcmread(str(src), stop_before_pixels=not pixels), str(src)
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        raise MappingError(f"cannot read DICOM {src}: {exc}") from None


def _first(v) -> float | None:
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        v = v[0] if len(v) else None
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def image_row(ds: Dataset, path: str | None = None) -> dict:
    """The image-table row of one instance (PS3.3 attribute values, None when absent)."""
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if ps is None and "SharedFunctionalGroupsSequence" in ds:
        # Enhanced multi-frame objects: PS3.3 C.7.6.16.2.1 Pixel Measures
        try:
            ps = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError):
            ps = None
    fm = getattr(ds, "file_meta", None)
    date = ds.get("StudyDate")
    return {
        "patient_id": ds.get("PatientID") or None,
        "study_uid": ds.get("StudyInstanceUID"),
        "series_uid": ds.get("SeriesInstanceUID"),
        "sop_uid": ds.get("SOPInstanceUID"),
        "sop_class_uid": ds.get("SOPClassUID"),
        "modality": ds.get("Modality") or None,
        "body_part": ds.get("BodyPartExamined") or None,
        "rows": ds.get("Rows"),
        "columns": ds.get("Columns"),
        "frames": int(ds.get("NumberOfFrames") or 1),
        "pixel_spacing_row": float(ps[0]) if ps else None,
        "pixel_spacing_col": float(ps[1]) if ps and len(ps) > 1 else None,
        "slice_thickness": _first(ds.get("SliceThickness")),
        "photometric": ds.get("PhotometricInterpretation"),
        "samples_per_pixel": ds.get("SamplesPerPixel"),
        "bits_allocated": ds.get("BitsAllocated"),
        "bits_stored": ds.get("BitsStored"),
        "pixel_representation": ds.get("PixelRepresentation"),
        "rescale_slope": _first(ds.get("RescaleSlope")),
        "rescale_intercept": _first(ds.get("RescaleIntercept")),
        "window_center": _first(ds.get("WindowCenter")),
        "window_width": _first(ds.get("WindowWidth")),
        "study_date": pd.to_datetime(str(date), format="%Y%m%d", errors="coerce") if date else None,
        "series_number": ds.get("SeriesNumber"),
        "instance_number": ds.get("InstanceNumber"),
        "transfer_syntax": str(fm.TransferSyntaxUID) if fm is not None and "TransferSyntaxUID" in fm else None,
        "path": path,
    }


def image_table(sources: Iterable[Dataset | str | Path]) -> pd.DataFrame:
    """The image table of DICOM instances given as Datasets or file paths (pixels not read)."""
    rows = [image_row(*_read(s, pixels=False)) for s in sources]
    df = pd.DataFrame(rows, columns=IMAGE_COLUMNS)
    for c in _INT_COLS:
        df[c] = pd.array([None if v is None else int(v) for v in df[c]], dtype="Int64")
    for c in _FLOAT_COLS:
        df[c] = df[c].astype("float64")
    for c in _CAT_COLS:
        df[c] = df[c].astype("object").where(df[c].notna(), None).astype("category")
    for c in ("patient_id", "study_uid", "series_uid", "sop_uid", "path"):
        df[c] = df[c].astype("object").where(df[c].notna(), None).astype("string")
    df["study_date"] = pd.to_datetime(df["study_date"])
    return df


def image_table_meta(df: pd.DataFrame) -> dict:
    """Column metadata of an image table."""
    return {"table": {"name": "images", "key": "sop_uid", "n_instances": int(len(df))},
            "columns": {c: {**IMAGE_COLUMN_META[c], "dtype": str(df[c].dtype)} for c in df.columns}}


def load_pixels(src: Dataset | str | Path, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """The first frame as float32 in [0, 1], as a viewer would display it.

    Grey images: Modality LUT (Rescale Slope/Intercept), then the first VOI window when
    present (PS3.3 C.11.2.1.2, linear), else min-max scaling; MONOCHROME1 is inverted so
    that 1 is always white. Colour images are converted to RGB and scaled by their bit
    depth, shape (rows, columns, 3).

    Args:
        src: a Dataset or a file path.
        size: resize to ``size`` x ``size`` or ``(rows, columns)`` with PIL (bilinear).

    Raises:
        MappingError: no pixel data, or a transfer syntax without an installed decoder.
    """
    from pydicom.pixels import apply_modality_lut

    ds, _ = _read(src, pixels=True)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MappingError("the dataset has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoder plugins raise various errors
        raise MappingError(f"cannot decode pixel data ({ds.file_meta.TransferSyntaxUID.name}): {exc}") from None
    frames = int(ds.get("NumberOfFrames") or 1)
    spp = int(ds.get("SamplesPerPixel") or 1)
    if frames > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if spp > 1 or photometric == "PALETTE COLOR":
        out = _colour(ds, arr, photometric)
    else:
        x = apply_modality_lut(arr, ds).astype(np.float64)
        c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if c is not None and w is not None and w >= 1:
            # PS3.3 C.11.2.1.2.1 linear VOI function, output range [0, 1]
            out = np.clip((x - (c - 0.5)) / (w - 1 if w > 1 else 1) + 0.5, 0.0, 1.0)
        else:
            lo, hi = float(np.min(x)), float(np.max(x))
            out = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        if photometric == "MONOCHROME1":
            out = 1.0 - out
    out = out.astype(np.float32)
    if size is not None:
        out = _resize(out, size)
    return out


def _colour(ds: Dataset, arr: np.ndarray, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float64)
        bits = 16 if rgb.max() > 255 else 8
    else:
        # pydicom's pixel_array already converts YBR_* to RGB (its as_rgb default).
        rgb = arr.astype(np.float64)
        bits = int(ds.get("BitsStored") or 8)
    return np.clip(rgb / float((1 << bits) - 1), 0.0, 1.0)


def _resize(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    from PIL import Image

    rows, cols = (size, size) if isinstance(size, int) else size
    if img.ndim == 2:
        return np.asarray(Image.fromarray(img, mode="F").resize((cols, rows), Image.BILINEAR),
                          dtype=np.float32)
    chans = [np.asarray(Image.fromarray(img[..., i], mode="F").resize((cols, rows), Image.BILINEAR))
             for i in range(img.shape[-1])]
    return np.stack(chans, axis=-1).astype(np.float32)


def row_to_dataset(row: Mapping | pd.Series, pixels: np.ndarray | None = None) -> Dataset:
    """A DICOM Dataset (with file meta) carrying the attributes of an image-table row.

    Args:
        row: image-table row (Series or dict). UIDs, modality, body part, geometry and pixel
            description are copied; absent UIDs are generated.
        pixels: optional float array in [0, 1] (rows x columns, or x 3 for RGB), stored as
            unsigned integers of ``bits_stored`` bits (MONOCHROME1 inverted back).
    """
    from pydicom.uid import generate_uid

    r = {k: _val(v) for k, v in (row.items() if hasattr(row, "items") else row)}
    ds = Dataset()
    sop_class = r.get("sop_class_uid") or "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = r.get("sop_uid") or generate_uid()
    ds.StudyInstanceUID = r.get("study_uid") or generate_uid()
    ds.SeriesInstanceUID = r.get("series_uid") or generate_uid()
    ds.PatientID = str(r.get("patient_id") or "")
    ds.Modality = r.get("modality") or "OT"
    if r.get("body_part"):
        ds.BodyPartExamined = str(r["body_part"])[:16]
    if r.get("study_date") is not None:
        ds.StudyDate = pd.Timestamp(r["study_date"]).strftime("%Y%m%d")
    if r.get("series_number") is not None:
        ds.SeriesNumber = int(r["series_number"])
    if r.get("instance_number") is not None:
        ds.InstanceNumber = int(r["instance_number"])
    spp = int(r.get("samples_per_pixel") or 1)
    ds.SamplesPerPixel = spp
    ds.PhotometricInterpretation = r.get("photometric") or ("RGB" if spp == 3 else "MONOCHROME2")
    ds.Rows = int(r.get("rows") or (pixels.shape[0] if pixels is not None else 0))
    ds.Columns = int(r.get("columns") or (pixels.shape[1] if pixels is not None else 0))
    bits_alloc = int(r.get("bits_allocated") or 16)
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = int(r.get("bits_stored") or bits_alloc)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(r.get("pixel_representation") or 0)
    if r.get("frames") and int(r["frames"]) > 1:
        ds.NumberOfFrames = int(r["frames"])
    if r.get("pixel_spacing_row") is not None:
        ds.PixelSpacing = [_ds(r["pixel_spacing_row"]), _ds(r.get("pixel_spacing_col") or r["pixel_spacing_row"])]
    if r.get("slice_thickness") is not None:
        ds.SliceThickness = _ds(r["slice_thickness"])
    for key, kw in (("rescale_slope", "RescaleSlope"), ("rescale_intercept", "RescaleIntercept"),
                    ("window_center", "WindowCenter"), ("window_width", "WindowWidth")):
        if r.get(key) is not None:
            setattr(ds, kw, _ds(r[key]))
    if spp > 1:
        ds.PlanarConfiguration = 0
    if pixels is not None:
        _set_pixels(ds, pixels)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = ds.SOPClassUID
    fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = fm
    return ds


def _ds(v: float) -> str:
    """A Decimal String value (PS3.5 §6.2: at most 16 characters)."""
    s = repr(float(v))
    if len(s) > 16:
        s = f"{float(v):.10g}"
    return s


def _val(v):
    if v is None:
        return None
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        return v
    return v.item() if hasattr(v, "item") else v


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    px = np.clip(np.asarray(pixels, dtype=np.float64), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        px = 1.0 - px
    ds.Rows, ds.Columns = int(px.shape[0]), int(px.shape[1])
    if ds.BitsAllocated not in (8, 16):
        ds.BitsAllocated = 16
    ds.BitsStored = min(int(ds.BitsStored), int(ds.BitsAllocated))
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    ints = np.rint(px * ((1 << int(ds.BitsStored)) - 1)).astype(dtype)
    ds.PixelData = ints.tobytes()
    # The stored values are already display values: drop rescale/window from the row.
    for kw in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "NumberOfFrames"):
        if kw in ds:
            delattr(ds, kw)
    if math.prod(px.shape[:2]) == 0:
        raise MappingError("empty pixel array")
