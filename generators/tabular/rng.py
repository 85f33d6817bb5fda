"""Counter-based uniforms: u = f(seed, row, stream), no RNG state anywhere.

DESIGN.md asks that virtual patient i be a pure function of (model, seed, i), so
the draw for row i never depends on how many rows were generated before it or
in the same batch. We hash (seed, row, stream) with the SplitMix64 finaliser
(Steele, Lea, Flood 2014), which is vectorised over rows with numpy uint64
arithmetic (wrap-around multiplication is intended).
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _C1
    z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def key(seed: int, stream: int) -> np.uint64:
    """64-bit key for (seed, stream); any Python int seed is reduced mod 2**64."""
    with np.errstate(over="ignore"):
        s = np.array([int(seed) & _MASK64], dtype=np.uint64)
        k = _mix(s + _GOLDEN * np.uint64(int(stream) + 1))
        return _mix(k ^ np.uint64(0xD1B54A32D192ED03))[0]


def keys(seed: int, n_streams: int) -> np.ndarray:
    """``key(seed, s)`` for s = 0 .. n_streams-1 at once."""
    with np.errstate(over="ignore"):
        s = np.full(n_streams, int(seed) & _MASK64, dtype=np.uint64)
        k = _mix(s + _GOLDEN * (np.arange(n_streams, dtype=np.uint64) + np.uint64(1)))
        return _mix(k ^ np.uint64(0xD1B54A32D192ED03))


def uniforms(seed: int, rows: np.ndarray, stream: int, k: np.uint64 | None = None) -> np.ndarray:
    """Uniforms in the open interval (0, 1), one per row index, for one stream.

    Args:
        seed: the cohort/sample seed.
        rows: absolute row indices (uint64-convertible).
        stream: which draw of a row (e.g. 2 * column + purpose).
        k: ``key(seed, stream)`` when the caller has it already.

    Returns:
        float64 array shaped like ``rows``.
    """
    if k is None:
        k = key(seed, stream)
    with np.errstate(over="ignore"):
        z = _mix(np.asarray(rows, dtype=np.uint64) * _GOLDEN + k)
        z = _mix(z ^ k)
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


#: Rows per stratification block of ``stratified_uniforms``.
STRATA = 32


def stratified_uniforms(seed: int, rows: np.ndarray, stream: int, k: np.uint64 | None = None,
                        strata: int = STRATA) -> np.ndarray:
    """Latin-hypercube uniforms (McKay, Beckman and Conover 1979), still counter-based.

    Rows are grouped in blocks of ``strata`` consecutive indices; inside a block, each
    stream sends its rows to the strata [s/N, (s+1)/N) in an order given by a keyed random
    permutation (the ranks of hashed block positions), plus a uniform jitter inside the
    stratum. Every block thus draws each stream's uniforms once per stratum, so the first
    n rows of a sample follow the model's marginals much more closely than independent
    draws, while streams stay independent of each other (each has its own permutation).
    Row i's value depends only on (seed, i, stream): a row can still be drawn alone.
    """
    rows = np.asarray(rows, dtype=np.uint64)
    if k is None:
        k = key(seed, stream)
    n = np.uint64(strata)
    block, pos = rows // n, (rows % n).astype(np.int64)
    ub, inv = np.unique(block, return_inverse=True)
    # hashes of every position of each block touched, with a key of its own
    with np.errstate(over="ignore"):
        kp = _mix(k ^ np.uint64(0xA24BAED4963EE407))
        cells = (ub[:, None] * n + np.arange(strata, dtype=np.uint64)[None, :]) * _GOLDEN + kp
        h = _mix(_mix(cells) ^ kp)
    rank = np.argsort(np.argsort(h, axis=1, kind="stable"), axis=1, kind="stable")
    stratum = rank[inv.ravel(), pos.ravel()].reshape(rows.shape)
    jitter = uniforms(seed, rows, stream, k)
    return (stratum + jitter) / strata
