"""Mutation fuzzing of the DICOM store paths (STOW-RS, C-STORE) and what serves the result.

A *case* is one seed file from the pydicom wheel, with fresh UIDs, and one mutation:

* ``flip``: a few random bytes of the data set changed (the preamble and ``DICM`` kept);
* ``truncate``: the file cut at a random offset after the preamble;
* ``value``: one element's value bytes replaced by a hostile value of the same length
  (non-ASCII and control bytes, backslashes, path separators, ``%``, NULs), so the
  structure still parses and the value reaches the code that reads it;
* ``length``: one element's length field set to an odd, huge or undefined value;
* ``attribute``: one attribute that the server reads (Rows, BitsAllocated, NumberOfFrames,
  PixelRepresentation, PhotometricInterpretation, SamplesPerPixel, dates, times, names,
  UIDs, the character set, the window, the rescale) set to a wrong value through
  pydicom, written without validation.

:func:`cases` yields them deterministically for a seed. The callers (the unit test in
``tests/unit/server/http/test_dicomweb_fuzz.py``, ``benchmarks/fuzz_dicom.py``) send each
case, read back what was stored, and check the rules in :func:`check_answer` and
:func:`check_store`: no 5xx, a PS3.18 failure reason for every refused instance, what is
stored is served byte for byte, and the rows, counts and blob files agree.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filereader import data_element_generator
from pydicom.tag import Tag
from pydicom.uid import generate_uid

import pydicom.data

TEST_FILES = Path(pydicom.data.__file__).resolve().parent / "test_files"

#: Seeds: uncompressed (explicit and implicit VR, big endian), encapsulated (JPEG, RLE,
#: JPEG 2000), multi-frame, colour, RT with sequences, SR.
SEEDS = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
         "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_jpeg_dcmtk.dcm",
         "rtdose.dcm", "rtplan.dcm", "test-SR.dcm", "examples_palette.dcm")

MUTATIONS = ("flip", "truncate", "value", "length", "attribute")

HOSTILE = [b"\xff\xfe\x00", b"..\\..\\etc", b"../../x", b"%00%2e", b"\x1b[31m", b"\\\\\\",
           b"\x00\x00\x00\x00", b"*?*?", b"\xc3\x28", b"' OR 1=1 --", b"\r\n", b"9" * 40]

#: Attributes the server reads or renders with, and wrong values for them.
ATTRIBUTES: dict[str, list] = {
    "Rows": [0, 1, 65535],
    "Columns": [0, 3, 65535],
    "BitsAllocated": [0, 1, 7, 12, 64],
    "BitsStored": [0, 17, 33],
    "HighBit": [0, 40],
    "PixelRepresentation": [2, 65535],
    "SamplesPerPixel": [0, 2, 4],
    "PhotometricInterpretation": ["", "NONSENSE", "RGB", "PALETTE COLOR", "YBR_FULL_422"],
    "NumberOfFrames": ["0", "-1", "99999", "abc", "2.5"],
    "PlanarConfiguration": [2],
    "WindowCenter": ["abc", "1e400", "nan"],
    "WindowWidth": ["0", "-5", "inf"],
    "RescaleSlope": ["0", "nan", "x"],
    "RescaleIntercept": ["inf", "-"],
    "StudyDate": ["20241345", "2024-01-01", "abc", "20240101-20230101"],
    "StudyTime": ["256161", "12:00", "x"],
    "PatientBirthDate": ["99999999", "?"],
    "PatientName": ["a" * 200, "^^^^^^", "=Ω=\\x", "\\"],
    "PatientID": ["x" * 65, "", "../..", "\\multi"],
    "SpecificCharacterSet": ["ISO_IR 999", "ISO 2022 IR 87", "\\ISO_IR 100", "GB18030"],
    "SeriesNumber": ["abc", "99999999999999"],
    "InstanceNumber": ["1.5", "-", "1e99"],
    "StudyInstanceUID": ["", "1.2.abc", "1." + "2" * 70, "../../etc/passwd", "1.2.3\\1.2.4"],
    "SeriesInstanceUID": ["", "x"],
    "SOPInstanceUID": ["", "1.2..3", "1.2.3 "],
    "SOPClassUID": ["", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.7"],
    "Modality": ["", "X" * 20, "CT\\MR"],
    "AccessionNumber": ["A" * 70],
    "BodyPartExamined": ["ÄÖÜ" * 30],
    "ImagePositionPatient": [["a", "b", "c"], [1]],
    "PixelSpacing": [["0", "0"], ["x"]],
    "TimezoneOffsetFromUTC": ["+9999", "abc"],
}


@dataclass
class Case:
    """One fuzzed file: which seed and mutation made it, and the bytes."""

    n: int
    seed_file: str
    mutation: str
    detail: str
    data: bytes

    def label(self) -> str:
        return f"#{self.n} {self.seed_file} {self.mutation} {self.detail}"


def _fresh(name: str, entropy: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(TEST_FILES / name)
    # Derived from the entropy, so of fixed length: the mutations' offsets repeat
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[entropy, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[entropy, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _write(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except AttributeError:      # a file meta element made empty on purpose: write as is
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def _elements(data: bytes) -> tuple[list[tuple[int, int, int, int]], bool, bool]:
    """(tag, offset of the value, value length, header length) of the top-level data set
    elements of a Part 10 file, and whether it is implicit VR, little endian."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=False, defer_size=None)
    start = 132
    meta_len = ds.file_meta.get("FileMetaInformationGroupLength")
    start += 12 + int(meta_len.value if hasattr(meta_len, "value") else meta_len)
    ts = ds.file_meta.TransferSyntaxUID
    implicit = ts == pydicom.uid.ImplicitVRLittleEndian
    little = ts != pydicom.uid.ExplicitVRBigEndian
    out = []
    fp = io.BytesIO(data)
    fp.seek(start)
    for raw in data_element_generator(fp, implicit, little):
        if not isinstance(raw, RawDataElement) or raw.length == 0xFFFFFFFF:
            continue            # a sequence (read whole) or an undefined length
        head = 8 if implicit else (12 if raw.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC",
                                                    "UN", "UR", "UT") else 8)
        out.append((int(raw.tag), raw.value_tell, raw.length, head))
    return out, implicit, little


def cases(seed: int, count: int, seeds: tuple[str, ...] = SEEDS,
          mutations: tuple[str, ...] = MUTATIONS, salt: str = "") -> Iterator[Case]:
    """``count`` fuzzed files, the same for the same ``seed`` and ``salt``.

    The UIDs of case ``n`` are derived from (seed, salt, n): another ``salt`` gives the
    same mutations of new instances (a second run against a store that holds the first).
    """
    rng = random.Random(seed)
    available = [s for s in seeds if (TEST_FILES / s).is_file()]
    for n in range(count):
        name = rng.choice(available)
        mutation = rng.choice(mutations)
        ds = _fresh(name, f"{seed}/{salt}/{n}")
        if mutation == "attribute":
            keyword = rng.choice(sorted(ATTRIBUTES))
            value = rng.choice(ATTRIBUTES[keyword])
            detail = f"{keyword}={value!r}"[:80]
            with _no_validation():
                _set_raw(ds, keyword, value)
                if keyword == "SOPInstanceUID":
                    ds.file_meta.MediaStorageSOPInstanceUID = value
                data = _write(ds)
            yield Case(n, name, mutation, detail, data)
            continue
        data = bytearray(_write(ds))
        body_start = 132
        if mutation == "flip":
            k = rng.randint(1, 8)
            spots = [rng.randrange(body_start, len(data)) for _ in range(k)]
            for at in spots:
                data[at] = rng.randrange(256)
            detail = f"{k} bytes at {spots[:3]}"
        elif mutation == "truncate":
            at = rng.randrange(body_start, len(data))
            del data[at:]
            detail = f"at {at} of {len(data)}"
        else:
            elems, implicit, little = _elements(bytes(data))
            tag, offset, length, head = rng.choice([e for e in elems if e[2] > 0])
            if mutation == "value":
                hostile = rng.choice(HOSTILE)
                value = (hostile * (length // len(hostile) + 1))[:length]
                data[offset:offset + length] = value
                detail = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) <- {hostile!r}"
            else:
                new = rng.choice([length + 1, length + 4096, 0xFFFFFFFF, 0x7FFFFFFF, 1])
                order = "little" if little else "big"
                if implicit or head == 12:      # PS3.5 §7.1.2-3: 32-bit length field
                    data[offset - 4:offset] = new.to_bytes(4, order)
                else:                           # explicit VR, 16-bit length field
                    data[offset - 2:offset] = (new & 0xFFFF).to_bytes(2, order)
                detail = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) length {length} -> {new}"
        yield Case(n, name, mutation, detail, bytes(data))


def _set_raw(ds: pydicom.Dataset, keyword: str, value) -> None:
    """Set an attribute to ``value`` as written, bypassing pydicom's conversion (which
    refuses, say, a DS of ``abc``): text goes in as a raw element of its VR."""
    tag = Tag(tag_for_keyword(keyword))
    vr = dictionary_VR(tag)
    if isinstance(value, int):
        setattr(ds, keyword, value)
        return
    text = "\\".join(map(str, value)) if isinstance(value, list) else str(value)
    raw = text.encode("utf-8")
    if len(raw) % 2:            # PS3.5 §6.2: even length, UI padded with NUL
        raw += b"\0" if vr == "UI" else b" "
    ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


class _no_validation:
    """pydicom's writing validation off (values the standard forbids are the point)."""

    def __enter__(self):
        self._mode = pydicom.config.settings.writing_validation_mode
        pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
        self._rmode = pydicom.config.settings.reading_validation_mode
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

    def __exit__(self, *exc):
        pydicom.config.settings.writing_validation_mode = self._mode
        pydicom.config.settings.reading_validation_mode = self._rmode
        return False


__all__ = ["Case", "cases", "SEEDS", "MUTATIONS"]


# --------------------------------------------------------------------------- checking
@dataclass
class Answer:
    """What an HTTP request got: status, content type, body."""

    status: int
    ctype: str
    body: bytes


@dataclass
class Finding:
    """A case that broke a rule."""

    case: str
    request: str
    problem: str


@dataclass
class Report:
    """What a run sent, how the server answered, and what broke a rule."""

    cases: int = 0
    stored: int = 0
    refused: int = 0
    findings: list = None       # type: ignore[assignment]
    statuses: dict = None       # type: ignore[assignment]

    def __post_init__(self):
        self.findings = [] if self.findings is None else self.findings
        self.statuses = {} if self.statuses is None else self.statuses

    def tally(self, what: str, status: int) -> None:
        key = f"{what} {status}"
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def summary(self, limit: int = 20) -> str:
        lines = [f"cases: {self.cases}, stored: {self.stored}, refused: {self.refused}",
                 "answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))]
        lines += [f"FINDING {f.case}: {f.request}: {f.problem}" for f in self.findings[:limit]]
        return "\n".join(lines)


def _with_post_get(send):
    """(post, get, send): ``post`` and ``get`` as :func:`run_stow` calls them, over ``send``."""
    def post(body: bytes, ctype: str) -> Answer:
        return send("POST", "studies", {"Content-Type": ctype, "Accept": "application/dicom+json"},
                    body)

    def get(path: str, accept: str) -> Answer:
        return send("GET", path, {"Accept": accept})
    return post, get, send


def http_client(base: str):
    """``post`` and ``get`` for :func:`run_stow`, and ``send`` for :func:`run_requests`,
    against a running server's DICOMweb ``base`` (``http://host:port/dicomweb``), over
    one requests session."""
    import requests

    http = requests.Session()

    def send(method: str, path: str, headers: dict, body: bytes = b"") -> Answer:
        # requests adds an Accept of its own when none is given: send none as none
        headers = {k: v for k, v in headers.items() if v is not None}
        headers.setdefault("Accept", None)
        r = http.request(method, f"{base}/{path}", data=body or None, headers=headers, timeout=120)
        return Answer(r.status_code, r.headers.get("Content-Type", ""), r.content)

    return _with_post_get(send)


def flask_client(client, base: str = "/dicomweb"):
    """:func:`http_client` over a Flask test client (in-process), for the DICOMweb
    ``base`` path of the app (``/dicomweb``, ``/synthetic/<cohort>/dicomweb``)."""
    def send(method: str, path: str, headers: dict, body: bytes = b"") -> Answer:
        r = client.open(f"{base}/{path}", method=method, data=body,
                        headers={k: v for k, v in headers.items() if v is not None})
        return Answer(r.status_code, r.headers.get("Content-Type", ""), r.get_data())

    return _with_post_get(send)


STOW_STATUSES = {200, 202, 400, 409, 413, 415}
PROCESSING_FAILURE = 0x0110     # PS3.4 C.4.2.1.4: the server's fault, never a fuzz answer
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _json(body: bytes):
    import orjson
    return orjson.loads(body)


def run_stow(cases_: Iterator[Case], post, get, report: Report | None = None) -> Report:
    """Send each case with STOW-RS (one instance per request) and check the answers.

    Args:
        post: ``post(body, content_type) -> Answer`` for ``POST {base}/studies``.
        get: ``get(path, accept) -> Answer`` for ``GET {base}/{path}``.
    """
    from tests.unit.server.dicom.factory import multipart

    report = report or Report()
    for case in cases_:
        report.cases += 1
        ctype, body = multipart([case.data])
        ans = post(body, ctype)
        report.tally("STOW", ans.status)

        def bad(request: str, problem: str) -> None:
            report.findings.append(Finding(case.label(), request, problem))

        if ans.status not in STOW_STATUSES:
            bad("STOW", f"status {ans.status}: {ans.body[:300]!r}")
            continue
        try:
            doc = _json(ans.body)
        except Exception:   # noqa: BLE001
            bad("STOW", f"status {ans.status}, body is not JSON: {ans.body[:200]!r}")
            continue
        refs = (doc.get("00081199") or {}).get("Value") or []
        failed = (doc.get("00081198") or {}).get("Value") or []
        if ans.status >= 400 and not failed and ans.status != 413:
            if "errorMessage" not in str(doc) and "00081198" not in doc:
                bad("STOW", f"status {ans.status} without a FailedSOPSequence: {doc}")
        for item in failed:
            if "00081197" not in item:
                bad("STOW", f"failed item without FailureReason: {item}")
            elif item["00081197"].get("Value") == [PROCESSING_FAILURE]:
                # the server's own failure, not a reason about the instance
                bad("STOW", f"processing failure (0x0110): {ans.body[:200]!r}")
        if not refs:
            report.refused += 1
            continue
        report.stored += 1
        ref = refs[0]
        url = ref["00081190"]["Value"][0]
        path = url[url.index("studies/"):]
        sop = ref["00081155"]["Value"][0]
        got = get(path, RETRIEVE_ACCEPT)
        report.tally("WADO", got.status)
        if got.status != 200:
            bad("WADO " + path, f"status {got.status}: {got.body[:200]!r}")
        elif case.data not in got.body:
            bad("WADO " + path, "the instance served is not the bytes stored")
        meta = get(path + "/metadata", "application/dicom+json")
        report.tally("metadata", meta.status)
        if meta.status != 200:
            bad("metadata", f"status {meta.status}: {meta.body[:200]!r}")
        else:
            try:
                items = _json(meta.body)
                assert isinstance(items, list) and len(items) == 1
            except Exception as exc:   # noqa: BLE001
                bad("metadata", f"not one DICOM JSON object: {type(exc).__name__}")
        study = path.split("/")[1]
        found = get(f"studies/{study}/instances?SOPInstanceUID={sop}", "application/dicom+json")
        report.tally("QIDO", found.status)
        if found.status != 200 or len(_json(found.body)) != 1:
            bad("QIDO", f"status {found.status}, {found.body[:200]!r}")
        for extra, accept in (("/rendered", "image/jpeg"), ("/thumbnail", "image/png"),
                              ("/frames/1", "multipart/related; type=application/octet-stream; "
                                            "transfer-syntax=*")):
            r = get(path + extra, accept)
            report.tally(extra.split("/")[1], r.status)
            if r.status >= 500:
                bad(extra, f"status {r.status}: {r.body[:300]!r}")
            elif r.status >= 400 and not r.body:
                bad(extra, f"status {r.status} without a message")
    return report


def check_store(engine, blob_root: Path) -> list[str]:
    """What is wrong with a DICOM store after a run ([] when nothing): every instance row
    has its blob, which parses to the row's SOP Instance and Series UIDs; no blob without
    a row; no temporary file left; every count equals what it counts; no series or
    patient row without an instance or study below it.

    The study UID in a blob may differ from its row's: an instance that files a stored
    series under another study moves the series with its earlier instances
    (docs/dicomweb.md), and the study it left stays as a row with no instance, which
    QIDO-RS does not list.
    """
    from sqlalchemy import func, select

    from server.db import schema as S
    from server.dicom.store import blob_key, parse_instance

    problems: list[str] = []
    P, ST, SE, I = S.dicom_patient, S.dicom_study, S.dicom_series, S.dicom_instance
    with engine.connect() as conn:
        rows = conn.execute(select(I.c.sop_uid, I.c.blob_key, I.c.series_pk, I.c.study_pk,
                                   SE.c.series_uid, ST.c.study_uid)
                            .join(SE, SE.c.pk == I.c.series_pk)
                            .join(ST, ST.c.pk == I.c.study_pk)).all()
        n_instances = conn.execute(select(func.count()).select_from(I)).scalar_one()
        if n_instances != len(rows):
            problems.append(f"{n_instances - len(rows)} instance row(s) without their series or study")
        for sop, key, _, _, series_uid, _ in rows:
            if key != blob_key(sop):
                problems.append(f"{sop}: blob key {key} is not the hash of its UID")
            path = blob_root / key[:2] / f"{key}.dcm"
            if not path.is_file():
                problems.append(f"{sop}: blob {path.name} missing")
                continue
            parsed = parse_instance(path.read_bytes())
            if (parsed.sop_uid, parsed.series_uid) != (sop, series_uid):
                problems.append(f"{sop}: the blob parses to other UIDs")
        keys = {key for _, key, *_ in rows}
        for path in blob_root.rglob("*"):
            if path.is_dir():
                continue
            if path.name.startswith(".incoming-"):
                problems.append(f"temporary file left: {path.name}")
            elif path.suffix == ".dcm" and path.stem not in keys:
                problems.append(f"blob without a row: {path.name}")
        empty = conn.execute(select(func.count()).select_from(SE).where(SE.c.num_instances == 0)).scalar_one()
        if empty:
            problems.append(f"{empty} series row(s) without an instance")
        series_counts = dict(conn.execute(select(I.c.series_pk, func.count()).group_by(I.c.series_pk)).all())
        for pk, uid, n in conn.execute(select(SE.c.pk, SE.c.series_uid, SE.c.num_instances)).all():
            if series_counts.get(pk, 0) != n:
                problems.append(f"series {uid}: num_instances {n}, {series_counts.get(pk, 0)} rows")
        study_inst = dict(conn.execute(select(I.c.study_pk, func.count()).group_by(I.c.study_pk)).all())
        study_series = dict(conn.execute(select(SE.c.study_pk, func.count()).group_by(SE.c.study_pk)).all())
        for pk, uid, ns, ni in conn.execute(select(ST.c.pk, ST.c.study_uid, ST.c.num_series,
                                                   ST.c.num_instances)).all():
            if (study_series.get(pk, 0), study_inst.get(pk, 0)) != (ns, ni):
                problems.append(f"study {uid}: counts {ns}/{ni}, rows {study_series.get(pk, 0)}/"
                                f"{study_inst.get(pk, 0)}")
        orphans = conn.execute(select(func.count()).select_from(P).where(
            ~select(ST.c.pk).where(ST.c.patient_pk == P.c.pk).exists())).scalar_one()
        if orphans:
            problems.append(f"{orphans} patient row(s) without a study")
    return problems


#: C-STORE statuses a fuzzed instance may get (PS3.4 Annex B.2.3): success, the
#: warnings, and the failures synthport names in server/errors.py.
CSTORE_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007, 0xA700, 0xA900, 0xC000, 0xC409, 0x0110,
                   0x0122, 0x0124}


def _release_and_echo(ae, assoc, host: str, port: int, ae_title: str) -> bool:
    """Release ``assoc`` (if still up), then whether a new association answers C-ECHO:
    whatever the last one carried, the listener must go on serving."""
    if assoc.is_established:
        assoc.release()
    check = ae.associate(host, port, ae_title=ae_title)
    ok = check.is_established and check.send_c_echo().Status == 0
    if check.is_established:
        check.release()
    return ok


def run_cstore(cases_: Iterator[Case], host: str, port: int, ae_title: str, folder: Path,
               get=None, report: Report | None = None) -> Report:
    """Send each case with C-STORE (pynetdicom, the file's data set sent as read, not
    re-encoded), one association per ten cases, and check the statuses: every one is a
    named C-STORE status; the listener answers a C-ECHO after every association; an
    instance that got a success is found by QIDO-RS (``get`` as in :func:`run_stow`).

    Cases whose file meta pynetdicom cannot read, or whose UIDs it cannot encode in a
    request, are not sent (no peer could send them).
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from server.dicom.attributes import is_uid

    report = report or Report()
    folder.mkdir(parents=True, exist_ok=True)
    batch: list[tuple[Case, Path, str, str, str]] = []
    for case in cases_:
        try:
            ds = pydicom.dcmread(io.BytesIO(case.data), stop_before_pixels=True)
            meta = ds.file_meta
            # pynetdicom sends the data set's SOP Instance UID as the Affected one
            sop_class, sop, ts = (str(meta.MediaStorageSOPClassUID), str(ds.SOPInstanceUID),
                                  str(meta.TransferSyntaxUID))
        except Exception:   # noqa: BLE001 - not sendable: nothing to propose
            continue
        if not all(map(is_uid, (sop_class, sop, ts))):
            continue            # pynetdicom cannot encode it in a request
        path = folder / f"case{case.n:05d}.dcm"
        path.write_bytes(case.data)
        batch.append((case, path, sop_class, sop, ts))
    for start in range(0, len(batch), 10):
        part = batch[start:start + 10]
        ae = AE(ae_title="FUZZ")
        for _, _, sop_class, _, ts in part:
            try:
                ae.add_requested_context(sop_class, ts)
            except Exception:   # noqa: BLE001 - an unusable UID or too many contexts
                pass
        ae.add_requested_context(Verification)
        assoc = ae.associate(host, port, ae_title=ae_title)
        if not assoc.is_established:
            report.findings.append(Finding(part[0][0].label(), "A-ASSOCIATE", "no association"))
            continue
        for case, path, sop_class, sop, ts in part:
            report.cases += 1
            try:
                status = assoc.send_c_store(path)
            except Exception as exc:    # noqa: BLE001 - no context for it: not sent
                report.tally("C-STORE not sent", 0)
                del exc
                continue
            code = int(status.Status) if status and "Status" in status else None
            report.tally("C-STORE", code if code is not None else -1)
            if code is None:
                report.findings.append(Finding(case.label(), "C-STORE", "no response (association lost?)"))
                break
            if code not in CSTORE_STATUSES or code == PROCESSING_FAILURE:
                report.findings.append(Finding(case.label(), "C-STORE", f"status 0x{code:04X}: "
                                                                        f"{status.get('ErrorComment', '')}"))
            if code in (0x0000, 0xB000, 0xB006, 0xB007):
                report.stored += 1
                if get is not None:
                    found = get(f"instances?SOPInstanceUID={sop}", "application/dicom+json")
                    if found.status != 200 or len(_json(found.body)) != 1:
                        report.findings.append(Finding(case.label(), "QIDO after C-STORE",
                                                       f"status {found.status}, {found.body[:120]!r}"))
            else:
                report.refused += 1
        if not _release_and_echo(ae, assoc, host, port, ae_title):
            report.findings.append(Finding(part[-1][0].label(), "C-ECHO", "the listener stopped answering"))
            break
    return report


# --------------------------------------------------------------------------- requests
#: Query keys: matching keys of every level, by keyword and by tag, a sequence path,
#: the QIDO-RS controls, and names that are not attributes.
QUERY_KEYS = ["PatientName", "PatientID", "00100020", "StudyDate", "StudyTime", "AccessionNumber",
              "ModalitiesInStudy", "StudyInstanceUID", "0020000D", "SeriesInstanceUID",
              "SOPInstanceUID", "Modality", "SeriesNumber", "InstanceNumber", "PatientBirthDate",
              "ReferringPhysicianName", "StudyID", "SOPClassUID", "SeriesDate",
              "RequestAttributesSequence.ScheduledProcedureStepID", "00400275.00400009",
              "PerformedProcedureStepStartDate", "includefield", "limit", "offset",
              "fuzzymatching", "NoSuchKeyword", "0010002", "00100010.00100020", "", "ZZZZZZZZ"]
QUERY_VALUES = ["*", "?", "a*b?c", "**", "\\", "a\\b", "1.2.3,1.2.4", ",", "-", "20240101-",
                "-20240101", "20240101-20230101", "2024", "99999999", "abc", "0", "-1",
                "99999999999999999999999", "1e3", "true", "maybe", "all", "00100010,BAD",
                "^^^", "=", "Ü" * 40, "x" * 3000, "%00", "'; DROP TABLE dicom_study; --",
                "\x00", "\t", "ヤマダ^タロウ", "2024-01-01", "1200-1300", "235959.999999-",
                "CT\\MR", "CT,MR", "..", "../../etc/passwd", "null", ""]
ACCEPTS = [None, "*/*", "application/dicom+json", "application/json", "application/dicom",
           'multipart/related; type="application/dicom"', "multipart/related; type=application/dicom",
           'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
           "multipart/related; type=application/dicom; transfer-syntax=*",
           "multipart/related; type=application/octet-stream; transfer-syntax=*",
           "multipart/related; type=application/octet-stream",
           'multipart/related; type="image/jpeg"', "image/png", "image/gif", "text/html",
           "multipart/related", "multipart/related; type=", 'multipart/related; type="', ";;;",
           "application/dicom+json; q=0, */*; q=0", "image/*; q=0.5, application/*; q=abc",
           "multipart/related; type=application/dicom; transfer-syntax=" + "1." * 40]
FRAME_LISTS = ["1", "1,2", "2", "0", "-1", "1,,2", ",", "a", "99999999999999999999", "1-3",
               "1%2C2", " 1", "1" * 400]
RENDER_ARGS = ["window=40,400,linear", "window=40,400", "window=a,b,c", "window=40,0,linear",
               "window=40,400,sigmoid", "window=nan,inf,linear", "viewport=64,64", "viewport=0,0",
               "viewport=100000,100000", "viewport=-1,5", "viewport=a", "quality=0", "quality=101",
               "quality=50", "quality=x", "annotation=patient", "iccprofile=srgb", ""]


@dataclass
class RequestCase:
    """One generated request: method, path below the DICOMweb base, headers, body."""

    n: int
    method: str
    path: str
    headers: dict
    body: bytes = b""

    def label(self) -> str:
        return f"#{self.n} {self.method} {self.path[:160]} {self.headers}"


def request_cases(seed: int, count: int, study: str, series: str, sop: str,
                  stored: list[bytes]) -> Iterator[RequestCase]:
    """Requests around one stored instance (its UIDs given): QIDO-RS queries of random
    keys and hostile values, WADO-RS with odd Accept headers, frame lists and rendering
    parameters, and STOW-RS bodies with a broken multipart envelope around ``stored``
    files. The same for the same ``seed``."""
    from urllib.parse import quote

    rng = random.Random(seed)
    inst = f"studies/{study}/series/{series}/instances/{sop}"
    targets = ["studies", "series", "instances", f"studies/{study}/series",
               f"studies/{study}/instances", f"studies/{study}/series/{series}/instances"]
    for n in range(count):
        kind = rng.choice(("qido", "qido", "wado", "frames", "render", "stow"))
        if kind == "qido":
            params = "&".join(f"{quote(rng.choice(QUERY_KEYS))}={quote(rng.choice(QUERY_VALUES))}"
                              for _ in range(rng.randint(1, 4)))
            yield RequestCase(n, "GET", f"{rng.choice(targets)}?{params}",
                              {"Accept": rng.choice(ACCEPTS[:4])})
        elif kind == "wado":
            path = rng.choice([f"studies/{study}", f"studies/{study}/series/{series}", inst,
                               inst + "/metadata", f"studies/{study}/metadata",
                               inst + "/bulkdata/7FE00010", inst + "/bulkdata/" + rng.choice(
                                   ["00000000", "7FE00010/0/0", "zz", "../x", "00081140/99/00081155"])])
            yield RequestCase(n, "GET", path, {"Accept": rng.choice(ACCEPTS)})
        elif kind == "frames":
            yield RequestCase(n, "GET", f"{inst}/frames/{quote(rng.choice(FRAME_LISTS))}",
                              {"Accept": rng.choice(ACCEPTS)})
        elif kind == "render":
            where = rng.choice([inst + "/rendered", inst + "/thumbnail", f"studies/{study}/thumbnail",
                                f"{inst}/frames/{quote(rng.choice(FRAME_LISTS))}/rendered"])
            args = "&".join(rng.choice(RENDER_ARGS) for _ in range(rng.randint(0, 3)))
            yield RequestCase(n, "GET", f"{where}?{args}", {"Accept": rng.choice(ACCEPTS)})
        else:
            boundary = rng.choice(["b0und", "", "x" * 80, "a b", '"q"', "--"])
            part = rng.choice(stored)
            crlf = rng.choice([b"\r\n", b"\n"])
            heads = rng.choice([b"Content-Type: application/dicom", b"Content-Type: text/plain",
                                b"", b"Content-Type: application/dicom\r\nContent-Length: 5",
                                b"X" * 9000])
            pieces = [b"--" + boundary.encode() + crlf + heads + crlf + crlf + part + crlf]
            if rng.random() < 0.7:
                pieces.append(b"--" + boundary.encode() + b"--" + crlf)
            body = b"".join(pieces)
            if rng.random() < 0.3:
                body = body[:rng.randrange(len(body))]
            ctype = rng.choice([f"multipart/related; type=\"application/dicom\"; boundary={boundary}",
                                f"multipart/related; boundary={boundary}",
                                "multipart/related", "application/dicom", "application/json",
                                f"multipart/related; type=application/dicom+xml; boundary={boundary}",
                                f"multipart/form-data; boundary={boundary}"])
            path = rng.choice(["studies", f"studies/{study}", f"studies/{series}"])
            yield RequestCase(n, "POST", path, {"Content-Type": ctype,
                                                "Accept": rng.choice(ACCEPTS[:4])}, body)


def run_requests(cases_: Iterator[RequestCase], send, report: Report | None = None) -> Report:
    """Send each request; findings: a 5xx, and a 4xx without a body that says why.

    Args:
        send: ``send(method, path, headers, body) -> Answer``.
    """
    report = report or Report()
    for case in cases_:
        report.cases += 1
        ans = send(case.method, case.path, case.headers, case.body)
        report.tally(case.method, ans.status)
        if ans.status >= 500:
            report.findings.append(Finding(case.label(), case.method, f"status {ans.status}: "
                                                                       f"{ans.body[:300]!r}"))
        elif ans.status >= 400 and not ans.body:
            report.findings.append(Finding(case.label(), case.method, f"status {ans.status} "
                                                                       "without a message"))
    return report


def request_targets(post) -> tuple[str, str, str, list[bytes]]:
    """Store three good instances (CT, JPEG 2000, RLE multi-frame) for
    :func:`request_cases`: (study, series, SOP instance of the CT, the files)."""
    files = [_write(_fresh(name, f"targets/{name}"))
             for name in ("CT_small.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm")]
    from tests.unit.server.dicom.factory import multipart

    ctype, body = multipart(files)
    ans = post(body, ctype)
    assert ans.status == 200, ans.body[:300]
    ds = pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, files


#: C-FIND statuses (PS3.4 C.4.1.1.4): pending, success, cancel and the named failures.
CFIND_STATUSES = {0xFF00, 0xFF01, 0x0000, 0xFE00, 0xA700, 0xA900, 0xC000, 0x0122, 0x0124}
CFIND_KEYS = ["PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
              "ModalitiesInStudy", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
              "Modality", "SeriesNumber", "InstanceNumber", "PatientBirthDate", "StudyID",
              "NumberOfStudyRelatedInstances", "SOPClassUID", "ReferringPhysicianName",
              "StudyDescription", "PatientSex", "IssuerOfPatientID", "SpecificCharacterSet"]


def run_cfind(seed: int, count: int, host: str, port: int, ae_title: str,
              report: Report | None = None) -> Report:
    """C-FIND (Patient and Study Root) with generated identifiers: random levels
    (including none and unknown ones), keys and hostile values (as raw elements, so that
    what pydicom would refuse to write is sent). Findings: a status that is not a named
    C-FIND status, no final response, and a listener that stops answering C-ECHO."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                      StudyRootQueryRetrieveInformationModelFind, Verification)

    report = report or Report()
    rng = random.Random(seed)
    models = [PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind]
    ae = AE(ae_title="FUZZ")
    for model in models:
        ae.add_requested_context(model)
    ae.add_requested_context(Verification)
    for start in range(0, count, 20):
        assoc = ae.associate(host, port, ae_title=ae_title)
        if not assoc.is_established:
            report.findings.append(Finding(f"#{start}", "A-ASSOCIATE", "no association"))
            break
        for n in range(start, min(count, start + 20)):
            report.cases += 1
            ident = pydicom.Dataset()
            level = rng.choice(["PATIENT", "STUDY", "SERIES", "IMAGE", "", "FRAME", "x" * 20])
            ident.QueryRetrieveLevel = level
            for _ in range(rng.randint(0, 5)):
                with _no_validation():
                    _set_raw(ident, rng.choice(CFIND_KEYS), rng.choice(QUERY_VALUES))
            label = f"#{n} level={level} {sorted(ident.dir())}"
            codes = []
            try:
                for status, _ in assoc.send_c_find(ident, rng.choice(models)):
                    codes.append(int(status.Status) if status and "Status" in status else None)
            except Exception as exc:   # noqa: BLE001 - pynetdicom could not encode it: not sent
                report.tally("C-FIND not sent", 0)
                del exc
                continue
            final = codes[-1] if codes else None
            report.tally("C-FIND", final if final is not None else -1)
            if final is None:
                report.findings.append(Finding(label, "C-FIND", "no final response"))
                break
            bad = [c for c in codes if c not in CFIND_STATUSES]
            if bad:
                report.findings.append(Finding(label, "C-FIND", f"status 0x{bad[0]:04X}"))
        if not _release_and_echo(ae, assoc, host, port, ae_title):
            report.findings.append(Finding(f"#{start}", "C-ECHO", "the listener stopped answering"))
            break
    return report


# --------------------------------------------------------------------------- PDUs
def split_pdus(data: bytes) -> list[bytes]:
    """Whole PDUs of a byte stream (PS3.8 §9.3: type, reserved, 4-byte big-endian length)."""
    out, at = [], 0
    while at + 6 <= len(data):
        end = at + 6 + int.from_bytes(data[at + 2:at + 6], "big")
        out.append(data[at:end])
        at = end
    return out


def record_pdus(host: str, port: int, action) -> list[bytes]:
    """What a client sends for one association: ``action(proxy_port)`` talks to a proxy
    in front of ``host:port``, which records the client's bytes and relays both ways."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    sent = bytearray()

    def relay(src, dst, keep: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if keep:
                    sent.extend(chunk)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection((host, port))
        back = threading.Thread(target=relay, args=(upstream, client, False), daemon=True)
        back.start()
        relay(client, upstream, True)
        back.join(5)
        client.close()
        upstream.close()

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    try:
        action(listener.getsockname()[1])
    finally:
        worker.join(10)
        listener.close()
    return split_pdus(bytes(sent))


def pdu_cases(seed: int, count: int, pdus: list[bytes]) -> Iterator[tuple[str, list[bytes]]]:
    """Mutations of a recorded association (a list of PDUs): bytes flipped in one PDU, its
    length field made larger or smaller, a PDU cut, its type changed, an item length
    inside it changed, PDUs dropped, repeated or swapped. The same for the same seed."""
    rng = random.Random(seed)
    for n in range(count):
        seq = [bytearray(p) for p in pdus]
        i = rng.randrange(len(seq))
        pdu = seq[i]
        kind = rng.choice(("flip", "length", "cut", "type", "item", "drop", "repeat", "swap"))
        if kind == "flip":
            for _ in range(rng.randint(1, 6)):
                pdu[rng.randrange(len(pdu))] = rng.randrange(256)
        elif kind == "length":
            new = rng.choice([0, 1, len(pdu) - 7, len(pdu) + 10, 0xFFFFFFFF, 0x7FFFFFFF])
            pdu[2:6] = max(0, new).to_bytes(4, "big")
        elif kind == "cut":
            del pdu[rng.randrange(1, len(pdu)):]
        elif kind == "type":
            pdu[0] = rng.choice([0, 3, 7, 8, 0xFF, 1, 4])
        elif kind == "item" and len(pdu) > 80:
            # A-ASSOCIATE-RQ variable items start at 74; a P-DATA item's length at 6
            at = rng.choice([6, 74, 76, rng.randrange(6, len(pdu) - 4)])
            pdu[at:at + 2] = rng.randrange(65536).to_bytes(2, "big")
        elif kind == "drop" and len(seq) > 1:
            del seq[i]
        elif kind == "repeat":
            seq.insert(i, bytearray(pdu))
        elif kind == "swap" and len(seq) > 1:
            j = rng.randrange(len(seq))
            seq[i], seq[j] = seq[j], seq[i]
        yield f"#{n} {kind} PDU {i} of {len(pdus)}", [bytes(p) for p in seq]


def run_pdus(cases_, host: str, port: int, echo, report: Report | None = None,
             wait: float = 0.3) -> Report:
    """Send each mutated association over a raw socket, reading what comes back for a
    short while, then close it; every ten cases ``echo()`` (a C-ECHO on a new
    association) must succeed. Findings: a listener that stops answering."""
    import socket

    report = report or Report()
    for k, (label, seq) in enumerate(cases_):
        report.cases += 1
        answer = b""
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(wait)
                for pdu in seq:
                    s.sendall(pdu)
                    try:
                        answer += s.recv(65536)
                    except (socket.timeout, TimeoutError):
                        pass
        except OSError:
            pass
        report.tally("first answer PDU", answer[0] if answer else -1)
        if k % 10 == 9 and not echo():
            report.findings.append(Finding(label, "C-ECHO", "the listener stopped answering"))
            break
    return report
