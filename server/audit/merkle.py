"""Merkle tree hashing and proofs of RFC 9162 (Certificate Transparency 2.0), §2.1.

Pure functions over leaf hashes; nothing here touches a database.

* ``leaf_hash(entry) = SHA-256(0x00 || entry)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``
  (§2.1.1); the prefixes keep a leaf from being passed off as an interior node.
* :func:`mth` is the Merkle Tree Hash of a list of leaf hashes (§2.1.1).
* :func:`inclusion_path` / :func:`verify_inclusion`: audit paths (§2.1.3.1, §2.1.3.2).
* :func:`consistency_path` / :func:`verify_consistency`: consistency proofs (§2.1.4.1,
  §2.1.4.2).
* The *frontier* is the right edge of the tree: the roots of the perfect subtrees that
  the binary digits of the tree size describe, largest first. Appending a leaf merges
  equal-sized subtrees like a binary counter carries, so an append costs O(log n) hashes
  and the root is a fold of at most log2(n) + 1 hashes.

The proof builders take the tree either as a list of leaf hashes or as a callable
``subtree(start, end) -> bytes`` returning ``MTH(D[start:end])``; the audit log passes a
callable that reads stored subtree hashes so that a proof costs O(log n) reads.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()  # §2.1.1: MTH({}) = SHA-256()

SubtreeFn = Callable[[int, int], bytes]


def leaf_hash(entry: bytes) -> bytes:
    """``SHA-256(0x00 || entry)`` (RFC 9162 §2.1.1)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)`` (RFC 9162 §2.1.1)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``), the ``k`` of §2.1.1."""
    return 1 << ((n - 1).bit_length() - 1)


def mth(leaf_hashes: Sequence[bytes]) -> bytes:
    """Merkle Tree Hash of a list of leaf hashes (RFC 9162 §2.1.1), bottom-up in O(n).

    Pairing neighbours level by level and carrying an odd last node up unchanged gives
    the same tree as the recursive split at the largest power of two below ``n``.
    """
    if not leaf_hashes:
        return EMPTY_ROOT
    level = list(leaf_hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def _subtree_fn(leaves: Sequence[bytes] | SubtreeFn) -> SubtreeFn:
    if callable(leaves):
        return leaves
    return lambda a, b: mth(leaves[a:b])


# --------------------------------------------------------------------------- inclusion


def inclusion_path(index: int, leaf_hashes: Sequence[bytes] | SubtreeFn,
                   tree_size: int | None = None) -> list[bytes]:
    """The audit path ``PATH(index, D[tree_size])`` of RFC 9162 §2.1.3.1, leaf end first.

    Args:
        index: leaf index, ``0 <= index < tree_size``.
        leaf_hashes: the leaf hashes ``D[0:n]``, or a ``subtree(start, end)`` callable.
        tree_size: size of the tree (default: ``len(leaf_hashes)``; required with a callable).
    """
    subtree = _subtree_fn(leaf_hashes)
    n = len(leaf_hashes) if tree_size is None else tree_size
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} is not in a tree of size {n}")
    path: list[bytes] = []
    lo, hi, m = 0, n, index
    # Iterative form of PATH(m, D[lo:hi]): the sibling subtrees are collected root first,
    # then reversed so the list starts at the leaf (§2.1.3.1 appends after the recursion).
    while hi - lo > 1:
        k = split_point(hi - lo)
        if m < k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            lo, m = lo + k, m - k
    path.reverse()
    return path


def root_from_inclusion(index: int, tree_size: int, leaf: bytes, path: Sequence[bytes]) -> bytes | None:
    """The root that ``path`` proves ``leaf`` at ``index`` into, or None if the path has the
    wrong shape (RFC 9162 §2.1.3.2 steps 1-5 without the final comparison)."""
    if not 0 <= index < tree_size:
        return None
    fn, sn, r = index, tree_size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(index: int, tree_size: int, leaf: bytes, path: Sequence[bytes],
                     root: bytes) -> bool:
    """True when ``path`` proves that ``leaf`` (a leaf hash) is leaf ``index`` of the tree of
    ``tree_size`` leaves with root hash ``root`` (RFC 9162 §2.1.3.2)."""
    got = root_from_inclusion(index, tree_size, leaf, path)
    return got is not None and got == root


# --------------------------------------------------------------------------- consistency


def consistency_path(first: int, leaf_hashes: Sequence[bytes] | SubtreeFn,
                     tree_size: int | None = None) -> list[bytes]:
    """The consistency proof ``PROOF(first, D[tree_size])`` of RFC 9162 §2.1.4.1.

    Empty when ``first`` is 0 or equal to the tree size (nothing to prove).
    """
    subtree = _subtree_fn(leaf_hashes)
    n = len(leaf_hashes) if tree_size is None else tree_size
    if not 0 <= first <= n:
        raise ValueError(f"cannot prove consistency of size {first} with size {n}")
    if first == 0 or first == n:
        return []
    out: list[bytes] = []
    lo, hi, m, whole = 0, n, first, True
    # SUBPROOF(m, D[lo:hi], whole), iteratively; the hashes appended after each recursive
    # call in §2.1.4.1 are collected here root first and reversed at the end.
    while True:
        if m == hi - lo:
            if not whole:
                out.append(subtree(lo, hi))
            break
        k = split_point(hi - lo)
        if m <= k:
            out.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            out.append(subtree(lo, lo + k))
            lo, m, whole = lo + k, m - k, False
    out.reverse()
    return out


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> bool:
    """True when ``path`` proves that the tree of ``first`` leaves with root ``first_root`` is
    a prefix of the tree of ``second`` leaves with root ``second_root`` (RFC 9162 §2.1.4.2)."""
    if not 0 <= first <= second:
        return False
    if first == second:
        return not path and first_root == second_root
    if first == 0:
        return not path  # the empty tree is a prefix of every tree
    if not path:
        return False
    path = list(path)
    if first & (first - 1) == 0:  # first is an exact power of 2: its root is a node of the proof
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root


# --------------------------------------------------------------------------- frontier


def append_to_frontier(frontier: Sequence[bytes], size: int, leaf: bytes) -> list[bytes]:
    """The frontier of the tree after appending ``leaf`` to a tree of ``size`` leaves.

    ``frontier[i]`` is the root of the i-th perfect subtree from the left; their sizes are
    the set bits of ``size``, largest first, so ``len(frontier) == size.bit_count()``.
    """
    out, nodes = append_with_nodes(frontier, size, leaf)
    return out


def append_with_nodes(frontier: Sequence[bytes], size: int,
                      leaf: bytes) -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    """Like :func:`append_to_frontier`, also returning the perfect subtrees the append
    completed, as ``(level, index, hash)``: the subtree of ``2**level`` leaves starting at
    leaf ``index * 2**level``. Level 0 (the leaf itself) is not listed."""
    if len(frontier) != size.bit_count():
        raise ValueError(f"frontier of {len(frontier)} hashes does not fit tree size {size}")
    out = list(frontier)
    h, n, level, made = leaf, size, 0, []
    while n & 1:  # merge equal perfect subtrees, like the carry of a binary increment
        h = node_hash(out.pop(), h)
        n >>= 1
        level += 1
        made.append((level, size >> level, h))
    out.append(h)
    return out, made


def root_from_frontier(frontier: Sequence[bytes], size: int) -> bytes:
    """The tree's root hash ``MTH(D[size])`` from its frontier (RFC 9162 §2.1.1).

    The recursive split at the largest power of two puts every perfect subtree of the
    frontier on the left of the rest, so the root is a right-to-left fold.
    """
    if len(frontier) != size.bit_count():
        raise ValueError(f"frontier of {len(frontier)} hashes does not fit tree size {size}")
    if size == 0:
        return EMPTY_ROOT
    h = frontier[-1]
    for x in reversed(frontier[:-1]):
        h = node_hash(x, h)
    return h


def frontier_of(leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """The frontier of a tree given all its leaf hashes."""
    f: list[bytes] = []
    for i, h in enumerate(leaf_hashes):
        f = append_to_frontier(f, i, h)
    return f


def range_hash(start: int, end: int, perfect: Callable[[int, int], bytes]) -> bytes:
    """``MTH(D[start:end])`` for a range whose start is aligned as proofs need it, built from
    perfect subtrees: ``perfect(level, index)`` returns the root of the ``2**level`` leaves
    from ``index * 2**level``.

    Every range that :func:`inclusion_path` and :func:`consistency_path` ask for starts at a
    multiple of a power of two at least as large as its left part (§2.1.1 splits at the
    largest power of two), so its left part is always a perfect, aligned subtree.
    """
    n = end - start
    if n <= 0:
        raise ValueError("empty range")
    if n & (n - 1) == 0 and start % n == 0:
        return perfect(n.bit_length() - 1, start // n)
    k = split_point(n)
    return node_hash(range_hash(start, start + k, perfect), range_hash(start + k, end, perfect))
