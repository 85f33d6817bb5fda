"""Image table, pixel loader and row -> Dataset on pydicom's own test files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from mappings.dicom import IMAGE_COLUMNS, image_table, image_table_meta, load_pixels, row_to_dataset
from mappings.errors import MappingError

FILES = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "US1_UNCR.dcm", "RG1_UNCR.dcm",
         "SC_ybr_full_uncompressed.dcm", "OBXXXX1A.dcm"]


def _path(name):
    p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"pydicom test file {name} not available")
    return p


def test_image_table_from_paths_and_datasets():
    paths = [_path(n) for n in FILES]
    df = image_table(paths[:3] + [pydicom.dcmread(paths[3])])
    assert list(df.columns) == IMAGE_COLUMNS
    ct = df.iloc[0]
    assert ct["modality"] == "CT" and ct["rows"] == 128 and ct["columns"] == 128
    assert ct["pixel_spacing_row"] == pytest.approx(0.661468)
    assert ct["photometric"] == "MONOCHROME2" and ct["bits_stored"] == 16
    assert ct["rescale_intercept"] == -1024.0
    assert ct["study_uid"] and ct["series_uid"] and ct["sop_uid"] and ct["patient_id"] == "1CT1"
    assert df.iloc[2]["frames"] == 10 and df.iloc[2]["body_part"] == "HEAD"
    assert df.iloc[3]["samples_per_pixel"] == 3 and pd.isna(df.iloc[3]["path"])
    assert str(df["rows"].dtype) == "Int64" and str(df["modality"].dtype) == "category"
    meta = image_table_meta(df)
    assert meta["columns"]["rows"]["kind"] == "numerical"


def test_load_pixels_grey_and_window():
    ct = load_pixels(_path("CT_small.dcm"))
    assert ct.dtype == np.float32 and ct.shape == (128, 128)
    assert ct.min() == 0.0 and ct.max() == 1.0
    mr = load_pixels(_path("MR_small.dcm"))  # window 600/1600 -> values clipped into [0, 1]
    ds = pydicom.dcmread(_path("MR_small.dcm"))
    raw = ds.pixel_array.astype(float)
    expect = np.clip((raw - 599.5) / 1599 + 0.5, 0, 1)
    assert np.allclose(mr, expect, atol=1e-6)


def test_monochrome1_is_inverted():
    p = _path("RG1_UNCR.dcm")
    img = load_pixels(p)
    ds = pydicom.dcmread(p)
    raw = ds.pixel_array.astype(float)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expect = 1.0 - np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    assert np.allclose(img, expect, atol=1e-5)


def test_multiframe_colour_and_resize():
    em = load_pixels(_path("emri_small.dcm"))
    assert em.shape == (64, 64)
    small = load_pixels(_path("emri_small.dcm"), size=16)
    assert small.shape == (16, 16) and small.dtype == np.float32
    us = load_pixels(_path("US1_UNCR.dcm"), size=(24, 32))
    assert us.shape == (24, 32, 3) and 0.0 <= us.min() and us.max() <= 1.0
    pal = load_pixels(_path("OBXXXX1A.dcm"))
    assert pal.shape == (600, 800, 3)
    ybr = load_pixels(_path("SC_ybr_full_uncompressed.dcm"))
    assert ybr.shape == (100, 100, 3)
    # the first pixel of this test image is red after YBR -> RGB
    assert ybr[0, 0, 0] > 0.9 and ybr[0, 0, 1] < 0.1


def test_row_to_dataset_round_trip(tmp_path):
    df = image_table([_path("CT_small.dcm")])
    ds = row_to_dataset(df.iloc[0])
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "Rows",
               "Columns", "PhotometricInterpretation", "BitsStored", "PatientID"):
        assert kw in ds
    out = tmp_path / "x.dcm"
    ds.save_as(out, enforce_file_format=True)
    back = image_table([out]).iloc[0]
    for c in ("study_uid", "series_uid", "sop_uid", "modality", "rows", "columns",
              "pixel_spacing_row", "pixel_spacing_col", "photometric", "bits_stored", "patient_id"):
        assert back[c] == df.iloc[0][c], c
    # with pixels: a readable image whose loader gives the array back
    px = np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
    ds2 = row_to_dataset({"modality": "MR", "bits_allocated": 16, "bits_stored": 12}, pixels=px)
    ds2.save_as(tmp_path / "y.dcm", enforce_file_format=True)
    again = load_pixels(tmp_path / "y.dcm")
    assert again.shape == (64, 32) and np.allclose(again, px, atol=1 / 4095)


def test_errors():
    with pytest.raises(MappingError):
        load_pixels(row_to_dataset({"modality": "OT", "rows": 2, "columns": 2}))
    with pytest.raises(MappingError):
        image_table(["/nonexistent/file.dcm"])
