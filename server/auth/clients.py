"""Registry of SMART Backend Services clients (``synthport client add|list|remove``).

A client authenticates at the token endpoint with a JWT signed by its own private key
(``private_key_jwt``, SMART Backend Services §"Registering a client"); the registry holds
its public keys (a JWKS document, or the URL of one), the most it may ever be granted
(``scopes``), the DIMSE calling AE titles that act as it, and two flags carried into its
tokens: the purpose of use (``research``) and de-identified access.

Nothing here imports Flask. Table: ``auth_client`` (migration 0007).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import Boolean, Column, Float, MetaData, String, Table, Text, delete, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from server.auth.scopes import ScopeError, parse_scopes
from server.errors import Conflict, InvalidRequest, NotFound

metadata = MetaData()

client_table = Table(
    "auth_client", metadata,
    Column("client_id", String(256), primary_key=True),
    Column("name", Text, nullable=False, default=""),
    Column("jwks", Text, nullable=True),           # JWKS JSON (public keys only)
    Column("jwks_url", Text, nullable=True),
    Column("scopes", Text, nullable=False, default=""),
    Column("ae_titles", Text, nullable=False, default=""),  # JSON list of AE titles
    Column("purpose", String(64), nullable=False, default=""),
    Column("deidentified", Boolean, nullable=False, default=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created", Float, nullable=False),
)

jti_table = Table(
    "auth_jti", metadata,
    Column("key", String(512), primary_key=True),
    Column("expires", Float, nullable=False),
)

PURPOSES = ("", "research")
# Algorithms a client assertion may use (SMART Backend Services §"Authenticating to the
# token endpoint": RS384 and ES384), and the keys that can verify each.
ASSERTION_ALGS = ("RS384", "ES384")
CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~\-]{0,255}$")
# PS3.5 §6.2 (AE VR): at most 16 characters, no backslash or control characters;
# leading and trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@dataclass
class Client:
    """One registered client.

    Attributes:
        client_id: the ``iss``/``sub`` of its client assertions.
        name: a human-readable label.
        jwks: its public keys as a JWKS document, or ``None`` when fetched from ``jwks_url``.
        jwks_url: where its JWKS is published (https, or http on a loopback address).
        scopes: the most it may be granted (space-separated SMART scopes).
        ae_titles: DIMSE calling AE titles that act as this client.
        purpose: ``''`` or ``'research'`` (purpose of use carried into its tokens).
        deidentified: its tokens only ever see de-identified data.
        active: inactive clients get no tokens.
    """

    client_id: str
    name: str = ""
    jwks: dict | None = None
    jwks_url: str | None = None
    scopes: str = ""
    ae_titles: list[str] = field(default_factory=list)
    purpose: str = ""
    deidentified: bool = False
    active: bool = True

    def to_json(self) -> dict:
        return {"client_id": self.client_id, "name": self.name, "jwks": self.jwks,
                "jwks_url": self.jwks_url, "scopes": self.scopes, "ae_titles": self.ae_titles,
                "purpose": self.purpose, "deidentified": self.deidentified,
                "active": self.active}


def check_jwks(jwks: dict) -> KeySet:
    """Validate a client's JWKS document (RFC 7517 §5) and return it as a ``KeySet``.

    Every key needs a ``kid`` (assertions name their key by it, SMART Backend Services)
    and must be public; at least one must be able to verify RS384 or ES384.

    Raises:
        InvalidRequest: when the document is not such a JWKS.
    """
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise InvalidRequest('JWKS must be a JSON object {"keys": [...]} with at least one key')
    kids = []
    for k in jwks["keys"]:
        if not isinstance(k, dict):
            raise InvalidRequest("JWKS: every key must be a JSON object")
        if _PRIVATE_MEMBERS & set(k):
            raise InvalidRequest(f"JWKS key '{k.get('kid', '')}' holds private or secret "
                                 "material: register the public key only")
        if not k.get("kid"):
            raise InvalidRequest("JWKS: every key needs a 'kid'")
        kids.append(k["kid"])
    if len(set(kids)) != len(kids):
        raise InvalidRequest("JWKS: 'kid' values must be unique")
    try:
        keyset = KeySet.import_key_set(jwks)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise InvalidRequest(f"JWKS is not valid: {exc}") from None
    if not any(usable_for(k) for k in keyset):
        raise InvalidRequest("JWKS has no key for RS384 (RSA) or ES384 (EC P-384)")
    return keyset


def usable_for(key) -> str | None:
    """The assertion algorithm a key can verify (``RS384``/``ES384``), or ``None``."""
    alg = key.get("alg")
    if key.key_type == "RSA":
        return "RS384" if alg in (None, "RS384") else None
    if key.key_type == "EC" and key.get("crv") == "P-384":
        return "ES384" if alg in (None, "ES384") else None
    return None


def check_jwks_url(url: str) -> str:
    """A JWKS URL must be https (SMART: "TLS-protected"); plain http only on loopback."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"):
        return url
    raise InvalidRequest(f"JWKS URL '{url}' must be https (http only on a loopback address)")


def _row_to_client(r) -> Client:
    return Client(client_id=r.client_id, name=r.name or "",
                  jwks=orjson.loads(r.jwks) if r.jwks else None, jwks_url=r.jwks_url or None,
                  scopes=r.scopes or "", ae_titles=orjson.loads(r.ae_titles) if r.ae_titles else [],
                  purpose=r.purpose or "", deidentified=bool(r.deidentified), active=bool(r.active))


class ClientRegistry:
    """The registered clients, in the ``auth_client`` table of ``engine``."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def add(self, client: Client) -> Client:
        """Register a client.

        Raises:
            InvalidRequest: bad client_id, scopes, JWKS, JWKS URL, AE title or purpose, or
                neither a JWKS nor a JWKS URL.
            Conflict: the client_id exists, or an AE title already acts as another client.
        """
        if not CLIENT_ID.match(client.client_id or ""):
            raise InvalidRequest(f"client_id '{client.client_id}': letters, digits and "
                                 "._~- only, at most 256 characters")
        if client.jwks is None and not client.jwks_url and not client.ae_titles:
            # A DIMSE-only client (a modality, a PACS) is known by its AE title alone.
            raise InvalidRequest("A client needs its public keys (a JWKS or a JWKS URL), "
                                 "or an AE title for DIMSE only")
        if client.jwks is not None and client.jwks_url:
            raise InvalidRequest("Give a JWKS or a JWKS URL, not both")
        if client.jwks is not None:
            check_jwks(client.jwks)
        if client.jwks_url:
            check_jwks_url(client.jwks_url)
        try:
            if not parse_scopes(client.scopes):
                raise InvalidRequest("A client needs at least one resource scope "
                                     "(e.g. system/*.rs)")
        except ScopeError as exc:
            raise InvalidRequest(f"Scopes: {exc}") from None
        if client.purpose not in PURPOSES:
            raise InvalidRequest(f"purpose must be one of {', '.join(repr(p) for p in PURPOSES)}")
        aets = [a.strip() for a in client.ae_titles]
        for a in aets:
            if not _AE_TITLE.match(a):
                raise InvalidRequest(f"AE title '{a}': 1 to 16 printable characters, no backslash")
        taken = {a: c.client_id for c in self.list() for a in c.ae_titles}
        for a in aets:
            if a in taken:
                raise Conflict(f"AE title '{a}' already acts as client '{taken[a]}'")
        client = Client(client.client_id, client.name or "", client.jwks, client.jwks_url or None,
                        " ".join(client.scopes.split()), list(dict.fromkeys(aets)),
                        client.purpose, bool(client.deidentified), bool(client.active))
        row = {"client_id": client.client_id, "name": client.name,
               "jwks": orjson.dumps(client.jwks).decode() if client.jwks is not None else None,
               "jwks_url": client.jwks_url, "scopes": client.scopes,
               "ae_titles": orjson.dumps(client.ae_titles).decode(), "purpose": client.purpose,
               "deidentified": client.deidentified, "active": client.active,
               "created": time.time()}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(client_table).values(**row))
        except IntegrityError:
            raise Conflict(f"Client '{client.client_id}' exists") from None
        return client

    def get(self, client_id: str) -> Client | None:
        """The client, or ``None`` when it is not registered."""
        with self.engine.connect() as conn:
            r = conn.execute(select(client_table).where(client_table.c.client_id == client_id)).first()
        return _row_to_client(r) if r else None

    def list(self) -> list[Client]:
        """Every registered client, by client_id."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(client_table).order_by(client_table.c.client_id)).all()
        return [_row_to_client(r) for r in rows]

    def remove(self, client_id: str) -> None:
        """Remove a client; tokens it holds stay valid until they expire.

        Raises:
            NotFound: no such client.
        """
        with self.engine.begin() as conn:
            n = conn.execute(delete(client_table).where(client_table.c.client_id == client_id)).rowcount
        if not n:
            raise NotFound(f"No client '{client_id}'")

    def by_ae_title(self, aet: str) -> Client | None:
        """The active client that DIMSE calling AE title ``aet`` acts as, if any."""
        aet = (aet or "").strip()
        if not aet:
            return None
        # AE titles sit in a JSON list; narrow in SQL, decide exactly in Python.
        with self.engine.connect() as conn:
            rows = conn.execute(select(client_table).where(
                client_table.c.active.is_(True),
                client_table.c.ae_titles.contains(orjson.dumps(aet).decode(), autoescape=True))).all()
        for r in rows:
            c = _row_to_client(r)
            if aet in c.ae_titles:
                return c
        return None
