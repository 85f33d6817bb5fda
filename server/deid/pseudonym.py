"""Reversible, keyed pseudonyms: AES-SIV (RFC 5297) deterministic authenticated encryption.

A pseudonym is ``psn-`` followed by the AES-SIV ciphertext (synthetic IV + encrypted
value) in a base64 alphabet made only of FHIR id characters (``A-Z a-z 0-9 - .``, which
are also URL-unreserved, RFC 3986 §2.3). So:

- the same value, key and context always give the same pseudonym (records link up);
- only a holder of the key (the data controller) can turn it back (:func:`reidentify`);
- without the key the value cannot be recovered, and a wrong key or context is detected
  (the SIV is an authentication tag), never silently decoded into something else.

The key is 64 random bytes (AES-256-SIV), kept base64-encoded in a file *outside* the
database and the data directory (setting ``pseudonym_key_file``).

The *context* is bound as associated data: the same value pseudonymised for two purposes
(``id`` and ``value``) gives two unrelated pseudonyms.

Values are packed before encryption so that resource ids stay within FHIR's 64-character
limit: canonical UUIDs take 16 bytes, decimal numbers and lowercase hex strings their
binary size, anything else its UTF-8 bytes.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import stat
import uuid
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.errors import InvalidRequest

log = logging.getLogger(__name__)

PREFIX = "psn-"
KEY_BYTES = 64  # AES-256-SIV takes a 512-bit key (RFC 5297 §2.2, two 256-bit halves)

# Standard base64 with '+' '/' replaced by '-' '.': every character is a FHIR id character
# (R4 datatypes §2.24.0.1) and URL-unreserved (RFC 3986 §2.3).
_STD = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_OURS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-."
_ENC = bytes.maketrans(_STD, _OURS)
_DEC = bytes.maketrans(_OURS, _STD)

# Packing of the plaintext (first byte says which).
_RAW, _UUID, _DIGITS, _HEX = 0, 1, 2, 3


class PseudonymError(InvalidRequest):
    """Not a pseudonym made with this key and context (or a malformed key)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").translate(_ENC).decode("ascii")


def _unb64(text: str) -> bytes:
    raw = text.encode("ascii").translate(_DEC)
    return base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise PseudonymError(f"A pseudonym key is {KEY_BYTES} bytes (AES-256-SIV)")
    return bytes(key)


def load_key(path: str | os.PathLike) -> bytes:
    """Read a pseudonym key file (base64 of 64 bytes).

    Raises:
        PseudonymError: missing file or not a 64-byte base64 key.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PseudonymError(f"Cannot read the pseudonym key file {p}: {exc}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        try:
            key = base64.urlsafe_b64decode(text)
        except ValueError:
            raise PseudonymError(f"{p} is not a base64 pseudonym key") from None
    if len(key) != KEY_BYTES:
        raise PseudonymError(f"{p} holds {len(key)} bytes; a pseudonym key is {KEY_BYTES}")
    try:
        if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("pseudonym key file %s is readable by group/others; chmod 600 it", p)
    except OSError:
        pass
    return key


def new_key_file(path: str | os.PathLike) -> bytes:
    """Create a key file with 64 random bytes (mode 0600); never overwrites.

    Returns:
        The new key.

    Raises:
        PseudonymError: the file exists already (a lost key cannot be re-made, and an
            overwritten one makes every earlier pseudonym unrecoverable).
    """
    p = Path(path)
    key = os.urandom(KEY_BYTES)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, mode=0o700)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PseudonymError(f"{p} exists already; refusing to overwrite a pseudonym key") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(base64.b64encode(key).decode("ascii") + "\n")
    return key


def derive_key(key: bytes, purpose: str, length: int = 32) -> bytes:
    """A sub-key for another purpose (HKDF-SHA256, RFC 5869), e.g. the de-identification
    engine's cryptoHash and dateShift keys when only a pseudonym key is configured."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=b"synthport deid " + purpose.encode("utf-8")).derive(_check_key(key))


def _pack(value: str) -> bytes:
    if len(value) == 36:
        try:
            u = uuid.UUID(value)
        except ValueError:
            u = None
        if u is not None and str(u) == value:
            return bytes([_UUID]) + u.bytes
    if value.isascii() and value.isdigit() and (value == "0" or value[0] != "0"):
        n = int(value)
        return bytes([_DIGITS]) + n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    if value and len(value) % 2 == 0 and all(c in "0123456789abcdef" for c in value):
        return bytes([_HEX]) + bytes.fromhex(value)
    return bytes([_RAW]) + value.encode("utf-8")


def _unpack(data: bytes) -> str:
    kind, body = data[0], data[1:]
    if kind == _UUID:
        return str(uuid.UUID(bytes=body))
    if kind == _DIGITS:
        return str(int.from_bytes(body, "big"))
    if kind == _HEX:
        return body.hex()
    if kind == _RAW:
        return body.decode("utf-8")
    raise ValueError("unknown packing")


def pseudonymize(value: str, key: bytes, context: str) -> str:
    """The pseudonym of ``value`` under ``key`` for ``context`` (deterministic).

    Args:
        value: the identifying string.
        key: 64-byte key (:func:`load_key`).
        context: what the value is (e.g. ``id``, ``value``); bound as associated data.
    """
    if not isinstance(value, str):
        raise TypeError("pseudonymize takes a string")
    ct = AESSIV(_check_key(key)).encrypt(_pack(value), [context.encode("utf-8")])
    return PREFIX + _b64(ct)


def is_pseudonym(text: object) -> bool:
    """Whether ``text`` has the shape of a pseudonym (says nothing about the key)."""
    return isinstance(text, str) and text.startswith(PREFIX) and len(text) > len(PREFIX) + 21


def reidentify(pseudonym: str, key: bytes, context: str) -> str:
    """The original value of a pseudonym; only with the key and context it was made with.

    Raises:
        PseudonymError: not a pseudonym, or made with another key or context.
    """
    if not is_pseudonym(pseudonym):
        raise PseudonymError("Not a pseudonym (expected 'psn-...')")
    try:
        ct = _unb64(pseudonym[len(PREFIX):])
        plain = AESSIV(_check_key(key)).decrypt(ct, [context.encode("utf-8")])
        return _unpack(plain)
    except PseudonymError:
        raise
    except (InvalidTag, ValueError, IndexError, UnicodeDecodeError):
        raise PseudonymError("Pseudonym was not made with this key and context") from None


def keyed_hash(key: bytes, value: str) -> str:
    """HMAC-SHA256 of ``value``, lowercase hex (64 characters): the cryptoHash method."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()
