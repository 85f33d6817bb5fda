"""Transparency endpoints of the audit log (RFC 9162 §4 in JSON), mounted at ``/audit``.

* ``GET /audit/sth``: the current signed tree head (signed now if the log grew).
* ``GET /audit/proof/inclusion?index=&tree_size=``: audit path of one entry.
* ``GET /audit/proof/consistency?first=&second=``: consistency proof of two sizes.
* ``GET /audit/entry/<seq>``: the entry's bytes exactly as hashed (leaf = SHA-256(0x00||bytes)).

All answers are JSON (hashes base64); bad parameters answer 400 (InvalidRequest). The
AuditEvents themselves are searched at ``/fhir/AuditEvent``; nothing here writes.
"""
from __future__ import annotations

from typing import Callable

import orjson
from flask import Blueprint, Response, request

from server.errors import InvalidRequest

_MAX_INDEX = 2**62


def _json(body, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def _int_arg(name: str) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        raise InvalidRequest(f"missing query parameter '{name}'")
    if not (raw.isascii() and raw.isdigit()) or int(raw) > _MAX_INDEX:
        raise InvalidRequest(f"'{name}' must be a non-negative integer, got '{raw}'")
    return int(raw)


def make_audit_blueprint(get_log: Callable) -> Blueprint:
    """The ``/audit`` blueprint.

    Args:
        get_log: returns the :class:`server.audit.log.AuditLog` to serve (called per
            request, so the app may create it lazily).
    """
    bp = Blueprint("audit", __name__, url_prefix="/audit")

    @bp.get("/sth")
    def sth():
        return _json(get_log().sign_tree_head())

    @bp.get("/proof/inclusion")
    def inclusion():
        return _json(get_log().inclusion(_int_arg("index"), _int_arg("tree_size")))

    @bp.get("/proof/consistency")
    def consistency():
        return _json(get_log().consistency(_int_arg("first"), _int_arg("second")))

    @bp.get("/entry/<seq>")
    def entry(seq: str):
        if not (seq.isascii() and seq.isdigit()) or int(seq) > _MAX_INDEX:
            raise InvalidRequest(f"entry number must be a non-negative integer, got '{seq}'")
        return Response(get_log().entry(int(seq)), content_type="application/json")

    return bp
