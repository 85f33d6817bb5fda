"""FHIR instants <-> epoch seconds."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime

from dateutil import parser as _dtparser

from server.errors import InvalidRequest


def now() -> float:
    """Current time in epoch seconds, at millisecond precision (what meta.lastUpdated shows)."""
    return round(time.time(), 3)


def instant(ts: float) -> str:
    """FHIR instant (R4 datatypes §2.24.0.1) with milliseconds, UTC."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def http_date(ts: float) -> str:
    """RFC 7231 IMF-fixdate for Last-Modified."""
    return format_datetime(datetime.fromtimestamp(int(ts), timezone.utc), usegmt=True)


def parse_http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def parse_instant(value: str) -> float:
    """Parse a FHIR date/dateTime/instant (no zone = UTC) to epoch seconds (start of range)."""
    if len(value) >= 20 and value[10:11] == "T":
        # A full instant (audit entries, lastUpdated): the standard library's parser is
        # ten times faster than dateutil's and agrees with it on these.
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            dt = None
        if dt is not None and dt.tzinfo is not None:
            return dt.timestamp()
    try:
        dt = _dtparser.isoparse(value)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"Invalid date/time '{value}'") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
