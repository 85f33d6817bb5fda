"""OAuth 2.0 token service: SMART Backend Services client credentials, access tokens,
RFC 7662 introspection.

* ``token``: ``grant_type=client_credentials`` with a ``private_key_jwt`` client
  assertion (RFC 7523 §2.2, SMART Backend Services §"Authenticating to the token
  endpoint"): RS384 or ES384, signed by a key of the client's registered JWKS (inline or
  by URL) named by ``kid``; ``iss`` = ``sub`` = client_id, ``aud`` = the token URL, ``exp``
  at most ``auth_assertion_max_lifetime`` ahead, a ``jti`` never seen before.
* Access tokens are JWTs (``typ: at+jwt``, RFC 9068 §2.1) signed ES384 with the
  server's key (:mod:`server.auth.keys`), so every worker and host verifies them
  without the database. Claims: ``iss`` (``synthport``), ``sub`` and ``client_id``,
  ``iat``, ``exp``, ``jti``, ``scope``, ``purpose``, ``deid`` and optionally ``patient``.

Nothing here imports Flask; ``server/http/auth.py`` is the HTTP face.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import orjson
import requests
from joserfc import jws, jwt
from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from sqlalchemy import delete, insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from server.auth.clients import (ASSERTION_ALGS, PURPOSES, Client, ClientRegistry, check_jwks,
                                 jti_table, usable_for)
from server.auth.keys import ALG, server_key
from server.auth.scopes import ScopeError, grant, parse_scopes
from server.errors import InvalidRequest, Unauthorized

ISSUER = "synthport"
TOKEN_TYPE = "bearer"
ACCESS_TOKEN_TYP = "at+jwt"  # RFC 9068 §2.1: never confused with other JWS of the same key
CLIENT_CREDENTIALS = "client_credentials"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 §2.2
CLI_CLIENT_ID = "synthport-cli"
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 id datatype
_JWKS_FETCH_TIMEOUT = 5.0
_JWKS_MAX_BYTES = 256 * 1024
_JWKS_REFETCH_AFTER = 10.0  # an unknown kid refetches a cached JWKS at most this often
_PURGE_EVERY = 60.0         # seconds between deletions of expired auth_jti rows


class OAuthError(InvalidRequest):
    """A token request refused with an RFC 6749 §5.2 error.

    Attributes:
        error: the error code (``invalid_request``, ``invalid_client``, ``invalid_grant``,
            ``unauthorized_client``, ``unsupported_grant_type``, ``invalid_scope``).
        status: the HTTP status, 401 for ``invalid_client`` and 400 otherwise.
    """

    def __init__(self, error: str, description: str, status: int | None = None):
        super().__init__(description)
        self.error = error
        self.status = status or (401 if error == "invalid_client" else 400)


@dataclass(frozen=True)
class TokenClaims:
    """What a verified access token says."""

    client_id: str
    scope: str
    patient: str | None
    purpose: str
    deidentified: bool
    exp: float
    iat: float
    jti: str


# url -> (fetched at, KeySet); per process, shared by every TokenService of it.
_jwks_cache: dict[str, tuple[float, KeySet]] = {}
_jwks_lock = threading.Lock()


class TokenService:
    """Issue, verify and introspect access tokens.

    Args:
        engine: the database with ``auth_client`` and ``auth_jti`` (migration 0007).
        cfg: settings (``auth_*``, ``data_dir``).
        on_event: called with ``{"event": "token"|"auth-failure", "client_id", "outcome":
            "success"|"failure", "reason", "scope"}`` for every token issued and every
            refused token request; an exception from it fails the request.
        clock: the time source (tests).
    """

    def __init__(self, engine: Engine, cfg, on_event: Callable[[dict], Any] | None = None,
                 *, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.cfg = cfg
        self.on_event = on_event
        self.clock = clock
        self.clients = ClientRegistry(engine)
        self._last_purge = 0.0

    # ------------------------------------------------------------------ settings
    def _setting(self, name: str, default: int) -> int:
        v = self.cfg.get(name) if hasattr(self.cfg, "get") else None
        return int(v if v is not None else default)

    @property
    def token_lifetime(self) -> int:
        return self._setting("auth_token_lifetime", 300)

    # ------------------------------------------------------------------ token endpoint
    def token(self, form: dict[str, str], token_url: str) -> dict:
        """Answer a token request (RFC 6749 §4.4 client credentials, RFC 7523 §2.2).

        Args:
            form: the request's form parameters.
            token_url: this endpoint's absolute URL (the assertion's ``aud``).

        Returns:
            ``{access_token, token_type, expires_in, scope}`` (RFC 6749 §5.1).

        Raises:
            OAuthError: the request is refused (RFC 6749 §5.2).
        """
        claimed = form.get("client_id") or _unverified_iss(form.get("client_assertion"))
        try:
            out, client = self._token(form, token_url)
        except OAuthError as err:
            self._emit({"event": "auth-failure", "client_id": claimed, "outcome": "failure",
                        "reason": f"{err.error}: {err.message}", "scope": form.get("scope", "")})
            raise
        self._emit({"event": "token", "client_id": client.client_id, "outcome": "success",
                    "reason": "client_credentials with private_key_jwt", "scope": out["scope"]})
        return out

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _token(self, form: dict[str, str], token_url: str) -> tuple[dict, Client]:
        grant_type = form.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant_type != CLIENT_CREDENTIALS:
            raise OAuthError("unsupported_grant_type",
                             f"grant_type '{grant_type}' is not supported; use client_credentials")
        # RFC 6749 §5.2: no or an unsupported client authentication is invalid_client.
        if form.get("client_assertion_type") != JWT_BEARER:
            raise OAuthError("invalid_client", f"client_assertion_type must be {JWT_BEARER}")
        assertion = form.get("client_assertion")
        if not assertion:
            raise OAuthError("invalid_client", "client_assertion is required")
        client, exp, jti = self._authenticate(assertion, token_url)
        # RFC 7521 §4.2: a client_id parameter must name the authenticated client.
        if form.get("client_id") and form["client_id"] != client.client_id:
            raise OAuthError("invalid_client", "client_id does not match the assertion's iss")
        self._consume_jti(client.client_id, jti, exp)
        requested = form.get("scope", "").strip()
        if not requested:  # RFC 6749 §3.3: no default scope here
            raise OAuthError("invalid_scope", "scope is required (e.g. system/*.rs)")
        try:
            granted = grant(requested, client.scopes)
        except ScopeError as exc:
            raise OAuthError("invalid_scope", str(exc)) from None
        if not granted:
            raise OAuthError("invalid_scope", f"none of '{requested}' is allowed for this client")
        lifetime = self.token_lifetime
        access = self._sign(client.client_id, granted, None, client.purpose, client.deidentified,
                            lifetime)
        return {"access_token": access, "token_type": TOKEN_TYPE, "expires_in": lifetime,
                "scope": granted}, client

    def _authenticate(self, assertion: str, token_url: str) -> tuple[Client, float, str]:
        """Verify a client assertion; return the client, the assertion's exp and jti."""
        try:
            header = jws.extract_compact(assertion.encode()).headers()
        except (JoseError, ValueError, TypeError):
            raise OAuthError("invalid_client", "client_assertion is not a JWS compact "
                             "serialization") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ASSERTION_ALGS:
            raise OAuthError("invalid_client", f"client_assertion alg '{alg}' is not accepted; "
                             f"use {' or '.join(ASSERTION_ALGS)}")
        if not kid or not isinstance(kid, str):
            raise OAuthError("invalid_client", "client_assertion header needs the kid of the key")
        iss = _unverified_iss(assertion)
        client = self.clients.get(iss) if isinstance(iss, str) and iss else None
        if client is None or not client.active:
            raise OAuthError("invalid_client", f"unknown client '{iss}'")
        jku = header.get("jku")
        if jku is not None and jku != client.jwks_url:
            # SMART Backend Services: jku, when present, SHALL match the registered URL.
            raise OAuthError("invalid_client", "jku does not match the registered JWKS URL")
        key = self._client_key(client, kid)
        if usable_for(key) != alg:
            raise OAuthError("invalid_client", f"key '{kid}' cannot verify {alg}")
        try:
            tok = jwt.decode(assertion, key, algorithms=[alg])
        except (JoseError, ValueError, TypeError):
            raise OAuthError("invalid_client", "client_assertion signature is not valid") from None
        now = self.clock()
        claims = tok.claims
        registry = JWTClaimsRegistry(
            now=int(now),
            iss={"essential": True, "value": client.client_id},
            sub={"essential": True, "value": client.client_id},
            aud={"essential": True, "value": token_url},
            exp={"essential": True},
            jti={"essential": True})
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise OAuthError("invalid_client", "client_assertion has expired") from None
        except MissingClaimError as exc:
            raise OAuthError("invalid_client", f"client_assertion lacks the claim(s) {exc.claim}") from None
        except InvalidClaimError as exc:
            expected = {"iss": f"the client_id '{client.client_id}'",
                        "sub": f"the client_id '{client.client_id}'",
                        "aud": f"the token URL {token_url}"}.get(exc.claim)
            raise OAuthError("invalid_client", f"client_assertion {exc.claim} must be {expected}"
                             if expected else f"client_assertion: {exc.description}") from None
        except JoseError as exc:
            raise OAuthError("invalid_client", f"client_assertion: {exc.description}") from None
        exp = claims["exp"]
        if exp < now:  # a NumericDate may be fractional
            raise OAuthError("invalid_client", "client_assertion has expired")
        max_life = self._setting("auth_assertion_max_lifetime", 300)
        if exp - now > max_life:
            raise OAuthError("invalid_client", f"client_assertion exp is more than {max_life} s "
                             "ahead (SMART Backend Services: at most five minutes)")
        if not claims["jti"]:
            raise OAuthError("invalid_client", "client_assertion jti is empty")
        return client, float(exp), claims["jti"]

    def _client_key(self, client: Client, kid: str):
        if client.jwks is None and not client.jwks_url:
            raise OAuthError("invalid_client", "this client is registered for DIMSE only "
                                               "(no public keys)")
        if client.jwks is not None:
            keyset = KeySet.import_key_set(client.jwks)
            key = _by_kid(keyset, kid)
        else:
            key = _by_kid(self._fetch_jwks(client.jwks_url), kid)
            if key is None:  # the client may have rotated its keys since we cached them
                key = _by_kid(self._fetch_jwks(client.jwks_url, refresh=True), kid)
        if key is None:
            raise OAuthError("invalid_client", f"no key '{kid}' in the client's JWKS")
        return key

    def _fetch_jwks(self, url: str, refresh: bool = False) -> KeySet:
        ttl = self._setting("auth_jwks_cache_seconds", 300)
        now = time.monotonic()
        with _jwks_lock:
            hit = _jwks_cache.get(url)
        if hit and now - hit[0] < ttl and not (refresh and now - hit[0] >= _JWKS_REFETCH_AFTER):
            return hit[1]
        try:
            with requests.get(url, timeout=_JWKS_FETCH_TIMEOUT, stream=True, allow_redirects=False,
                              headers={"Accept": "application/json"}) as resp:
                resp.raise_for_status()
                body = resp.raw.read(_JWKS_MAX_BYTES + 1, decode_content=True)
            if len(body) > _JWKS_MAX_BYTES:
                raise ValueError("JWKS too large")
            keyset = check_jwks(orjson.loads(body))
        except Exception as exc:  # noqa: BLE001 - any failure: the client cannot be verified
            raise OAuthError("invalid_client", f"cannot read the client's JWKS URL: "
                             f"{getattr(exc, 'message', None) or type(exc).__name__}") from None
        with _jwks_lock:
            _jwks_cache[url] = (now, keyset)
        return keyset

    def _consume_jti(self, client_id: str, jti: str, exp: float) -> None:
        """Record an assertion's jti; a second use is a replay (SMART Backend Services)."""
        key = hashlib.sha256(orjson.dumps([client_id, jti])).hexdigest()
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                if now - self._last_purge > _PURGE_EVERY:
                    # Rows past their assertion's exp can go: the assertion itself is refused.
                    conn.execute(delete(jti_table).where(jti_table.c.expires < now))
                    self._last_purge = now
                conn.execute(insert(jti_table).values(key=key, expires=exp))
        except IntegrityError:
            raise OAuthError("invalid_client", "client_assertion jti was already used") from None

    # ------------------------------------------------------------------ access tokens
    def _sign(self, client_id: str, scope: str, patient: str | None, purpose: str,
              deidentified: bool, lifetime: int) -> str:
        key = server_key(self.cfg)
        iat = int(self.clock())
        claims = {"iss": ISSUER, "sub": client_id, "client_id": client_id, "iat": iat,
                  "exp": iat + int(lifetime), "jti": uuid.uuid4().hex, "scope": scope,
                  "purpose": purpose, "deid": bool(deidentified)}
        if patient:
            claims["patient"] = patient
        header = {"alg": ALG, "typ": ACCESS_TOKEN_TYP, "kid": key.kid}
        return jwt.encode(header, claims, key, algorithms=[ALG])

    def mint(self, scope: str, patient: str | None = None, client_id: str = CLI_CLIENT_ID,
             purpose: str = "", deidentified: bool = False, lifetime: int | None = None) -> str:
        """An access token signed with the server's key, without a client assertion
        (``synthport token``: local use and tests).

        Raises:
            InvalidRequest: bad scope, patient id, purpose or lifetime.
        """
        try:
            canonical = grant(scope, scope)
        except ScopeError as exc:
            raise InvalidRequest(str(exc)) from None
        if not parse_scopes(canonical):
            raise InvalidRequest(f"'{scope}' has no resource scope (e.g. system/*.rs)")
        if patient is not None and not _FHIR_ID.match(patient):
            raise InvalidRequest(f"'{patient}' is not a FHIR id")
        if purpose not in PURPOSES:
            raise InvalidRequest(f"purpose must be one of {', '.join(repr(p) for p in PURPOSES)}")
        lifetime = self.token_lifetime if lifetime is None else int(lifetime)
        if lifetime <= 0:
            raise InvalidRequest("lifetime must be a positive number of seconds")
        return self._sign(client_id, canonical, patient, purpose, deidentified, lifetime)

    def verify(self, token: str) -> TokenClaims:
        """Check an access token's signature, type, issuer and expiry.

        Raises:
            Unauthorized: the token is malformed, not ours, tampered with or expired.
        """
        if not token or not isinstance(token, str):
            raise Unauthorized("No access token")
        try:
            tok = jwt.decode(token, server_key(self.cfg), algorithms=[ALG])
        except (JoseError, ValueError, TypeError):
            raise Unauthorized("Access token is malformed or its signature is not valid") from None
        if tok.header.get("typ") != ACCESS_TOKEN_TYP:
            raise Unauthorized("Not an access token")
        c = tok.claims
        try:
            JWTClaimsRegistry(
                now=int(self.clock()), leeway=0,
                iss={"essential": True, "value": ISSUER},
                sub={"essential": True}, exp={"essential": True}, iat={"essential": True},
                jti={"essential": True}, scope={"essential": True}).validate(c)
        except ExpiredTokenError:
            raise Unauthorized("Access token has expired") from None
        except JoseError as exc:
            raise Unauthorized(f"Access token is not valid: {exc.description}") from None
        if c["exp"] < self.clock():
            raise Unauthorized("Access token has expired")
        patient = c.get("patient")
        if not isinstance(c["scope"], str) or (patient is not None and not isinstance(patient, str)):
            raise Unauthorized("Access token is not valid: bad scope or patient claim")
        return TokenClaims(client_id=str(c.get("client_id") or c["sub"]), scope=c["scope"],
                           patient=patient, purpose=str(c.get("purpose") or ""),
                           deidentified=bool(c.get("deid", False)), exp=float(c["exp"]),
                           iat=float(c["iat"]), jti=str(c["jti"]))

    def introspect(self, token: str) -> dict:
        """RFC 7662 §2.2 introspection response; ``{"active": false}`` for any bad token."""
        try:
            c = self.verify(token)
        except Unauthorized:
            return {"active": False}
        out = {"active": True, "scope": c.scope, "client_id": c.client_id, "sub": c.client_id,
               "exp": int(c.exp), "iat": int(c.iat), "token_type": TOKEN_TYPE, "iss": ISSUER,
               "jti": c.jti, "purpose": c.purpose, "deidentified": c.deidentified}
        if c.patient:
            out["patient"] = c.patient
        return out


def _by_kid(keyset: KeySet, kid: str):
    for k in keyset:
        if k.kid == kid:
            return k
    return None


def _unverified_iss(assertion: str | None) -> str | None:
    """The ``iss`` an assertion claims, before anything is verified (to find the client)."""
    if not assertion:
        return None
    try:
        claims = orjson.loads(jws.extract_compact(assertion.encode()).payload)
    except Exception:  # noqa: BLE001 - anything unreadable names no client
        return None
    iss = claims.get("iss") if isinstance(claims, dict) else None
    return iss if isinstance(iss, str) else None
