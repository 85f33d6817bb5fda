"""Privacy risk estimates in the manner of Anonymeter, with numpy only.

Anonymeter (Giomi et al., "A Unified Framework for Quantifying Privacy Risk in Synthetic
Data", PoPETs 2023) pins numpy versions that synthport cannot install, so its three attacks
are written here from the paper's description (``privacy.anonymeter_risks`` still runs the
package itself when it is installed). Each attack is run against the training rows and,
identically, against a **control** set of real rows that the generator never saw (the
hold-out). What the synthetic data teach about any patient of the population shows up in
both; only what they leak about the *training* patients makes the first succeed more
often. The risk is Anonymeter's residual success rate

    risk = (rate_train - rate_control) / (1 - rate_control)

with both rates Wilson score estimates, and the confidence interval propagated from their
errors (Gaussian error propagation, as Anonymeter does). 0 is no measurable leak; values
are clipped to [0, 1], the interval is not.

* **Singling out** (univariate): predicates that hold for exactly one synthetic row are
  built from the synthetic data: ``column == value`` for values that occur once,
  ``column <= min`` and ``column >= max`` for numbers. A predicate succeeds when it holds
  for exactly one row of the attacked set. The training rows are subsampled (seeded) to
  the size of the control set first, since singling out gets easier in a smaller set.
  Baseline: ``column == v`` for values v drawn at random from the column's values.
* **Linkability**: the attacker holds two parts of a target's record (``aux_columns``
  split in two: by default the demographic columns and the condition flags) and links
  them through the synthetic rows: the attack succeeds when the ``n_neighbors`` nearest
  synthetic rows on the first part and on the second part share a row. Baseline: random
  neighbour sets.
* **Inference**: the attacker knows ``aux_columns`` of a target and guesses ``secret`` as
  the value of the nearest synthetic row; right when equal (categories) or within 5 %
  (numbers). Baseline: the secret of a random synthetic row.

Nearest means the smallest Gower distance: numbers as |a - b| / range (range over all
three tables), categories 0 when equal and 1 otherwise, missing equal to missing and at
distance 1 from any value.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from generators.evaluation.fidelity import numeric_array, sdtypes_from_metadata

DEMOGRAPHICS = ("sex", "age", "birth_year", "marital_status", "country", "language")
NUMERIC_TOLERANCE = 0.05   # Anonymeter's default relative tolerance for numerical secrets


# ------------------------------------------------------------------------ statistics
def success_rate(n_success: int, n_total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score estimate of a success rate and its error (half-width).

    Wilson (1927): centre (k + z²/2) / (n + z²), half-width
    z / (n + z²) · sqrt(k (n - k) / n + z² / 4).
    """
    if n_total <= 0:
        return math.nan, math.nan
    z = _z(confidence)
    n, k = float(n_total), float(n_success)
    centre = (k + z * z / 2.0) / (n + z * z)
    err = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4.0)
    return centre, err


def residual_risk(attack: tuple[float, float], control: tuple[float, float]) -> dict[str, Any]:
    """(rate_attack - rate_control) / (1 - rate_control) with its propagated interval."""
    (a, ea), (c, ec) = attack, control
    if any(math.isnan(v) for v in (a, c)) or c >= 1.0:
        return {"value": math.nan, "ci": [math.nan, math.nan]}
    r = (a - c) / (1.0 - c)
    # d r / d a = 1 / (1 - c); d r / d c = (a - 1) / (1 - c)^2
    err = math.sqrt((ea / (1.0 - c)) ** 2 + (ec * (a - 1.0) / (1.0 - c) ** 2) ** 2)
    return {"value": float(min(max(r, 0.0), 1.0)), "ci": [float(r - err), float(r + err)]}


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _result(n_train: int, k_train: int, n_control: int, k_control: int, n_base: int,
            k_base: int, confidence: float, **extra) -> dict[str, Any]:
    att, ctl, base = (success_rate(k_train, n_train, confidence),
                      success_rate(k_control, n_control, confidence),
                      success_rate(k_base, n_base, confidence))
    out = residual_risk(att, ctl)
    out.update({"attack_rate": att[0], "control_rate": ctl[0], "baseline_rate": base[0],
                "n_attacks": int(n_train), "n_control_attacks": int(n_control),
                "successes": int(k_train), "control_successes": int(k_control),
                "n_baseline_attacks": int(n_base), "baseline_successes": int(k_base), **extra})
    return out


# ------------------------------------------------------------------------ encoding
class _Space:
    """Columns as floats (numbers scaled by range) and category codes, shared by all tables."""

    def __init__(self, frames: Sequence[pd.DataFrame], columns: Sequence[str], sdtypes: dict):
        self.num = [c for c in columns if sdtypes.get(c) in ("numerical", "datetime")]
        self.cat = [c for c in columns if c not in self.num]
        self.lo: dict[str, float] = {}
        self.rng: dict[str, float] = {}
        for c in self.num:
            x = np.concatenate([numeric_array(f[c]) for f in frames])
            x = x[~np.isnan(x)]
            lo, hi = (float(x.min()), float(x.max())) if len(x) else (0.0, 1.0)
            self.lo[c], self.rng[c] = lo, (hi - lo) or 1.0
        self.luts: dict[str, dict] = {c: {} for c in self.cat}

    def encode(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        n = len(df)
        num = np.empty((n, len(self.num)))
        for j, c in enumerate(self.num):
            num[:, j] = (numeric_array(df[c]) - self.lo[c]) / self.rng[c]
        cat = np.empty((n, len(self.cat)), dtype=np.int64)
        for j, c in enumerate(self.cat):
            lut = self.luts[c]
            vals = df[c].astype(object).where(df[c].notna(), None).map(
                lambda v: None if v is None else str(v))
            cat[:, j] = [lut.setdefault(v, len(lut)) for v in vals]
        return num, cat


def _gower(q: tuple[np.ndarray, np.ndarray], r: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[len(q), len(r)] Gower distances (sum over columns)."""
    qn, qc = q
    rn, rc = r
    d = np.zeros((len(qn), len(rn)))
    for j in range(qn.shape[1]):
        a, b = qn[:, j][:, None], rn[:, j][None, :]
        diff = np.abs(a - b)
        na_a, na_b = np.isnan(a), np.isnan(b)
        diff = np.where(na_a & na_b, 0.0, np.where(na_a | na_b, 1.0, np.minimum(diff, 1.0)))
        d += diff
    for j in range(qc.shape[1]):
        d += qc[:, j][:, None] != rc[:, j][None, :]
    return d


def _nearest(q, r, k: int, chunk: int = 256) -> np.ndarray:
    """Indices of the k nearest rows of r for each row of q (ties: lower index first)."""
    k = max(1, min(k, len(r[0])))
    out = np.empty((len(q[0]), k), dtype=np.int64)
    for a in range(0, len(q[0]), chunk):
        d = _gower((q[0][a:a + chunk], q[1][a:a + chunk]), r)
        out[a:a + chunk] = np.argsort(d, axis=1, kind="stable")[:, :k]
    return out


def _take(enc, idx):
    return enc[0][idx], enc[1][idx]


# ------------------------------------------------------------------------ attacks
def singling_out(train: pd.DataFrame, synthetic: pd.DataFrame, control: pd.DataFrame, *,
                 columns: Sequence[str], sdtypes: dict, n_attacks: int = 500, seed: int = 0,
                 confidence: float = 0.95) -> dict[str, Any]:
    """Univariate singling-out risk (see the module docstring)."""
    rs = np.random.default_rng(seed)
    n = min(len(train), len(control))
    tr = train.iloc[np.sort(rs.choice(len(train), n, replace=False))] if len(train) > n else train
    ct = control.iloc[np.sort(rs.choice(len(control), n, replace=False))] if len(control) > n else control
    preds: list[tuple[str, str, Any]] = []
    for c in columns:
        s = synthetic[c]
        if sdtypes.get(c) in ("numerical", "datetime"):
            x = numeric_array(s)
            x = x[~np.isnan(x)]
            if len(x):
                preds += [(c, "<=", float(x.min())), (c, ">=", float(x.max()))]
                vals, counts = np.unique(x, return_counts=True)
                preds += [(c, "==", float(v)) for v in vals[counts == 1]]
        else:
            vc = s.dropna().astype(str).value_counts()
            preds += [(c, "==", v) for v in vc.index[vc == 1]]
    order = rs.permutation(len(preds))[:n_attacks]
    preds = [preds[i] for i in order]

    def holds(df: pd.DataFrame, p) -> np.ndarray:
        c, op, v = p
        if sdtypes.get(c) in ("numerical", "datetime"):
            x = numeric_array(df[c])
            with np.errstate(invalid="ignore"):
                return x <= v if op == "<=" else x >= v if op == ">=" else x == v
        return (df[c].dropna().astype(str) == v).to_numpy()

    k_tr = sum(int(holds(tr, p).sum() == 1) for p in preds)
    k_ct = sum(int(holds(ct, p).sum() == 1) for p in preds)
    # baseline: equality with a random value of the column (as a guess without the data)
    k_base = 0
    for c, _, _ in preds:
        vals = pd.unique(synthetic[c].dropna().astype(str)) if sdtypes.get(c) not in (
            "numerical", "datetime") else np.unique(numeric_array(synthetic[c])[~np.isnan(
                numeric_array(synthetic[c]))])
        if len(vals):
            k_base += int(holds(tr, (c, "==", vals[rs.integers(len(vals))])).sum() == 1)
    return _result(len(preds), k_tr, len(preds), k_ct, len(preds), k_base, confidence,
                   mode="univariate", rows_per_set=int(n))


def linkability(train_enc, control_enc, syn_enc, n_neighbors: int, seed: int,
                confidence: float, part_a: np.ndarray, part_b: np.ndarray,
                outcomes: dict | None = None) -> dict[str, Any]:
    """Linkability risk from encoded tables; ``part_a``/``part_b`` select encoded columns.
    ``outcomes``, when given, receives each target's success (``train``, ``control``)."""
    rs = np.random.default_rng(seed)

    def split(enc, sel):
        num_sel, cat_sel = sel
        return enc[0][:, num_sel], enc[1][:, cat_sel]

    def links(target) -> np.ndarray:
        a = _nearest(split(target, part_a), split(syn_enc, part_a), n_neighbors)
        b = _nearest(split(target, part_b), split(syn_enc, part_b), n_neighbors)
        return np.array([len(np.intersect1d(x, y)) > 0 for x, y in zip(a, b)], dtype=bool)

    n_syn = len(syn_enc[0])
    k = max(1, min(n_neighbors, n_syn))
    n_t = len(train_enc[0])
    k_base = sum(int(len(np.intersect1d(rs.choice(n_syn, k, replace=False),
                                        rs.choice(n_syn, k, replace=False))) > 0)
                 for _ in range(n_t))
    l_tr, l_ct = links(train_enc), links(control_enc)
    if outcomes is not None:
        outcomes.update(train=l_tr, control=l_ct)
    return _result(n_t, int(l_tr.sum()), len(control_enc[0]), int(l_ct.sum()), n_t, k_base,
                   confidence, n_neighbors=int(k))


def inference(train_enc, control_enc, syn_enc, secret_train, secret_control, secret_syn,
              numeric: bool, seed: int, confidence: float, outcomes: dict | None = None
              ) -> dict[str, Any]:
    """Inference risk: nearest synthetic row on the aux columns gives the guess.
    ``outcomes``, when given, receives each target's success (``train``, ``control``)."""
    rs = np.random.default_rng(seed)

    def right(guess, truth) -> np.ndarray:
        if numeric:
            g, t = np.asarray(guess, float), np.asarray(truth, float)
            both_na = np.isnan(g) & np.isnan(t)
            with np.errstate(invalid="ignore"):
                return both_na | (np.abs(g - t) <= NUMERIC_TOLERANCE * np.abs(t))
        return np.asarray([a == b for a, b in zip(guess, truth)])

    def attack(enc, truth) -> np.ndarray:
        nn = _nearest(enc, syn_enc, 1)[:, 0]
        return np.asarray(right(secret_syn[nn], truth), dtype=bool)

    n_t = len(train_enc[0])
    base = secret_syn[rs.integers(len(secret_syn), size=n_t)]
    a_tr, a_ct = attack(train_enc, secret_train), attack(control_enc, secret_control)
    if outcomes is not None:
        outcomes.update(train=a_tr, control=a_ct)
    return _result(n_t, int(a_tr.sum()), len(control_enc[0]), int(a_ct.sum()), n_t,
                   int(right(base, secret_train).sum()), confidence)


def default_columns(train: pd.DataFrame, columns: Sequence[str], n_flags: int = 10
                    ) -> tuple[list[str], list[str]]:
    """(demographic columns present, up to ``n_flags`` condition flags nearest 50 %)."""
    demo = [c for c in DEMOGRAPHICS if c in columns]
    flags = []
    for c in columns:
        if c.startswith("cond_") and not c.endswith("_age") and c not in demo:
            v = pd.to_numeric(train[c], errors="coerce")
            if v.dropna().nunique() == 2:
                flags.append((abs(float((v == v.max()).mean()) - 0.5), c))
    return demo, [c for _, c in sorted(flags)[:n_flags]]


def privacy_risks(train: pd.DataFrame, synthetic: pd.DataFrame, control: pd.DataFrame,
                  metadata=None, *, n_attacks: int | None = None,
                  aux_columns: Sequence[str] | None = None, secrets: Sequence[str] | None = None,
                  n_neighbors: int = 10, confidence: float = 0.95, seed: int = 0,
                  keep_outcomes: bool = False) -> dict:
    """Singling-out, linkability and inference risks with ``control`` as the control set.

    Args:
        train: the generator's training rows.
        synthetic: its output.
        control: real rows it never saw (the hold-out).
        metadata: column kinds (``fidelity.sdtypes_from_metadata``).
        n_attacks: at most this many targets per set (default 500; each set gives
            min(n_attacks, its size)) and singling-out predicates.
        aux_columns: what the attacker knows (default: the demographic columns present plus
            up to 10 condition flags nearest 50 % prevalence).
        secrets: inferred columns (default: the 5 flags nearest 50 %, each with the other
            aux columns as knowledge).
        n_neighbors: linkability's neighbour sets.
        confidence: level of the intervals.
        seed: target sampling and baselines.
        keep_outcomes: also return each target's success under ``"outcomes"``
            (``train_index``/``control_index``: the targets' index labels; per attack
            boolean arrays ``train``/``control``), for paired estimates (crossfit.py).

    Returns:
        ``{"status": "ok", "method", "n_attacks", "aux_columns", "secrets",
        "singling_out": {...}, "linkability": {...}, "inference": {secret: {...}},
        "inference_max": float}``; every risk has ``value``, ``ci``, the attack, control and
        baseline rates; or ``{"status": "skipped", "reason"}``.
    """
    if len(control) < 2 or len(train) < 2 or len(synthetic) < 2:
        return {"status": "skipped", "reason": "needs at least 2 training, 2 control and 2 "
                                               "synthetic rows"}
    sdtypes = sdtypes_from_metadata(train, metadata)
    cols = [c for c in train.columns if c in synthetic.columns and c in control.columns
            and sdtypes.get(c) in ("numerical", "datetime", "categorical", "boolean")]
    demo, flags = default_columns(train, cols)
    aux = [c for c in (aux_columns or demo + flags) if c in cols]
    secrets = [c for c in (secrets or flags[:5]) if c in cols]
    n = int(n_attacks or 500)
    rs = np.random.default_rng(seed)
    # as many targets as each set allows (up to n): the training rate is then the more
    # precise one; both are rates, so the sets need not be of one size
    tr_t = train.iloc[np.sort(rs.choice(len(train), min(n, len(train)), replace=False))]
    ct_t = control.iloc[np.sort(rs.choice(len(control), min(n, len(control)), replace=False))]
    out: dict[str, Any] = {
        "status": "ok", "method": "synthport (Anonymeter's attacks, numpy)", "n_attacks": n,
        "aux_columns": aux, "secrets": secrets, "confidence": confidence}
    out["singling_out"] = singling_out(train, synthetic, control, columns=cols, sdtypes=sdtypes,
                                       n_attacks=n, seed=seed, confidence=confidence)
    out["targets"] = {"train": len(tr_t), "control": len(ct_t)}
    kept: dict[str, Any] = {"train_index": list(tr_t.index), "control_index": list(ct_t.index),
                            "inference": {}}
    if keep_outcomes:
        out["outcomes"] = kept
    if aux:
        space = _Space([train, synthetic, control], aux, sdtypes)
        enc = {k: space.encode(d[aux]) for k, d in (("tr", tr_t), ("ct", ct_t), ("sy", synthetic))}
        # the attacker's two sources: demographics and diagnoses, else two halves
        a_cols = [c for c in aux if c in demo]
        if not a_cols or len(a_cols) == len(aux):
            a_cols = aux[:max(1, len(aux) // 2)]
        b_cols = [c for c in aux if c not in a_cols] or a_cols

        def sel(names):
            return (np.array([space.num.index(c) for c in names if c in space.num], dtype=np.int64),
                    np.array([space.cat.index(c) for c in names if c in space.cat], dtype=np.int64))

        kept["linkability"] = {}
        link = linkability(enc["tr"], enc["ct"], enc["sy"], n_neighbors, seed, confidence,
                           sel(a_cols), sel(b_cols), outcomes=kept["linkability"])
        link["aux_columns"] = [a_cols, b_cols]
        out["linkability"] = link
        inf = {}
        for s in secrets:
            known = [c for c in aux if c != s]
            if not known:
                continue
            sp = _Space([train, synthetic, control], known, sdtypes)
            e = {k: sp.encode(d[known]) for k, d in (("tr", tr_t), ("ct", ct_t), ("sy", synthetic))}
            numeric = sdtypes.get(s) in ("numerical", "datetime")

            def vals(df):
                if numeric:
                    return numeric_array(df[s])
                return np.asarray(df[s].astype(object).where(df[s].notna(), None).map(
                    lambda v: None if v is None else str(v)).tolist(), dtype=object)

            kept["inference"][s] = {}
            inf[s] = inference(e["tr"], e["ct"], e["sy"], vals(tr_t), vals(ct_t), vals(synthetic),
                               numeric, seed, confidence, outcomes=kept["inference"][s])
        out["inference"] = inf
        vals_ = [v["value"] for v in inf.values() if not math.isnan(v["value"])]
        out["inference_max"] = max(vals_) if vals_ else math.nan
    else:
        out["linkability"] = {"status": "skipped", "reason": "no auxiliary columns"}
        out["inference"] = {}
        out["inference_max"] = math.nan
    return out


__all__ = ["privacy_risks", "success_rate", "residual_risk", "singling_out", "default_columns"]
