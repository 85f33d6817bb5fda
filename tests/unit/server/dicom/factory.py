"""DICOM test data built from the files inside the pydicom wheel (never downloaded ones).

Every helper gives new UIDs (``pydicom.uid.generate_uid``) unless told otherwise, so
tests build the studies they need from a handful of sample files.
"""
from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import generate_uid

TEST_FILES = Path(pydicom.data.__file__).resolve().parent / "test_files"


def sample_path(name: str) -> Path:
    """A sample file shipped in the pydicom wheel (skips if this pydicom lacks it)."""
    path = TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not in this pydicom wheel")
    return path


def dataset(name: str = "CT_small.dcm", *, study: str | None = None, series: str | None = None,
            sop: str | None = None, **attrs) -> pydicom.Dataset:
    """A sample file as a dataset with fresh (or given) UIDs and attributes set by keyword."""
    ds = pydicom.dcmread(sample_path(name))
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def part10(ds: pydicom.Dataset) -> bytes:
    """A dataset as PS3.10 bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def instance(name: str = "CT_small.dcm", **kw) -> bytes:
    """:func:`dataset` as PS3.10 bytes."""
    return part10(dataset(name, **kw))


def series_of(n: int, name: str = "CT_small.dcm", *, study: str | None = None,
              series: str | None = None, **attrs) -> tuple[str, str, list[bytes]]:
    """``n`` instances of one series (InstanceNumber 1..n): (study, series, files)."""
    study = study or generate_uid()
    series = series or generate_uid()
    files = [instance(name, study=study, series=series, InstanceNumber=i + 1, **attrs)
             for i in range(n)]
    return study, series, files


def multipart(parts: list[bytes], boundary: str = "synthport-test-boundary",
              quoted: bool = True) -> tuple[str, bytes]:
    """(Content-Type, body) of a STOW-RS request."""
    body = b"".join(b"\r\n--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p
                    for p in parts) + b"\r\n--" + boundary.encode() + b"--\r\n"
    type_param = 'type="application/dicom"' if quoted else "type=application/dicom"
    return f"multipart/related; {type_param}; boundary={boundary}", body
