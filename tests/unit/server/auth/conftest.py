"""Fixtures of the auth tests: a migrated database (both backends), settings with a
server key under tmp_path, client key pairs made with joserfc, and an assertion builder."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from server.auth.clients import Client
from server.auth.tokens import JWT_BEARER, TokenService
from server.config import load_config
from server.db.engine import make_engine, migrate

TOKEN_URL = "http://fhir.test/auth/token"


@dataclass
class Env:
    service: TokenService
    cfg: dict
    events: list[dict]
    rsa: RSAKey
    ec: ECKey

    def jwks(self) -> dict:
        return KeySet([self.rsa, self.ec]).as_dict(private=False)

    def add(self, client_id="backend-1", scopes="system/*.rs", **kw) -> Client:
        kw.setdefault("jwks", self.jwks())
        return self.service.clients.add(Client(client_id, scopes=scopes, **kw))


@pytest.fixture(scope="session")
def client_keys() -> tuple[RSAKey, ECKey]:
    """One RSA (RS384) and one EC P-384 (ES384) client key, private (the client's side)."""
    rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "alg": "RS384"}, private=True)
    ec = ECKey.generate_key("P-384", parameters={"kid": "ec-1", "alg": "ES384"}, private=True)
    return rsa, ec


@pytest.fixture
def env(db_url: str, tmp_path: Path, client_keys) -> Iterator[Env]:
    engine = make_engine(db_url)
    migrate(engine)
    cfg = load_config({"data_dir": str(tmp_path / "data"), "database_url": db_url}, environ={})
    events: list[dict] = []
    yield Env(TokenService(engine, cfg, events.append), cfg, events, *client_keys)
    engine.dispose()


def assertion(key, client_id="backend-1", *, alg=None, kid=None, aud=TOKEN_URL, iss=None,
              sub=None, exp_in=240, jti=None, omit=(), header_extra=None) -> str:
    """A client assertion (SMART Backend Services), signed on the client side with joserfc."""
    alg = alg or ("RS384" if key.key_type == "RSA" else "ES384")
    header = {"alg": alg, "typ": "JWT", "kid": kid if kid is not None else key.kid,
              **(header_extra or {})}
    claims = {"iss": iss or client_id, "sub": sub or client_id, "aud": aud,
              "exp": int(time.time() + exp_in), "jti": jti or uuid.uuid4().hex}
    for k in omit:
        claims.pop(k, None)
    return jwt.encode(header, claims, key, algorithms=[alg])


def token_form(assertion_text: str, scope="system/*.rs", **extra) -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": JWT_BEARER, "client_assertion": assertion_text, **extra}
