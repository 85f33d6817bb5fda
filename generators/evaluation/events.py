"""Event-sequence statistics, real vs synthetic event tables (see docs/generators.md).

Scores in [0, 1], 1 = identical: ``ks_complement`` = 1 - Kolmogorov-Smirnov statistic
(as SDMetrics' KSComplement), ``tv_complement`` = 1 - total-variation distance.
Order constraints are counts (``generators.events.constraints.order_violations``); the
generator's output must have none.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from generators.events.constraints import (
    learn_dependencies, order_violations, patient_consistency, sort_events,
)


def ks_complement(a, b) -> float:
    """1 - two-sample Kolmogorov-Smirnov statistic (NaN when either side is empty)."""
    a = np.sort(np.asarray(a, float)[~np.isnan(np.asarray(a, float))])
    b = np.sort(np.asarray(b, float)[~np.isnan(np.asarray(b, float))])
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    x = np.concatenate([a, b])
    fa = np.searchsorted(a, x, side="right") / len(a)
    fb = np.searchsorted(b, x, side="right") / len(b)
    return float(1.0 - np.max(np.abs(fa - fb)))


def tv_complement(p: pd.Series, q: pd.Series) -> float:
    """1 - total-variation distance of two frequency tables (normalised here)."""
    idx = p.index.union(q.index)
    p = p.reindex(idx, fill_value=0).astype(float)
    q = q.reindex(idx, fill_value=0).astype(float)
    if p.sum() == 0 or q.sum() == 0:
        return float("nan")
    return float(1.0 - 0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def events_per_patient(events: pd.DataFrame, patients: pd.Series | None = None) -> pd.Series:
    """Number of events of each patient (0 for listed patients without events)."""
    n = events.groupby(events["patient_id"].astype(str), observed=True).size()
    if patients is not None:
        n = n.reindex(pd.Index(patients.astype(str)), fill_value=0)
    return n


def time_gaps(events: pd.DataFrame) -> np.ndarray:
    """Days between consecutive events of the same patient (sequence order)."""
    ev = sort_events(events)
    t = ev["t_days"].to_numpy(float)
    pid = ev["patient_id"].astype(str).to_numpy()
    same = pid[1:] == pid[:-1]
    return np.diff(t)[same]


def code_prevalence(events: pd.DataFrame, n_patients: int | None = None) -> pd.DataFrame:
    """Share of patients with each (kind, system, code)."""
    n = n_patients or events["patient_id"].nunique()
    ev = events.assign(system=events["system"].astype(object).fillna(""),
                       code=events["code"].astype(object).fillna(""))
    prev = ev.groupby(["kind", "system", "code"], observed=True)["patient_id"].nunique() / max(n, 1)
    return prev.rename("prevalence").reset_index()


def event_statistics(real: pd.DataFrame, synthetic: pd.DataFrame,
                     real_patients: pd.DataFrame | None = None,
                     synthetic_patients: pd.DataFrame | None = None,
                     min_dependency_support: int = 3,
                     dependencies: list[dict] | None = None) -> dict:
    """The event-sequence part of the evaluation report.

    Args:
        real: real event table.
        synthetic: generated event table.
        real_patients: patient table of ``real`` (counts patients without events).
        synthetic_patients: patient table the synthetic events were generated for (bounds
            and condition flags are checked against it).
        min_dependency_support: as in ``learn_dependencies``.
        dependencies: the rules the generator learned from its training data
            (``EventModel.meta["dependencies"]``); its output must break none. Without
            them the rules are learned from ``real``; with them, breaks of rules learned
            from ``real`` are reported apart (``real_rules_broken``: a held-out table
            yields rules that merely happen to hold in few patients).

    Returns:
        A JSON-able dict.
    """
    from generators.events.constraints import patient_ids

    rp = patient_ids(real_patients) if real_patients is not None else None
    sp = patient_ids(synthetic_patients) if synthetic_patients is not None else None
    n_real = events_per_patient(real, rp)
    n_syn = events_per_patient(synthetic, sp)
    per_kind = {}
    for kind in sorted(set(real["kind"].astype(str)) | set(synthetic["kind"].astype(str))):
        a = events_per_patient(real[real["kind"].astype(str) == kind], rp if rp is not None
                               else pd.Series(n_real.index))
        b = events_per_patient(synthetic[synthetic["kind"].astype(str) == kind], sp if sp is not None
                               else pd.Series(n_syn.index))
        per_kind[kind] = {"real_mean": float(a.mean()), "synthetic_mean": float(b.mean()),
                          "ks_complement": ks_complement(a, b)}
    g_real, g_syn = time_gaps(real), time_gaps(synthetic)

    prev_r = code_prevalence(real, len(n_real))
    prev_s = code_prevalence(synthetic, len(n_syn))
    prev = prev_r.merge(prev_s, on=["kind", "system", "code"], how="outer",
                        suffixes=("_real", "_synthetic")).fillna({"prevalence_real": 0.0,
                                                                  "prevalence_synthetic": 0.0})
    prevalence = {}
    for kind, g in prev.groupby("kind", observed=True):
        d = (g["prevalence_real"] - g["prevalence_synthetic"]).abs()
        corr = (float(np.corrcoef(g["prevalence_real"], g["prevalence_synthetic"])[0, 1])
                if len(g) > 1 and g["prevalence_real"].std() > 0 and g["prevalence_synthetic"].std() > 0
                else float("nan"))
        fr = real[real["kind"].astype(str) == kind].groupby(["system", "code"], observed=True).size()
        fs = synthetic[synthetic["kind"].astype(str) == kind].groupby(["system", "code"], observed=True).size()
        prevalence[str(kind)] = {"codes": int(len(g)), "mean_abs_diff": float(d.mean()),
                                 "max_abs_diff": float(d.max()), "correlation": corr,
                                 "frequency_tv_complement": tv_complement(fr, fs)}

    values = []
    obs_r = real[(real["kind"].astype(str) == "observation") & real["value_num"].notna()]
    obs_s = synthetic[(synthetic["kind"].astype(str) == "observation") & synthetic["value_num"].notna()]
    vs = {k: g["value_num"].to_numpy(float) for k, g in obs_s.groupby("code", observed=True)}
    for code, g in obs_r.groupby("code", observed=True):
        if code in vs and len(g) >= 5:
            values.append(ks_complement(g["value_num"].to_numpy(float), vs[code]))

    real_deps = learn_dependencies(real, min_dependency_support)
    deps = real_deps if dependencies is None else dependencies
    report = {
        "events_per_patient": {
            "real_mean": float(n_real.mean()), "synthetic_mean": float(n_syn.mean()),
            "real_median": float(n_real.median()), "synthetic_median": float(n_syn.median()),
            "ks_complement": ks_complement(n_real, n_syn)},
        "events_per_patient_by_kind": per_kind,
        "time_gaps": {
            "ks_complement": ks_complement(g_real, g_syn),
            "real_median_days": float(np.median(g_real)) if len(g_real) else float("nan"),
            "synthetic_median_days": float(np.median(g_syn)) if len(g_syn) else float("nan"),
            "real_same_instant_share": float(np.mean(g_real < 1e-6)) if len(g_real) else float("nan"),
            "synthetic_same_instant_share": float(np.mean(g_syn < 1e-6)) if len(g_syn) else float("nan")},
        "code_prevalence": prevalence,
        "observation_values": {"codes": len(values),
                               "mean_ks_complement": float(np.mean(values)) if values else float("nan")},
        "dependencies_checked": len(deps),
        "order_constraints_violated": order_violations(synthetic, synthetic_patients, deps),
        # The real table's rows need not be in time order: it is checked in sequence order.
        "order_constraints_violated_real": order_violations(sort_events(real), real_patients, deps),
    }
    if dependencies is not None:
        report["real_rules_broken"] = {
            "rules": len(real_deps),
            "broken": order_violations(synthetic, None, real_deps)["dependency"]}
    if synthetic_patients is not None:
        report["patient_consistency"] = patient_consistency(synthetic_patients, synthetic)
    return report
