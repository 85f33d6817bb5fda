"""Pixel-level work for WADO-RS: frames, transcoding, rendering, bulk data values.

Everything takes the stored Part 10 bytes (from ``DicomSource.open_instance``) and
returns bytes; no Flask, no SQL.

* Frames (PS3.18 §10.4.1.1.4): native (uncompressed) pixel data are cut per frame and
  served little endian (a big endian source is byte-swapped); encapsulated pixel data
  are served as stored, one compressed frame per part, with their transfer syntax.
* Transcoding (instances): only to Explicit or Implicit VR Little Endian, and only from
  an uncompressed source; anything else is 406 at the HTTP layer.
* Rendering (PS3.18 §10.4.1.1.5, §8.3.5.1): modality LUT (Rescale Slope/Intercept),
  VOI from the ``window`` parameter, else Window Center/Width (first value, also from
  the functional groups of enhanced multi-frame objects), else the frame's min/max;
  MONOCHROME1 inverted; colour (RGB, YBR, palette) as RGB; scaled to ``viewport``.
"""
from __future__ import annotations

import io
import logging
import struct
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.encaps import get_frame
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian)

from server.errors import InvalidRequest, NotAcceptable, NotFound

log = logging.getLogger("synthport.dicom")

EVRLE = str(ExplicitVRLittleEndian)
IVRLE = str(ImplicitVRLittleEndian)
NATIVE_SYNTAXES = frozenset({EVRLE, IVRLE, str(ExplicitVRBigEndian),
                             str(DeflatedExplicitVRLittleEndian)})
TRANSCODE_TARGETS = frozenset({EVRLE, IVRLE})
TRANSCODE_SOURCES = frozenset({EVRLE, IVRLE, str(DeflatedExplicitVRLittleEndian)})
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# PS3.18 Table 8.7.3-5 (media types of compressed bulk data) and -3 (video).
TS_MEDIA_TYPE: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg2", "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4", "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4", "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4", "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
MEDIA_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}


def media_type_for(ts: str) -> str:
    """The bulk data media type of a transfer syntax (uncompressed: octet-stream)."""
    return TS_MEDIA_TYPE.get(str(ts), "application/octet-stream")


def read(data: bytes, stop_before_pixels: bool = False) -> Dataset:
    """Parse stored Part 10 bytes (they were validated when stored)."""
    return dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)


def transcode(data: bytes, target: str) -> bytes:
    """Re-encode an instance in ``target`` (EVRLE or IVRLE) from an uncompressed source.

    Raises:
        NotAcceptable: another target, or a compressed or big endian source.
    """
    ds = read(data)
    source = str(ds.file_meta.TransferSyntaxUID)
    if source == target:
        return data
    if target not in TRANSCODE_TARGETS or source not in TRANSCODE_SOURCES:
        raise NotAcceptable(f"Cannot transcode from {UID(source).name} to {UID(target).name}; "
                            "ask for transfer-syntax=* to get the stored encoding")
    ds.file_meta.TransferSyntaxUID = UID(target)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pixel_element(ds: Dataset):
    for kw in PIXEL_KEYWORDS:
        if kw in ds:
            try:
                return ds[kw]
            except Exception as exc:  # noqa: BLE001 - pydicom cannot read the element as stored
                raise NotFound(f"The {kw} element cannot be read as stored: {exc}") from None
    return None


#: What reading an attribute of a stored file may raise when its value is malformed
#: (pydicom converts on access: an unknown VR is NotImplementedError).
READ_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError)


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except READ_ERRORS:
        return 1


def parse_frame_list(text: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3] (PS3.18 §8.3.3.1: frame numbers start at 1).

    Raises:
        InvalidRequest: not a list of positive integers.
    """
    try:
        numbers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InvalidRequest(f"Invalid frame list '{text}' (expected e.g. 1 or 1,2,3)") from None
    if not numbers or any(n < 1 for n in numbers):
        raise InvalidRequest(f"Invalid frame list '{text}' (frame numbers start at 1)")
    return numbers


def frames(data: bytes, numbers: list[int]) -> tuple[str, list[bytes]]:
    """The requested frames and the transfer syntax they are encoded in.

    Native pixel data come back little endian as Explicit VR Little Endian; encapsulated
    pixel data as stored (one compressed frame each).

    Raises:
        NotFound: the instance has no pixel data, or a frame number is out of range.
    """
    ds = read(data)
    elem = _pixel_element(ds)
    if elem is None or elem.value is None:
        raise NotFound("The instance has no pixel data")
    n = number_of_frames(ds)
    bad = [k for k in numbers if k > n]
    if bad:
        raise NotFound(f"Frame {bad[0]} does not exist (the instance has {n} frame(s))")
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts not in NATIVE_SYNTAXES:
        try:
            return ts, [get_frame(elem.value, k - 1, number_of_frames=n) for k in numbers]
        except (*READ_ERRORS, struct.error) as exc:
            # PS3.5 A.4: items, fragments and offset table as stored do not hold the frame
            raise NotFound(f"The frame cannot be read from the stored encapsulated Pixel "
                           f"Data: {exc}") from None
    try:
        return EVRLE, [_native_frame(ds, elem, k - 1, n, ts) for k in numbers]
    except READ_ERRORS as exc:
        raise NotFound(f"The image attributes cannot be read as stored: {exc}") from None


def _native_frame(ds: Dataset, elem, index: int, n: int, ts: str) -> bytes:
    raw = bytes(elem.value)
    bits = int(ds.get("BitsAllocated") or 8)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    spp = int(ds.get("SamplesPerPixel") or 1)
    pixels = rows * cols * spp
    if str(ds.get("PhotometricInterpretation", "")).startswith("YBR") and \
            str(ds.get("PhotometricInterpretation")).endswith("_422"):
        pixels = rows * cols * 2
    if pixels <= 0 or bits <= 0 or (bits != 1 and bits % 8):
        # PS3.5 §8.1.1: BitsAllocated is 1 or a multiple of 8
        raise NotFound(f"The instance's image attributes (Rows {rows}, Columns {cols}, "
                       f"SamplesPerPixel {spp}, BitsAllocated {bits}) describe no frame")
    need = (index + 1) * pixels * bits
    if len(raw) * 8 < need:
        # Never a frame cut short: the attributes ask for more than the value holds.
        raise NotFound(f"Frame {index + 1} is not in the stored Pixel Data: its "
                       f"{rows}x{cols}x{spp} pixels of {bits} bits need {(need + 7) // 8} "
                       f"bytes, the value holds {len(raw)}")
    if bits == 1:
        bitstream = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        part = bitstream[index * pixels:(index + 1) * pixels]
        return np.packbits(part, bitorder="little").tobytes()
    size = pixels * bits // 8
    frame = raw[index * size:(index + 1) * size]
    if ts == str(ExplicitVRBigEndian) and bits in (16, 32, 64):
        frame = np.frombuffer(frame, dtype=f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
    return frame


def bulk_value(data: bytes, path: str) -> bytes:
    """The value of the element at a tag path (``7FE00010``, ``00540016/0/00181072``).

    Raises:
        NotFound: no such element.
    """
    ds = read(data)
    parts = [p for p in path.strip("/").split("/") if p]
    try:
        node: Any = ds
        for i, part in enumerate(parts):
            if i % 2 == 0:
                node = node[int(part, 16)]
                if i < len(parts) - 1:
                    node = node.value
            else:
                node = node[int(part)]
        value = node.value
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        raise NotFound(f"No bulk data at '{path}'") from None
    if isinstance(value, (bytes, bytearray)):
        if node.tag in (0x7FE00010,) and str(ds.file_meta.TransferSyntaxUID) == str(ExplicitVRBigEndian):
            bits = int(ds.get("BitsAllocated") or 8)
            if bits in (16, 32):
                return np.frombuffer(value, dtype=f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise NotFound(f"The element at '{path}' is not bulk data")


# --------------------------------------------------------------------------- rendering
def _functional(ds: Dataset, index: int, seq: str, attr: str):
    """``attr`` from the per-frame or shared functional groups (enhanced multi-frame)."""
    for group in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = ds.get(group)
        if not items:
            continue
        item = items[index] if group.startswith("PerFrame") and len(items) > index else items[0]
        inner = item.get(seq)
        if inner and attr in inner[0]:
            return inner[0].get(attr)
    return None


def _first(value) -> float | None:
    """First value of a DS/IS (multi-valued or not) as float; None when absent/invalid."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if not len(value):
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _leading_numbers(text: str, conv, what: str, expected: str) -> tuple[list[str], tuple]:
    """Split a comma list and convert its first two items; 400 with the expected form if not."""
    parts = [p.strip() for p in text.split(",")]
    try:
        return parts, (conv(parts[0]), conv(parts[1]))
    except (ValueError, IndexError):
        raise InvalidRequest(f"Invalid {what} '{text}' (expected {expected})") from None


def parse_window(text: str | None) -> tuple[float, float, str] | None:
    """``window=center,width[,function]`` (PS3.18 §8.3.5.1.4).

    Raises:
        InvalidRequest: malformed.
    """
    if not text:
        return None
    parts, (center, width) = _leading_numbers(text, float, "window", "center,width[,function]")
    function = parts[2].upper() if len(parts) > 2 and parts[2] else "LINEAR"
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or width <= 0:
        raise InvalidRequest(f"Invalid window '{text}'")
    return center, width, function


def parse_viewport(text: str | None) -> tuple[int, int] | None:
    """``viewport=vw,vh`` (PS3.18 §8.3.5.1.3; the source-region form is not supported).

    Raises:
        InvalidRequest: malformed.
    """
    if not text:
        return None
    _, (vw, vh) = _leading_numbers(text, int, "viewport", "width,height")
    if vw < 1 or vh < 1 or vw > 8192 or vh > 8192:
        raise InvalidRequest(f"Invalid viewport '{text}'")
    return vw, vh


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI LUT function (PS3.3 C.11.2.1.2) to 0..1."""
    if function == "LINEAR_EXACT":
        out = (arr - center) / width + 0.5
    elif function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    else:
        w = max(width - 1.0, 1e-6)
        out = (arr - (center - 0.5)) / w + 0.5
    return np.clip(out, 0.0, 1.0)


def render_frame(data: bytes, index: int, media_type: str, *, viewport: tuple[int, int] | None = None,
                 window: tuple[float, float, str] | None = None, quality: int | None = None,
                 max_size: int | None = None) -> bytes:
    """One frame as ``image/jpeg`` or ``image/png``.

    Args:
        data: stored Part 10 bytes.
        index: 0-based frame index.
        media_type: ``image/jpeg`` or ``image/png``.
        viewport: fit into (width, height), keeping the aspect ratio.
        window: (center, width, function) overriding the header's VOI.
        quality: JPEG quality 1..100 (default 90).
        max_size: fit into a max_size square (thumbnails) when no viewport is given.

    Raises:
        NotFound: no pixel data, or no such frame.
        NotAcceptable: the pixel data cannot be decoded here (no decoder).
    """
    from pydicom.pixels import pixel_array

    ds = read(data)
    if _pixel_element(ds) is None:
        raise NotAcceptable("The instance has no pixel data to render")
    n = number_of_frames(ds)
    if index >= n:
        raise NotFound(f"Frame {index + 1} does not exist (the instance has {n} frame(s))")
    try:
        arr = pixel_array(ds, index=index)
    except Exception as exc:  # noqa: BLE001 - missing decoder plugin, corrupt data
        raise NotAcceptable(f"Cannot decode {UID(str(ds.file_meta.TransferSyntaxUID)).name} pixel "
                            f"data for rendering: {exc}") from None
    try:
        img = _image(ds, arr, index, window)
    except READ_ERRORS as exc:
        # attributes that contradict the decoded array (a palette without its LUT,
        # SamplesPerPixel of 2...): nothing to show, as for undecodable pixel data
        raise NotAcceptable(f"Cannot render these pixel data: {exc}") from None
    if viewport:
        img = _fit(img, viewport)
    elif max_size:
        img = _fit(img, (max_size, max_size))
    buf = io.BytesIO()
    if media_type == "image/png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=int(quality or 90))
    return buf.getvalue()


def _image(ds: Dataset, arr, index: int, window):
    """The decoded frame as a PIL image: palette and colour as RGB, grey through the
    rescale and the window (given, from the data set, or the frame's range)."""
    from PIL import Image
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        rgb = apply_color_lut(arr, ds)
        out = (rgb.astype(np.float64) / max(float(rgb.max()), 1.0) * 255.0
               if rgb.dtype != np.uint8 else rgb.astype(np.float64))
        img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    elif arr.ndim == 3:
        if arr.dtype != np.uint8:
            bits = int(ds.get("BitsStored") or 8)
            arr = arr.astype(np.float64) / float(2 ** bits - 1) * 255.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    else:
        values = arr.astype(np.float64)
        slope = _first(ds.get("RescaleSlope")) or _first(_functional(
            ds, index, "PixelValueTransformationSequence", "RescaleSlope")) or 1.0
        intercept = _first(ds.get("RescaleIntercept"))
        if intercept is None:
            intercept = _first(_functional(ds, index, "PixelValueTransformationSequence",
                                           "RescaleIntercept")) or 0.0
        values = values * slope + intercept
        if window is None:
            center = _first(ds.get("WindowCenter"))
            width = _first(ds.get("WindowWidth"))
            if center is None or width is None:
                center = _first(_functional(ds, index, "FrameVOILUTSequence", "WindowCenter"))
                width = _first(_functional(ds, index, "FrameVOILUTSequence", "WindowWidth"))
            if center is not None and width is not None and width > 0:
                function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
                window = (center, width, function if function in ("LINEAR", "LINEAR_EXACT", "SIGMOID")
                          else "LINEAR")
        if window is None:
            lo, hi = float(values.min()), float(values.max())
            window = ((lo + hi) / 2.0 + 0.5, max(hi - lo, 1.0) + 1.0, "LINEAR")
        grey = _window(values, *window) * 255.0
        if photometric == "MONOCHROME1":
            grey = 255.0 - grey
        img = Image.fromarray(np.rint(grey).astype(np.uint8), "L")
    return img


def _fit(img, box: tuple[int, int]):
    from PIL import Image

    w, h = img.size
    scale = min(box[0] / w, box[1] / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS) if size != img.size else img
