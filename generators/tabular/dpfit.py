"""Differentially private fitting of the patient model (``PatientModel(dp={...})``).

Everything the model learns from the rows goes through a DP mechanism, and all of them
are composed in one Rényi-DP account (``generators.dp``):

1. **Encoders from a noisy histogram.** Every column gets a histogram over a candidate
   domain that does not depend on the data (below) plus a missing-value cell; one patient
   adds one count to one cell of each column, so the whole vector of C columns has L2
   sensitivity sqrt(C) under add/remove of a patient. Gaussian noise of standard deviation
   ``s`` is added to every cell (Gaussian mechanism); tokens, bins, points and the
   calibration targets are post-processing of those noisy counts.

   * numerical/datetime columns: a fixed grid (unit cells centred on the integers -32..32
     for integer columns, then cells growing by a factor 10^(1/24) ~ 1.1 out to 10^7 on
     both sides; datetimes as days since 1970, so cells there are years wide). Cells whose
     noisy count is below z s are dropped as noise (z ~ 4: a cell nobody holds survives
     with probability 5 % / number of cells); integer cells holding at least 2 % of
     the noisy total (and ``rare_min_count``) become exact points, the rest is cut into up
     to ``max_bins`` bins of at least ``min_bin_count`` noisy rows at cell edges; values are
     drawn uniformly inside a bin (no within-bin curve, no decimals rounding: both would
     need the raw values).
   * categorical columns: *public* categories (metadata ``values``; ``False``/``True`` for
     bool columns; 0/1 for columns the metadata marks ``binary``) are always kept. Values
     only the data shows are kept when their noisy count exceeds a threshold
     tau = 1 + s * Phi^-1(1 - delta_thr / K) (K such columns); everything else is the
     ``_RARE_`` token. A category held by a single patient is thus released with
     probability at most delta_thr / K per column, which adds delta_thr to delta (the
     "stability" argument for releasing noisy counts of data-derived keys: Korolova et
     al. 2009; Wilson et al., "Differentially private SQL with bounded user
     contribution", PoPETs 2020).
   * kinds come from the metadata or the dtype, never from the values.

2. **Constraints** are the declared ones plus two naming rules applied without looking at
   the data (``X_…`` numerical column present iff flag ``X``; a column with the word
   ``age`` at most ``age``); no ``derived`` rule is inferred.

3. **Network weights by DP-SGD**: Poisson sampling with rate q = expected batch / n,
   per-patient gradient clipping to ``clip`` (the whole per-row loss: any-order and
   fixed-order parts), Gaussian noise ``sigma * clip`` on the sum (``generators.dp``).
   No validation split and no early stopping (both would look at the data): a fixed
   number of steps, ``epochs / q``.

4. **Calibration** targets are the noisy histograms (post-processing).

The number of patients n is treated as public, as DP-SGD practice does (q = batch / n).
Budget: ``preprocess_share`` of epsilon goes to the histogram (its noise ``s`` is the
smallest whose epsilon alone is that share), the rest to training (the smallest sigma for
which the composed epsilon is at most the target).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from generators.tabular.encoding import ColumnCodec, Constraint, _dtype_tag, _normalise_category
from generators.tabular.errors import TabularModelError

DP_DEFAULTS: dict[str, Any] = {
    "epsilon": None,          # required
    "delta": None,            # default: min(1e-5, 1 / (10 n))
    "clip": 1.0,              # per-patient L2 gradient bound
    "expected_batch": None,   # default: max(8, n // 10)
    "preprocess_share": 0.2,  # share of epsilon for the encoders' histogram
    "lr": 2e-3,
}
_INT_SPAN = 32
_DECADES = (-3, 7)
_PER_DECADE = 24


def dp_settings(dp: dict, n: int) -> dict:
    """Validated DP settings with defaults filled in."""
    unknown = set(dp) - set(DP_DEFAULTS)
    if unknown:
        raise TabularModelError(f"unknown dp settings: {sorted(unknown)}")
    s = {**DP_DEFAULTS, **dp}
    eps = s["epsilon"]
    if eps is None or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise TabularModelError("dp needs a positive, finite epsilon")
    if s["delta"] is None:
        s["delta"] = min(1e-5, 1.0 / (10 * n))
    if not 0 < s["delta"] < 1.0 / n:
        raise TabularModelError(f"dp delta must be in (0, 1/n) = (0, {1.0 / n:.3g}); "
                                f"got {s['delta']}")
    if not s["clip"] > 0:
        raise TabularModelError("dp clip must be positive")
    if not 0 < s["preprocess_share"] < 1:
        raise TabularModelError("dp preprocess_share must be in (0, 1)")
    s["expected_batch"] = int(s["expected_batch"] or max(8, n // 10))
    if not 1 <= s["expected_batch"] <= n:
        raise TabularModelError("dp expected_batch must be between 1 and n")
    return s


def dp_kind(s: pd.Series, meta: dict) -> str:
    """Column kind from the metadata or the dtype only."""
    if meta.get("kind"):
        return meta["kind"]
    if pd.api.types.is_datetime64_any_dtype(s):
        return "datetime"
    if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
        return "categorical"
    return "numerical"


def numeric_grid(integer: bool) -> np.ndarray:
    """Cell edges of the data-independent grid (see module docstring)."""
    g = 10.0 ** (np.arange(_DECADES[0] * _PER_DECADE, _DECADES[1] * _PER_DECADE + 1) / _PER_DECADE)
    if integer:
        g = g[g > _INT_SPAN + 0.5]
        inner = np.arange(-_INT_SPAN, _INT_SPAN + 2) - 0.5
        return np.unique(np.r_[-g[::-1], inner, g])
    return np.unique(np.r_[-g[::-1], 0.0, g])


def _public_categories(s: pd.Series, meta: dict, dtype: str) -> list:
    if meta.get("values") is not None:
        return [_normalise_category(v, dtype) for v in meta["values"]]
    if dtype == "bool":
        return [False, True]
    if meta.get("binary") and dtype in ("int", "float"):
        return [_normalise_category(v, dtype) for v in (0, 1)]
    return []


class NoisyHistograms:
    """Draw the Gaussian noise of every histogram cell from one seeded generator."""

    def __init__(self, noise_std: float, seed: int):
        self.s = float(noise_std)
        self.rng = np.random.default_rng([int(seed), 0xD9])

    def noisy(self, counts: np.ndarray) -> np.ndarray:
        return np.asarray(counts, dtype=float) + self.rng.normal(0.0, self.s, len(counts))


def dp_codec(s: pd.Series, kind: str, meta: dict, hist: NoisyHistograms, tau: float, *,
             rare_min_count: int, max_bins: int, min_bin_count: int
             ) -> tuple[ColumnCodec, np.ndarray]:
    """One column's codec and its noisy token masses (calibration targets, >= 0)."""
    name = str(s.name)
    dtype = _dtype_tag(s.iloc[:0], kind)
    isna = s.isna().to_numpy()
    na_noisy = float(hist.noisy([isna.sum()])[0])
    if kind == "categorical":
        public = _public_categories(s, meta, dtype)
        vals = [_normalise_category(v, dtype) for v in s[~isna].tolist()]
        counts: dict[Any, int] = {}
        for v in vals:
            counts[v] = counts.get(v, 0) + 1
        observed = [v for v in counts if v not in public]
        noisy_pub = hist.noisy([counts.get(v, 0) for v in public]) if public else np.zeros(0)
        noisy_obs = hist.noisy([counts[v] for v in observed]) if observed else np.zeros(0)
        keep_obs = [(v, c) for v, c in zip(observed, noisy_obs) if c > tau]
        cats = list(zip(public, noisy_pub)) + keep_obs
        cats.sort(key=lambda vc: (-vc[1], str(vc[0])))
        # a _RARE_ token unless the public domain is complete (bool, binary): decided
        # without looking at the values
        has_rare = not (dtype == "bool" or (meta.get("binary") and public))
        codec = ColumnCodec(name=name, kind=kind, dtype=dtype, has_na=True,
                            categories=[v for v, _ in cats], has_rare=has_rare)
        if dtype == "category":
            codec.category_order = [str(v) for v, _ in cats]
        mass = [max(c, 0.0) for _, c in cats] + ([0.0] if has_rare else []) + [max(na_noisy, 0.0)]
        return codec, np.asarray(mass)
    integer = bool(meta.get("integer")) or dtype == "int"
    codec = ColumnCodec(name=name, kind=kind, dtype=dtype, has_na=True, integer=integer,
                        decimals=0 if integer else None)
    x = codec._to_float(s)
    x = x[~np.isnan(x)]
    edges = numeric_grid(integer)
    cell = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    raw = hist.noisy(np.bincount(cell, minlength=len(edges) - 1))
    # cells below z * s are dropped as noise, z such that a cell holding nobody survives
    # with probability 5 % / (number of cells): about one spurious cell in 20 columns
    z = NormalDist().inv_cdf(1.0 - 0.05 / (len(edges) - 1))
    noisy = np.where(raw >= z * hist.s, raw, 0.0)
    if not noisy.any():       # nothing above the noise: the cell with the largest noisy count
        noisy[int(np.argmax(raw))] = 1.0
    total = noisy.sum()
    mass: list[float] = []
    if integer:
        width = np.diff(edges)
        unit = np.isclose(width, 1.0)
        pts = np.flatnonzero(unit & (noisy >= max(rare_min_count, 0.02 * total)))
        codec.points = [float(round((edges[i] + edges[i + 1]) / 2)) for i in pts]
        mass += [float(noisy[i]) for i in pts]
        noisy = noisy.copy()
        noisy[pts] = 0.0
    rest = noisy.sum()
    if rest > 0:
        live = np.flatnonzero(noisy > 0)
        lo_i, hi_i = int(live[0]), int(live[-1])
        target = max(float(min_bin_count), rest / max_bins)
        bin_edges, bin_mass, acc = [float(edges[lo_i])], [], 0.0
        for i in range(lo_i, hi_i + 1):
            acc += float(noisy[i])
            if acc >= target and i < hi_i:
                bin_edges.append(float(edges[i + 1]))
                bin_mass.append(acc)
                acc = 0.0
        bin_edges.append(float(edges[hi_i + 1]))
        bin_mass.append(acc)
        if len(bin_mass) > 1 and bin_mass[-1] < target:      # merge a thin last bin
            bin_mass[-2] += bin_mass.pop()
            del bin_edges[-2]
        codec.edges = bin_edges
        mass += bin_mass
    if not codec.points and not codec.edges:
        codec.edges = [float(edges[0]), float(edges[-1])]
        mass.append(0.0)
    mass.append(max(na_noisy, 0.0))
    return codec, np.asarray(mass)


def name_constraints(codecs: list[ColumnCodec], declared: list[Constraint]) -> list[Constraint]:
    """The naming rules of ``infer_constraints`` without the data checks (DP mode)."""
    from generators.tabular.encoding import _truthy_tokens

    have = {(c.kind, c.column) for c in declared}
    by = {c.name: c for c in codecs}
    out = []
    flags = sorted((c for c in codecs if c.kind == "categorical" and len(_truthy_tokens(c, None)) == 1),
                   key=lambda c: -len(c.name))
    for c in codecs:
        if c.kind == "categorical" or ("present_if", c.name) in have:
            continue
        for f in flags:
            if c.name.startswith(f.name + "_"):
                out.append(Constraint("present_if", c.name, f.name, _truthy_tokens(f, None)))
                break
    age = by.get("age")
    if age is not None and age.kind == "numerical":
        for c in codecs:
            if c.name != "age" and c.kind == "numerical" and "age" in c.name.split("_") \
                    and ("upper", c.name) not in have:
                out.append(Constraint("upper", c.name, "age"))
    return out


def threshold(noise_std: float, delta_thr: float, k: int) -> float:
    """tau with P[1 + N(0, s^2) > tau] = delta_thr / k (k >= 1)."""
    return 1.0 + noise_std * NormalDist().inv_cdf(1.0 - delta_thr / max(k, 1))


__all__ = ["DP_DEFAULTS", "dp_settings", "dp_kind", "dp_codec", "numeric_grid",
           "name_constraints", "threshold", "NoisyHistograms"]
