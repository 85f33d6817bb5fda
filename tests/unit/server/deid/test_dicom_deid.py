"""DICOM de-identification (server/deid/dicom.py): PS3.15 Annex E Basic Profile and options.

Data sets are built here from the sample files of the pydicom wheel and of pydicom-data
(``pydicom.data.get_testdata_file``, never downloaded; a test skips when a file is absent).
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from server.deid.dicom import (DicomDeidOptions, PixelRule, date_offset_days,
                               deidentified_uid, deidentify_bytes, deidentify_dataset,
                               deidentify_json, key_from_file, load_pixel_rules,
                               pseudonym_patient_id)
from server.errors import InstanceRefused, InternalError, InvalidRequest

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
PATIENT = "MRN-7730012"
NAME = "Smithson^Johanna^Q"
INSTITUTION = "Mercy Riverside Hospital"


def sample(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is in neither the pydicom wheel nor pydicom-data")
    return Path(path)


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def code(value: str, meaning: str, scheme: str = "99LOCAL") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def identified(name: str = "CT_small.dcm", *, patient: str = PATIENT, study: str | None = None,
               series: str | None = None, sop: str | None = None, frame: str | None = None,
               study_date: str = "20200310", series_date: str = "20200311",
               references: list[str] = ()) -> Dataset:
    """A sample image dressed with identifying attributes, private tags and sequences."""
    ds = pydicom.dcmread(sample(name))
    ds.remove_private_tags()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = sop or generate_uid()
    ds.FrameOfReferenceUID = frame or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = NAME
    ds.PatientID = patient
    ds.PatientBirthDate = "19610514"
    ds.PatientBirthTime = "101500"
    ds.OtherPatientIDs = ["OLD-4481920", "NHS-9434765919"]
    ds.PatientSex, ds.PatientAge, ds.PatientSize, ds.PatientWeight = "F", "058Y", "1.68", "71.5"
    ds.PatientAddress = "12 Harbour Lane, Kingsport"
    ds.PatientTelephoneNumbers = "+1 555 201 4433"
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "1 Main Street, Kingsport"
    ds.ReferringPhysicianName = "Okafor^Adaeze"
    ds.PerformingPhysicianName = "Lindqvist^Mats"
    ds.OperatorsName = "Tanaka^Hiro"
    ds.AccessionNumber = "ACC88231"
    ds.StudyID = "ST4471"
    ds.StationName = "CTROOM7"
    ds.DeviceSerialNumber = "SN-22-99871"
    ds.StudyDate, ds.SeriesDate = study_date, series_date
    ds.AcquisitionDate = ds.ContentDate = series_date
    ds.InstanceCreationDate = series_date
    ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime, ds.ContentTime = \
        "081500", "082010.5", "082011", "082012"
    ds.StudyDescription = f"CT chest for Johanna Smithson MRN {PATIENT[4:]} 03/10/2020"
    ds.SeriesDescription = "Axial 5mm soft tissue"
    ds.ImageComments = "ask Dr Okafor, call 555-201-4433"
    ds.AdditionalPatientHistory = "Smithson reports cough since 2019-12-01"
    # nested sequences
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = "OLD-4481920", "Mercy"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.RequestedProcedureID = "RP-55120"
    request.ScheduledProcedureStepID = "SPS-55120"
    request.ScheduledProcedureStepDescription = "CT chest Smithson"
    protocol = code("CTCHEST", "Chest protocol for Johanna")
    protocol.add_new(0x00491010, "LO", "PRIVATE CREATOR")
    protocol.add_new(0x00491011, "LO", "private Smithson")
    request.ScheduledProtocolCodeSequence = Sequence([protocol])
    ds.RequestAttributesSequence = Sequence([request])
    refs = []
    for uid in references:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    if refs:
        ds.ReferencedImageSequence = Sequence(refs)
    region = code("T-D3000", "Chest", "SRT")
    region.add_new(0x00091001, "LO", "ACME")
    region.add_new(0x00091010, "LO", "private note Johanna")
    ds.AnatomicRegionSequence = Sequence([region])
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "Smithson Johanna MRN-7730012")
    # an overlay plane (60xx): X (Overlay Data) takes the plane
    ds.add_new(0x60000010, "US", ds.Rows)
    ds.add_new(0x60000011, "US", ds.Columns)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\xff" * (ds.Rows * ds.Columns // 8))
    return ds


def all_elements(ds: Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from all_elements(item)


def days_between(a: str, b: str) -> int:
    return (date(int(a[:4]), int(a[4:6]), int(a[6:8]))
            - date(int(b[:4]), int(b[4:6]), int(b[6:8]))).days


# --- identifying attributes -----------------------------------------------------------------

def test_identifying_attributes_are_gone_or_replaced():
    ds = identified()
    out_bytes = deidentify_bytes(to_bytes(ds), KEY)
    out = read(out_bytes)
    assert str(out.PatientName) != NAME and str(out.PatientID) != PATIENT
    assert out.PatientID == pseudonym_patient_id(KEY, PATIENT)
    assert out.PatientName == "DEID^" + out.PatientID[5:]
    assert out.get("PatientBirthDate", "") == ""
    for keyword in ("PatientBirthTime", "OtherPatientIDs", "OtherPatientIDsSequence",
                    "PatientAddress", "PatientTelephoneNumbers", "InstitutionAddress",
                    "PerformingPhysicianName"):
        assert keyword not in out, keyword
    for keyword in ("ReferringPhysicianName", "AccessionNumber"):
        assert out.get(keyword, "") == "", keyword
    for keyword, original in (("InstitutionName", INSTITUTION), ("StationName", "CTROOM7"),
                              ("DeviceSerialNumber", "SN-22-99871"), ("StudyID", "ST4471"),
                              ("OperatorsName", "Tanaka^Hiro")):
        assert str(out.get(keyword, "")) != original, keyword
    # Nothing identifying is left anywhere in the file, nested sequences included. (The
    # phone number is looked for whole: "555" alone turns up by chance in the new UIDs,
    # derived from random ones, in about one run of ten.)
    for needle in (b"Smithson", b"Johanna", b"7730012", b"4481920", b"9434765919", b"Mercy",
                   b"Riverside", b"Okafor", b"Lindqvist", b"Tanaka", b"ACC88231", b"ST4471",
                   b"CTROOM7", b"99871", b"55120", b"Harbour", b"201 4433", b"201-4433", b"19610514",
                   ds.StudyInstanceUID.encode(), ds.SOPInstanceUID.encode()):
        assert needle not in out_bytes, needle


def test_private_attributes_and_overlays_are_removed_everywhere():
    out = read(deidentify_bytes(to_bytes(identified()), KEY))
    assert not [e.tag for e in all_elements(out) if e.tag.is_private]
    assert not [e.tag for e in out if 0x6000 <= e.tag.group <= 0x601E]
    # the code items themselves stay (codes are not identifying, PS3.15 E.1-1 note 10)
    assert out.AnatomicRegionSequence[0].CodeValue == "T-D3000"


def test_nested_sequences_follow_the_profile():
    out = read(deidentify_bytes(to_bytes(identified()), KEY))
    request = out.RequestAttributesSequence[0]
    assert "RequestedProcedureID" not in request and "ScheduledProcedureStepID" not in request
    assert "Smithson" not in request.ScheduledProcedureStepDescription
    assert "CT chest" in request.ScheduledProcedureStepDescription
    protocol = request.ScheduledProtocolCodeSequence[0]
    assert protocol.CodeValue == "CTCHEST" and "Johanna" not in protocol.CodeMeaning


def test_clean_descriptors_keeps_the_meaning_and_drops_identifiers():
    out = read(deidentify_bytes(to_bytes(identified()), KEY))
    assert out.StudyDescription.startswith("CT chest for")
    for needle in ("Johanna", "Smithson", "7730012", "2020"):
        assert needle not in out.StudyDescription
    assert out.SeriesDescription == "Axial 5mm soft tissue"
    assert "Okafor" not in out.ImageComments and "4433" not in out.ImageComments
    assert "cough" in out.AdditionalPatientHistory and "2019" not in out.AdditionalPatientHistory

    plain = read(deidentify_bytes(to_bytes(identified()), KEY,
                                  DicomDeidOptions(clean_descriptors=False)))
    for keyword in ("StudyDescription", "SeriesDescription", "ImageComments",
                    "AdditionalPatientHistory"):
        assert keyword not in plain, keyword
    codes = {i.CodeValue for i in plain.DeidentificationMethodCodeSequence}
    assert "113105" not in codes


def test_patient_characteristics_retained_or_removed():
    out = read(deidentify_bytes(to_bytes(identified()), KEY))
    assert (out.PatientSex, out.PatientAge, out.PatientSize, out.PatientWeight) == \
        ("F", "058Y", 1.68, 71.5)
    bare = read(deidentify_bytes(to_bytes(identified()), KEY,
                                 DicomDeidOptions(retain_patient_chars=False)))
    assert bare.get("PatientSex", "") == ""                          # Z (Type 2)
    for keyword in ("PatientAge", "PatientSize", "PatientWeight"):    # X
        assert keyword not in bare, keyword
    assert "113108" not in {i.CodeValue for i in bare.DeidentificationMethodCodeSequence}


def test_content_sequence_loses_its_text_and_keeps_its_codes():
    src = pydicom.dcmread(sample("test-SR.dcm"))
    out = read(deidentify_bytes(sample("test-SR.dcm").read_bytes(), KEY))
    def content(ds):
        return [e for item in ds.ContentSequence for e in all_elements(item)]
    before, after = content(src), content(out)
    texts = [e.value for e in after if e.keyword == "TextValue"]
    assert texts and set(texts) == {"ANONYMIZED"}                    # D (Content Sequence)
    codes = lambda elems: [e.value for e in elems if e.keyword == "CodeValue"]  # noqa: E731
    assert codes(after) == codes(before)                              # Table E.1-1 note 10
    person = Dataset()
    person.ContentSequence = Sequence([Dataset()])
    item = person.ContentSequence[0]
    item.PersonName = "Okafor^Adaeze"
    item.PersonIdentificationCodeSequence = Sequence([code("EMP-3341", "Okafor badge")])
    out = deidentify_dataset(person, KEY).ContentSequence[0]
    assert "Okafor" not in str(out.PersonName)
    staff = out.PersonIdentificationCodeSequence[0]                   # codes of people go too
    assert (staff.CodeValue, staff.CodeMeaning) == ("ANONYMIZED", "ANONYMIZED")


# --- UIDs -----------------------------------------------------------------------------------

def study_of_three(**kw) -> list[Dataset]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    first = identified(study=study, series=series, frame=frame, **kw)
    return [first] + [identified(study=study, series=series, frame=frame,
                                 references=[first.SOPInstanceUID], **kw) for _ in range(2)]


def test_uids_are_replaced_consistently_across_a_study():
    originals = study_of_three()
    outs = [read(deidentify_bytes(to_bytes(ds), KEY)) for ds in originals]
    for key_word in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {o[key_word].value for o in outs}
        assert len(values) == 1, key_word
        assert values != {originals[0][key_word].value}
        assert values == {deidentified_uid(KEY, originals[0][key_word].value)}
    sops = [o.SOPInstanceUID for o in outs]
    assert len(set(sops)) == 3
    for o, ds in zip(outs, originals):
        assert o.SOPInstanceUID.startswith("2.25.") and len(o.SOPInstanceUID) <= 64
        assert o.file_meta.MediaStorageSOPInstanceUID == o.SOPInstanceUID
        assert o.SOPClassUID == ds.SOPClassUID
        assert o.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    # references follow the instance they point at; classes are kept
    for o in outs[1:]:
        ref = o.ReferencedImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == outs[0].SOPInstanceUID
        assert ref.ReferencedSOPClassUID == originals[0].SOPClassUID
    # the UID is a UUID in its integer form (PS3.5 §B.2): version 8, RFC variant
    n = int(outs[0].StudyInstanceUID[5:])
    assert n < 1 << 128 and (n >> 76) & 0xF == 8 and (n >> 62) & 0x3 == 2


def test_retain_uids_option_keeps_them():
    ds = identified()
    out = read(deidentify_bytes(to_bytes(ds), KEY, DicomDeidOptions(retain_uids=True)))
    assert (out.StudyInstanceUID, out.SeriesInstanceUID, out.SOPInstanceUID) == \
        (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert "113110" in {i.CodeValue for i in out.DeidentificationMethodCodeSequence}


def test_same_key_same_output_other_key_other_uids():
    data = to_bytes(identified())
    assert deidentify_bytes(data, KEY) == deidentify_bytes(data, KEY)
    a, b = read(deidentify_bytes(data, KEY)), read(deidentify_bytes(data, OTHER_KEY))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
        assert a[keyword].value != b[keyword].value, keyword


# --- dates ----------------------------------------------------------------------------------

def test_dates_shift_by_one_offset_per_patient_and_keep_their_relations():
    first = identified(study_date="20200310", series_date="20200311")
    later = identified(study_date="20221201", series_date="20221201")
    other = identified(patient="MRN-1000001", study_date="20200310", series_date="20200311")
    a, b, c = (read(deidentify_bytes(to_bytes(ds), KEY)) for ds in (first, later, other))
    offset = date_offset_days(KEY, PATIENT)
    assert -3650 <= offset <= -365
    assert days_between(a.StudyDate, "20200310") == offset
    assert days_between(b.StudyDate, "20221201") == offset
    assert days_between(a.SeriesDate, a.StudyDate) == 1              # relation kept
    assert a.AcquisitionDate == a.ContentDate == a.InstanceCreationDate == a.SeriesDate
    assert (a.StudyTime, a.SeriesTime) == ("081500", "082010.5")     # times kept
    assert days_between(c.StudyDate, "20200310") == date_offset_days(KEY, "MRN-1000001")
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "113107" in {i.CodeValue for i in a.DeidentificationMethodCodeSequence}


def test_without_the_dates_option_dates_are_removed():
    ds = identified()
    out = read(deidentify_bytes(to_bytes(ds), KEY, DicomDeidOptions(retain_long_modified_dates=False)))
    assert out.StudyDate == "" and out.StudyTime == ""               # Z
    assert out.get("AcquisitionDate", "") == ""                      # X/Z
    dates = [e.value for e in all_elements(out) if e.VR in ("DA", "DT") and e.value]
    assert all(v.startswith("1900") for v in dates), dates           # only dummies (D) left
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_method_attributes_are_written():
    out = read(deidentify_bytes(to_bytes(identified()), KEY))
    assert out.PatientIdentityRemoved == "YES"
    assert out[0x00120063].value                                     # De-identification Method
    items = out.DeidentificationMethodCodeSequence
    assert all(i.CodingSchemeDesignator == "DCM" for i in items)
    assert [i.CodeValue for i in items] == ["113100", "113105", "113107", "113108"]
    assert items[0].CodeMeaning == "Basic Application Confidentiality Profile"


def test_deidentify_dataset_leaves_its_input_alone():
    ds = identified()
    out = deidentify_dataset(ds, KEY)
    assert ds.PatientName == NAME and out.PatientName != NAME
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert to_bytes(out) == deidentify_bytes(to_bytes(ds), KEY)


# --- pixels ---------------------------------------------------------------------------------

def burned(name: str) -> Dataset:
    ds = pydicom.dcmread(sample(name))
    ds.BurnedInAnnotation = "YES"
    return ds


def test_burned_in_annotation_without_a_rule_is_refused():
    data = to_bytes(burned("CT_small.dcm"))
    with pytest.raises(InstanceRefused, match="Burned In Annotation"):
        deidentify_bytes(data, KEY)
    elsewhere = PixelRule(modality="CT", manufacturer="Other Vendor", regions=[(0, 0, 8, 8)])
    with pytest.raises(InstanceRefused):
        deidentify_bytes(data, KEY, DicomDeidOptions(pixel_rules=[elsewhere]))


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
                                  "US1_UNCR.dcm", "US1_J2KR.dcm"])
def test_a_matching_pixel_rule_blanks_its_region(name):
    ds = burned(name)
    source_pixels = pydicom.dcmread(sample(name)).pixel_array
    rule = PixelRule(modality=ds.Modality, rows=ds.Rows, columns=ds.Columns,
                     regions=[(4, 2, 30, 10)])
    out = read(deidentify_bytes(to_bytes(ds), KEY, DicomDeidOptions(pixel_rules=[rule])))
    ts = ds.file_meta.TransferSyntaxUID
    assert out.file_meta.TransferSyntaxUID == \
        ("1.2.840.10008.1.2.1" if ts.is_compressed else ts)
    arr = out.pixel_array
    region = np.zeros(arr.shape[:2], bool)
    region[2:12, 4:34] = True
    assert not arr[region].any()
    assert np.array_equal(arr[~region], source_pixels[~region])
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in {i.CodeValue for i in out.DeidentificationMethodCodeSequence}


def test_pixels_untouched_keep_their_transfer_syntax():
    for name in ("JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "rtplan.dcm"):
        ds = pydicom.dcmread(sample(name))
        out = read(deidentify_bytes(sample(name).read_bytes(), KEY))
        assert out.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID, name
        assert out.get("PixelData") == ds.get("PixelData"), name


def test_pixel_rules_from_json(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": [
        {"name": "acme us", "Modality": "US", "manufacturer": "ACME", "rows": 480,
         "columns": 640, "regions": [[0, 0, 640, 40], {"x": 10, "y": 450, "width": 100,
                                                         "height": 20}]}]}))
    [rule] = load_pixel_rules(path)
    assert rule.regions == ((0, 0, 640, 40), (10, 450, 100, 20))
    ds = Dataset()
    ds.Modality, ds.Manufacturer, ds.Rows, ds.Columns = "US", " acme ", 480, 640
    assert rule.matches(ds)
    ds.Columns = 800
    assert not rule.matches(ds)
    path.write_text(json.dumps([{"modality": "US", "regions": [[0, 0, 0, 5]]}]))
    with pytest.raises(InvalidRequest, match="region"):
        load_pixel_rules(path)
    path.write_text(json.dumps([{"modality": "US", "colour": "red", "regions": [[0, 0, 5, 5]]}]))
    with pytest.raises(InvalidRequest, match="unknown keys"):
        load_pixel_rules(path)


# --- dciodvfy -------------------------------------------------------------------------------

def dciodvfy_errors(path: Path) -> set[str]:
    """dciodvfy's errors, UIDs in them masked (they differ between input and output)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {re.sub(r"\d+(?:\.\d+){2,}", "<uid>", re.sub(r"\s+", " ", line.strip()))
            for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed")
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm",
                                  "MR_small_RLE.dcm", "rtplan.dcm", "US1_UNCR.dcm",
                                  "emri_small.dcm", "color3d_jpeg_baseline.dcm", "test-SR.dcm",
                                  "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_output_has_no_new_dciodvfy_errors(tmp_path, name):
    src = sample(name)
    for i, options in enumerate([DicomDeidOptions(), DicomDeidOptions(
            retain_long_modified_dates=False, retain_patient_chars=False,
            clean_descriptors=False)]):
        out = tmp_path / f"out{i}.dcm"
        out.write_bytes(deidentify_bytes(src.read_bytes(), KEY, options))
        assert not dciodvfy_errors(out) - dciodvfy_errors(src)


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_dressed_and_cleaned_instance_has_no_new_dciodvfy_errors(tmp_path):
    ds = burned("US1_J2KR.dcm")
    src, out = tmp_path / "in.dcm", tmp_path / "out.dcm"
    src.write_bytes(to_bytes(ds))
    rule = PixelRule(modality="US", regions=[(0, 0, 640, 40)])
    out.write_bytes(deidentify_bytes(src.read_bytes(), KEY, DicomDeidOptions(pixel_rules=[rule])))
    assert not dciodvfy_errors(out) - dciodvfy_errors(src)


# --- DICOM JSON -----------------------------------------------------------------------------

def test_json_metadata_matches_the_deidentified_instance():
    ds = identified(references=[generate_uid()])
    base = (f"https://pacs.example/dicomweb/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    metadata = ds.to_json_dict(bulk_data_threshold=1024,
                               bulk_data_element_handler=lambda e: f"{base}/bulk/{e.tag:08X}")
    assert "BulkDataURI" in metadata["7FE00010"]
    out = deidentify_json(metadata, KEY)
    expected = read(deidentify_bytes(to_bytes(ds), KEY)).to_json_dict(
        bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "bulk")
    assert {k for k in set(out) | set(expected) if out.get(k) != expected.get(k)} == {"7FE00010"}
    uri = out["7FE00010"]["BulkDataURI"]
    study = deidentified_uid(KEY, ds.StudyInstanceUID)
    assert uri == (f"https://pacs.example/dicomweb/studies/{study}/series/"
                   f"{deidentified_uid(KEY, ds.SeriesInstanceUID)}/instances/"
                   f"{deidentified_uid(KEY, ds.SOPInstanceUID)}/bulk/7FE00010")
    assert ds.StudyInstanceUID not in json.dumps(out)


def test_json_refuses_what_the_file_path_refuses():
    ds = burned("CT_small.dcm")
    with pytest.raises(InstanceRefused):
        deidentify_json(ds.to_json_dict(), KEY)
    rule = PixelRule(modality="CT", regions=[(0, 0, 4, 4)])
    out = deidentify_json(ds.to_json_dict(bulk_data_threshold=1024,
                                          bulk_data_element_handler=lambda e: "http://x/bulk"),
                          KEY, DicomDeidOptions(pixel_rules=[rule]))
    assert out["00280301"]["Value"] == ["NO"]
    assert out["7FE00010"]["BulkDataURI"] == "http://x/bulk"


# --- keys and the command -------------------------------------------------------------------

def test_key_from_file(tmp_path):
    b64 = tmp_path / "b64.key"
    b64.write_text(base64.b64encode(KEY).decode() + "\n")
    assert key_from_file(b64) == KEY
    raw = tmp_path / "raw.key"
    raw.write_bytes(b"\xff" * 40)
    assert key_from_file(raw) == b"\xff" * 40
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(InternalError, match="32 bytes"):
        key_from_file(short)


def test_command_line(tmp_path):
    from server.cli import main

    key = tmp_path / "deid.key"
    key.write_text(base64.b64encode(KEY).decode())
    inbox = tmp_path / "in"
    (inbox / "sub").mkdir(parents=True)
    good = study_of_three()
    for i, ds in enumerate(good):
        (inbox / "sub" / f"Smithson_{i}.dcm").write_bytes(to_bytes(ds))
    (inbox / "README.txt").write_text("not dicom")
    runner = CliRunner()
    result = runner.invoke(main, ["deidentify-dicom", str(inbox), "-o", str(tmp_path / "out"),
                                  "--key-file", str(key)])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(f"{deidentified_uid(KEY, ds.SOPInstanceUID)}.dcm" for ds in good)

    bad = tmp_path / "burned.dcm"
    bad.write_bytes(to_bytes(burned("CT_small.dcm")))
    result = runner.invoke(main, ["deidentify-dicom", str(bad), str(inbox), "-o",
                                  str(tmp_path / "out2"), "--key-file", str(key),
                                  "--no-retain-dates", "--retain-uids"])
    assert result.exit_code == 1
    assert f"refused {bad}: Refused: Burned In Annotation" in result.output
    assert "3 de-identified, 1 refused or failed" in result.output
    out = read((tmp_path / "out2" / f"{good[0].SOPInstanceUID}.dcm").read_bytes())
    assert out.StudyDate == ""
