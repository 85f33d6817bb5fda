"""DICOM JSON (PS3.18 Annex F.2) with bulk data left out as ``BulkDataURI``.

Values that are bulk data (Pixel Data, Float/Double Float Pixel Data, and binary values
longer than :data:`BULK_THRESHOLD` bytes, also inside sequences) are never written
inline: they become ``{"vr": .., "BulkDataURI": ..}`` pointing at the WADO-RS
``/bulkdata/{tag path}`` resource of their instance (PS3.18 §10.4.1.1.3 and F.2.6).

The stored form (what :class:`server.dicom.store.DicomStore` keeps per instance) writes
those URIs as ``synthport-bulk:<path relative to the DICOMweb base>``;
:func:`absolutize` turns them into absolute URLs with one byte replacement, so serving
``/metadata`` never re-encodes JSON.
"""
from __future__ import annotations

import logging
from typing import Callable

import orjson
from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import dictionary_VR
from pydicom.valuerep import VR as VR_

log = logging.getLogger("synthport.dicom")

BULK_THRESHOLD = 1024
BULK_PREFIX = "synthport-bulk:"
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


class BulkRef(bytes):
    """An empty value standing for bulk data that was left out; ``path`` is the
    ``BulkDataURI`` relative to the DICOMweb base."""

    path: str

    def __new__(cls, path: str) -> "BulkRef":
        obj = super().__new__(cls, b"")
        obj.path = path
        return obj


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """``studies/{s}/series/{se}/instances/{i}`` (relative to the DICOMweb base)."""
    return f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def is_bulk(elem: DataElement) -> bool:
    """Whether an element is bulk data (PixelData always; binary VRs above 1 KB)."""
    if elem.tag in PIXEL_TAGS:
        return True
    if isinstance(elem.value, BulkRef):
        return True
    if elem.VR in BINARY_VRS:
        value = elem.value
        try:
            return value is not None and len(value) > BULK_THRESHOLD
        except TypeError:
            return False
    return False


# Cache of the DICOM JSON of plain (not bulk, not SQ) elements read from a file, keyed
# by everything their JSON depends on: tag, explicit VR, the value bytes as read, the
# byte order and the character set. Instances of one series repeat most of their
# header, so storing them converts and encodes only the few values that differ.
_ELEM_CACHE: dict[tuple, dict] = {}
_ELEM_CACHE_MAX = 50_000
_CACHE_VALUE_MAX = 512
_KNOWN_VRS = frozenset(v.value for v in VR_ if " or " not in v.value)
_NO_CACHE_VRS = frozenset({"SQ", "UN", "OB", "OD", "OF", "OL", "OV", "OW"})


def _cached_vr(raw) -> str | None:
    """The VR a raw element certainly converts to (None: convert it to know)."""
    vr = raw.VR
    if vr is None:
        if not raw.is_implicit_VR or (int(raw.tag) >> 16) & 1:
            return None
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    if vr in _NO_CACHE_VRS or " or " in vr:
        return None
    return vr


def _charset_key(ds: Dataset) -> tuple:
    try:
        return tuple(ds._character_set)
    except Exception:  # noqa: BLE001 - an odd SpecificCharacterSet: no cache
        return ("?",)


def _hex(tag: int) -> str:
    key = _HEX.get(tag)
    if key is None:
        key = _HEX[tag] = f"{tag:08X}"
    return key


_HEX: dict[int, str] = {}


def _sorted_items(ds: Dataset) -> list:
    """(int tag, element) pairs in tag order. Files are written in ascending order, so
    this is the dataset's own order except for a malformed file (then sorted)."""
    items = list(ds._dict.items())
    tags = [int(t) for t, _ in items]
    if tags != sorted(tags):
        items.sort(key=lambda kv: int(kv[0]))
        tags = [int(t) for t, _ in items]
    return list(zip(tags, (e for _, e in items)))


_INT_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})


def _checked(obj: dict) -> dict:
    """An element's JSON, refused when a number cannot be written as JSON here: IS
    converts any integral text ("1e99"), orjson writes integers of at most 64 bits."""
    if obj.get("vr") in _INT_VRS:
        for v in obj.get("Value") or ():
            if isinstance(v, int) and not -2**63 <= v < 2**64:
                raise ValueError(f"integer {str(v)[:20]}... out of range")
    return obj


def to_json(ds: Dataset, bulk_uri: Callable[[str], str], _path: str = "") -> dict:
    """A dataset as a DICOM JSON object (PS3.18 F.2).

    Args:
        ds: the dataset (group length and file meta elements are left out).
        bulk_uri: ``bulk_uri(path, absolute=False)`` gives the ``BulkDataURI`` of a
            value: ``path`` is its tag path in this instance (``7FE00010``,
            ``00540016/0/00181072``), or with ``absolute=True`` the path a
            :class:`BulkRef` value carries (relative to the DICOMweb base).
    """
    out: dict[str, dict] = {}
    charset: tuple | None = None
    cache_get = _ELEM_CACHE.get
    for tag, raw in _sorted_items(ds):
        if tag & 0xFFFF == 0 or tag >> 16 == 0x0002:
            continue
        # Fast paths on the element as read (no value conversion): most elements of a
        # series repeat from instance to instance, and their JSON comes from the cache.
        if type(raw) is RawDataElement and raw.value is not None:
            rvr = raw.VR
            value = raw.value
            if rvr in BINARY_VRS and rvr != "UN" and (tag in PIXEL_TAGS
                                                       or len(value) > BULK_THRESHOLD):
                key = _hex(tag)
                out[key] = ({"vr": rvr, "BulkDataURI": bulk_uri(f"{_path}{key}")}
                            if len(value) else {"vr": rvr})
                continue
            if len(value) <= _CACHE_VALUE_MAX:
                if charset is None:
                    charset = _charset_key(ds)
                hit = cache_get((tag, rvr, value, raw.is_little_endian, charset))
                if hit is not None:
                    out[_hex(tag)] = hit
                    continue
                vr = _cached_vr(raw)
                if vr is not None:
                    key = _hex(tag)
                    try:
                        hit = _checked(ds[tag].to_json_dict(None, 2**62))
                    except Exception as exc:  # noqa: BLE001
                        log.warning("element %s not representable in DICOM JSON: %s", key, exc)
                        out[key] = {"vr": vr}
                        continue
                    if hit.get("vr") == vr:
                        if len(_ELEM_CACHE) >= _ELEM_CACHE_MAX:
                            _ELEM_CACHE.clear()
                        # Keyed by the VR as read (None for implicit VR), which with the
                        # tag determines the converted VR (see _cached_vr).
                        _ELEM_CACHE[(tag, rvr, value, raw.is_little_endian, charset)] = hit
                    out[key] = hit
                    continue
        key = _hex(tag)
        try:
            elem = ds[tag]
        except Exception as exc:  # noqa: BLE001 - pydicom cannot convert the value as read
            log.warning("element %s not representable in DICOM JSON: %s", key, exc)
            vr = getattr(raw, "VR", None)
            # PS3.18 F.2.3: "vr" must be a VR; one that pydicom cannot read is unknown (UN)
            out[key] = {"vr": vr if vr in _KNOWN_VRS else "UN"}
            continue
        try:
            if elem.VR == "SQ":
                items = [to_json(item, bulk_uri, f"{_path}{key}/{i}/")
                         for i, item in enumerate(elem.value or [])]
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            elif is_bulk(elem):
                if isinstance(elem.value, BulkRef):
                    out[key] = {"vr": elem.VR, "BulkDataURI": bulk_uri(elem.value.path, absolute=True)}
                elif elem.value is None or len(elem.value) == 0:
                    out[key] = {"vr": elem.VR}
                else:
                    out[key] = {"vr": elem.VR, "BulkDataURI": bulk_uri(f"{_path}{key}")}
            else:
                out[key] = _checked(elem.to_json_dict(None, 2**62))
        except Exception as exc:  # noqa: BLE001 - one malformed value must not lose the rest
            log.warning("element %s not representable in DICOM JSON: %s", key, exc)
            out[key] = {"vr": elem.VR if elem.VR != "SQ" else "SQ"}
    return out


def stored_json(ds: Dataset, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
    """The stored form of an instance's metadata: DICOM JSON bytes whose bulk data URIs
    are ``synthport-bulk:studies/.../instances/{i}/bulkdata/{tag path}``."""
    return orjson.dumps(stored_json_obj(ds, study_uid, series_uid, sop_uid))


def stored_json_obj(ds: Dataset, study_uid: str, series_uid: str, sop_uid: str) -> dict:
    """:func:`stored_json` before serialisation (the DICOM JSON object)."""
    base = instance_path(study_uid, series_uid, sop_uid) + "/bulkdata/"

    def uri(path: str, absolute: bool = False) -> str:
        return BULK_PREFIX + (path if absolute else base + path)

    return to_json(ds, uri)


def json_text(obj: dict, tag: str) -> str:
    """The first value of an attribute of a DICOM JSON object as text ("" when absent),
    as ``str(ds[tag].value)`` would give it: person names as ``alphabetic=ideographic=
    phonetic`` (trailing empty groups dropped), numbers as written by ``str``; without
    NUL characters (the text goes to SQL columns)."""
    elem = obj.get(tag)
    values = elem.get("Value") if elem else None
    if not values:
        return ""
    value = values[0]
    if value is None:
        return ""
    if isinstance(value, dict):
        if elem.get("vr") != "PN":
            return ""
        groups = [value.get(k) or "" for k in ("Alphabetic", "Ideographic", "Phonetic")]
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(groups).replace("\x00", "").strip()
    # NUL is no DICOM character (PS3.5 §6.1) and PostgreSQL text cannot hold it
    return str(value).replace("\x00", "").strip()


def absolutize(raw: bytes, dicomweb_base: str) -> bytes:
    """Stored JSON -> served JSON: ``synthport-bulk:`` URIs become absolute URLs."""
    return raw.replace(b'"' + BULK_PREFIX.encode(), b'"' + dicomweb_base.encode() + b"/")


def from_stored(raw: bytes | dict, keep: set[int] | None = None) -> Dataset:
    """A dataset from the stored form; bulk data become empty :class:`BulkRef` values.

    Args:
        raw: stored JSON (bytes or already parsed).
        keep: only these top-level tags (None = all).
    """
    data = orjson.loads(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    if keep is not None:
        data = {k: v for k, v in data.items() if int(k, 16) in keep}

    def handler(tag: str, vr: str, uri: str) -> BulkRef:
        return BulkRef(uri[len(BULK_PREFIX):] if uri.startswith(BULK_PREFIX) else uri)

    return Dataset.from_json(data, bulk_data_uri_handler=handler)


def datasets_json(datasets: list[Dataset], dicomweb_base: str) -> bytes:
    """A JSON array of datasets as served (BulkDataURIs absolute under ``dicomweb_base``)."""
    parts = []
    for ds in datasets:
        inst = instance_path(ds.get("StudyInstanceUID", ""), ds.get("SeriesInstanceUID", ""),
                             ds.get("SOPInstanceUID", ""))

        def uri(path: str, absolute: bool = False, _inst=inst) -> str:
            return f"{dicomweb_base}/{path}" if absolute else f"{dicomweb_base}/{_inst}/bulkdata/{path}"

        parts.append(orjson.dumps(to_json(ds, uri)))
    return b"[" + b",".join(parts) + b"]"
