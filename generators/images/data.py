"""Training images from DICOM: pixel arrays normalised to [0, 1], resized to S x S.

Normalisation (the inverse is applied by :mod:`generators.images.render`):

* CT: Hounsfield units through the Modality LUT (PS3.3 §C.11.1), mapped linearly from
  ``[CT_HU_MIN, CT_HU_MAX]`` to [0, 1], so 0.5 means the same tissue in every image.
* everything else: the 0.5th to 99.5th percentile of the image mapped to [0, 1]
  (MR and radiograph values carry no absolute unit).
* MONOCHROME1 is inverted so that 1 is always white (PS3.3 §C.7.6.3.1.2).
* colour images (RGB, YBR_*, PALETTE COLOR) become grey (ITU-R BT.601 luma); for
  CT, MR, CR and DX they are skipped instead, as a colour CT is a screenshot, not a scan.

Files that cannot be read or decoded (a compressed transfer syntax without its
decoder plug-in, a truncated file) are skipped and counted, never raised.
"""
from __future__ import annotations

import glob
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

CT_HU_MIN = -1024.0
CT_HU_MAX = 1976.0
DUPLICATE_MAD = 0.01
GREY_ONLY = {"CT", "MR", "CR", "DX"}
# Modalities whose pixels are not an image of the patient (dose grids, segmentations,
# structured data) and would only teach the model noise.
NOT_IMAGES = {"RTDOSE", "RTSTRUCT", "RTPLAN", "SEG", "SR", "PR", "KO", "REG", "RWV"}


@dataclass
class CollectedImages:
    """Result of :func:`collect_images`.

    Attributes:
        images: ``(array [S, S] float32 in [0, 1], modality, body_part)`` tuples.
        skipped: number of files or frames left out, by reason.
    """

    images: list[tuple[np.ndarray, str, str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def norm_modality(value: object) -> str:
    """Upper-case modality code; ``"OT"`` when absent."""
    text = str(value or "").strip().upper()
    return text or "OT"


def norm_body_part(value: object) -> str:
    """Upper-case Body Part Examined (PS3.16 Annex L keywords); ``""`` when absent."""
    return str(value or "").strip().upper().replace(" ", "")


def resize(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float array with PIL (bicubic when enlarging, box filter when shrinking).

    Args:
        array: 2-D array.
        size: ``S`` for S x S, or ``(rows, cols)``.

    Returns:
        float32 array of the requested shape.
    """
    rows, cols = (size, size) if isinstance(size, int) else size
    a = np.ascontiguousarray(array, dtype=np.float32)
    if a.shape == (rows, cols):
        return a.copy()
    shrink = rows < a.shape[0] and cols < a.shape[1]
    img = Image.fromarray(a)  # float32 2-D -> mode "F"
    out = img.resize((cols, rows), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.float32)


def _to_grey(frame: np.ndarray, photometric: str) -> np.ndarray:
    if frame.ndim == 2:
        return frame.astype(np.float32)
    # pydicom's pixel_array already converts YBR to RGB by default; BT.601 luma.
    rgb = frame[..., :3].astype(np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _normalise(frame: np.ndarray, modality: str) -> np.ndarray | None:
    if modality == "CT":
        out = (frame - CT_HU_MIN) / (CT_HU_MAX - CT_HU_MIN)
    else:
        lo, hi = np.percentile(frame, [0.5, 99.5])
        if not np.isfinite(lo) or hi - lo <= 0:
            return None
        out = (frame - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _frames(ds, max_frames: int) -> list[int]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n <= max_frames:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, max_frames)})


def _near_duplicate(img: np.ndarray, kept: list[np.ndarray]) -> bool:
    return any(float(np.mean(np.abs(img - k))) < DUPLICATE_MAD for k in kept)


def collect_images(sources: Iterable, size: int = 64, max_frames: int = 8,
                   dedupe: bool = True) -> CollectedImages:
    """Collect training images from DICOM datasets or file paths.

    Args:
        sources: ``pydicom.Dataset`` objects or paths to DICOM files.
        size: side ``S`` of the square output arrays.
        max_frames: at most this many frames (evenly spaced) from a multi-frame instance,
            so that one cine loop does not outweigh a hundred radiographs.
        dedupe: keep one copy of an image found several times: by SOP Instance UID, and
            by content (mean absolute difference below ``DUPLICATE_MAD`` to an image kept
            of the same modality), as the sample packages ship the same image in several
            transfer syntaxes, some lossy, under different UIDs.

    Returns:
        The images with their modality and body part, and the skip counts.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, pixel_array

    out = CollectedImages()
    seen: set[str] = set()
    kept: dict[str, list[np.ndarray]] = {}
    for src in sources:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = src if isinstance(src, pydicom.Dataset) else pydicom.dcmread(src)
        except Exception:  # noqa: BLE001 - any unreadable file is skipped and counted
            out.skip("unreadable")
            continue
        if "PixelData" not in ds:
            out.skip("no pixel data")
            continue
        modality = norm_modality(ds.get("Modality"))
        if modality in NOT_IMAGES:
            out.skip("not an image modality")
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if dedupe and uid:
            if uid in seen:
                out.skip("duplicate instance")
                continue
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR"
        if colour and modality in GREY_ONLY:
            out.skip("colour image of a grey modality")
            continue
        frame_ids = _frames(ds, max_frames)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Decode only the frames used: a 120-frame JPEG cine costs seconds otherwise.
                pixels = [pixel_array(ds, index=i) for i in frame_ids]
                if photometric == "PALETTE COLOR":
                    from pydicom.pixels import apply_color_lut
                    pixels = [apply_color_lut(p, ds) for p in pixels]
        except Exception:  # noqa: BLE001 - missing decoder, truncated or malformed data
            out.skip("cannot decode pixel data")
            continue
        added = False
        for frame in pixels:
            if not colour and modality == "CT":
                try:
                    frame = apply_modality_lut(frame, ds)
                except Exception:  # noqa: BLE001 - malformed rescale values
                    out.skip("bad modality LUT")
                    continue
            grey = _to_grey(np.asarray(frame), photometric)
            if photometric == "MONOCHROME1":
                grey = grey.max() - grey + grey.min()
            norm = _normalise(grey, modality)
            if norm is None:
                out.skip("constant image")
                continue
            small = np.clip(resize(norm, size), 0.0, 1.0)
            bucket = kept.setdefault(modality, [])
            if dedupe and _near_duplicate(small, bucket):
                out.skip("duplicate image")
                continue
            bucket.append(small)
            out.images.append((small, modality, norm_body_part(ds.get("BodyPartExamined"))))
            added = True
        if added and uid:
            seen.add(uid)
    return out


def sample_dicom_paths() -> list[str]:
    """DICOM files shipped by pydicom, pydicom-data and deid-data (those installed).

    These are the training images used by the tests and benchmarks (MIT licensed,
    installed with the ``test`` extra, never committed).
    """
    import pydicom.data

    paths = list(pydicom.data.get_testdata_files())  # includes pydicom-data when installed
    try:
        import deid_data

        root = Path(deid_data.__file__).parent / "data"
        paths += glob.glob(os.path.join(root, "**", "*.dcm"), recursive=True)
    except ImportError:
        pass
    return sorted(set(paths))


def fingerprint(images: list[tuple[np.ndarray, str, str]]) -> str:
    """SHA-256 over the training arrays and their labels, in order."""
    h = hashlib.sha256()
    for arr, modality, body_part in images:
        h.update(f"{modality}|{body_part}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
    return h.hexdigest()
