"""Bearer tokens on HTTP requests (RFC 6750) into the request context.

The token is verified here, once per request; what it permits is decided at the source
boundary (server/access.py), the same for FHIR, DICOMweb and DIMSE.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace

from flask import current_app, g, request

from server.errors import Unauthorized
from server.source import RequestContext

log = logging.getLogger("synthport.auth")

# Verified tokens of this process (an ES384 verification costs more than a read): a
# token stays usable until its exp, as its signature says; nothing more is remembered.
_VERIFIED: OrderedDict[tuple[int, str], object] = OrderedDict()
_VERIFIED_MAX = 4096
_lock = threading.Lock()


def _verify(tokens, token: str):
    now = time.time()
    key = (id(tokens), token)           # per token service: per server key
    with _lock:
        hit = _VERIFIED.get(key)
        if hit is not None and hit.exp > now and tokens.clock() < hit.exp:
            _VERIFIED.move_to_end(key)
            return hit
    claims = tokens.verify(token)
    with _lock:
        _VERIFIED[key] = claims
        while len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.popitem(last=False)
    return claims


def bearer_claims():
    """The verified claims of the request's bearer token, or None without one.

    Raises:
        Unauthorized: an Authorization header that is not a valid bearer token (the
            failure is audited).
    """
    if "bearer_claims" in g:
        return g.bearer_claims
    header = request.headers.get("Authorization", "")
    claims = None
    if header:
        scheme, _, token = header.strip().partition(" ")
        tokens = current_app.extensions["synthport"].get("tokens")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("The Authorization header must be 'Bearer <access token>'")
            if tokens is None:
                raise Unauthorized("This server issues no tokens")
            claims = _verify(tokens, token.strip())
        except Unauthorized as exc:
            _audit_failure(exc.message)
            raise
    g.bearer_claims = claims
    return claims


def with_claims(ctx: RequestContext, channel: str) -> RequestContext:
    """The context with the caller's identity, scopes, patient and purpose filled in."""
    claims = bearer_claims()
    ctx = replace(ctx, channel=channel, remote=request.remote_addr or "",
                  query=f"{request.method} {request.full_path.rstrip('?')}")
    if claims is None:
        return ctx
    return replace(ctx, claims=claims, caller=claims.client_id,
                   scopes=tuple(claims.scope.split()), patient=claims.patient or None,
                   purpose=claims.purpose or "", deidentified=bool(claims.deidentified))


def _audit_failure(reason: str) -> None:
    policy = current_app.extensions["synthport"].get("policy")
    if policy is None:
        return
    ctx = RequestContext(caller="unknown", channel="http", remote=request.remote_addr or "",
                         query=f"{request.method} {request.full_path.rstrip('?')}")
    policy.record(ctx, "auth-failure", "4", description=reason)
