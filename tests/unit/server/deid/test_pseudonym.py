"""Reversible keyed pseudonyms (AES-SIV): round trip with the key, nothing without it."""
import base64
import os
import re
import stat

import pytest

from server.deid import pseudonym as psn
from server.errors import InvalidRequest

KEY = bytes(range(64))
OTHER = bytes(range(1, 65))
VALUES = ["MRN-00472913", "999-12-3456", "6f1c2d3e-1111-4a2b-9c3d-5e6f7a8b9c0d", "12345",
          "0042", "deadbeef", "Zoë Ünïcode", "", "x" * 200]


@pytest.mark.parametrize("value", VALUES)
def test_round_trip_with_the_key(value):
    p = psn.pseudonymize(value, KEY, "value")
    assert p.startswith("psn-") and value not in p[4:] or value == ""
    assert psn.reidentify(p, KEY, "value") == value


def test_deterministic_and_context_bound():
    a = psn.pseudonymize("MRN-1", KEY, "value")
    assert a == psn.pseudonymize("MRN-1", KEY, "value")
    assert a != psn.pseudonymize("MRN-2", KEY, "value")
    assert a != psn.pseudonymize("MRN-1", KEY, "id")
    assert a != psn.pseudonymize("MRN-1", OTHER, "value")


def test_url_safe_and_fhir_id_characters():
    for v in VALUES[:7]:
        p = psn.pseudonymize(v, KEY, "id")
        assert re.fullmatch(r"[A-Za-z0-9\-.]+", p)
    # a UUID id packs into 16 bytes: the pseudonym stays within FHIR's 64-character id
    assert len(psn.pseudonymize(VALUES[2], KEY, "id")) <= 64


@pytest.mark.parametrize("value", VALUES[:6])
def test_without_the_key_nothing_is_recovered(value):
    p = psn.pseudonymize(value, KEY, "value")
    with pytest.raises(psn.PseudonymError):
        psn.reidentify(p, OTHER, "value")
    with pytest.raises(psn.PseudonymError):
        psn.reidentify(p, KEY, "id")       # the right key, the wrong context
    # the value is not in the pseudonym in any plain encoding
    body = p[4:]
    raw = base64.b64decode(body.replace("-", "+").replace(".", "/") + "=" * (-len(body) % 4))
    if len(value) >= 4:
        assert value.encode() not in raw and value not in body


def test_tampered_pseudonym_is_rejected():
    p = psn.pseudonymize("MRN-00472913", KEY, "value")
    flipped = p[:-1] + ("A" if p[-1] != "A" else "B")
    with pytest.raises(psn.PseudonymError):
        psn.reidentify(flipped, KEY, "value")
    with pytest.raises(psn.PseudonymError):
        psn.reidentify("MRN-00472913", KEY, "value")


def test_key_files(tmp_path):
    path = tmp_path / "keys" / "pseudonym.key"
    key = psn.new_key_file(path)
    assert len(key) == 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert psn.load_key(path) == key
    with pytest.raises(psn.PseudonymError):
        psn.new_key_file(path)            # never overwrites a key
    assert psn.load_key(path) == key
    bad = tmp_path / "bad.key"
    bad.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(InvalidRequest):
        psn.load_key(bad)
    with pytest.raises(InvalidRequest):
        psn.load_key(tmp_path / "missing.key")


def test_derived_keys_differ_by_purpose():
    a, b = psn.derive_key(KEY, "cryptoHash"), psn.derive_key(KEY, "dateShift")
    assert len(a) == 32 and a != b and a == psn.derive_key(KEY, "cryptoHash")
    assert psn.derive_key(OTHER, "cryptoHash") != a
