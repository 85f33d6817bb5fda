"""Fidelity: synthport's own implementation of the SDMetrics single-table Quality Report.

Same definitions as sdmetrics 0.32 (MIT), written with numpy/pandas so that the
server does not need sdmetrics (which pulls in the BUSL-licensed ``copulas``):

* Column Shapes: KSComplement (1 - two-sample Kolmogorov-Smirnov D, NaN dropped)
  for numerical/datetime columns, TVComplement (1 - total variation distance of
  the category frequencies, NaN dropped) for categorical/boolean columns.
* Column Pair Trends: CorrelationSimilarity (1 - |r_real - r_synth| / 2, Pearson on
  the rows where both are present) for two numerical columns; ContingencySimilarity
  (1 - total variation distance of the 2-D frequency table, NaN as a category) for
  the other pairs, a numerical column being cut into 10 equal-width bins of its own
  data (``np.histogram_bin_edges``, computed separately on real and synthetic, as
  sdmetrics does). Like sdmetrics >= 0.2x, only pairs that are associated in the
  real data count: |r_real| > 0.5 for correlations and Cramér's V > 0.3 for
  contingency tables (``real_*_threshold``; 0 counts every pair).
* Overall score: the mean of the two property scores (NaN ones left out).

``tests/unit/generators/test_fidelity.py`` checks the numbers against sdmetrics'
``QualityReport`` when sdmetrics is installed (``pip install 'synthport[eval]'``).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

SDTYPES = ("numerical", "datetime", "categorical", "boolean")
_CONTINUOUS = ("numerical", "datetime")
_MAX_DECIMALS = 14  # sdmetrics rounds to sys.float_info.dig - 1 before the KS test


def _infer_sdtype(s: pd.Series) -> str:
    from generators.tabular.encoding import infer_kind

    kind = infer_kind(s)
    if kind == "categorical" and pd.api.types.is_bool_dtype(s):
        return "boolean"
    return kind


def sdtypes_from_metadata(df: pd.DataFrame, metadata: Mapping | None = None) -> dict[str, str]:
    """Column -> sdtype from sdmetrics-style ``{"columns": {c: {"sdtype": ..}}}``,
    synthport-style ``{c: {"kind": ..}}`` metadata, or inferred. ``patient_id`` is an id."""
    metadata = dict(metadata or {})
    cols = metadata.get("columns", metadata)
    out = {}
    for c in df.columns:
        meta = cols.get(c, {}) if isinstance(cols.get(c, {}), Mapping) else {}
        st = meta.get("sdtype") or meta.get("kind")
        if st in ("key", "text", "ignore"):
            st = "id"
        if st is None:
            st = "id" if c == "patient_id" else _infer_sdtype(df[c])
        out[c] = st
    return out


def to_sdmetrics_metadata(sdtypes: Mapping[str, str]) -> dict:
    """sdmetrics' single-table metadata dict for the given sdtypes."""
    return {"columns": {c: {"sdtype": t} for c, t in sdtypes.items()}}


# ----------------------------------------------------------------------- single columns
def numeric_array(s: pd.Series) -> np.ndarray:
    """A column as floats (datetimes as nanoseconds, anything unparsable as NaN)."""
    if pd.api.types.is_datetime64_any_dtype(s):
        out = s.astype("datetime64[ns]").astype("int64").to_numpy().astype(float)
        out[s.isna().to_numpy()] = np.nan
        return out
    return pd.to_numeric(s, errors="coerce").astype(float).to_numpy()


def ks_complement(real: pd.Series, synthetic: pd.Series) -> float:
    """1 - Kolmogorov-Smirnov D statistic of two samples (NaN dropped)."""
    a = np.round(numeric_array(pd.Series(real)), _MAX_DECIMALS)
    b = np.round(numeric_array(pd.Series(synthetic)), _MAX_DECIMALS)
    a, b = np.sort(a[~np.isnan(a)]), np.sort(b[~np.isnan(b)])
    if not len(a) or not len(b):
        return math.nan
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(1.0 - np.max(np.abs(cdf_a - cdf_b)))


def _hashable(values: pd.Series) -> list:
    return [v.item() if isinstance(v, np.generic) else v for v in values.tolist()]


def tv_complement(real: pd.Series, synthetic: pd.Series) -> float:
    """1 - total variation distance of the category frequencies (NaN dropped)."""
    r = pd.Series(real).dropna()
    s = pd.Series(synthetic).dropna()
    if not len(r) or not len(s):
        return math.nan
    rc: dict[Any, float] = {}
    for v in _hashable(r):
        rc[v] = rc.get(v, 0) + 1
    sc: dict[Any, float] = {}
    for v in _hashable(s):
        sc[v] = sc.get(v, 0) + 1
    for v in sc:  # sdmetrics' regularisation for values the real data never has
        if v not in rc:
            rc[v] = 1e-6
    n_r, n_s = sum(rc.values()), sum(sc.values())
    tv = sum(abs(sc.get(v, 0) / n_s - c / n_r) for v, c in rc.items())
    return float(1.0 - 0.5 * tv)


# ------------------------------------------------------------------------ column pairs
def _codes(values: list, lut: dict) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v is pd.NaT:
            v = ("__nan__",)
        out[i] = lut.setdefault(v, len(lut))
    return out


def _discrete_codes(col: pd.Series, sdtype: str, lut: dict) -> np.ndarray:
    """Categorical codes (shared lookup between real and synthetic); NaN is a code."""
    if sdtype in _CONTINUOUS:
        x = numeric_array(col)
        ok = x[~np.isnan(x)]
        if not len(ok):
            raise ValueError("no values to bin")
        edges = np.histogram_bin_edges(ok)
        return np.digitize(x, bins=edges).astype(np.int64)  # NaN -> len(edges)
    return _codes(_hashable(col), lut)


def _cramers_v(a: np.ndarray, b: np.ndarray) -> float:
    """Cramér's V of the observed table (no continuity correction), as scipy's association."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    if min(table.shape) < 2:
        return math.nan
    n = table.sum()
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    chi2 = float(((table - expected) ** 2 / expected).sum())
    return math.sqrt(chi2 / n / (min(table.shape) - 1))


def _contingency(ra: np.ndarray, rb: np.ndarray, sa: np.ndarray, sb: np.ndarray,
                 threshold: float) -> tuple[float, float, bool]:
    assoc = math.nan
    if threshold > 0:
        assoc = _cramers_v(ra, rb)
        if math.isnan(assoc) or assoc <= threshold:
            return math.nan, assoc, False
    k = int(max(ra.max(), sa.max(), rb.max(), sb.max())) + 1
    fr = np.bincount(ra * k + rb, minlength=k * k) / len(ra)
    fs = np.bincount(sa * k + sb, minlength=k * k) / len(sa)
    return float(1.0 - 0.5 * np.abs(fr - fs).sum()), assoc, True


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = ~np.isnan(x) & ~np.isnan(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        raise ValueError("fewer than two rows")
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    if den == 0:
        return math.nan
    return float(np.clip((x * y).sum() / den, -1.0, 1.0))


def quality_report(real: pd.DataFrame, synthetic: pd.DataFrame, metadata: Mapping | None = None,
                   *, real_correlation_threshold: float = 0.5,
                   real_association_threshold: float = 0.3, max_rows: int = 50_000,
                   seed: int = 0) -> dict:
    """SDMetrics-style Quality Report.

    Args:
        real: the training (or real hold-out) table.
        synthetic: the generated table (same columns).
        metadata: see ``sdtypes_from_metadata``; inferred when None.
        real_correlation_threshold: numerical pairs count only when |r_real| is above it.
        real_association_threshold: other pairs count only when Cramér's V of real is above it.
        max_rows: larger tables are subsampled (seeded) for the pair trends, like sdmetrics.
        seed: seed of that subsample.

    Returns:
        ``{"score", "column_shapes": {"score", "details"}, "column_pair_trends": {"score",
        "details"}}``; details are lists of dicts (JSON-able).
    """
    sdtypes = sdtypes_from_metadata(real, metadata)
    cols = [c for c, t in sdtypes.items() if t in SDTYPES and c in synthetic.columns]
    shapes = []
    for c in cols:
        cont = sdtypes[c] in _CONTINUOUS
        try:
            score = ks_complement(real[c], synthetic[c]) if cont else tv_complement(real[c], synthetic[c])
        except (TypeError, ValueError):
            score = math.nan
        shapes.append({"column": c, "metric": "KSComplement" if cont else "TVComplement",
                       "score": score})
    r, s = real, synthetic
    rs = np.random.default_rng(seed)
    if len(r) > max_rows:
        r = r.iloc[np.sort(rs.choice(len(r), max_rows, replace=False))]
    if len(s) > max_rows:
        s = s.iloc[np.sort(rs.choice(len(s), max_rows, replace=False))]
    num_r = {c: numeric_array(r[c]) for c in cols if sdtypes[c] in _CONTINUOUS}
    num_s = {c: numeric_array(s[c]) for c in cols if sdtypes[c] in _CONTINUOUS}
    disc_r: dict[str, np.ndarray | None] = {}
    disc_s: dict[str, np.ndarray | None] = {}
    for c in cols:
        lut: dict = {}
        try:
            disc_r[c] = _discrete_codes(r[c], sdtypes[c], lut)
            disc_s[c] = _discrete_codes(s[c], sdtypes[c], lut)
        except (TypeError, ValueError):
            disc_r[c] = disc_s[c] = None
    pairs = []
    for a, b in itertools.combinations(cols, 2):
        both_cont = sdtypes[a] in _CONTINUOUS and sdtypes[b] in _CONTINUOUS
        row: dict[str, Any] = {"column_1": a, "column_2": b,
                               "metric": "CorrelationSimilarity" if both_cont else "ContingencySimilarity",
                               "score": math.nan, "real_correlation": math.nan,
                               "synthetic_correlation": math.nan, "real_association": math.nan,
                               "meets_threshold": False}
        try:
            if both_cont:
                ra, rb, sa, sb = num_r[a], num_r[b], num_s[a], num_s[b]
                if min(pd.Series(v).nunique() for v in (ra, rb, sa, sb)) == 1:
                    raise ValueError("constant column")
                rr = _pearson(ra, rb)
                row["real_correlation"] = rr
                if not math.isnan(rr) and abs(rr) > real_correlation_threshold:
                    rsyn = _pearson(sa, sb)
                    row["synthetic_correlation"] = rsyn
                    if not math.isnan(rsyn):
                        row["score"] = 1.0 - abs(rr - rsyn) / 2.0
                row["meets_threshold"] = not math.isnan(rr) and (
                    real_correlation_threshold <= 0 or abs(rr) > real_correlation_threshold)
            else:
                if disc_r[a] is None or disc_r[b] is None:
                    raise ValueError("could not discretise")
                score, assoc, ok = _contingency(disc_r[a], disc_r[b], disc_s[a], disc_s[b],
                                                real_association_threshold)
                row.update(score=score, real_association=assoc, meets_threshold=ok)
        except (TypeError, ValueError):
            row["meets_threshold"] = False
        pairs.append(row)
    shape_scores = [d["score"] for d in shapes if not math.isnan(d["score"])]
    pair_scores = [d["score"] for d in pairs if d["meets_threshold"] and not math.isnan(d["score"])]
    shape_score = float(np.mean(shape_scores)) if shape_scores else math.nan
    pair_score = float(np.mean(pair_scores)) if pair_scores else math.nan
    props = [x for x in (shape_score, pair_score) if not math.isnan(x)]
    return {
        "score": float(np.mean(props)) if props else math.nan,
        "column_shapes": {"score": shape_score, "details": shapes},
        "column_pair_trends": {"score": pair_score, "details": pairs,
                               "pairs_counted": len(pair_scores)},
        "thresholds": {"real_correlation": real_correlation_threshold,
                       "real_association": real_association_threshold},
    }
