"""RFC 9162 §2.1 Merkle tree: roots, frontier, inclusion and consistency proofs, checked
against a naive recursive MTH written straight from §2.1.1, and against tampering."""
from __future__ import annotations

import hashlib

import pytest

from server.audit import merkle as M


def naive_mth(leaves: list[bytes]) -> bytes:
    """MTH as defined in RFC 9162 §2.1.1, recursively, on the entries themselves."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + naive_mth(leaves[:k]) + naive_mth(leaves[k:])).digest()


ENTRIES = [f"entry-{i}".encode() for i in range(70)]
LEAVES = [M.leaf_hash(e) for e in ENTRIES]
SIZES = list(range(0, 34)) + [63, 64, 65, 70]


def test_hash_prefixes():
    assert M.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert M.node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()
    # A leaf can never pass for a node: same bytes, different prefix.
    assert M.leaf_hash(b"a" * 64) != M.node_hash(b"a" * 32, b"a" * 32)


def test_ct_reference_vector():
    """The 8-entry tree of the Certificate Transparency reference tests (RFC 6962 test data)."""
    data = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243",
                                       "5051525354555657", "606162636465666768696a6b6c6d6e6f")]
    assert M.mth([M.leaf_hash(d) for d in data]).hex() == \
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    assert M.mth([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("n", SIZES)
def test_mth_and_frontier_match_naive(n):
    want = naive_mth(ENTRIES[:n])
    assert M.mth(LEAVES[:n]) == want
    frontier: list[bytes] = []
    for i in range(n):
        frontier = M.append_to_frontier(frontier, i, LEAVES[i])
        assert len(frontier) == (i + 1).bit_count()  # O(log n) state
    assert M.root_from_frontier(frontier, n) == want


def test_append_with_nodes_lists_completed_perfect_subtrees():
    frontier, seen = [], {}
    for i in range(16):
        frontier, made = M.append_with_nodes(frontier, i, LEAVES[i])
        for level, idx, h in made:
            seen[(level, idx)] = h
    assert seen[(4, 0)] == naive_mth(ENTRIES[:16])
    assert seen[(2, 3)] == naive_mth(ENTRIES[12:16])
    assert seen[(1, 5)] == naive_mth(ENTRIES[10:12])
    assert len(seen) == 15  # every interior node of a 16-leaf tree, once


def test_frontier_size_mismatch_raises():
    with pytest.raises(ValueError):
        M.append_to_frontier([LEAVES[0]], 3, LEAVES[1])
    with pytest.raises(ValueError):
        M.root_from_frontier([], 1)


@pytest.mark.parametrize("n", [n for n in SIZES if n > 0])
def test_every_inclusion_proof_verifies(n):
    root = naive_mth(ENTRIES[:n])
    for i in range(n):
        path = M.inclusion_path(i, LEAVES[:n])
        assert M.verify_inclusion(i, n, LEAVES[i], path, root)
        # The same proof from a subtree oracle (what the log uses).
        assert M.inclusion_path(i, lambda a, b: M.mth(LEAVES[a:b]), n) == path


def test_inclusion_tampering_fails():
    n, i = 13, 6
    root = M.mth(LEAVES[:n])
    path = M.inclusion_path(i, LEAVES[:n])
    assert M.verify_inclusion(i, n, LEAVES[i], path, root)
    assert not M.verify_inclusion(i, n, LEAVES[i + 1], path, root)            # other leaf
    assert not M.verify_inclusion(i + 1, n, LEAVES[i], path, root)            # other index
    assert not M.verify_inclusion(i, 7, LEAVES[i], path, root)                # other shape
    assert not M.verify_inclusion(i, n, LEAVES[i], path[:-1], root)           # short path
    assert not M.verify_inclusion(i, n, LEAVES[i], path + [LEAVES[0]], root)  # long path
    assert not M.verify_inclusion(i, n, LEAVES[i], path[::-1], root)          # reordered
    bad = list(path)
    bad[1] = bytes(32)
    assert not M.verify_inclusion(i, n, LEAVES[i], bad, root)                 # edited node
    assert not M.verify_inclusion(i, n, LEAVES[i], path, M.mth(LEAVES[:n - 1]))
    assert not M.verify_inclusion(n, n, LEAVES[i], path, root)                # out of range
    with pytest.raises(ValueError):
        M.inclusion_path(n, LEAVES[:n])


@pytest.mark.parametrize("n", [n for n in SIZES if n > 0])
def test_every_consistency_proof_verifies(n):
    second = naive_mth(ENTRIES[:n])
    for m in range(0, n + 1):
        path = M.consistency_path(m, LEAVES[:n])
        assert M.verify_consistency(m, n, naive_mth(ENTRIES[:m]), second, path), (m, n)
        assert M.consistency_path(m, lambda a, b: M.mth(LEAVES[a:b]), n) == path


def test_consistency_tampering_fails():
    m, n = 6, 21
    r1, r2 = M.mth(LEAVES[:m]), M.mth(LEAVES[:n])
    path = M.consistency_path(m, LEAVES[:n])
    assert M.verify_consistency(m, n, r1, r2, path)
    # A log that rewrote history: same size, one old entry replaced.
    forked = list(LEAVES[:n])
    forked[2] = M.leaf_hash(b"rewritten")
    assert not M.verify_consistency(m, n, r1, M.mth(forked), M.consistency_path(m, forked))
    assert not M.verify_consistency(m, n, M.mth(forked[:m]), r2, path)
    assert not M.verify_consistency(m, n, r1, r2, path[:-1])
    assert not M.verify_consistency(m, n, r1, r2, path + [r1])
    assert not M.verify_consistency(m + 1, n, r1, r2, path)
    assert not M.verify_consistency(m, 16, r1, r2, path)  # other shape
    bad = list(path)
    bad[0] = bytes(32)
    assert not M.verify_consistency(m, n, r1, r2, bad)
    assert not M.verify_consistency(n, m, r2, r1, [])               # shrinking
    assert not M.verify_consistency(n, n, r2, r1, [])               # same size, other root
    assert not M.verify_consistency(4, 8, M.mth(LEAVES[:4]), M.mth(LEAVES[:8]), [])


def test_range_hash_from_perfect_subtrees():
    def perfect(level, idx):
        return M.mth(LEAVES[idx << level:(idx + 1) << level])

    for a, b in [(0, 70), (64, 70), (32, 45), (0, 1), (8, 13)]:
        assert M.range_hash(a, b, perfect) == naive_mth(ENTRIES[a:b])
