"""Baseline generators of the patient table, to show where synthport's model stands.

All share one shape: ``Baseline(**options).fit(df, metadata)`` then ``.sample(n, seed)``
(a DataFrame with ``df``'s modelled columns and dtypes).

* ``gaussian_copula``: synthport's own Gaussian copula (numpy + torch's normal CDF and
  quantile function; no extra package). Always available.
* ``sdv_gaussian_copula``: SDV's ``GaussianCopulaSynthesizer`` (``pip install sdv``).
* ``ctgan``: plain CTGAN of the ``ctgan`` package (BUSL-1.1, see docs/synthetic.md).
* ``tabularargn``: MOSTLY AI's TabularARGN (``pip install mostlyai-engine``).

The last three are optional and never dependencies: :func:`make_baseline` raises
:class:`BaselineUnavailable` when the package is missing, and the evaluation reports
"skipped: package not installed". They run on the CPU with their package's defaults
(CTGAN 300 epochs, TabularARGN at most 100 epochs with early stopping) unless ``epochs``
is given; TabularARGN's training time is capped at :data:`ARGN_MAX_TRAINING_MINUTES`.
Checked against sdv 2.0.0, ctgan 0.12.1 and mostlyai-engine 2.7.3 (docs/synthetic.md
says how to install them in an environment of their own).

**Gaussian copula** (as in SDV's GaussianCopula, written here from the method): every
column is mapped to a standard normal score; numbers (datetimes as nanoseconds) through
their empirical CDF (mid-ranks, ties averaged), categories (missing is a category of its
own) through the interval of [0, 1] that each category occupies in frequency order, the
row's point drawn uniformly inside it (seeded). A number with missing values also gets a
0/1 "missing" column, encoded like a category; its missing cells get the median score.
The scores' correlation matrix, shrunk by ``shrinkage`` towards the identity (a table
with more columns than rows has a singular one), is the copula. Sampling draws normal
vectors with that correlation (seeded numpy Generator) and maps each score back: numbers
by the empirical quantile function (linear between the sorted training values, so
values between observed ones appear; integers are rounded), categories by the interval
that holds the normal CDF of the score.
"""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from generators.evaluation.fidelity import numeric_array, sdtypes_from_metadata

#: name -> (description, package that must be importable or None)
BASELINES: dict[str, tuple[str, str | None]] = {
    "gaussian_copula": ("synthport's Gaussian copula (numpy/torch)", None),
    "sdv_gaussian_copula": ("SDV GaussianCopulaSynthesizer", "sdv"),
    "ctgan": ("CTGAN (ctgan package, BUSL-1.1)", "ctgan"),
    "tabularargn": ("MOSTLY AI TabularARGN (mostlyai-engine)", "mostlyai.engine"),
}


class BaselineUnavailable(Exception):
    """The baseline's package is not installed."""


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    import torch

    return torch.special.ndtr(torch.from_numpy(np.asarray(z, dtype=np.float64))).numpy()


def _norm_ppf(u: np.ndarray) -> np.ndarray:
    import torch

    u = np.clip(np.asarray(u, dtype=np.float64), 1e-9, 1 - 1e-9)
    return torch.special.ndtri(torch.from_numpy(u)).numpy()


@dataclass
class _Num:
    name: str
    sorted_values: np.ndarray
    integer: bool
    decimals: int | None
    missing: bool
    dtype: Any
    datetime: bool


@dataclass
class _Cat:
    name: str
    values: list          # in frequency order (None = missing)
    cum: np.ndarray       # upper edges of the intervals in [0, 1]
    dtype: Any
    missing_of: str | None = None   # the numerical column this missing flag belongs to


class GaussianCopula:
    """Gaussian copula over a patient table (see the module docstring).

    Args:
        shrinkage: weight of the identity in the correlation matrix (0..1).
        seed: seed of the uniform draws inside category intervals while fitting.
    """

    def __init__(self, shrinkage: float = 0.05, seed: int = 0):
        self.shrinkage = float(shrinkage)
        self.seed = int(seed)
        self.columns: list[str] = []
        self.parts: list[_Num | _Cat] = []
        self.chol: np.ndarray | None = None

    def fit(self, df: pd.DataFrame, metadata: Mapping | None = None) -> "GaussianCopula":
        """Fit on ``df`` (``patient_id`` and key/id/text columns are not modelled)."""
        sdtypes = sdtypes_from_metadata(df, metadata)
        rng = np.random.default_rng(self.seed)
        self.columns = [c for c in df.columns if sdtypes.get(c) in
                        ("numerical", "datetime", "categorical", "boolean")]
        scores = []
        self.parts = []
        n = len(df)
        for c in self.columns:
            s = df[c]
            if sdtypes[c] in ("numerical", "datetime"):
                x = numeric_array(s)
                na = np.isnan(x)
                ok = np.sort(x[~na])
                if not len(ok):       # never observed: a missing-only category
                    self._fit_cat(c, s, rng, scores)
                    continue
                dec = None
                if not pd.api.types.is_integer_dtype(s) and sdtypes[c] == "numerical":
                    dec = _decimals(ok)
                part = _Num(c, ok, bool(pd.api.types.is_integer_dtype(s)), dec,
                            bool(na.any()), s.dtype, sdtypes[c] == "datetime")
                z = np.zeros(n)
                # mid-ranks of the observed values -> (0, 1) -> normal scores
                ranks = pd.Series(x[~na]).rank(method="average").to_numpy()
                z[~na] = _norm_ppf((ranks - 0.5) / len(ok))
                z[na] = 0.0
                self.parts.append(part)
                scores.append(z)
                if part.missing:
                    self._fit_cat(c, pd.Series(na.astype(np.int8)), rng, scores, missing_of=c)
            else:
                self._fit_cat(c, s, rng, scores)
        z = np.vstack(scores).T if scores else np.zeros((n, 0))
        k = z.shape[1]
        if k and n > 1:
            sd = z.std(0)
            zz = (z - z.mean(0)) / np.where(sd > 0, sd, 1.0)
            corr = (zz.T @ zz) / n
            corr[np.ix_(sd == 0, sd == 0)] = 0.0
            np.fill_diagonal(corr, 1.0)
        else:
            corr = np.eye(k)
        corr = (1.0 - self.shrinkage) * corr + self.shrinkage * np.eye(k)
        # Cholesky of a positive definite matrix: eigenvalues clipped if rounding broke it.
        try:
            self.chol = np.linalg.cholesky(corr)
        except np.linalg.LinAlgError:
            w, v = np.linalg.eigh(corr)
            corr = (v * np.clip(w, 1e-6, None)) @ v.T
            d = np.sqrt(np.diag(corr))
            self.chol = np.linalg.cholesky(corr / np.outer(d, d))
        return self

    def _fit_cat(self, c: str, s: pd.Series, rng, scores: list, missing_of: str | None = None):
        vals = s.astype(object).where(s.notna(), None).tolist()
        counts: dict[Any, int] = {}
        for v in vals:
            v = v.item() if isinstance(v, np.generic) else v
            counts[v] = counts.get(v, 0) + 1
        order = sorted(counts, key=lambda v: (-counts[v], str(v)))
        freq = np.array([counts[v] for v in order], float) / max(len(vals), 1)
        cum = np.cumsum(freq)
        cum[-1] = 1.0
        lo = dict(zip(order, np.concatenate([[0.0], cum[:-1]])))
        hi = dict(zip(order, cum))
        u = np.array([lo[v.item() if isinstance(v, np.generic) else v] for v in vals])
        w = np.array([hi[v.item() if isinstance(v, np.generic) else v] for v in vals]) - u
        scores.append(_norm_ppf(u + w * rng.uniform(0.05, 0.95, len(vals))))
        self.parts.append(_Cat(c, order, cum, s.dtype, missing_of))

    def sample(self, n: int, seed: int = 0) -> pd.DataFrame:
        """``n`` rows (index 0..n-1), a pure function of (fitted model, n, seed)."""
        if self.chol is None:
            raise RuntimeError("the Gaussian copula is not fitted")
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((n, self.chol.shape[0])) @ self.chol.T
        u = _norm_cdf(z)
        out: dict[str, Any] = {}
        missing: dict[str, np.ndarray] = {}
        for j, p in enumerate(self.parts):
            if isinstance(p, _Cat):
                idx = np.minimum(np.searchsorted(p.cum, u[:, j], side="right"), len(p.values) - 1)
                if p.missing_of is not None:
                    missing[p.missing_of] = np.array([p.values[i] for i in idx]) == 1
                    continue
                out[p.name] = _cast_cat([p.values[i] for i in idx], p.dtype)
            else:
                m = len(p.sorted_values)
                pos = np.clip(u[:, j] * m - 0.5, 0, m - 1)
                x = np.interp(pos, np.arange(m), p.sorted_values)
                if p.integer or p.datetime:
                    x = np.round(x)
                elif p.decimals is not None:
                    x = np.round(x, p.decimals)
                out[p.name] = x
        for p in self.parts:
            if isinstance(p, _Num):
                x = out[p.name]
                na = missing.get(p.name, np.zeros(n, bool))
                out[p.name] = _cast_num(x, na, p)
        return pd.DataFrame({c: out[c] for c in self.columns if c in out})


def _decimals(x: np.ndarray) -> int | None:
    for d in range(0, 7):
        if np.allclose(x, np.round(x, d), rtol=0, atol=1e-9):
            return d
    return None


def _cast_cat(values: list, dtype) -> pd.Series:
    s = pd.Series(values, dtype=object)
    if pd.api.types.is_bool_dtype(dtype) and not s.isna().any():
        return s.astype(bool)
    if pd.api.types.is_integer_dtype(dtype):
        return s.astype("Int64" if s.isna().any() else dtype)
    if pd.api.types.is_float_dtype(dtype):
        return s.astype(float)
    if isinstance(dtype, pd.StringDtype):
        return s.astype(dtype)
    return s


def _cast_num(x: np.ndarray, na: np.ndarray, p: _Num) -> pd.Series:
    if p.datetime:
        v = pd.Series(pd.to_datetime(np.where(na, 0, x).astype(np.int64)))
        return v.where(~na)
    s = pd.Series(np.where(na, np.nan, x))
    if pd.api.types.is_integer_dtype(p.dtype):
        return s.round().astype("Int64" if na.any() or str(p.dtype) == "Int64" else p.dtype)
    return s.astype(float)


# ----------------------------------------------------------------------- optional packages
#: TabularARGN's bound on training time, in minutes (the package's default is 14,400: ten
#: days). Its other defaults stand (model MOSTLY_AI/Medium, at most 100 epochs with early
#: stopping on a validation split, value protection on).
ARGN_MAX_TRAINING_MINUTES = 10.0


def _isna(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v is pd.NaT


def _prepare(df: pd.DataFrame, metadata: Mapping | None) -> tuple[pd.DataFrame, dict[str, str]]:
    """The modelled columns as plain values: categories as ``str`` (missing: None),
    numbers as float (missing: NaN), datetimes as ``datetime64[ns]``."""
    sd = sdtypes_from_metadata(df, metadata)
    cols = [c for c in df.columns if sd.get(c) in ("numerical", "datetime", "categorical", "boolean")]
    plain = {}
    for c in cols:
        s = df[c]
        if sd[c] in ("categorical", "boolean"):
            plain[c] = s.astype(object).where(s.notna(), None).map(
                lambda v: None if v is None else str(v))
        elif sd[c] == "numerical":
            plain[c] = pd.to_numeric(s, errors="coerce").astype(float)
        else:
            plain[c] = pd.to_datetime(s, errors="coerce").astype("datetime64[ns]")
    return pd.DataFrame(plain).reset_index(drop=True), {c: sd[c] for c in cols}


def _restore(syn: pd.DataFrame, like: pd.DataFrame) -> pd.DataFrame:
    """Back to ``like``'s columns and dtypes (the packages return str/float/datetime).

    Integers become the training dtype when no value is missing, else ``Int64``; booleans
    ``bool`` (object with None when missing); pandas categoricals their categorical dtype.

    Raises:
        ValueError: a column of ``like`` is missing from ``syn``.
    """
    missing = [c for c in like.columns if c not in syn.columns]
    if missing:
        raise ValueError(f"the baseline returned no column {', '.join(missing[:5])}")
    out = {}
    for c in like.columns:
        s, dt = syn[c].reset_index(drop=True), like[c].dtype
        if pd.api.types.is_bool_dtype(dt):
            s = s.astype(object).map(lambda v: None if _isna(v)
                                     else str(v).strip().lower() in ("true", "1", "1.0"))
            if not s.isna().any():
                s = s.astype(bool)
        elif isinstance(dt, pd.CategoricalDtype):
            back = {str(v): v for v in dt.categories}
            s = pd.Series(pd.Categorical(
                s.astype(object).map(lambda v: None if _isna(v) else back.get(str(v), v)),
                dtype=dt))
        elif pd.api.types.is_datetime64_any_dtype(dt):
            if pd.api.types.is_numeric_dtype(s):      # nanoseconds (CTGAN)
                x = pd.to_numeric(s, errors="coerce")
                s = pd.to_datetime(x.round().astype("Int64"), unit="ns")
            s = pd.to_datetime(s, errors="coerce").astype(dt)
        elif pd.api.types.is_numeric_dtype(dt):
            s = pd.to_numeric(s, errors="coerce")
            if pd.api.types.is_integer_dtype(dt):
                s = s.round()
                s = s.astype("Int64" if s.isna().any() or str(dt) == "Int64" else dt)
            else:
                s = s.astype(float)
        elif isinstance(dt, pd.StringDtype):
            s = s.astype(object).where(s.notna(), None).astype(dt)
        elif dt == object:                            # plain objects, None when missing
            s = s.astype(object).where(s.notna(), None)
        out[c] = s
    return pd.DataFrame(out)


#: Loggers of the optional packages that log every column at INFO (SDV/RDT: several
#: hundred lines on a 400-column table); kept at WARNING while they fit and sample.
_CHATTY_LOGGERS = ("rdt", "sdv", "copulas", "SingleTableSynthesizer", "ctgan", "mostlyai")


@contextlib.contextmanager
def _quiet_packages():
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _External:
    """Common wrapper of the optional packages (fit on plain str/float columns)."""

    package: str = ""

    def __init__(self, epochs: int | None = None, seed: int = 0):
        self.epochs = epochs
        self.seed = int(seed)
        self._like: pd.DataFrame | None = None

    def fit(self, df: pd.DataFrame, metadata: Mapping | None = None):
        plain, sd = _prepare(df, metadata)
        if plain.shape[1] == 0:
            raise ValueError("no column to model")
        self._like = df[list(plain.columns)].iloc[:0]
        with _quiet_packages():
            self._fit(plain, sd)
        return self

    def sample(self, n: int, seed: int = 0) -> pd.DataFrame:
        """``n`` rows (index 0..n-1) with the training table's modelled columns and dtypes."""
        if self._like is None:
            raise RuntimeError(f"the {type(self).__name__} baseline is not fitted")
        with _quiet_packages():
            raw = self._sample(int(n), int(seed))
        return _restore(raw, self._like)


class SdvGaussianCopula(_External):
    """SDV's ``GaussianCopulaSynthesizer`` with the package defaults (beta marginals,
    min/max and rounding enforced), through the 2.x API (``Metadata``, data as
    ``{table: DataFrame}``) or the 1.x one. Seeded per sample through the synthesizer's
    own random state (reset to the post-fit state, then set to ``seed``)."""

    package = "sdv"

    def _fit(self, df, sd):
        from sdv.single_table import GaussianCopulaSynthesizer

        cols = {c: {"sdtype": "categorical" if t == "boolean" else t} for c, t in sd.items()}
        try:                          # sdv >= 1.15 (the only metadata class of sdv 2.x)
            from sdv.metadata import Metadata

            meta = Metadata.load_from_dict({"tables": {"patients": {"columns": cols}}})
        except ImportError:           # older sdv 1.x
            from sdv.metadata import SingleTableMetadata

            meta = SingleTableMetadata.load_from_dict({"columns": cols})
        self.model = GaussianCopulaSynthesizer(meta)
        import sdv

        # sdv 2.x fits on {table name: DataFrame} and samples such a dict; 1.x on the frame
        self._dict_api = int(str(sdv.__version__).split(".")[0]) >= 2
        self.model.fit({"patients": df} if self._dict_api else df)

    def _sample(self, n, seed):
        self.model.reset_sampling()
        if hasattr(self.model, "_set_random_state"):
            self.model._set_random_state(seed)
        out = self.model.sample(num_rows=n)
        return next(iter(out.values())) if isinstance(out, dict) else out


class Ctgan(_External):
    """Plain CTGAN (``ctgan`` package) on the CPU, package defaults (300 epochs unless
    ``epochs``; batch 500, pac 10). CTGAN refuses missing values in continuous columns:
    as SDV's ``CTGANSynthesizer`` does (RDT ``missing_value_replacement='mean'``,
    ``missing_value_generation='from_column'``), each such column is filled with its mean
    and gets a discrete 0/1 "missing" column that is learned with it and decides which
    sampled values are blanked. Datetimes are modelled as nanoseconds."""

    package = "ctgan"

    def _fit(self, df, sd):
        from ctgan import CTGAN

        discrete = [c for c, t in sd.items() if t in ("categorical", "boolean")]
        cols: dict[str, Any] = {c: df[c].to_numpy() for c in df.columns}
        flags: dict[str, np.ndarray] = {}
        self._missing: dict[str, str] = {}
        for c, t in sd.items():
            if c in discrete:
                continue
            x = pd.Series(numeric_array(df[c]))
            na = x.isna()
            if na.any():
                flag = f"{c}__missing"
                while flag in cols or flag in flags:
                    flag += "_"
                flags[flag] = np.where(na, "1", "0")
                discrete.append(flag)
                self._missing[c] = flag
                x = x.fillna(x.mean() if not na.all() else 0.0)
            cols[c] = x.to_numpy()
        data = pd.DataFrame({**cols, **flags})
        try:
            self.model = CTGAN(epochs=self.epochs or 300, enable_gpu=False)
        except TypeError:             # ctgan < 0.11: `cuda`
            self.model = CTGAN(epochs=self.epochs or 300, cuda=False)
        self.model.set_random_state(self.seed)
        self.model.fit(data, discrete_columns=discrete)

    def _sample(self, n, seed):
        self.model.set_random_state(seed)
        s = self.model.sample(n).reset_index(drop=True)
        for c, flag in self._missing.items():
            s[c] = s[c].where(s[flag].astype(str) != "1")
        return s.drop(columns=list(self._missing.values()))


class TabularArgn(_External):
    """MOSTLY AI's TabularARGN (``mostlyai-engine`` 2.x) on the CPU with its defaults
    (model MOSTLY_AI/Medium, at most 100 epochs with early stopping, value protection),
    training bounded by :data:`ARGN_MAX_TRAINING_MINUTES` (``epochs`` caps the epochs).
    The encodings are given from the metadata (categorical, numeric auto, datetime), not
    guessed; rare categories that value protection hides are sampled from the non-rare
    ones (``rare_category_replacement_method='sample'``) rather than written as
    ``_RARE_``. The engine works in a temporary folder, removed with the object. Seeded
    by ``random_state`` for training and the engine's global seed before each sample."""

    package = "mostlyai.engine"

    def _fit(self, df, sd):
        import shutil
        import weakref

        from mostlyai.engine import TabularARGN

        self._dir = tempfile.mkdtemp(prefix="synthport-argn-")
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        enc = {c: {"datetime": "TABULAR_DATETIME", "numerical": "TABULAR_NUMERIC_AUTO"}
               .get(t, "TABULAR_CATEGORICAL") for c, t in sd.items()}
        kw: dict[str, Any] = {"workspace_dir": self._dir, "device": "cpu", "random_state": self.seed,
                              "max_training_time": ARGN_MAX_TRAINING_MINUTES,
                              "tgt_encoding_types": enc, "verbose": 0}
        if self.epochs:
            kw["max_epochs"] = self.epochs
        self.model = TabularARGN(**kw)
        self.model.fit(df)

    def _sample(self, n, seed):
        from mostlyai.engine import set_random_state

        set_random_state(seed)
        return self.model.sample(n_samples=n, device="cpu", rare_category_replacement_method="sample")


_CLASSES = {"gaussian_copula": GaussianCopula, "sdv_gaussian_copula": SdvGaussianCopula,
            "ctgan": Ctgan, "tabularargn": TabularArgn}


def available(name: str) -> bool:
    """Whether baseline ``name``'s package can be imported."""
    import importlib.util

    pkg = BASELINES[name][1]
    if pkg is None:
        return True
    try:
        return importlib.util.find_spec(pkg) is not None
    except ModuleNotFoundError:
        return False


def make_baseline(name: str, *, epochs: int | None = None, seed: int = 0):
    """A fresh baseline generator.

    Raises:
        KeyError: unknown name (see ``BASELINES``).
        BaselineUnavailable: its package is not installed.
    """
    if name not in _CLASSES:
        raise KeyError(f"unknown baseline {name!r}: one of {', '.join(BASELINES)}")
    if not available(name):
        raise BaselineUnavailable(f"{BASELINES[name][1]} is not installed")
    if name == "gaussian_copula":
        return GaussianCopula(seed=seed)
    return _CLASSES[name](epochs=epochs, seed=seed)


__all__ = ["BASELINES", "BaselineUnavailable", "GaussianCopula", "make_baseline", "available"]
