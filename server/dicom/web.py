"""DICOMweb (PS3.18) transactions over a :class:`server.dicom.source.DicomSource`.

The Flask blueprint (:mod:`server.http.dicomweb`) only moves request data in and a
:class:`WebResponse` out; everything between (parameter parsing, content negotiation,
multipart bodies, DICOM JSON) lives here, without Flask, so synthetic cohorts reuse
it unchanged. ``ctx.base_url`` is the DICOMweb base as the client called it
(``http://host:8080/dicomweb``); every URL in a response starts with it.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import orjson
from pydicom import Dataset
from pydicom.filereader import read_partial
from pydicom.sequence import Sequence

from server.db.engine import MAX_QUERY_INT
from server.dicom import attributes as A
from server.dicom import multipart as M
from server.dicom import pixels
from server.dicom.dicomjson import absolutize, datasets_json
from server.dicom.matching import is_universal
from server.dicom.source import (BatchStoreSource, DicomSource, InstanceRef, StoreOutcome,
                                 StoredMetadataSource)
from server.errors import (DIMSE_PROCESSING_FAILURE, Forbidden, InvalidRequest, InvalidResource,
                           NotAcceptable, Unauthorized,
                           NotFound, StudyMismatch, SynthportError, UnsupportedMediaType, describe)
from server.source import RequestContext

log = logging.getLogger("synthport.dicomweb")

DICOM_JSON = "application/dicom+json"
THUMBNAIL_SIZE = 128
#: QIDO-RS parameters that are not attribute matches (PS3.18 §8.3.4).
QIDO_CONTROL = ("limit", "offset", "fuzzymatching", "includefield")
_LIST_KINDS = ("uid", "cs", "int", "modalities")


@dataclass
class WebResponse:
    """What a DICOMweb transaction answers.

    Attributes:
        status: HTTP status.
        content_type: Content-Type header (None for an empty body).
        body: bytes, or an iterator of bytes for a streamed multipart body.
        headers: more headers (``Warning``...), as (name, value) pairs.
    """

    status: int
    content_type: str | None
    body: bytes | Iterator[bytes] = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


def warning_header(text: str) -> tuple[str, str]:
    """``Warning: 299 synthport "<text>"`` (RFC 7234 §5.5, as PS3.18 §8.3.4.x uses it).

    The text often quotes what a client sent (a UID with control bytes, say): anything
    but printable ASCII becomes ``?``, as a header value may not hold control characters
    (RFC 7230 §3.2; gunicorn refuses the whole response otherwise), and a backslash is
    escaped for the quoted-string.
    """
    clean = " ".join(str(text).replace('"', "'").split())[:400]
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in clean).replace("\\", "\\\\")
    return "Warning", f'299 synthport "{clean}"'


def study_url(ctx: RequestContext, study: str) -> str:
    return f"{ctx.base_url}/studies/{study}"


def series_url(ctx: RequestContext, study: str, series: str) -> str:
    return f"{study_url(ctx, study)}/series/{series}"


def instance_url(ctx: RequestContext, study: str, series: str, sop: str) -> str:
    return f"{series_url(ctx, study, series)}/instances/{sop}"


def _json(datasets: list[Dataset], ctx: RequestContext, headers=None, status: int = 200) -> WebResponse:
    return WebResponse(status, DICOM_JSON, datasets_json(datasets, ctx.base_url), list(headers or []))


def _require_json(accept: str | None) -> None:
    if not M.accepts_json(accept):
        raise NotAcceptable(f"Cannot produce '{accept}'; this resource is served as {DICOM_JSON}")


# --------------------------------------------------------------------------- QIDO-RS
@dataclass
class QidoQuery:
    """A parsed QIDO-RS query string (PS3.18 §8.3.4, §10.6.1.2)."""

    query: dict[str, str]
    includefields: set[str]
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    unsupported: list[str] = field(default_factory=list)


def _nonneg_int(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a non-negative integer, got '{value}'") from None
    if not 0 <= n <= MAX_QUERY_INT:
        raise InvalidRequest(f"{name} must be an integer from 0 to {MAX_QUERY_INT}, "
                             f"got '{value[:40]}'")
    return n


def parse_qido(args: Iterable[tuple[str, str]]) -> QidoQuery:
    """Query parameters -> :class:`QidoQuery`.

    Keys are keywords or tags (``PatientID``, ``00100020``, dotted sequence paths);
    ``includefield`` repeats and takes comma lists and ``all``; a repeated matching key
    is an OR of its values where a list is allowed (UIDs, code strings, integers).

    Raises:
        InvalidRequest: an unknown parameter or attribute, or a bad control value.
    """
    out = QidoQuery({}, set())
    for key, value in args:
        lk = key.lower()
        if lk == "limit":
            out.limit = _nonneg_int("limit", value)
        elif lk == "offset":
            out.offset = _nonneg_int("offset", value)
        elif lk == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise InvalidRequest(f"fuzzymatching must be true or false, got '{value}'")
            out.fuzzy = value.lower() == "true"
        elif lk == "includefield":
            for item in value.split(","):
                item = item.strip()
                if not item:
                    continue
                if item.lower() == "all":
                    out.include_all = True
                else:
                    out.includefields.add(A.canonical_name(item))
        else:
            kw = A.canonical_name(key)
            mk = A.MATCH_KEYS.get(kw)
            if kw in out.query:
                if mk is None or mk.kind not in _LIST_KINDS:
                    raise InvalidRequest(f"Matching key {kw} given twice")
                out.query[kw] = out.query[kw] + "\\" + value
            else:
                out.query[kw] = value
            if mk is None and not is_universal(value):
                out.unsupported.append(kw)
    return out


def qido(source: DicomSource, ctx: RequestContext, level: str, args: Iterable[tuple[str, str]],
         accept: str | None, study: str | None = None, series: str | None = None,
         max_results: int = 1000) -> WebResponse:
    """Search for studies, series or instances (PS3.18 §10.6).

    An empty result is ``200`` with ``[]``. ``limit`` is capped at ``max_results``;
    when more matches exist than were returned, a ``Warning`` header says so.
    """
    _require_json(accept)
    q = parse_qido(args)
    if study is not None:
        q.query["StudyInstanceUID"] = study
    if series is not None:
        q.query["SeriesInstanceUID"] = series
    headers = []
    if q.unsupported:
        headers.append(warning_header("The following attributes are not supported for matching "
                                      "(matched universally): " + ", ".join(q.unsupported)))
    limit = max_results if q.limit is None or q.limit == 0 else min(q.limit, max_results)
    if q.limit is not None and q.limit > max_results:
        headers.append(warning_header(f"limit capped at {max_results}"))
    include = q.includefields | A.qido_includefields(level, study is not None, series is not None)
    found = source.find(ctx, level, q.query, includefields=include, include_all=q.include_all,
                        fuzzy=q.fuzzy, limit=limit + 1, offset=q.offset)
    if len(found) > limit:
        found = found[:limit]
        headers.append(warning_header("The number of results exceeded the maximum supported by "
                                      "the server. Additional results can be requested."))
    for ds in found:
        ds.add_new(0x00081190, "UR", _retrieve_url(ctx, level, ds))
    return _json(found, ctx, headers)


def _retrieve_url(ctx: RequestContext, level: str, ds: Dataset) -> str:
    st = str(ds.get("StudyInstanceUID", ""))
    if level == "STUDY":
        return study_url(ctx, st)
    se = str(ds.get("SeriesInstanceUID", ""))
    if level == "SERIES":
        return series_url(ctx, st, se)
    return instance_url(ctx, st, se, str(ds.get("SOPInstanceUID", "")))


# --------------------------------------------------------------------------- STOW-RS
def _peek(data: bytes) -> Dataset:
    """The UIDs of a part, read without the pixel data (empty dataset if unreadable)."""
    try:
        # The three UIDs are in groups 0008 and 0020: stop reading after (0020,000D)
        # rather than walking the whole header (this ran for every STOW-RS part).
        return read_partial(io.BytesIO(data), stop_when=_after_study_uid,
                            specific_tags=[0x00080016, 0x00080018, 0x0020000D])
    except Exception:  # noqa: BLE001 - the store will say why
        return Dataset()


def _head_uid(head: Dataset, keyword: str) -> str:
    """A UID of a refused part for its FailedSOPSequence item, or "" when it is not one
    (the reason of the refusal may be that very value: unreadable, or not a UID)."""
    try:
        value = str(head.get(keyword, "") or "").strip().strip("\x00")
    except Exception:  # noqa: BLE001 - pydicom cannot convert it
        return ""
    return value if A.is_uid(value) else ""


def _after_study_uid(tag, vr, length) -> bool:
    return tag > 0x0020000D


def stow(source: DicomSource, ctx: RequestContext, content_type: str | None, body: bytes,
         accept: str | None, study: str | None = None) -> WebResponse:
    """Store instances (PS3.18 §10.5): ``multipart/related; type="application/dicom"``
    (``application/dicom`` alone is taken as one instance).

    Returns 200 when every instance was stored, 202 when some failed, 409 when all
    failed; the body is the Store Instances Response Module (PS3.18 Annex I) in DICOM
    JSON with FailureReason codes of PS3.18 Table I.2-2 (see
    :data:`server.errors.ERROR_TABLE` ``dimse_status``).

    Raises:
        UnsupportedMediaType: another Content-Type (e.g. a JSON + bulk data STOW).
        InvalidRequest: a malformed multipart body.
        NotAcceptable: the client accepts no DICOM JSON answer.
    """
    _require_json(accept)
    if not body:
        raise InvalidRequest("Empty request body")
    ctype = M.parse_media_type(content_type or "")
    if ctype.mime == "multipart/related":
        if ctype.type_param not in (None, "application/dicom"):
            raise UnsupportedMediaType(f"STOW-RS accepts type=\"application/dicom\" parts only, "
                                       f"not '{ctype.type_param}'")
        parts = [(p.content_type, p.content)
                 for p in M.split_multipart(body, ctype.params.get("boundary", ""))]
    elif ctype.mime == "application/dicom":
        parts = [(None, body)]
    else:
        raise UnsupportedMediaType(f"Content-Type '{content_type}' is not supported; send "
                                   "multipart/related; type=\"application/dicom\"")
    stored, failed, headers, studies = [], [], [], []
    # The UIDs of a part are read before storing only to check the study of
    # /studies/{study}; otherwise a stored part's come from its outcome, and a failed
    # part is peeked at below (one header walk per part saved).
    heads: list[Dataset | None] = [_peek(data) if study is not None else None for _, data in parts]
    results: list[StoreOutcome | Exception | None] = [None] * len(parts)
    todo: list[int] = []
    for i, (part_type, data) in enumerate(parts):
        head = heads[i]
        try:
            if part_type is not None and part_type.mime not in ("application/dicom", "*/*"):
                raise InvalidResource(f"Part of type '{part_type.mime}' is not application/dicom")
            theirs = _head_uid(head, "StudyInstanceUID") if head is not None else ""
            if theirs not in ("", study):
                raise StudyMismatch(f"Instance {_head_uid(head, 'SOPInstanceUID')} belongs to "
                                    f"study {theirs}, not {study}")
        except SynthportError as err:
            results[i] = err
            continue
        todo.append(i)
    if isinstance(source, BatchStoreSource) and len(todo) > 1:
        try:
            batch = source.store_many(ctx, [parts[i][1] for i in todo])
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its parts, not the request
            batch = [exc] * len(todo)
        for i, res in zip(todo, batch):
            results[i] = res
    else:
        for i in todo:
            try:
                results[i] = source.store_instance(ctx, parts[i][1])
            except Exception as exc:  # noqa: BLE001 - one bad part never fails the others
                results[i] = exc
    # Who may store is a property of the request, not of a part: 401/403 for all of it.
    for res in results:
        if isinstance(res, (Unauthorized, Forbidden)):
            raise res
    for i, res in enumerate(results):
        if isinstance(res, StoreOutcome):
            sop_class, sop_uid = res.sop_class_uid, res.sop_instance_uid
        else:
            head = heads[i] if heads[i] is not None else _peek(parts[i][1])
            sop_class, sop_uid = _head_uid(head, "SOPClassUID"), _head_uid(head, "SOPInstanceUID")
        if isinstance(res, SynthportError):
            info = describe(res)
            failed.append((sop_class, sop_uid, info.dimse_status))
            headers.append(warning_header(f"{sop_uid or 'part'}: {res.message}"))
            continue
        if not isinstance(res, StoreOutcome):
            log.error("STOW-RS: storing %s failed", sop_uid or "a part", exc_info=res)
            failed.append((sop_class, sop_uid, DIMSE_PROCESSING_FAILURE))
            headers.append(warning_header(f"{sop_uid or 'part'}: internal error {type(res).__name__}"))
            continue
        outcome = res
        stored.append(outcome)
        if outcome.study_uid not in studies:
            studies.append(outcome.study_uid)
        for w in outcome.warnings:
            headers.append(warning_header(f"{outcome.sop_instance_uid}: {w}"))
    rsp = Dataset()
    target = study or (studies[0] if len(studies) == 1 else None)
    if target:
        rsp.add_new(0x00081190, "UR", study_url(ctx, target))
    if stored:
        items = []
        for o in stored:
            item = Dataset()
            item.ReferencedSOPClassUID = o.sop_class_uid
            item.ReferencedSOPInstanceUID = o.sop_instance_uid
            item.add_new(0x00081190, "UR",
                         instance_url(ctx, o.study_uid, o.series_uid, o.sop_instance_uid))
            items.append(item)
        rsp.ReferencedSOPSequence = Sequence(items)
    if failed:
        items = []
        for sop_class, sop_uid, reason in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class or None
            item.ReferencedSOPInstanceUID = sop_uid or None
            item.FailureReason = reason
            items.append(item)
        rsp.FailedSOPSequence = Sequence(items)
    status = 200 if not failed else (202 if stored else 409)
    body_json = orjson.dumps(rsp.to_json_dict())
    return WebResponse(status, DICOM_JSON, body_json, headers[:50])


# --------------------------------------------------------------------------- WADO-RS
def _dicom_target(ranges: list[M.MediaRange], stored_ts: str) -> str | None:
    """The transfer syntax to send an instance in, or None if no range allows one.

    Without a ``transfer-syntax`` parameter the stored syntax is sent (PS3.18's default
    would be Explicit VR Little Endian; we do not decompress, see docs/dicomweb.md).
    """
    for r in ranges:
        if r.mime == "multipart/related":
            inner = r.type_param or "application/dicom"
        else:
            inner = r.mime
        if inner not in ("application/dicom", "*/*", "application/*"):
            continue
        ts = r.transfer_syntax
        if ts in (None, "*", stored_ts):
            return stored_ts
        if ts in pixels.TRANSCODE_TARGETS and stored_ts in pixels.TRANSCODE_SOURCES:
            return ts
    return None


def retrieve(source: DicomSource, ctx: RequestContext, accept: str | None, study: str,
             series: str | None = None, sop: str | None = None) -> WebResponse:
    """Retrieve a study, series or instance as ``multipart/related; type="application/dicom"``
    (PS3.18 §10.4), streamed part by part.

    Raises:
        NotFound: unknown UIDs.
        NotAcceptable: a media type or transfer syntax we cannot produce for every instance.
    """
    refs = source.instance_refs(ctx, study, series, sop)
    ranges = M.parse_accept(accept)
    plan = []
    for ref in refs:
        target = _dicom_target(ranges, ref.transfer_syntax_uid)
        if target is None:
            raise NotAcceptable(f"Cannot produce '{accept}' for instance {ref.sop_uid} "
                                f"(stored as {ref.transfer_syntax_uid}); only transcoding from "
                                "uncompressed to Explicit/Implicit VR Little Endian is done")
        plan.append((ref, target))
    boundary = M.new_boundary()

    def parts() -> Iterator[tuple[str, bytes]]:
        for ref, target in plan:
            data = source.open_instance(ctx, ref)
            if target != ref.transfer_syntax_uid:
                data = pixels.transcode(data, target)
            yield f"application/dicom; transfer-syntax={target}", data

    return WebResponse(200, M.multipart_content_type("application/dicom", boundary),
                       M.multipart_stream(parts(), boundary))


def metadata(source: DicomSource, ctx: RequestContext, accept: str | None, study: str,
             series: str | None = None, sop: str | None = None) -> WebResponse:
    """Retrieve metadata (PS3.18 §10.4.1.1.2): DICOM JSON, bulk data as BulkDataURIs."""
    _require_json(accept)
    if isinstance(source, StoredMetadataSource):
        raws = source.metadata_json(ctx, study, series, sop)
        return WebResponse(200, DICOM_JSON, absolutize(b"[" + b",".join(raws) + b"]", ctx.base_url))
    query = {"StudyInstanceUID": study}
    if series:
        query["SeriesInstanceUID"] = series
    if sop:
        query["SOPInstanceUID"] = sop
    found = source.find(ctx, "IMAGE", query, include_all=True)
    if not found:
        raise NotFound(f"No stored instances for study {study}")
    return _json(found, ctx)


def _frame_part_type(ranges: list[M.MediaRange], stored_ts: str) -> str | None:
    """The media type of the frame parts, or None if no range allows the stored frames."""
    native = stored_ts in pixels.NATIVE_SYNTAXES
    stored_media = pixels.media_type_for(stored_ts)
    for r in ranges:
        inner = (r.type_param or "*/*") if r.mime == "multipart/related" else r.mime
        inner = pixels.MEDIA_ALIASES.get(inner, inner)
        ts = r.transfer_syntax
        if inner in ("*/*", "*"):
            if native and ts in (None, "*", pixels.EVRLE):
                return "application/octet-stream"
            if not native and ts in (None, "*", stored_ts):
                return stored_media
        elif inner == "application/octet-stream":
            if native and ts in (None, "*", pixels.EVRLE):
                return "application/octet-stream"
            if not native and ts in (None, "*", stored_ts):
                return "application/octet-stream"      # compressed, labelled by transfer-syntax
        elif inner.endswith("/*"):
            if not native and stored_media.startswith(inner[:-1]) and ts in (None, "*", stored_ts):
                return stored_media
        elif not native and inner == stored_media and ts in (None, "*", stored_ts):
            return stored_media
    return None


def _one_ref(source: DicomSource, ctx: RequestContext, study: str, series: str, sop: str) -> InstanceRef:
    return source.instance_refs(ctx, study, series, sop)[0]


def frames(source: DicomSource, ctx: RequestContext, accept: str | None, study: str, series: str,
           sop: str, frame_list: str) -> WebResponse:
    """Retrieve frames (PS3.18 §10.4.1.1.4) as ``multipart/related``: native frames as
    ``application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1``, compressed ones as
    stored with their transfer syntax (``Accept: ...; transfer-syntax=*`` or none).

    Raises:
        InvalidRequest: a bad frame list.
        NotFound: unknown instance, no pixel data, frame out of range.
        NotAcceptable: e.g. uncompressed frames asked for a compressed instance.
    """
    numbers = pixels.parse_frame_list(frame_list)
    ref = _one_ref(source, ctx, study, series, sop)
    part_type = _frame_part_type(M.parse_accept(accept), ref.transfer_syntax_uid)
    if part_type is None:
        raise NotAcceptable(f"Cannot produce '{accept}' for frames stored as "
                            f"{ref.transfer_syntax_uid} (no decompression here; ask for "
                            "transfer-syntax=*)")
    ts, data = pixels.frames(source.open_instance(ctx, ref), numbers)
    boundary = M.new_boundary()
    ctype = f"{part_type}; transfer-syntax={ts}"
    body = b"".join(M.multipart_stream(((ctype, f) for f in data), boundary))
    return WebResponse(200, M.multipart_content_type(part_type, boundary), body)


def bulkdata(source: DicomSource, ctx: RequestContext, accept: str | None, study: str, series: str,
             sop: str, path: str) -> WebResponse:
    """Retrieve bulk data (PS3.18 §10.4.1.1.3) named by a BulkDataURI we emitted."""
    ranges = M.parse_accept(accept)
    ok = any((r.mime == "multipart/related" and (r.type_param or "application/octet-stream")
              in ("application/octet-stream", "*/*"))
             or r.mime in ("application/octet-stream", "*/*") for r in ranges)
    if not ok:
        raise NotAcceptable(f"Cannot produce '{accept}'; bulk data are served as "
                            "multipart/related; type=\"application/octet-stream\"")
    ref = _one_ref(source, ctx, study, series, sop)
    value = pixels.bulk_value(source.open_instance(ctx, ref), path)
    boundary = M.new_boundary()
    body = b"".join(M.multipart_stream([("application/octet-stream", value)], boundary))
    return WebResponse(200, M.multipart_content_type("application/octet-stream", boundary), body)


# --------------------------------------------------------------------------- rendered
def _rendered_type(accept: str | None) -> str:
    for r in M.parse_accept(accept):
        inner = (r.type_param or "") if r.mime == "multipart/related" else r.mime
        if inner in ("image/jpeg", "image/png"):
            return inner
        if inner in ("image/*", "*/*"):
            return "image/jpeg"
    raise NotAcceptable(f"Cannot render as '{accept}'; rendered images are image/jpeg or image/png")


def _quality(text: str | None) -> int | None:
    if not text:
        return None
    try:
        q = int(text)
    except ValueError:
        raise InvalidRequest(f"quality must be an integer 1..100, got '{text}'") from None
    if not 1 <= q <= 100:
        raise InvalidRequest(f"quality must be an integer 1..100, got '{text}'")
    return q


def rendered(source: DicomSource, ctx: RequestContext, accept: str | None, args: dict,
             study: str, series: str | None = None, sop: str | None = None,
             frame_list: str | None = None, thumbnail: bool = False) -> WebResponse:
    """Rendered resources and thumbnails (PS3.18 §10.4.1.1.5, §10.4.1.1.6) as one image.

    An instance renders its first frame (or the first frame of ``frame_list``); a series
    thumbnail uses its middle instance, a study thumbnail the middle instance of its
    first series with pixel data. Thumbnails fit ``viewport`` or 128 px. Query
    parameters: ``viewport=w,h``, ``window=center,width[,function]``, ``quality``.
    """
    media = _rendered_type(accept)
    viewport = pixels.parse_viewport(args.get("viewport"))
    window = pixels.parse_window(args.get("window"))
    quality = _quality(args.get("quality"))
    index = pixels.parse_frame_list(frame_list)[0] - 1 if frame_list else 0
    refs = source.instance_refs(ctx, study, series, sop)
    if sop is None:
        refs = _thumbnail_candidates(refs)
    last: SynthportError | None = None
    for ref in refs[:8]:
        try:
            image = pixels.render_frame(source.open_instance(ctx, ref), index, media,
                                        viewport=viewport, window=window, quality=quality,
                                        max_size=THUMBNAIL_SIZE if thumbnail else None)
        except NotAcceptable as err:
            last = err
            continue
        return WebResponse(200, media, image)
    raise last or NotFound("Nothing to render")


def _thumbnail_candidates(refs: list[InstanceRef]) -> list[InstanceRef]:
    """Instances to try for a series/study thumbnail: per series in order, the middle
    instance first."""
    by_series: dict[str, list[InstanceRef]] = {}
    for ref in refs:
        by_series.setdefault(ref.series_uid, []).append(ref)
    out = []
    for items in by_series.values():
        mid = len(items) // 2
        out.append(items[mid])
        out.extend(r for i, r in enumerate(items) if i != mid)
    return out
