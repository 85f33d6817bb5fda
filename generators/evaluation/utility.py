"""Utility: train on synthetic, test on real (TSTR) against train on real (TRTR).

One binary target (a condition flag such as ``cond_44054006``) is predicted from
every other column by the same scikit-learn pipeline trained once on the real
training rows and once on the synthetic rows, both scored (ROC AUC) on a real
hold-out set that neither saw. scikit-learn is a dependency of the ``eval`` extra
(and of ``test``), not of the server: it is imported when this runs.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd

from generators.evaluation.fidelity import sdtypes_from_metadata

MODELS = ("logistic", "gbm")


def _xy(df: pd.DataFrame, target: str, sdtypes: Mapping[str, str], leak_prefix: str):
    feats = [c for c, t in sdtypes.items()
             if c != target and t in ("numerical", "datetime", "categorical", "boolean")
             and not (leak_prefix and c.startswith(leak_prefix))]
    x: dict[str, pd.Series] = {}
    for c in feats:
        s = df[c]
        if sdtypes[c] in ("numerical", "datetime"):
            if pd.api.types.is_datetime64_any_dtype(s):
                v = s.astype("datetime64[ns]").astype("int64").astype(float).where(s.notna())
            else:
                v = pd.to_numeric(s, errors="coerce").astype(float)
            x[c] = v
        else:
            x[c] = s.astype(object).where(s.notna(), "_NA_").astype(str)
    x = pd.DataFrame(x, index=df.index)
    y = df[target].astype(object).map(lambda v: str(v).strip().lower() in ("1", "1.0", "true", "yes"))
    return x, y.to_numpy(dtype=int), feats


def _pipeline(kind: str, x: pd.DataFrame, sdtypes: Mapping[str, str], seed: int):
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    num = [c for c in x.columns if sdtypes[c] in ("numerical", "datetime")]
    cat = [c for c in x.columns if c not in num]
    pre = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median", add_indicator=True,
                                            keep_empty_features=True), StandardScaler()), num),
        ("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), cat),
    ])
    if kind == "logistic":
        clf = LogisticRegression(max_iter=2000, C=1.0)
    elif kind == "gbm":
        clf = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed)
    else:
        raise ValueError(f"model must be one of {MODELS}")
    return make_pipeline(pre, clf)


def tstr(train: pd.DataFrame, synthetic: pd.DataFrame, test: pd.DataFrame, target: str, *,
         model: str = "logistic", metadata: Mapping | None = None, seed: int = 0,
         exclude_prefix: str | None = None) -> dict:
    """TSTR vs TRTR ROC AUC for one binary target.

    Args:
        train: real training rows (the generator's training table).
        synthetic: synthetic rows.
        test: real hold-out rows.
        target: binary column to predict.
        model: ``"logistic"`` (standardised logistic regression) or ``"gbm"``
            (histogram gradient boosting).
        metadata: column kinds (see ``fidelity.sdtypes_from_metadata``).
        seed: model seed.
        exclude_prefix: features starting with it are dropped; default ``target + "_"``
            (``cond_X_onset_age`` would give ``cond_X`` away).

    Returns:
        ``{"target", "model", "trtr_auc", "tstr_auc", "ratio", "n_features", ...}``;
        AUCs are NaN when a set has a single class.
    """
    from sklearn.metrics import roc_auc_score

    sdtypes = sdtypes_from_metadata(train, metadata)
    leak = target + "_" if exclude_prefix is None else exclude_prefix
    xr, yr, feats = _xy(train, target, sdtypes, leak)
    xs, ys, _ = _xy(synthetic, target, sdtypes, leak)
    xt, yt, _ = _xy(test, target, sdtypes, leak)
    out = {"target": target, "model": model, "n_features": len(feats),
           "prevalence_train": float(yr.mean()), "prevalence_synthetic": float(ys.mean()),
           "prevalence_test": float(yt.mean())}

    def auc(x, y) -> float:
        if len(np.unique(y)) < 2 or len(np.unique(yt)) < 2:
            return math.nan
        pipe = _pipeline(model, x, sdtypes, seed).fit(x, y)
        return float(roc_auc_score(yt, pipe.predict_proba(xt)[:, 1]))

    out["trtr_auc"] = auc(xr, yr)
    out["tstr_auc"] = auc(xs, ys)
    out["ratio"] = out["tstr_auc"] / out["trtr_auc"] if out["trtr_auc"] else math.nan
    return out
