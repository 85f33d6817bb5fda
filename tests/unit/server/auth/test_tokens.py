"""Token endpoint logic (SMART Backend Services), access tokens and introspection."""
from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from server.auth.tokens import OAuthError, TokenService
from server.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from tests.unit.server.auth.conftest import TOKEN_URL, assertion, token_form


def _refused(env, form, error="invalid_client", status=None, match=None):
    with pytest.raises(OAuthError) as ei:
        env.service.token(form, TOKEN_URL)
    assert ei.value.error == error
    assert ei.value.status == (status or (401 if error == "invalid_client" else 400))
    if match:
        assert match in ei.value.message
    assert env.events[-1]["event"] == "auth-failure"
    assert env.events[-1]["outcome"] == "failure"
    return ei.value


@pytest.mark.parametrize("which", ["rsa", "ec"])
def test_rs384_and_es384_assertions_get_a_token(env, which):
    env.add()
    key = getattr(env, which)
    out = env.service.token(token_form(assertion(key)), TOKEN_URL)
    assert out["token_type"] == "bearer" and out["scope"] == "system/*.rs"
    assert out["expires_in"] == env.cfg["auth_token_lifetime"]
    claims = env.service.verify(out["access_token"])
    assert claims.client_id == "backend-1" and claims.scope == "system/*.rs"
    assert claims.exp - claims.iat == env.cfg["auth_token_lifetime"]
    assert env.events[-1] == {"event": "token", "client_id": "backend-1", "outcome": "success",
                              "reason": "client_credentials with private_key_jwt",
                              "scope": "system/*.rs"}


def test_access_token_is_an_es384_jwt_with_the_documented_claims(env):
    env.add(purpose="research", deidentified=True)
    tok = env.service.token(token_form(assertion(env.ec)), TOKEN_URL)["access_token"]
    header = json.loads(base64.urlsafe_b64decode(tok.split(".")[0] + "=="))
    assert header["alg"] == "ES384" and header["typ"] == "at+jwt"
    c = env.service.verify(tok)
    assert (c.purpose, c.deidentified, c.patient) == ("research", True, None)


def test_refusals(env):
    env.add()
    # exp more than five minutes ahead
    _refused(env, token_form(assertion(env.rsa, exp_in=301)), match="300 s")
    _refused(env, token_form(assertion(env.rsa, exp_in=-5)), match="expired")
    _refused(env, token_form(assertion(env.rsa, omit=("exp",))), match="exp")
    _refused(env, token_form(assertion(env.rsa, omit=("jti",))), match="jti")
    _refused(env, token_form(assertion(env.rsa, aud="http://other/auth/token")), match="aud")
    _refused(env, token_form(assertion(env.rsa, sub="someone-else")), match="sub")
    _refused(env, token_form(assertion(env.rsa, kid="nope")), match="no key 'nope'")
    _refused(env, token_form(assertion(env.rsa, client_id="unknown")), match="unknown client")
    _refused(env, token_form(assertion(env.rsa), client_id="other"), match="client_id")
    _refused(env, token_form(assertion(env.rsa, header_extra={"jku": "https://evil/jwks"})),
             match="jku")


def test_wrong_issuer_is_refused(env):
    env.add()
    env.add("backend-2")
    # signed by backend-1's key but claims to be backend-2 with sub backend-1
    _refused(env, token_form(assertion(env.rsa, iss="backend-2", sub="backend-1")), match="sub")


def test_key_of_another_client_or_other_alg_is_refused(env):
    env.add()
    stranger = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)
    _refused(env, token_form(assertion(stranger)), match="signature")
    # an ES384 assertion that names the client's RSA key
    _refused(env, token_form(assertion(env.ec, kid="rsa-1")), match="cannot verify ES384")


def _b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def test_alg_none_and_hmac_are_refused(env):
    env.add()
    claims = {"iss": "backend-1", "sub": "backend-1", "aud": TOKEN_URL,
              "exp": int(time.time()) + 60, "jti": uuid.uuid4().hex}
    unsigned = _b64({"alg": "none", "kid": "rsa-1"}) + "." + _b64(claims) + "."
    _refused(env, token_form(unsigned), match="alg 'none'")
    # HS256 keyed with the public JWK text: the classic algorithm-confusion attack
    secret = OctKey.import_key(json.dumps(env.rsa.as_dict(private=False)).encode())
    hs = jwt.encode({"alg": "HS256", "kid": "rsa-1"}, claims, secret, algorithms=["HS256"])
    _refused(env, token_form(hs), match="alg 'HS256'")
    _refused(env, token_form("not-a-jwt"), match="JWS")


def test_replayed_jti_is_refused(env):
    env.add()
    a = assertion(env.ec, jti="same-jti")
    env.service.token(token_form(a), TOKEN_URL)
    _refused(env, token_form(a), match="already used")
    # the same jti from another client is that client's own
    env.add("backend-2")
    env.service.token(token_form(assertion(env.ec, "backend-2", jti="same-jti")), TOKEN_URL)


def test_form_errors(env):
    env.add()
    a = assertion(env.rsa)
    _refused(env, {**token_form(a), "grant_type": "authorization_code"}, "unsupported_grant_type")
    _refused(env, {k: v for k, v in token_form(a).items() if k != "grant_type"}, "invalid_request")
    _refused(env, {**token_form(a), "client_assertion_type": "x"}, match="client_assertion_type")
    _refused(env, {k: v for k, v in token_form(a).items() if k != "client_assertion"})
    _refused(env, token_form(assertion(env.rsa), scope=""), "invalid_scope")


def test_scope_downgrade_and_invalid_scope(env):
    env.add(scopes="system/Patient.rs system/Observation.rs")
    out = env.service.token(token_form(assertion(env.rsa), scope="system/*.cruds"), TOKEN_URL)
    assert out["scope"] == "system/Patient.rs system/Observation.rs"
    assert env.service.verify(out["access_token"]).scope == out["scope"]
    _refused(env, token_form(assertion(env.rsa), scope="system/Encounter.rs"), "invalid_scope")
    _refused(env, token_form(assertion(env.rsa), scope="system/*.cud"), "invalid_scope")
    _refused(env, token_form(assertion(env.rsa), scope="system/Patient.dus"), "invalid_scope",
             match="order")


def test_v1_scopes_are_granted_in_v2_form(env):
    env.add(scopes="system/*.read")
    out = env.service.token(token_form(assertion(env.rsa), scope="system/Patient.read"), TOKEN_URL)
    assert out["scope"] == "system/Patient.rs"


def test_inactive_client_is_refused(env):
    env.add(active=False)
    _refused(env, token_form(assertion(env.rsa)), match="unknown client")


def test_on_event_failure_fails_the_request(env):
    env.add()

    def boom(event):
        raise RuntimeError("audit log unavailable")

    svc = TokenService(env.service.engine, env.cfg, boom)
    with pytest.raises(RuntimeError):
        svc.token(token_form(assertion(env.rsa)), TOKEN_URL)


# ---------------------------------------------------------------------- JWKS URL


class _JwksHandler(BaseHTTPRequestHandler):
    body = b""
    hits = 0

    def do_GET(self):  # noqa: N802 - http.server API
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args):
        pass


@pytest.fixture
def jwks_server():
    handler = type("H", (_JwksHandler,), {"body": b"", "hits": 0})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json"
    httpd.shutdown()
    httpd.server_close()


def test_jwks_url_is_fetched_cached_and_refetched_for_a_new_kid(env, jwks_server, monkeypatch):
    handler, url = jwks_server
    handler.body = json.dumps(KeySet([env.ec]).as_dict(private=False)).encode()
    env.add(jwks=None, jwks_url=url)
    env.service.token(token_form(assertion(env.ec)), TOKEN_URL)
    env.service.token(token_form(assertion(env.ec)), TOKEN_URL)
    assert handler.hits == 1  # cached
    # key rotation: a kid not in the cached set fetches again (once the cache is 10 s old)
    new = ECKey.generate_key("P-384", parameters={"kid": "ec-2"}, private=True)
    handler.body = json.dumps(KeySet([env.ec, new]).as_dict(private=False)).encode()
    import server.auth.tokens as tokens_mod
    cached_at, ks = tokens_mod._jwks_cache[url]
    tokens_mod._jwks_cache[url] = (cached_at - 11, ks)
    env.service.token(token_form(assertion(new)), TOKEN_URL)
    assert handler.hits == 2
    _refused(env, token_form(assertion(env.rsa)), match="no key 'rsa-1'")


def test_unreachable_jwks_url_is_invalid_client(env):
    env.add(jwks=None, jwks_url="http://127.0.0.1:9/jwks.json")
    _refused(env, token_form(assertion(env.ec)), match="JWKS URL")


# ---------------------------------------------------------------------- access tokens


def test_mint_and_verify(env):
    tok = env.service.mint("patient/*.read", patient="p1", purpose="research", lifetime=60)
    c = env.service.verify(tok)
    assert (c.client_id, c.scope, c.patient, c.purpose, c.deidentified) == \
        ("synthport-cli", "patient/*.rs", "p1", "research", False)
    assert c.exp - c.iat == 60
    for bad in [dict(scope="patient/*.dus"), dict(scope="openid"), dict(scope="system/*.rs", patient="a b"),
                dict(scope="system/*.rs", purpose="marketing"), dict(scope="system/*.rs", lifetime=0)]:
        with pytest.raises(InvalidRequest):
            env.service.mint(**bad)


def test_verify_rejects_other_key_expired_and_tampered_tokens(env, tmp_path):
    other = TokenService(None, {"data_dir": str(tmp_path / "other")})
    with pytest.raises(Unauthorized):
        env.service.verify(other.mint("system/*.rs"))
    # expired: verify an hour later
    tok = env.service.mint("system/*.rs", lifetime=60)
    later = TokenService(None, env.cfg, clock=lambda: time.time() + 3600)
    with pytest.raises(Unauthorized, match="expired"):
        later.verify(tok)
    # tampered payload: scope widened, signature kept
    h, p, s = tok.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    claims["scope"] = "system/*.cruds"
    with pytest.raises(Unauthorized):
        env.service.verify(f"{h}.{_b64(claims)}.{s}")
    for junk in ["", "abc", "a.b.c", tok + "x"]:
        with pytest.raises(Unauthorized):
            env.service.verify(junk)


def test_verify_rejects_a_jws_of_the_server_key_that_is_no_access_token(env):
    from server.auth.keys import server_key

    key = server_key(env.cfg)
    now = int(time.time())
    claims = {"iss": "synthport", "sub": "x", "iat": now, "exp": now + 60, "jti": "j",
              "scope": "system/*.cruds"}
    plain = jwt.encode({"alg": "ES384"}, claims, key, algorithms=["ES384"])
    with pytest.raises(Unauthorized, match="Not an access token"):
        env.service.verify(plain)
    wrong_iss = jwt.encode({"alg": "ES384", "typ": "at+jwt"}, {**claims, "iss": "else"}, key,
                           algorithms=["ES384"])
    with pytest.raises(Unauthorized, match="iss"):
        env.service.verify(wrong_iss)


def test_introspection(env):
    tok = env.service.mint("system/Patient.rs", patient="p9")
    info = env.service.introspect(tok)
    assert info["active"] is True
    assert info["scope"] == "system/Patient.rs" and info["client_id"] == "synthport-cli"
    assert info["sub"] == "synthport-cli" and info["token_type"] == "bearer"
    assert info["patient"] == "p9" and info["exp"] > info["iat"]
    assert env.service.introspect("garbage") == {"active": False}
    later = TokenService(None, env.cfg, clock=lambda: time.time() + 3600)
    assert later.introspect(tok) == {"active": False}


# ---------------------------------------------------------------------- client registry


def test_client_registry(env):
    reg = env.service.clients
    c = env.add("c1", "system/*.read", ae_titles=["MODALITY1", " PACS "], purpose="research",
                deidentified=True, name="Lab")
    assert c.ae_titles == ["MODALITY1", "PACS"]
    got = reg.get("c1")
    assert got == c and got.jwks["keys"][0]["kid"] == "rsa-1"
    assert reg.by_ae_title("PACS").client_id == "c1"
    assert reg.by_ae_title("PACS_") is None and reg.by_ae_title("") is None
    assert reg.by_ae_title("MODALITY") is None
    env.add("c2", jwks=None, jwks_url="https://keys.example.org/jwks.json")
    assert [x.client_id for x in reg.list()] == ["c1", "c2"]
    with pytest.raises(Conflict):
        env.add("c1")
    with pytest.raises(Conflict):
        env.add("c3", ae_titles=["PACS"])
    reg.remove("c1")
    assert reg.get("c1") is None and reg.by_ae_title("PACS") is None
    with pytest.raises(NotFound):
        reg.remove("c1")


def test_client_validation(env):
    pub = env.jwks()
    private = {"keys": [env.ec.as_dict(private=True)]}
    nokid = {"keys": [{k: v for k, v in env.ec.as_dict(private=False).items() if k != "kid"}]}
    p256 = {"keys": [ECKey.generate_key("P-256", parameters={"kid": "p"}).as_dict(private=False)]}
    secret = {"keys": [OctKey.generate_key(256, parameters={"kid": "s"}).as_dict(private=True)]}
    for kw in [dict(jwks=None), dict(jwks=private), dict(jwks=nokid), dict(jwks=p256),
               dict(jwks=secret), dict(jwks={"keys": []}), dict(jwks={"x": 1}),
               dict(jwks=pub, jwks_url="https://k/jwks"),
               dict(jwks=None, jwks_url="http://keys.example.org/jwks"),
               dict(scopes="system/*.dus"), dict(scopes="openid"), dict(purpose="marketing"),
               dict(ae_titles=["A" * 17]), dict(ae_titles=["BAD\\AE"])]:
        with pytest.raises(InvalidRequest):
            env.add("cx", **kw)
    with pytest.raises(InvalidRequest):
        env.add("bad id")
    assert env.service.clients.list() == []


def test_client_without_keys_gets_no_token(env):
    """A DIMSE-only client (AE title, no keys) cannot authenticate at the token endpoint."""
    from sqlalchemy import insert

    from server.auth.clients import client_table

    with env.service.engine.begin() as conn:
        conn.execute(insert(client_table).values(
            client_id="modality", name="", jwks=None, jwks_url=None, scopes="system/*.rs",
            ae_titles='["MOD1"]', purpose="", deidentified=False, active=True, created=0.0))
    _refused(env, token_form(assertion(env.ec, "modality")), match="DIMSE only")
