"""Media types for DICOMweb: Accept / Content-Type parsing and multipart/related bodies.

Parsing is deliberately tolerant of what real clients send (PS3.18 §8.7, RFC 2387):
quoted or unquoted ``type=`` and ``boundary=``, parameters in any case and order,
``transfer-syntax=*``, a body starting with or without CRLF before the first boundary,
bare ``\\n`` line ends in part headers.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from server.errors import InvalidRequest


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header (or a Content-Type).

    Attributes:
        mime: lower-cased ``type/subtype`` (``*/*`` allowed).
        params: lower-cased parameter names -> unquoted values (``type`` lower-cased).
        q: quality (0..1).
    """

    mime: str
    params: dict = field(default_factory=dict)
    q: float = 1.0

    @property
    def type_param(self) -> str | None:
        """The ``type`` parameter of a multipart range."""
        return self.params.get("type")

    @property
    def transfer_syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split_unquoted(text: str, sep: str) -> list[str]:
    out, buf, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return out


def parse_media_type(text: str) -> MediaRange:
    """``multipart/related; type="application/dicom"; boundary=x`` -> MediaRange."""
    pieces = _split_unquoted(text or "", ";")
    mime = pieces[0].strip().lower()
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        name, eq, value = piece.partition("=")
        if not eq:
            continue
        name = name.strip().lower()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name == "q":
            try:
                q = max(0.0, min(1.0, float(value)))
            except ValueError:
                q = 1.0
            continue
        params[name] = value.lower() if name == "type" else value
    return MediaRange(mime, params, q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """Accept header -> ranges by preference (q descending, then order); q=0 dropped.
    An absent or empty header gives ``[*/*]``."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [parse_media_type(p) for p in _split_unquoted(header, ",") if p.strip()]
    ranges = [r for r in ranges if r.q > 0 and r.mime]
    return sorted(ranges, key=lambda r: -r.q) or [MediaRange("*/*")]


def accepts_json(header: str | None) -> bool:
    """Whether a DICOM JSON answer satisfies the Accept header (QIDO, metadata, STOW)."""
    for r in parse_accept(header):
        if r.mime in ("application/dicom+json", "application/json", "*/*", "application/*"):
            return True
        if r.mime == "multipart/related" and r.type_param in ("application/dicom+json",
                                                             "application/json"):
            return True
    return False


# --------------------------------------------------------------------------- bodies
@dataclass
class Part:
    """One body part: its headers (lower-cased names) and content."""

    headers: dict
    content: bytes

    @property
    def content_type(self) -> MediaRange | None:
        value = self.headers.get("content-type")
        return parse_media_type(value) if value else None


def split_multipart(body: bytes, boundary: str) -> list[Part]:
    """Split a multipart body (RFC 2046 §5.1.1) into parts; preamble and epilogue dropped.

    Raises:
        InvalidRequest: no boundary, or no part.
    """
    if not boundary:
        raise InvalidRequest("multipart body without a boundary parameter")
    delim = b"--" + boundary.encode("latin-1")
    data = b"\r\n" + body
    chunks = data.split(b"\r\n" + delim)
    parts: list[Part] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break                              # close delimiter
        # transport padding after the boundary, then the header lines up to an empty one
        eol = chunk.find(b"\n")
        if eol < 0:
            continue
        pos = eol + 1
        headers = {}
        while True:
            eol = chunk.find(b"\n", pos)
            if eol < 0:
                raise InvalidRequest("multipart part without a header/body separator")
            line = chunk[pos:eol].rstrip(b"\r")
            pos = eol + 1
            if not line:
                break
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers, chunk[pos:]))
    if not parts:
        raise InvalidRequest("multipart body has no parts (boundary not found)")
    return parts


def new_boundary() -> str:
    return uuid.uuid4().hex


def multipart_stream(parts: Iterable[tuple[str, bytes]], boundary: str) -> Iterator[bytes]:
    """Yield a multipart/related body part by part (for a streamed response)."""
    for content_type, content in parts:
        yield (f"--{boundary}\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(content)}\r\n\r\n").encode("latin-1")
        yield content
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")


def multipart_content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    """``multipart/related; type="<part_type>"; boundary=<b>`` (PS3.18 §8.7.3.4)."""
    ts = f"; transfer-syntax={transfer_syntax}" if transfer_syntax else ""
    return f'multipart/related; type="{part_type}"{ts}; boundary={boundary}'
