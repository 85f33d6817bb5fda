"""Column encoders: every column becomes one token per row.

* categorical: one token per frequent category, one ``_RARE_`` bucket for string
  categories seen fewer than ``rare_min_count`` times (they are never reproduced),
  one ``_NA_`` token when the column has missing values;
* numerical and datetime: "point" tokens for exact values that carry a large share
  of the rows (0 encounters, 1 condition...), quantile bins for the rest (a value is
  drawn uniformly inside its bin on decoding, integers stay integers, floats are
  rounded to the decimals seen in training), one ``_NA_`` token.

Everything a codec knows is JSON (``to_json``/``from_json``), so a saved model is
weights + JSON, never a pickle.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from generators.tabular.errors import TabularModelError

KINDS = ("categorical", "numerical", "datetime")
RARE_LABEL = "_RARE_"
ID_COLUMNS = ("patient_id",)
_TRUTHY = {"1", "true", "t", "yes", "y"}
_NS_PER_DAY = 86_400 * 10**9


def _py(v: Any) -> Any:
    """numpy scalar -> plain Python value (JSON-able)."""
    return v.item() if isinstance(v, np.generic) else v


def infer_kind(s: pd.Series) -> str:
    """Guess a column's kind: bool/str/category and 0/1 numbers are categorical."""
    if pd.api.types.is_datetime64_any_dtype(s):
        return "datetime"
    if pd.api.types.is_bool_dtype(s):
        return "categorical"
    if pd.api.types.is_numeric_dtype(s):
        uniq = pd.unique(s.dropna())
        if len(uniq) and set(np.asarray(uniq, dtype=float).tolist()) <= {0.0, 1.0}:
            return "categorical"
        return "numerical"
    return "categorical"


def _dtype_tag(s: pd.Series, kind: str) -> str:
    if kind == "datetime":
        return "datetime"
    if pd.api.types.is_bool_dtype(s):
        return "bool"
    if isinstance(s.dtype, pd.CategoricalDtype):
        return "category"
    if pd.api.types.is_integer_dtype(s):
        return "int"
    if pd.api.types.is_float_dtype(s):
        return "float"
    if kind == "numerical":
        return "float"
    vals = s.dropna()
    if len(vals) and all(isinstance(v, (bool, np.bool_)) for v in vals):
        return "bool"
    return "str"


def _normalise_category(v: Any, dtype: str) -> Any:
    if dtype == "bool":
        return bool(v)
    if dtype == "int":
        return int(v)
    if dtype == "float":
        return float(v)
    return str(v)


def _bin_knots(x: np.ndarray, edges: np.ndarray, k: int, window: int = 3) -> list[list[float]]:
    """Per bin, k + 1 points of its within-bin quantile curve: the bin edges and, inside,
    the mean of the ``window`` values nearest each quantile position (an average, so the
    stored curve is not a list of training values). Sampling inside a bin follows this
    piecewise-linear curve instead of a uniform draw, which keeps clusters of values
    (onset ages of a childhood condition) where they are."""
    out = []
    n_bins = len(edges) - 1
    b = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)
    for i in range(n_bins):
        v = np.sort(x[b == i])
        lo, hi = float(edges[i]), float(edges[i + 1])
        if len(v) < window + 2 or hi <= lo:
            out.append([])
            continue
        pts = [lo]
        for q in np.linspace(0.0, 1.0, k + 1)[1:-1]:
            c = int(round(q * (len(v) - 1)))
            a = min(max(c - window // 2, 0), len(v) - window)
            pts.append(float(np.clip(v[a:a + window].mean(), lo, hi)))
        pts.append(hi)
        out.append([float(p) for p in np.maximum.accumulate(pts)])
    return out


def _decimals(x: np.ndarray) -> int | None:
    """Fewest decimals (<= 6) that represent every value, None when more are used."""
    for d in range(7):
        scaled = x * 10.0**d
        if np.all(np.abs(scaled - np.round(scaled)) <= 1e-6 * np.maximum(1.0, np.abs(scaled))):
            return d
    return None


@dataclass
class ColumnCodec:
    """Token layout of one column (see module docstring)."""

    name: str
    kind: str
    dtype: str
    has_na: bool = False
    categories: list = field(default_factory=list)
    category_order: list | None = None
    has_rare: bool = False
    points: list = field(default_factory=list)
    edges: list = field(default_factory=list)
    integer: bool = False
    decimals: int | None = None
    knots: list = field(default_factory=list)   # per bin: within-bin quantile curve (floats)

    # ------------------------------------------------------------------ layout
    @property
    def n_bins(self) -> int:
        return max(len(self.edges) - 1, 0)

    @property
    def n_tokens(self) -> int:
        if self.kind == "categorical":
            return len(self.categories) + int(self.has_rare) + int(self.has_na)
        return len(self.points) + self.n_bins + int(self.has_na)

    @property
    def na_token(self) -> int:
        return self.n_tokens - 1 if self.has_na else -1

    @property
    def rare_token(self) -> int:
        return len(self.categories) if self.has_rare else -1

    def token_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Smallest and largest value each token can decode to (NaN for ``_NA_``)."""
        cached = self.__dict__.get("_bounds")
        if cached is not None:
            return cached
        lo = np.full(self.n_tokens, np.nan)
        hi = np.full(self.n_tokens, np.nan)
        if self.kind != "categorical":
            p = len(self.points)
            lo[:p] = hi[:p] = self.points
            e = np.asarray(self.edges, dtype=float)
            lo[p:p + self.n_bins] = e[:-1]
            hi[p:p + self.n_bins] = e[1:]
        self.__dict__["_bounds"] = (lo, hi)
        return lo, hi

    # --------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, s: pd.Series, kind: str, *, rare_min_count: int = 5, max_bins: int = 24,
            min_bin_count: int = 5, max_points: int = 32, knots: int = 4) -> "ColumnCodec":
        """Learn the token layout of a column from training data."""
        if kind not in KINDS:
            raise TabularModelError(f"column {s.name!r}: unknown kind {kind!r} (one of {KINDS})")
        dtype = _dtype_tag(s, kind)
        codec = cls(name=str(s.name), kind=kind, dtype=dtype, has_na=bool(s.isna().any()))
        if kind == "categorical":
            vals = [_normalise_category(v, dtype) for v in s.dropna().tolist()]
            counts: dict[Any, int] = {}
            for v in vals:
                counts[v] = counts.get(v, 0) + 1
            protect = dtype in ("str", "category")
            keep = [v for v, c in counts.items() if not protect or c >= rare_min_count]
            codec.has_rare = len(keep) < len(counts)
            codec.categories = sorted(keep, key=lambda v: (-counts[v], str(v)))
            if dtype == "category":
                codec.category_order = [str(c) for c in s.cat.categories]
            return codec
        x = codec._to_float(s)
        x = x[~np.isnan(x)]
        if len(x) == 0:
            return codec
        codec.integer = bool(np.all(x == np.round(x)))
        codec.decimals = 0 if codec.integer else _decimals(x)
        uniq, cnt = np.unique(x, return_counts=True)
        thresh = max(rare_min_count, math.ceil(0.02 * len(x)))
        order = np.argsort(-cnt, kind="stable")
        pts = [float(uniq[i]) for i in order if cnt[i] >= thresh][:max_points]
        codec.points = sorted(pts)
        rest = x[~np.isin(x, codec.points)]
        if len(rest):
            n_bins = int(np.clip(len(rest) // min_bin_count, 1, max_bins))
            edges = np.unique(np.quantile(rest, np.linspace(0.0, 1.0, n_bins + 1)))
            if len(edges) == 1:
                edges = np.array([edges[0], edges[0]])
            codec.edges = [float(e) for e in edges]
            if knots > 1 and not codec.integer:
                codec.knots = _bin_knots(rest, edges, knots)
        return codec

    # -------------------------------------------------------------- encoding
    def _to_float(self, s: pd.Series | np.ndarray) -> np.ndarray:
        if self.kind == "datetime":
            d = pd.to_datetime(pd.Series(s), errors="coerce")
            out = d.astype("datetime64[ns]").astype("int64").to_numpy().astype(float) / _NS_PER_DAY
            out[d.isna().to_numpy()] = np.nan
            return out
        return pd.to_numeric(pd.Series(s), errors="coerce").astype(float).to_numpy()

    def encode(self, s: pd.Series | np.ndarray | list, *, strict: bool = False) -> np.ndarray:
        """Values -> tokens. With ``strict``, an unknown category with no rare bucket raises."""
        s = pd.Series(s) if not isinstance(s, pd.Series) else s
        isna = s.isna().to_numpy()
        tok = np.zeros(len(s), dtype=np.int64)
        if isna.any():
            if not self.has_na and strict:
                raise TabularModelError(f"column {self.name!r} was never missing in training")
            tok[isna] = self.na_token if self.has_na else 0
        if self.kind == "categorical":
            lut = {v: i for i, v in enumerate(self.categories)}
            for i in np.flatnonzero(~isna):
                v = s.iat[i]
                try:
                    v = _normalise_category(v, self.dtype)
                except (TypeError, ValueError):
                    pass
                t = lut.get(v)
                if t is None:
                    if self.has_rare:
                        t = self.rare_token
                    elif strict:
                        raise TabularModelError(
                            f"column {self.name!r}: value {v!r} never seen in training "
                            f"(known: {self.categories[:20]})")
                    else:
                        t = 0
                tok[i] = t
            return tok
        return self.encode_float(self._to_float(s))

    def encode_float(self, x: np.ndarray) -> np.ndarray:
        """Numerical/datetime values already as floats (days for datetimes) -> tokens."""
        x = np.asarray(x, dtype=float)
        ok = ~np.isnan(x)
        tok = np.full(len(x), self.na_token if self.has_na else 0, dtype=np.int64)
        p = len(self.points)
        pts = np.asarray(self.points, dtype=float)
        if self.n_bins:
            e = np.asarray(self.edges, dtype=float)
            b = np.clip(np.searchsorted(e, x[ok], side="right") - 1, 0, self.n_bins - 1)
            tok[ok] = p + b
        elif p:
            tok[ok] = np.abs(x[ok][:, None] - pts[None, :]).argmin(1)
        if p:
            j = np.searchsorted(pts, x[ok])
            jc = np.clip(j, 0, p - 1)
            hit = pts[jc] == x[ok]
            idx = np.flatnonzero(ok)
            tok[idx[hit]] = jc[hit]
        return tok

    # -------------------------------------------------------------- decoding
    def numeric_values(self, tok: np.ndarray, u: np.ndarray, lower: np.ndarray | None = None,
                       upper: np.ndarray | None = None) -> np.ndarray:
        """Tokens -> float values: points exactly, bins uniformly (u in (0,1)) within bounds."""
        out = np.full(len(tok), np.nan)
        p = len(self.points)
        ispt = tok < p
        out[ispt] = np.asarray(self.points, dtype=float)[tok[ispt]] if p else np.nan
        isbin = (tok >= p) & (tok < p + self.n_bins)
        if isbin.any():
            e = np.asarray(self.edges, dtype=float)
            b = tok[isbin] - p
            lo, hi = e[b].copy(), e[b + 1].copy()
            if lower is not None:
                lo = np.fmax(lo, lower[isbin])
            if upper is not None:
                hi = np.fmin(hi, upper[isbin])
            hi = np.maximum(hi, lo)
            uu = u[isbin]
            if self.integer:
                ilo, ihi = np.ceil(lo), np.floor(hi)
                bad = ihi < ilo
                v = np.minimum(ilo + np.floor(uu * (ihi - ilo + 1)), ihi)
                v[bad] = np.round((lo[bad] + hi[bad]) / 2)
            else:
                v = self._knot_values(b, lo, hi, uu) if self.knots else lo + uu * (hi - lo)
                if self.decimals is not None:
                    v = np.round(v, self.decimals)
            out[isbin] = v
        if lower is not None:
            out = np.where(np.isnan(lower) | np.isnan(out), out, np.fmax(out, lower))
        if upper is not None:
            out = np.where(np.isnan(upper) | np.isnan(out), out, np.fmin(out, upper))
        return out

    def _knot_values(self, b: np.ndarray, lo: np.ndarray, hi: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Within-bin draws through the bin's piecewise-linear quantile curve, restricted
        to [lo, hi] (the bin, narrowed by constraint bounds)."""
        v = lo + u * (hi - lo)
        for k in np.unique(b):
            kn = np.asarray(self.knots[k], dtype=float)
            if len(kn) < 2 or kn[-1] <= kn[0]:
                continue
            rows = b == k
            g = np.linspace(0.0, 1.0, len(kn))
            u_lo = np.interp(lo[rows], kn, g)
            u_hi = np.interp(hi[rows], kn, g)
            v[rows] = np.interp(u_lo + u[rows] * (u_hi - u_lo), g, kn)
        return v

    def to_series(self, tok: np.ndarray, values: np.ndarray | None, index: pd.Index,
                  given: dict[int, Any] | None = None) -> pd.Series:
        """Build the output column with the training dtype.

        Args:
            tok: sampled tokens.
            values: numeric values (numerical/datetime columns).
            index: output index.
            given: row position -> exact value a caller conditioned on (kept verbatim).
        """
        if self.kind == "categorical":
            labels = list(self.categories) + ([RARE_LABEL] if self.has_rare else [])
            if self.has_na:
                labels.append(None)
            arr = np.empty(len(labels), dtype=object)
            arr[:] = labels
            vals = arr[tok]
            if given:
                for i, v in given.items():
                    vals[i] = v
            na = pd.isna(vals)
            if self.dtype == "bool" and not na.any() and not self.has_rare:
                return pd.Series(vals.astype(bool), index=index, name=self.name)
            if self.dtype == "int" and not self.has_rare:
                if na.any():
                    return pd.Series(pd.array(vals, dtype="Int64"), index=index, name=self.name)
                return pd.Series(vals.astype(np.int64), index=index, name=self.name)
            if self.dtype == "float" and not self.has_rare:
                return pd.Series(vals, index=index, name=self.name, dtype=float)
            if self.dtype == "category":
                # Fixed categories (the training ones + _RARE_), so that chunks sampled
                # separately concatenate; only values a caller conditioned on are added.
                cats = [str(c) for c in (self.category_order or self.categories)]
                cats = [c for c in cats if c in {str(k) for k in self.categories}] or cats
                if self.has_rare:
                    cats.append(RARE_LABEL)
                extra = [v for v in pd.unique(vals[~na]) if v not in cats]
                return pd.Series(pd.Categorical(vals, categories=cats + extra), index=index,
                                 name=self.name)
            if self.dtype == "bool":
                return pd.Series(pd.array(vals, dtype="boolean"), index=index, name=self.name)
            return pd.Series(vals, index=index, name=self.name, dtype=object)
        v = values.copy() if values is not None else np.full(len(tok), np.nan)
        if self.kind == "datetime":
            ns = np.where(np.isnan(v), 0, np.round(v * _NS_PER_DAY)).astype(np.int64)
            out = pd.Series(ns.astype("datetime64[ns]"), index=index, name=self.name)
            out[np.isnan(v)] = pd.NaT
            if given:
                for i, g in given.items():
                    out.iat[i] = pd.Timestamp(g)
            return out
        if given:
            for i, g in given.items():
                v[i] = float(g)
        if self.dtype == "int":
            if np.isnan(v).any():
                return pd.Series(pd.array(np.where(np.isnan(v), None, v), dtype="Int64"),
                                 index=index, name=self.name)
            return pd.Series(v.astype(np.int64), index=index, name=self.name)
        return pd.Series(v, index=index, name=self.name, dtype=float)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return {k: ([_py(x) for x in v] if isinstance(v, list) else _py(v))
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "ColumnCodec":
        return cls(**d)


@dataclass
class Constraint:
    """A rule every sampled row satisfies.

    * ``present_if``: ``column`` is missing exactly when ``other`` is not one of
      ``present_tokens`` (e.g. ``cond_X_onset_age`` present iff ``cond_X`` == 1);
    * ``upper``: ``column <= other``; ``lower``: ``column >= other``;
    * ``derived``: ``column == scale * other + offset`` wherever both are present
      (``age`` / ``birth_year``, ``age_at_death`` / ``age``); the column is computed,
      its missingness is still sampled.
    """

    kind: str
    column: str
    other: str
    present_tokens: list = field(default_factory=list)
    scale: float = 1.0
    offset: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Constraint":
        return cls(**d)


def _truthy_tokens(codec: ColumnCodec, values: list | None) -> list[int]:
    if codec.kind == "categorical":
        if values is not None:
            want = {str(v).lower() for v in values}
            return [i for i, c in enumerate(codec.categories) if str(c).lower() in want]
        return [i for i, c in enumerate(codec.categories)
                if c is True or (not isinstance(c, bool) and str(c).strip().lower() in _TRUTHY)]
    lo, _ = codec.token_bounds()
    return [int(i) for i in np.flatnonzero(lo > 0)]


def parse_constraints(metadata: dict, codecs: dict[str, ColumnCodec]) -> list[Constraint]:
    """Constraints declared in column metadata (``present_if``, ``upper``, ``lower``)."""
    out: list[Constraint] = []
    for col, meta in metadata.items():
        if col not in codecs or not isinstance(meta, dict):
            continue
        spec = meta.get("present_if")
        if spec is not None:
            other, values = (spec, None) if isinstance(spec, str) else (spec["column"], spec.get("values"))
            if other not in codecs:
                raise TabularModelError(f"{col}: present_if refers to unknown column {other!r}")
            toks = _truthy_tokens(codecs[other], values)
            if not toks:
                raise TabularModelError(f"{col}: present_if {other!r} matches no value of it")
            out.append(Constraint("present_if", col, other, toks))
        spec = meta.get("derived")
        if spec is not None:
            if spec.get("column") not in codecs:
                raise TabularModelError(f"{col}: derived refers to unknown column {spec.get('column')!r}")
            if "categorical" in (codecs[col].kind, codecs[spec["column"]].kind):
                raise TabularModelError(f"{col}: derived needs two numerical/datetime columns")
            out.append(Constraint("derived", col, spec["column"], scale=float(spec.get("scale", 1)),
                                  offset=float(spec.get("offset", 0))))
        for kind in ("upper", "lower"):
            refs = meta.get(kind)
            for other in ([refs] if isinstance(refs, str) else refs or []):
                if other not in codecs:
                    raise TabularModelError(f"{col}: {kind} refers to unknown column {other!r}")
                if "categorical" in (codecs[col].kind, codecs[other].kind):
                    raise TabularModelError(f"{col}: {kind} needs two numerical/datetime columns")
                out.append(Constraint(kind, col, other))
    return out


def infer_constraints(df: pd.DataFrame, codecs: dict[str, ColumnCodec],
                      declared: list[Constraint]) -> list[Constraint]:
    """Constraints that hold in the data and that the naming of the patient table implies.

    * a numerical column missing exactly when a binary column is false: ``present_if``
      (``cond_X_onset_age`` / ``cond_X``, ``age_at_death`` / ``deceased``); a flag whose
      name prefixes the column is preferred;
    * ``derived`` for a numerical/datetime column that is a linear function of an
      earlier one on every row where both exist;
    * a numerical column whose name has the word ``age`` and never exceeds ``age``:
      ``upper age`` (onset ages, age at death).
    """
    have = {(c.kind, c.column) for c in declared}
    out: list[Constraint] = []
    flags = sorted((c for c in codecs.values()
                    if c.kind == "categorical" and len(c.categories) == 2 and not c.has_rare),
                   key=lambda c: -len(c.name))
    for c in codecs.values():
        if c.kind == "categorical" or not c.has_na or ("present_if", c.name) in have:
            continue
        present = df[c.name].notna().to_numpy()
        if present.all() or not present.any():
            continue
        # Name-related flags first (cond_X for cond_X_onset_age), then any flag whose
        # true/false split matches the missingness exactly (deceased / age_at_death).
        related = [f for f in flags if c.name.startswith(f.name + "_")]
        others = [f for f in flags if f not in related and min(present.sum(), (~present).sum()) >= 3]
        for f in related + others:
            toks = _truthy_tokens(f, None)
            if len(toks) != 1:
                continue
            truthy = f.encode(df[f.name]) == toks[0]
            if np.array_equal(truthy, present):
                out.append(Constraint("present_if", c.name, f.name, toks))
                break
    # Exact linear copies: B = scale * A + offset on every row where both exist
    # (age / birth date, birth_year / age, age_at_death / age).
    derived = {c.column for c in declared if c.kind == "derived"}
    floats = {c.name: c._to_float(df[c.name]) for c in codecs.values() if c.kind != "categorical"}
    sources: list[str] = []
    for c in codecs.values():
        if c.kind == "categorical" or c.name in derived:
            continue
        v = floats[c.name]
        found = None
        if np.unique(v[~np.isnan(v)]).size >= 2:
            for a_name in sources:
                found = _linear(c.name, v, a_name, floats[a_name])
                if found:
                    break
        if found:
            out.append(found)
            derived.add(c.name)
        else:
            sources.append(c.name)
    age = codecs.get("age")
    if age is not None and age.kind == "numerical":
        a = pd.to_numeric(df["age"], errors="coerce").to_numpy(dtype=float)
        for c in codecs.values():
            if c.name == "age" or c.kind != "numerical" or ("upper", c.name) in have \
                    or c.name in derived:
                continue
            if "age" not in c.name.split("_"):
                continue
            v = pd.to_numeric(df[c.name], errors="coerce").to_numpy(dtype=float)
            both = ~np.isnan(v) & ~np.isnan(a)
            if both.sum() >= 5 and np.all(v[both] <= a[both]):
                out.append(Constraint("upper", c.name, "age"))
    return out


def _linear(name: str, v: np.ndarray, a_name: str, a: np.ndarray) -> Constraint | None:
    both = ~np.isnan(a) & ~np.isnan(v)
    if both.sum() < 5:
        return None
    x, y = a[both], v[both]
    if x.max() == x.min():
        return None
    # Two far-apart points give the line, every other row must lie on it.
    i, k = int(x.argmin()), int(x.argmax())
    scale = (y[k] - y[i]) / (x[k] - x[i])
    if scale == 0:
        return None
    offset = y[i] - scale * x[i]
    tol = 1e-9 * max(1.0, float(np.abs(y).max()))
    if np.all(np.abs(scale * x + offset - y) <= tol):
        return Constraint("derived", name, a_name, scale=float(scale), offset=float(offset))
    return None


def check_constraints(df: pd.DataFrame, constraints: list[Constraint]) -> None:
    """Warn about declared constraints that the training data itself breaks."""
    for c in constraints:
        if c.kind == "present_if":
            continue
        v = pd.to_numeric(df[c.column], errors="coerce") if df[c.column].dtype.kind != "M" else df[c.column]
        o = pd.to_numeric(df[c.other], errors="coerce") if df[c.other].dtype.kind != "M" else df[c.other]
        bad = (v > o) if c.kind == "upper" else (v < o)
        if bad.fillna(False).any():
            warnings.warn(f"training data breaks {c.column} {c.kind} {c.other} in "
                          f"{int(bad.fillna(False).sum())} rows; samples will honour it", stacklevel=3)
