"""The sections of a model's evaluation report, computed from tables (no store, no files).

``table_section`` scores one generated patient table (synthport's model or a baseline)
against the training rows and the real hold-out: fidelity (the Quality Report), privacy
(exact copies, distance to closest record, attack risks) and utility (TSTR vs TRTR).
``event_section`` compares generated event sequences with the real ones. Everything
returned is JSON-able; ``plot`` entries carry the (small) data the HTML page draws.
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping

import numpy as np
import pandas as pd

from generators.evaluation.fidelity import quality_report
from generators.evaluation.privacy import (anonymeter_risks, dcr_distances,
                                           distance_to_closest_record, exact_copies)

MAX_PAIR_DETAILS = 200
TOP_CODES = 30


def pick_target(train: pd.DataFrame, wanted: str | None = None) -> str | None:
    """The binary column TSTR predicts: ``wanted``, else the ``cond_*`` flag whose
    training prevalence is nearest 40 % (within 10-90 %)."""
    if wanted:
        return wanted if wanted in train.columns else None
    best, score = None, math.inf
    for c in train.columns:
        if c.startswith("cond_") and not c.endswith("_age"):
            v = pd.to_numeric(train[c], errors="coerce")
            if v.dropna().nunique() != 2:
                continue
            p = float((v == v.max()).mean())
            if 0.1 <= p <= 0.9 and abs(p - 0.4) < score:
                best, score = c, abs(p - 0.4)
    return best


def histogram(a, b, bins: int = 24, log: bool = False) -> dict[str, Any]:
    """Shared-edge histograms of two samples, as shares (for the page's plots)."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if log:
        a, b = np.log10(1.0 + np.clip(a, 0, None)), np.log10(1.0 + np.clip(b, 0, None))
    both = np.concatenate([a, b])
    if not len(both):
        return {"edges": [], "a": [], "b": [], "log": log}
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    ha = np.histogram(a, edges)[0] / max(len(a), 1)
    hb = np.histogram(b, edges)[0] / max(len(b), 1)
    return {"edges": [round(float(e), 6) for e in edges], "a": [round(float(x), 6) for x in ha],
            "b": [round(float(x), 6) for x in hb], "log": log}


def _finite(x):
    """JSON-able: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def clean(report: Any) -> Any:
    """The report with NaN as null and numpy scalars as Python values (strict JSON)."""
    return _finite(report)


def table_section(train: pd.DataFrame, holdout: pd.DataFrame | None, synthetic: pd.DataFrame,
                  metadata: Mapping | None = None, *, target: str | None = None,
                  seed: int = 0, risks: bool = True, run_anonymeter: bool = True,
                  reference_quality: bool = True) -> dict:
    """Fidelity, privacy and utility of one generated patient table.

    Args:
        train: the generator's training rows (``patient_id`` index or column is ignored).
        holdout: real rows the generator never saw (None: privacy comparisons and
            utility are skipped with a note).
        synthetic: the generated rows.
        metadata: column kinds.
        target: TSTR's binary column (default: ``pick_target``).
        seed: of the attack sampling.
        risks: run the attack risk estimates.
        run_anonymeter: also run the anonymeter package when it is installed.
        reference_quality: also score the hold-out against the training rows.
    """
    t0 = time.perf_counter()
    train = train.reset_index(drop=True)
    synthetic = synthetic.reset_index(drop=True)
    cols = [c for c in train.columns if c in synthetic.columns and c != "patient_id"]
    train, synthetic = train[cols], synthetic[cols]
    if holdout is not None:
        holdout = holdout.reset_index(drop=True)[cols] if len(holdout) else None
    out: dict[str, Any] = {"rows": {"train": len(train), "synthetic": len(synthetic),
                                    "holdout": 0 if holdout is None else len(holdout)},
                           "columns": len(cols)}

    q = quality_report(train, synthetic, metadata)
    pairs = [p for p in q["column_pair_trends"]["details"] if p["meets_threshold"]]
    pairs.sort(key=lambda p: (p["score"] if p["score"] == p["score"] else -1.0))
    fid: dict[str, Any] = {
        "quality": q["score"], "column_shapes": q["column_shapes"]["score"],
        "column_pair_trends": q["column_pair_trends"]["score"],
        "pairs_counted": q["column_pair_trends"]["pairs_counted"],
        "thresholds": q["thresholds"],
        "column_shapes_details": q["column_shapes"]["details"],
        "worst_pairs": pairs[:MAX_PAIR_DETAILS],
    }
    if reference_quality and holdout is not None and len(holdout) >= 2:
        # what a fresh real sample scores against the training rows: the ceiling that
        # sampling noise leaves at this size
        qh = quality_report(train, holdout, metadata)
        fid["holdout_vs_train_quality"] = qh["score"]
    out["fidelity"] = fid

    priv: dict[str, Any] = {"exact_copies": exact_copies(train, synthetic)}
    if holdout is not None and len(holdout) >= 2:
        priv["holdout_exact_copies"] = exact_copies(train, holdout)
        priv["dcr"] = distance_to_closest_record(train, synthetic, holdout, metadata)
        d_syn, d_ho, _ = dcr_distances(train, synthetic, holdout, metadata)
        priv["dcr"]["plot"] = histogram(d_syn, d_ho)
        if risks:
            from generators.evaluation.risks import privacy_risks

            priv["risks"] = privacy_risks(train, synthetic, holdout, metadata, seed=seed)
            if run_anonymeter:
                a = anonymeter_risks(train, synthetic, holdout)
                if a.get("status") == "ok":
                    priv["anonymeter"] = a
                else:
                    priv["anonymeter"] = {"status": "skipped: package not installed",
                                          "reason": a.get("reason")}
    else:
        priv["note"] = "no hold-out: DCR and attack risks need real rows never trained on"
    out["privacy"] = priv

    util: dict[str, Any] = {}
    tgt = pick_target(train, target)
    if holdout is None or len(holdout) < 2:
        util = {"status": "skipped", "reason": "no hold-out to test on"}
    elif tgt is None:
        util = {"status": "skipped", "reason": "no binary condition flag with 10-90 % prevalence"}
    else:
        try:
            from generators.evaluation.utility import tstr

            util = {"status": "ok", "target": tgt}
            for kind in ("logistic", "gbm"):
                util[kind] = tstr(train, synthetic, holdout, tgt, model=kind, metadata=metadata)
        except ImportError:
            util = {"status": "skipped", "reason": "scikit-learn is not installed"}
        except ValueError as exc:     # e.g. a single class in a set
            util = {"status": "failed", "reason": str(exc)}
    out["utility"] = util
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def code_prevalence_table(real: pd.DataFrame, synthetic: pd.DataFrame, n_real: int, n_syn: int,
                          holdout: pd.DataFrame | None = None, n_holdout: int = 0,
                          displays: Mapping | None = None, top: int = TOP_CODES) -> dict:
    """Share of patients with each code, real (training) vs synthetic (and hold-out).

    Returns:
        ``{"top": [{kind, system, code, display, real, synthetic, holdout}], "plot":
        {"real": [...], "synthetic": [...]}, "correlation", "mean_abs_diff", "codes"}``.
    """
    from generators.evaluation.events import code_prevalence

    key = ["kind", "system", "code"]
    pr = code_prevalence(real, n_real).rename(columns={"prevalence": "real"})
    ps = code_prevalence(synthetic, n_syn).rename(columns={"prevalence": "synthetic"})
    df = pr.merge(ps, on=key, how="outer")
    if holdout is not None and n_holdout:
        ph = code_prevalence(holdout, n_holdout).rename(columns={"prevalence": "holdout"})
        df = df.merge(ph, on=key, how="left")
    df = df.fillna({"real": 0.0, "synthetic": 0.0})
    df = df.sort_values(["real", "synthetic"], ascending=False, kind="stable")
    displays = displays or {}

    def disp(system, code):
        return (displays.get(system) or {}).get(code)

    top_rows = []
    for r in df.head(top).itertuples(index=False):
        row = {"kind": str(r.kind), "system": str(r.system), "code": str(r.code),
               "display": disp(str(r.system), str(r.code)),
               "real": float(r.real), "synthetic": float(r.synthetic)}
        if "holdout" in df.columns:
            h = getattr(r, "holdout")
            row["holdout"] = None if h != h else float(h)
        top_rows.append(row)
    corr = (float(np.corrcoef(df["real"], df["synthetic"])[0, 1])
            if len(df) > 1 and df["real"].std() > 0 and df["synthetic"].std() > 0 else math.nan)
    sub = df.head(500)
    return {"codes": int(len(df)), "correlation": corr,
            "mean_abs_diff": float((df["real"] - df["synthetic"]).abs().mean()) if len(df) else math.nan,
            "top": top_rows,
            "plot": {"real": [round(float(x), 5) for x in sub["real"]],
                     "synthetic": [round(float(x), 5) for x in sub["synthetic"]]}}


def event_section(real_events: pd.DataFrame, real_patients: pd.DataFrame,
                  syn_events: pd.DataFrame, syn_patients: pd.DataFrame, *,
                  dependencies: list | None = None, holdout_events: pd.DataFrame | None = None,
                  n_holdout: int = 0, displays: Mapping | None = None) -> dict:
    """Event-sequence statistics (incl. order violations, which must be 0) and code
    prevalence, real training events vs the events generated for ``syn_patients``."""
    from generators.evaluation.events import event_statistics, events_per_patient, time_gaps
    from generators.events.constraints import patient_ids

    t0 = time.perf_counter()
    stats = event_statistics(real_events, syn_events, real_patients, syn_patients,
                             dependencies=dependencies)
    viol = stats["order_constraints_violated"]
    stats["order_violations_total"] = int(viol["total"] if "total" in viol else sum(viol.values()))
    stats["prevalence"] = code_prevalence_table(
        real_events, syn_events, len(real_patients), len(syn_patients), holdout_events, n_holdout,
        displays)
    stats["plot"] = {
        "events_per_patient": histogram(events_per_patient(real_events, patient_ids(real_patients)),
                                        events_per_patient(syn_events, patient_ids(syn_patients)),
                                        log=True),
        "time_gaps_days": histogram(time_gaps(real_events), time_gaps(syn_events), log=True),
    }
    stats["rows"] = {"real_patients": len(real_patients), "real_events": len(real_events),
                     "synthetic_patients": len(syn_patients), "synthetic_events": len(syn_events)}
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


__all__ = ["table_section", "event_section", "code_prevalence_table", "pick_target", "clean",
           "histogram"]
