"""Parquet + metadata JSON output."""
from __future__ import annotations

import json

import pandas as pd
from pydicom.data import get_testdata_file

from mappings.dicom import image_table
from mappings.io import read_table, read_tables, write_tables
from mappings.tables import map_records

from .records_fixture import small_cohort


def test_write_and_read_back(tmp_path):
    mt = map_records(small_cohort(), min_count=1)
    imgs = image_table([get_testdata_file("CT_small.dcm")])
    files = write_tables(mt, tmp_path / "out", images=imgs)
    names = sorted(p.name for p in files)
    assert names == ["events.meta.json", "events.parquet", "images.meta.json", "images.parquet",
                     "patients.meta.json", "patients.parquet"]
    back = read_tables(tmp_path / "out")
    pd.testing.assert_frame_equal(back.patients, mt.patients)
    pd.testing.assert_frame_equal(back.events, mt.events)
    assert back.patient_meta == json.loads(json.dumps(mt.patient_meta, default=str))
    img, meta = read_table(tmp_path / "out", "images")
    assert img.iloc[0]["modality"] == "CT" and meta["table"]["n_instances"] == 1
