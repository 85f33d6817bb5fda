"""Synthetic arrays to DICOM: what OHIF needs, valid IODs (dciodvfy), determinism."""
from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from generators.images.procedural import procedural, procedural_volume
from generators.images.render import (SOP_CLASS, RenderError, derived_uid, instance_bytes,
                                      render_instance, render_series, series_bytes)

CASES = [("CT", "HEAD"), ("CT", "CHEST"), ("MR", ""), ("MR", "KNEE"), ("CR", "CHEST"),
         ("CR", "EXTREMITY"), ("DX", "CHEST"), ("DX", ""), ("US", "ABDOMEN"), ("US", ""),
         ("OP", "EYE"), ("NM", "WHOLEBODY"), ("MG", "BREAST")]
SMALL = {"CR": (300, 240), "DX": (300, 240), "OP": (192, 256), "US": (120, 160)}


def attrs(modality: str, body_part: str = "", **kw) -> dict:
    base = dict(PatientID="SYN-0001", PatientName="Synth^Alice", PatientBirthDate="19700101",
                PatientSex="F", StudyInstanceUID="2.25.100", SeriesInstanceUID="2.25.101",
                SOPInstanceUID="2.25.102", StudyDate="20240102", StudyTime="101500",
                Modality=modality, BodyPartExamined=body_part, SeriesNumber=3, InstanceNumber=1,
                AccessionNumber="ACC1", StudyDescription="synthetic study")
    base.update(kw)
    return base


def reread(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(instance_bytes(ds)))


@pytest.mark.parametrize("modality,body_part", CASES)
def test_ohif_attributes(modality, body_part):
    matrix = SMALL.get(modality, (128, 128))
    ds = reread(render_instance(procedural(modality, body_part, 1, 64),
                                attrs(modality, body_part), matrix))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == SOP_CLASS.get(modality, "1.2.840.10008.5.1.4.1.1.7")
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == "2.25.102"
    assert (ds.Rows, ds.Columns) == matrix
    assert ds.PhotometricInterpretation == ("RGB" if modality == "OP" else "MONOCHROME2")
    assert ds.PixelRepresentation == 0 and ds.BitsAllocated in (8, 16)
    assert len(ds.PixelSpacing) == 2 and float(ds.PixelSpacing[0]) > 0
    assert ds.InstanceNumber == 1 and ds.Manufacturer == "synthport"
    assert ds.ImageComments == "synthetic image (synthport)"
    assert (ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex, ds.StudyDate,
            ds.AccessionNumber) == ("SYN-0001", "Synth^Alice", "19700101", "F", "20240102", "ACC1")
    if modality not in ("OP", "US"):
        assert ds.BitsAllocated == 16 and ds.BitsStored == 12
        assert "RescaleSlope" in ds and "RescaleIntercept" in ds
        assert "WindowCenter" in ds and "WindowWidth" in ds
    pixels = ds.pixel_array
    assert pixels.shape[:2] == matrix and pixels.std() > 0
    if modality in ("CT", "MR"):
        assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
        assert ds.FrameOfReferenceUID and "SliceThickness" in ds and "SliceLocation" in ds


def test_ct_pixels_are_hounsfield_units():
    v = np.zeros((64, 64), np.float32)
    v[:, 32:] = 1024 / 3000  # water
    ds = reread(render_instance(v, attrs("CT"), (64, 64)))
    assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert hu[10, 5] == -1024 and abs(hu[10, 60]) <= 1


def test_upsampling_keeps_aspect_by_cropping():
    v = np.zeros((64, 64), np.float32)
    v[:, :8] = 1.0  # a bright band on the left: cropped away in a portrait matrix
    ds = reread(render_instance(v, attrs("CR", "CHEST"), (400, 200)))
    assert ds.pixel_array[:, :20].max() < 100
    ds = reread(render_instance(v, attrs("CR", "CHEST"), (400, 400)))
    assert ds.pixel_array[:, :20].min() > 3500


def test_same_input_same_bytes_and_attrs_override():
    a = procedural("MR", "HEAD", 5, 64)
    first = instance_bytes(render_instance(a, attrs("MR", "HEAD"), (64, 64)))
    assert first == instance_bytes(render_instance(a, attrs("MR", "HEAD"), (64, 64)))
    other = reread(render_instance(a, attrs("MR", "HEAD", SeriesDescription="T1 axial",
                                            SliceThickness=3.0), (64, 64)))
    assert other.SeriesDescription == "T1 axial" and other.SliceThickness == 3.0


def test_series_geometry_and_uids():
    vol = procedural_volume("CT", "CHEST", 8, 64, 6)
    series = [reread(d) for d in render_series(vol, attrs("CT", "CHEST", SliceThickness=2.5),
                                               (96, 96))]
    assert [d.InstanceNumber for d in series] == [1, 2, 3, 4, 5, 6]
    assert len({d.SOPInstanceUID for d in series}) == 6
    assert series[2].SOPInstanceUID == derived_uid("2.25.101", "instance", "3")
    assert len({d.FrameOfReferenceUID for d in series}) == 1
    z = [float(d.ImagePositionPatient[2]) for d in series]
    assert np.allclose(np.diff(z), -2.5)
    assert [float(d.SliceLocation) for d in series] == z
    uids = [f"2.25.{i}" for i in range(6)]
    assert [d.SOPInstanceUID for d in render_series(vol, attrs("CT", SOPInstanceUIDs=uids))] == uids
    with pytest.raises(RenderError):
        render_series(vol, attrs("CT", SOPInstanceUIDs=uids[:2]))


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "DX"])
def test_series_slices_are_the_instances_rendered_one_by_one(modality):
    vol = procedural_volume(modality, "HEAD", 4, 32, 4)
    a = attrs(modality, "HEAD", PatientName="Müller^Jürgen")
    series = render_series(vol, a, (48, 48))
    alone = [instance_bytes(render_instance(vol[i], {**a, "InstanceNumber": i + 1,
                                                      "SOPInstanceUID": series[i].SOPInstanceUID},
                                             (48, 48))) for i in range(4)]
    assert [instance_bytes(d) for d in series] == alone
    assert series_bytes(series) == alone
    assert len(set(alone)) == 4


def test_missing_uid_and_bad_array_are_refused():
    with pytest.raises(RenderError):
        render_instance(np.zeros((8, 8)), attrs("CT", SOPInstanceUID=""))
    with pytest.raises(RenderError):
        render_instance(np.zeros((2, 8, 8)), attrs("CT"))


# ---------------------------------------------------------------------------- dciodvfy


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed")
@pytest.mark.parametrize("modality,body_part", CASES)
def test_dciodvfy_reports_no_error(modality, body_part, tmp_path):
    ds = render_instance(procedural(modality, body_part, 2, 64), attrs(modality, body_part),
                         SMALL.get(modality, (128, 128)))
    path = tmp_path / f"{modality}.dcm"
    path.write_bytes(instance_bytes(ds))
    assert dciodvfy_errors(path) == []


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_dciodvfy_sees_errors():
    """The check itself can fail: a CT without Image Position is an error."""
    ds = render_instance(procedural("CT", "HEAD", 2, 64), attrs("CT", "HEAD"), (64, 64))
    del ds.ImagePositionPatient
    path = Path(pytest.importorskip("tempfile").mkdtemp()) / "bad.dcm"
    path.write_bytes(instance_bytes(ds))
    assert any(re.search("ImagePositionPatient", e) for e in dciodvfy_errors(path))


def test_synthesize_series_is_seeded_by_the_uids():
    from generators.images import ImageModel, instance_uids, seed_from_uid, synthesize_series

    model = ImageModel(size=32)  # procedural fallback: no torch model needed
    a = attrs("CT", "HEAD")
    del a["SOPInstanceUID"]
    ct = synthesize_series(model, a, 5, (48, 48))
    assert [d.SOPInstanceUID for d in ct] == instance_uids("2.25.101", 5)
    assert series_bytes(ct) == series_bytes(synthesize_series(model, a, 5, (48, 48)))
    vol = model.sample_series("CT", "HEAD", seed_from_uid("2.25.101"), 5)
    assert instance_bytes(ct[2]) == instance_bytes(render_series(vol, a, (48, 48))[2])
    b = attrs("CR", "CHEST")
    del b["SOPInstanceUID"]
    cr = synthesize_series(model, {**b, "SOPInstanceUIDs": ["2.25.7", "2.25.8"]}, 2, (40, 32))
    alone = render_instance(model.sample("CR", "CHEST", seed_from_uid("2.25.8"))[0],
                            {**b, "SOPInstanceUID": "2.25.8", "InstanceNumber": 2}, (40, 32))
    assert instance_bytes(cr[1]) == instance_bytes(alone)
    [one] = synthesize_series(model, {**b, "SOPInstanceUIDs": ["2.25.8"], "InstanceNumber": 2},
                              1, (40, 32))
    assert instance_bytes(one) == instance_bytes(alone)
