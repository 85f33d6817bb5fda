"""The server's own signing key: access tokens (server/auth) and signed tree heads
(server/audit) are JWS signed with it (ES384, RFC 7518 §3.4).

The private JWK lives in a file, never in the database: ``auth_key_file`` or
``<data_dir>/keys/server-es384.jwk``. It is created on first use (mode 0600); every
gunicorn worker and every host of one deployment must read the same file.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import orjson
from joserfc.jwk import ECKey, KeySet

ALG = "ES384"


def key_path(cfg) -> Path:
    """Where the server key lives for these settings."""
    explicit = (cfg.get("auth_key_file") or "").strip()
    if explicit:
        return Path(explicit).expanduser().resolve()
    return Path(cfg["data_dir"]).expanduser().resolve() / "keys" / "server-es384.jwk"


def server_key(cfg) -> ECKey:
    """The server's private signing key (created if the file does not exist yet)."""
    return _load_or_create(str(key_path(cfg)))


def server_jwks(cfg) -> dict:
    """The public half, as a JWKS document (``/auth/jwks``)."""
    return KeySet([server_key(cfg)]).as_dict(private=False)


@functools.lru_cache(maxsize=8)
def _load_or_create(path: str) -> ECKey:
    p = Path(path)
    if p.exists():
        return ECKey.import_key(orjson.loads(p.read_bytes()))
    key = ECKey.generate_key("P-384", parameters={"alg": ALG, "use": "sig"}, private=True)
    key.ensure_kid()
    p.parent.mkdir(parents=True, exist_ok=True)
    # Create exclusively so two workers starting at once agree on one key.
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(orjson.dumps(key.as_dict(private=True)))
    try:
        os.link(tmp, p)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return ECKey.import_key(orjson.loads(p.read_bytes()))
