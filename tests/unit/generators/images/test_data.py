"""Training images from DICOM: normalisation, frames, colour and undecodable files."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from generators.images.data import CT_HU_MAX, CT_HU_MIN, collect_images, fingerprint, sample_dicom_paths


def make(pixels: np.ndarray, modality: str = "MR", photometric: str = "MONOCHROME2",
         body_part: str = "", **extra) -> Dataset:
    """A minimal in-memory dataset holding ``pixels`` (uint16 grey or uint8 RGB)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    frames = pixels.shape[0] if pixels.ndim == (4 if pixels.dtype == np.uint8 and photometric == "RGB" else 3) else 1
    rgb = photometric == "RGB"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 8 if rgb else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    return ds


def gradient(rows: int = 32, cols: int = 32) -> np.ndarray:
    return (np.add.outer(np.arange(rows), np.arange(cols)) * 40).astype(np.uint16)


def test_ct_is_normalised_in_hounsfield_units():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    got = collect_images([ds], size=ds.Rows)
    [(arr, modality, _)] = got.images
    assert modality == "CT" and arr.dtype == np.float32 and arr.shape == (ds.Rows, ds.Rows)
    expected = np.clip((hu - CT_HU_MIN) / (CT_HU_MAX - CT_HU_MIN), 0, 1)
    assert np.allclose(arr, expected, atol=1e-5)


def test_other_modalities_use_percentiles_and_resize():
    got = collect_images([make(gradient(32, 48))], size=16)
    [(arr, modality, body_part)] = got.images
    assert (modality, body_part) == ("MR", "")
    assert arr.shape == (16, 16) and arr.min() == 0.0 and arr.max() == 1.0
    assert arr[0, 0] < arr[-1, -1]


def test_monochrome1_is_inverted():
    m2 = collect_images([make(gradient(), "CR", "MONOCHROME2")], size=32).images[0][0]
    m1 = collect_images([make(gradient(), "CR", "MONOCHROME1")], size=32).images[0][0]
    assert np.allclose(m1, 1.0 - m2, atol=1e-5)


def test_rgb_becomes_grey_except_for_grey_modalities():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = np.arange(16)[None, :] * 16
    got = collect_images([make(rgb, "US", "RGB"), make(rgb, "CT", "RGB")], size=16)
    assert [m for _, m, _ in got.images] == ["US"]
    assert got.skipped == {"colour image of a grey modality": 1}
    assert got.images[0][0][:, -1].mean() > got.images[0][0][:, 0].mean()


def test_multiframe_takes_evenly_spaced_frames():
    frames = np.stack([gradient() + i * 7 for i in range(20)]).astype(np.uint16)
    frames[:, :, :16] = np.arange(20)[:, None, None] * 50  # frames differ in content
    got = collect_images([make(frames, "US", NumberOfFrames=20)], size=16, max_frames=5,
                         dedupe=False)
    assert len(got.images) == 5


def test_undecodable_unreadable_and_duplicates_are_counted(tmp_path):
    bad = tmp_path / "not-dicom.dcm"
    bad.write_bytes(b"hello")
    ds = make(gradient())
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # pixel data is not JPEG-LS: cannot decode
    dup = make(gradient())
    copy = make(gradient())
    copy.SOPInstanceUID = dup.SOPInstanceUID
    nopix = Dataset()
    nopix.Modality = "CT"
    got = collect_images([bad, ds, dup, copy, make(gradient()), nopix], size=16)
    assert len(got.images) == 1
    assert got.skipped == {"unreadable": 1, "cannot decode pixel data": 1,
                           "duplicate instance": 1, "duplicate image": 1, "no pixel data": 1}
    assert got.n_skipped == 5


def test_shipped_test_files_give_several_modalities():
    paths = sample_dicom_paths()
    assert any(p.endswith("CT_small.dcm") for p in paths)
    wanted = [p for p in paths if p.rsplit("/", 1)[-1] in
              {"CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "US1_UNCR.dcm", "RG3_UNCR.dcm",
               "MR_small_jpeg_ls_lossless.dcm"}]
    got = collect_images(wanted, size=32)
    modalities = {m for _, m, _ in got.images}
    assert {"CT", "MR"} <= modalities
    assert all(a.shape == (32, 32) and 0 <= a.min() and a.max() <= 1 for a, _, _ in got.images)
    assert fingerprint(got.images) == fingerprint(collect_images(wanted, size=32).images)
