"""Privacy of a synthetic table against its training table.

* ``exact_copies``: synthetic rows identical to a training row (must be 0).
* ``distance_to_closest_record``: DCR of every synthetic row to the training set,
  compared with the DCR of a real hold-out set (never trained on) to the training
  set. A generator that copies sits much closer to its training rows than fresh
  real patients do; a private one looks like the hold-out. Distances are Euclidean
  on an encoding where every column weighs at most 1: numbers are scaled to
  [0, 1] by the training 1st-99th percentile range (plus a missing flag), and
  categories are one-hot divided by sqrt(2), so a different category adds exactly 1.
* ``anonymeter_risks``: the singling-out, linkability and inference attacks of
  Anonymeter (Giomi et al., PoPETs 2023; BSD-3-Clause-Clear) with the hold-out as
  control set. anonymeter pins old numpy versions, so it is imported lazily and the
  result says ``"not installed"`` when it is absent.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from generators.evaluation.fidelity import numeric_array, sdtypes_from_metadata


def _canonical(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    out = {}
    for c in columns:
        s = df[c]
        if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
            out[c] = s.astype(object).where(s.notna(), None).map(lambda v: None if v is None else str(v))
        else:
            out[c] = pd.to_numeric(s, errors="coerce").astype(float)
    return pd.DataFrame(out)


def exact_copies(train: pd.DataFrame, synthetic: pd.DataFrame,
                 columns: Sequence[str] | None = None) -> int:
    """Number of synthetic rows equal, on every compared column, to some training row.

    Numbers compare as floats (1 == 1.0), missing equals missing, the rest as text.
    ``patient_id`` is never compared.
    """
    cols = [c for c in (columns or train.columns) if c != "patient_id" and c in synthetic.columns]
    a = pd.util.hash_pandas_object(_canonical(train, cols), index=False)
    b = pd.util.hash_pandas_object(_canonical(synthetic, cols), index=False)
    return int(np.isin(b.to_numpy(), a.to_numpy()).sum())


class _Encoder:
    """Fits on the training table; numbers -> [0,1] + missing flag, categories -> one-hot/sqrt2."""

    def __init__(self, train: pd.DataFrame, sdtypes: Mapping[str, str]):
        self.num: list[tuple[str, float, float, bool]] = []
        self.cat: list[tuple[str, dict]] = []
        for c, t in sdtypes.items():
            if t in ("numerical", "datetime"):
                x = self._float(train[c])
                ok = x[~np.isnan(x)]
                lo, hi = (np.percentile(ok, [1, 99]) if len(ok) else (0.0, 1.0))
                if hi <= lo:
                    lo, hi = (float(ok.min()), float(ok.max())) if len(ok) else (0.0, 1.0)
                self.num.append((c, float(lo), float(hi - lo) or 1.0, bool(np.isnan(x).any())))
            elif t in ("categorical", "boolean"):
                vals = train[c].astype(object).where(train[c].notna(), None).map(
                    lambda v: None if v is None else str(v))
                self.cat.append((c, {v: i for i, v in enumerate(pd.unique(vals))}))

    _float = staticmethod(numeric_array)

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        parts = []
        for c, lo, rng, _has_na in self.num:
            x = (self._float(df[c]) - lo) / rng
            na = np.isnan(x)
            parts.append(np.where(na, 0.0, np.clip(x, -0.5, 1.5))[:, None])
            # the flag column is always there: whether it exists must not depend on the
            # frame (a synthetic NaN where training had none gave frames of other widths)
            parts.append(na[:, None].astype(float))
        for c, lut in self.cat:
            vals = df[c].astype(object).where(df[c].notna(), None).map(
                lambda v: None if v is None else str(v))
            idx = vals.map(lambda v: lut.get(v, -1)).to_numpy()
            oh = np.zeros((len(df), len(lut) + 1))
            oh[np.arange(len(df)), np.where(idx < 0, len(lut), idx)] = 1.0 / math.sqrt(2.0)
            parts.append(oh)
        return np.hstack(parts) if parts else np.zeros((len(df), 0))


def _nearest(query: np.ndarray, ref: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Euclidean distance of each query row to its nearest reference row."""
    ref_sq = (ref * ref).sum(1)
    out = np.empty(len(query))
    for a in range(0, len(query), chunk):
        q = query[a:a + chunk]
        d2 = (q * q).sum(1)[:, None] + ref_sq[None, :] - 2.0 * q @ ref.T
        out[a:a + chunk] = np.sqrt(np.clip(d2.min(1), 0.0, None))
    return out


def dcr_distances(train: pd.DataFrame, synthetic: pd.DataFrame, holdout: pd.DataFrame,
                  metadata: Mapping | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distances behind ``distance_to_closest_record``: synthetic->train,
    hold-out->train and synthetic->hold-out, one per row (for plots)."""
    sdtypes = {c: t for c, t in sdtypes_from_metadata(train, metadata).items() if c in synthetic.columns}
    enc = _Encoder(train, sdtypes)
    tr, sy, ho = enc.transform(train), enc.transform(synthetic), enc.transform(holdout)
    return _nearest(sy, tr), _nearest(ho, tr), _nearest(sy, ho)


def distance_to_closest_record(train: pd.DataFrame, synthetic: pd.DataFrame,
                               holdout: pd.DataFrame, metadata: Mapping | None = None) -> dict:
    """DCR figures: synthetic->train against holdout->train.

    Returns:
        medians and 5th percentiles of both, ``share_synthetic_closer_than_holdout_p5``
        (about 0.05 when synthetic rows are as far from training rows as fresh
        patients; much more means memorisation), and ``share_closer_to_train_than_holdout``
        (synthetic rows whose nearest training row is nearer than their nearest
        hold-out row; about n_train / (n_train + n_holdout) when private).
    """
    d_syn, d_ho, d_syn_ho = dcr_distances(train, synthetic, holdout, metadata)
    p5 = float(np.percentile(d_ho, 5))
    return {
        "synthetic_to_train_median": float(np.median(d_syn)),
        "synthetic_to_train_p5": float(np.percentile(d_syn, 5)),
        "holdout_to_train_median": float(np.median(d_ho)),
        "holdout_to_train_p5": p5,
        "share_synthetic_closer_than_holdout_p5": float(np.mean(d_syn < p5)),
        "share_closer_to_train_than_holdout": float(np.mean(d_syn < d_syn_ho)),
        "expected_share_closer_to_train": len(train) / (len(train) + len(holdout)),
        "n_synthetic": int(len(synthetic)),
        "n_train": int(len(train)),
        "n_holdout": int(len(holdout)),
    }


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """float64 numbers (nullable ints, bools, datetimes as days) and str categories.

    anonymeter's numba distance kernels reject object arrays (pd.NA, categories).
    """
    out = {}
    for c in df.columns:
        s = df[c]
        if pd.api.types.is_datetime64_any_dtype(s):
            v = s.astype("datetime64[ns]").astype("int64").astype(float) / 86_400e9
            out[c] = v.where(s.notna())
        elif pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
            out[c] = pd.to_numeric(s.astype("Float64"), errors="coerce").astype(float)
        else:
            out[c] = s.astype(object).where(s.notna(), "_NA_").astype(str)
    return pd.DataFrame(out, index=df.index).reset_index(drop=True)


def anonymeter_risks(train: pd.DataFrame, synthetic: pd.DataFrame, control: pd.DataFrame, *,
                     n_attacks: int | None = None, aux_columns: Sequence[str] | None = None,
                     secrets: Sequence[str] | None = None, confidence: float = 0.95) -> dict:
    """Anonymeter singling-out, linkability and inference risks (``"not installed"`` if absent).

    Args:
        train: the training table (anonymeter's ``ori``).
        synthetic: the synthetic table.
        control: real rows never trained on.
        n_attacks: attacks per evaluator (default: len(control), at most 500).
        aux_columns: what the attacker knows (default: demographic columns present:
            sex, age, birth_year, marital_status, country).
        secrets: columns to infer (default: the five ``cond_*`` flags nearest 50 % prevalence).
        confidence: level of the reported confidence interval.

    Returns:
        ``{"status": "ok", "singling_out": {...}, "linkability": {...}, "inference": {...}}``
        where each risk has ``value``, ``ci`` (low, high); or ``{"status": "not installed"}``.
    """
    try:
        from anonymeter.evaluators import (InferenceEvaluator, LinkabilityEvaluator,
                                           SinglingOutEvaluator)
    except ImportError:
        return {"status": "not installed",
                "reason": "pip install anonymeter (kept out of synthport's dependencies: it pins numpy)"}
    cols = [c for c in train.columns if c != "patient_id" and c in synthetic.columns]
    ori, syn, ctl = (_plain(d[cols]) for d in (train, synthetic, control))
    n = n_attacks or min(len(control), 500)
    aux = list(aux_columns or [c for c in ("sex", "age", "birth_year", "marital_status", "country")
                                if c in cols])
    if not secrets:  # the condition flags nearest 50 % prevalence (a 99 % flag tells nothing)
        flags = [c for c in cols if c.startswith("cond_") and c not in aux and not c.endswith("_age")
                 and ori[c].nunique() == 2]
        secrets = sorted(flags, key=lambda c: abs(float((ori[c] == ori[c].max()).mean()) - 0.5))[:5]
    secrets = list(secrets)

    def risk(ev) -> dict[str, Any]:
        r = ev.risk(confidence_level=confidence)
        return {"value": float(r.value), "ci": [float(r.ci[0]), float(r.ci[1])]}

    out: dict[str, Any] = {"status": "ok", "n_attacks": n, "aux_columns": aux, "secrets": secrets}
    so = SinglingOutEvaluator(ori=ori, syn=syn, control=ctl, n_attacks=n)
    out["singling_out"] = risk(so.evaluate(mode="univariate"))
    half = max(1, len(aux) // 2)
    link = LinkabilityEvaluator(ori=ori, syn=syn, control=ctl, n_attacks=min(n, len(ctl)),
                                aux_cols=(aux[:half], aux[half:] or aux[:half]), n_neighbors=10)
    out["linkability"] = risk(link.evaluate(n_jobs=1))
    inf = {}
    for s in secrets:
        ev = InferenceEvaluator(ori=ori, syn=syn, control=ctl, aux_cols=aux, secret=s, n_attacks=n)
        inf[s] = risk(ev.evaluate(n_jobs=1))
    out["inference"] = inf
    return out
