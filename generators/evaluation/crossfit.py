"""Cross-fitted privacy risks: every real patient is a control once.

With one hold-out split, the control set is small (40 patients of 200) and the
Anonymeter-style risk ``(rate_train - rate_control) / (1 - rate_control)`` inherits the
noise of a rate over 40 attacks: a 95 % interval about ±0.27 wide for an inference secret
near 50 % prevalence, and the largest of several such estimates sits well above zero even
when nothing leaks. Cross-fitting (as in K-fold cross-validation) measures the same
quantity, the risk of *the training procedure with these settings on this population*,
with every patient attacked: the real table is split into ``folds`` parts; for each part a
generator is fitted on the other parts, sampled, and attacked with that part as the
control set and its own training rows as targets (:func:`risks.privacy_risks`, same
auxiliary and secret columns in every fold). The successes and attempts of the folds are
summed before the risk and its interval are computed (:func:`pool`), so the control rate
rests on every real patient instead of a fifth of them.

Paired estimate: each patient is attacked as a control once per pass (by the generator
that did not see it) and as a training target ``folds - 1`` times (by the generators that
did).
:func:`paired` compares the two per patient, ``mean_i(target_i) - mean_i(control_i)``
over ``1 - mean_i(control_i)``, with a bootstrap interval over patients. How guessable a
patient is (a typical one is easy, an unusual one hard) then cancels out of the
difference instead of adding to its noise, which is what the unpaired rates of
:func:`pool` cannot do. Reported beside the pooled estimate, for linkability and for
each inference secret (singling-out predicates are not per patient).

Repeated cross-fitting (``repeats`` R > 1): the K-fold split is drawn R times, so each
patient is a control R times and a target R (K - 1) times, against different generators.
The generators' own randomness (initialisation, dropout, sampling) then averages out of
both rates; the population does not change, so the pooled interval is computed from the
counts divided by R (the attacks of one pass over the population: averaging repeats does
not make the sample bigger) and the paired bootstrap still resamples patients.

What it does not measure: the served model itself (trained on the hold-out split, not on
these folds) — it is one more draw of the same procedure, on 80 % of the population as
each fold model is.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from generators.evaluation.fidelity import sdtypes_from_metadata
from generators.evaluation.risks import (_result, default_columns, privacy_risks, residual_risk,
                                         success_rate)

#: ``fit_sample(train, n, seed)`` -> ``n`` synthetic rows of a generator fitted on ``train``.
FitSample = Callable[[pd.DataFrame, int, int], pd.DataFrame]

_COUNTS = ("n_attacks", "successes", "n_control_attacks", "control_successes",
           "n_baseline_attacks", "baseline_successes")


def pool(parts: Sequence[dict], confidence: float = 0.95, repeats: int = 1) -> dict[str, Any]:
    """One risk from several results of the same attack: counts summed, then the risk
    and its interval computed as for a single run. Results without counts are skipped.

    With ``repeats`` > 1 the parts are that many passes over the same patients: the rates
    are those of the summed counts, the interval that of the counts divided by
    ``repeats`` (one pass's worth of attacks, not an R times larger sample)."""
    tot = dict.fromkeys(_COUNTS, 0)
    used = 0
    for p in parts:
        if not all(k in p for k in _COUNTS):
            continue
        used += 1
        for k in _COUNTS:
            tot[k] += int(p[k])
    if not used:
        return {"value": math.nan, "ci": [math.nan, math.nan], "folds_used": 0}
    out = _result(tot["n_attacks"], tot["successes"], tot["n_control_attacks"],
                  tot["control_successes"], tot["n_baseline_attacks"], tot["baseline_successes"],
                  confidence)
    if repeats > 1:
        rate = {k: v / repeats for k, v in tot.items()}
        r = residual_risk(success_rate(rate["successes"], rate["n_attacks"], confidence),
                          success_rate(rate["control_successes"], rate["n_control_attacks"],
                                       confidence))
        out.update(value=r["value"], ci=r["ci"], repeats=repeats)
    out["folds_used"] = used
    return out


def paired(runs: Sequence[dict], attack: str, secret: str | None = None, *, seed: int = 0,
           n_boot: int = 2000, confidence: float = 0.95) -> dict[str, Any]:
    """Paired residual risk of one attack from the ``outcomes`` of cross-fitted runs.

    Args:
        runs: :func:`risks.privacy_risks` results made with ``keep_outcomes=True``.
        attack: ``"linkability"`` or ``"inference"``.
        secret: the inference secret.
        seed: the bootstrap's.
        n_boot: bootstrap resamples of the patients.
        confidence: level of the percentile interval.

    Returns:
        ``{"value", "ci", "target_rate", "control_rate", "n_patients"}``; ``value`` is
        clipped to [0, 1], the interval is not.
    """
    targets: dict[Any, list[float]] = {}
    controls: dict[Any, list[float]] = {}
    for r in runs:
        o = r.get("outcomes") or {}
        got = o.get(attack) or {}
        if secret is not None:
            got = got.get(secret) or {}
        if "train" not in got:
            continue
        for key, v in zip(o["train_index"], got["train"]):
            targets.setdefault(key, []).append(float(v))
        for key, v in zip(o["control_index"], got["control"]):
            controls.setdefault(key, []).append(float(v))
    keys = [k for k in controls if targets.get(k)]
    if len(keys) < 2:
        return {"value": math.nan, "ci": [math.nan, math.nan], "n_patients": len(keys)}
    t = np.array([np.mean(targets[k]) for k in keys])
    c = np.array([np.mean(controls[k]) for k in keys])

    def risk(tt: np.ndarray, cc: np.ndarray) -> float:
        cm = cc.mean()
        return (tt.mean() - cm) / (1.0 - cm) if cm < 1.0 else math.nan

    r0 = risk(t, c)
    rs = np.random.default_rng(seed)
    idx = rs.integers(len(keys), size=(n_boot, len(keys)))
    boots = np.array([risk(t[i], c[i]) for i in idx])
    boots = boots[~np.isnan(boots)]
    lo, hi = (np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2]) if len(boots)
              else (math.nan, math.nan))
    return {"value": float(min(max(r0, 0.0), 1.0)) if not math.isnan(r0) else math.nan,
            "ci": [float(lo), float(hi)], "target_rate": float(t.mean()),
            "control_rate": float(c.mean()), "n_patients": len(keys)}


def crossfit_risks(real: pd.DataFrame, fit_sample: FitSample, metadata=None, *, folds: int = 5,
                   repeats: int = 1, seed: int = 0, n_attacks: int | None = None,
                   confidence: float = 0.95,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Singling-out, linkability and inference risks pooled over ``folds`` fits.

    Args:
        real: every real row available (training and hold-out patients together).
        fit_sample: fits a generator on a training part and samples from it.
        metadata: column kinds (``fidelity.sdtypes_from_metadata``).
        folds: number of parts (at least 2); each real row is a control exactly once.
        repeats: passes, each with its own random split (the first is ``seed``'s); each
            real row is a control once per pass.
        seed: the split, the generators' seeds (``seed + repeat * folds + fold``) and the
            attacks.
        n_attacks: as in :func:`risks.privacy_risks`, per fold.
        confidence: level of the intervals.
        progress: called with a line per fold.

    Returns:
        ``{"status": "ok", "method", "folds", "rows", "aux_columns", "secrets",
        "singling_out", "linkability", "inference": {secret: {...}}, "inference_max",
        "paired": {"linkability", "inference": {secret: {...}}, "inference_max"},
        "per_fold": [{"repeat", "fold", "inference_max", "singling_out", "linkability"},
        ...]}``, every pooled risk with ``value``, ``ci`` and the summed counts; or
        ``{"status": "skipped", "reason"}``.
    """
    folds, repeats = int(folds), int(repeats)
    if folds < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    if repeats < 1:
        raise ValueError("cross-fitting needs at least 1 repeat")
    if len(real) < 2 * folds:
        return {"status": "skipped", "reason": f"needs at least {2 * folds} real rows for "
                                               f"{folds} folds, has {len(real)}"}
    sdtypes = sdtypes_from_metadata(real, metadata)
    cols = [c for c in real.columns
            if sdtypes.get(c) in ("numerical", "datetime", "categorical", "boolean")]
    demo, flags = default_columns(real, cols)
    aux, secrets = demo + flags, flags[:5]
    runs, where = [], []
    for rep in range(repeats):
        # the first pass draws the split of a single cross-fit with this seed
        order = np.random.default_rng(seed if rep == 0 else [seed, rep]).permutation(len(real))
        parts = np.array_split(order, folds)
        for k, ctl_idx in enumerate(parts):
            train_idx = np.sort(np.concatenate([p for j, p in enumerate(parts) if j != k]))
            train, control = real.iloc[train_idx], real.iloc[np.sort(ctl_idx)]
            s_k = seed + rep * folds + k
            syn = fit_sample(train, len(train), s_k)
            r = privacy_risks(train, syn, control, metadata, n_attacks=n_attacks,
                              aux_columns=aux or None, secrets=secrets or None,
                              confidence=confidence, seed=s_k, keep_outcomes=True)
            if r.get("status") != "ok":
                return {"status": "skipped", "reason": f"repeat {rep}, fold {k}: {r.get('reason')}"}
            runs.append(r)
            where.append((rep, k))
            if progress:
                rp = f"repeat {rep + 1}/{repeats}, " if repeats > 1 else ""
                progress(f"privacy {rp}fold {k + 1}/{folds}: {len(train)} training rows, "
                         f"{len(control)} controls, inference max "
                         f"{r.get('inference_max', math.nan):.3f}")
    rp = f" x {repeats} repeated splits" if repeats > 1 else ""
    out: dict[str, Any] = {
        "status": "ok", "method": f"cross-fitted over {folds} folds{rp} (synthport, Anonymeter's "
                                  "attacks; counts pooled)",
        "folds": folds, "repeats": repeats, "rows": int(len(real)),
        "aux_columns": runs[0]["aux_columns"], "secrets": runs[0]["secrets"],
        "confidence": confidence}
    out["singling_out"] = pool([r["singling_out"] for r in runs], confidence, repeats)
    link = [r["linkability"] for r in runs]
    out["linkability"] = (pool(link, confidence, repeats) if all("value" in x for x in link)
                          else link[0])
    out["inference"] = {s: pool([r["inference"][s] for r in runs if s in r["inference"]],
                                confidence, repeats)
                        for s in out["secrets"]}
    vals = [v["value"] for v in out["inference"].values() if not math.isnan(v["value"])]
    out["inference_max"] = max(vals) if vals else math.nan
    out["paired"] = {
        "method": "per patient: success as a target (mean over the folds that trained on it) "
                  "minus success as a control; bootstrap over patients",
        "linkability": paired(runs, "linkability", seed=seed, confidence=confidence),
        "inference": {s: paired(runs, "inference", s, seed=seed, confidence=confidence)
                      for s in out["secrets"]}}
    pv = [v["value"] for v in out["paired"]["inference"].values() if not math.isnan(v["value"])]
    out["paired"]["inference_max"] = max(pv) if pv else math.nan
    out["per_fold"] = [{"repeat": rep, "fold": k, "inference_max": r.get("inference_max"),
                        "singling_out": r["singling_out"].get("value"),
                        "linkability": r["linkability"].get("value")}
                       for (rep, k), r in zip(where, runs)]
    return out


__all__ = ["crossfit_risks", "pool", "paired", "FitSample"]
