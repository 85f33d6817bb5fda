"""A made-up patient table with health-like dependencies, for tests and benchmarks.

It has the shape that ``mappings`` produces (one row per patient) and the
dependencies a generator must keep: age drives conditions, conditions drive
medications, labs and encounters, an onset age exists exactly when the
condition does and never exceeds the age, ``age_at_death`` exists only for
deceased patients. Nothing here is real data.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

REF_YEAR = 2025

# (SNOMED CT code, base log-odds, log-odds per year of age above 50, typical onset age)
CONDITIONS = [
    ("44054006", -2.4, 0.05, 55),   # diabetes mellitus type 2
    ("38341003", -1.4, 0.06, 50),   # hypertension
    ("55822004", -1.8, 0.04, 48),   # hyperlipidaemia
    ("195967001", -2.2, -0.02, 12),  # asthma
    ("40055000", -3.2, 0.07, 65),   # chronic sinusitis -> used as a rarer chronic condition
    ("433144002", -2.6, 0.05, 60),  # chronic kidney disease stage 3
]


def make_health_table(n: int = 200, seed: int = 0, extra_conditions: int = 0) -> pd.DataFrame:
    """Build the table.

    Args:
        n: patients.
        seed: numpy seed.
        extra_conditions: further made-up conditions (flag + onset age + a medication
            count each, 3 columns per condition) to widen the table.

    Returns:
        DataFrame with a ``patient_id`` column.
    """
    r = np.random.default_rng(seed)
    age = np.clip(np.round(r.gamma(4.0, 11.0, n)), 0, 99).astype(int)
    birth_year = REF_YEAR - age
    sex = r.choice(np.array(["female", "male"], dtype=object), n, p=[0.52, 0.48])
    male = sex == "male"
    country = r.choice(np.array(["ES", "PT", "FR", "MA", "AD"], dtype=object), n,
                       p=[0.86, 0.06, 0.04, 0.03, 0.01])
    marital = np.where(age < 25, "S", r.choice(np.array(["M", "S", "D", "W"], dtype=object), n,
                                                 p=[0.58, 0.22, 0.12, 0.08]))
    marital = np.where((age > 75) & (r.random(n) < 0.35), "W", marital).astype(object)
    cols: dict[str, object] = {
        "patient_id": [f"p{i:05d}" for i in range(n)],
        "sex": sex, "birth_year": birth_year, "age": age, "marital_status": marital,
        "country": country,
    }
    flags = {}
    conds = CONDITIONS + [(f"99{k:04d}00", -2.8, 0.03, 40) for k in range(extra_conditions)]
    for code, b0, b_age, onset in conds:
        logit = b0 + b_age * (age - 50) + 0.25 * male
        if code == "44054006":
            logit = logit + 0.0
        if code == "433144002" and "44054006" in flags:
            logit = logit + 1.2 * flags["44054006"]
        if code == "38341003" and "44054006" in flags:
            logit = logit + 0.9 * flags["44054006"]
        has = (r.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
        flags[code] = has
        on = np.minimum(age, np.round(np.clip(r.normal(onset, 10, n), 0, None)))
        cols[f"cond_{code}"] = has
        cols[f"cond_{code}_onset_age"] = np.where(has == 1, on, np.nan)
    dm, htn, lip, asth, ckd = (flags[c] for c in ("44054006", "38341003", "55822004",
                                                   "195967001", "433144002"))
    cols["med_860975"] = np.where(dm == 1, r.poisson(8, n), 0)           # metformin fills
    cols["med_314076"] = np.where(htn == 1, r.poisson(6, n), r.poisson(0.1, n))  # lisinopril
    cols["med_617312"] = np.where(lip == 1, r.poisson(5, n), 0)          # atorvastatin
    cols["med_895994"] = np.where(asth == 1, r.poisson(3, n), 0)         # fluticasone inhaler
    for k in range(extra_conditions):
        code = conds[len(CONDITIONS) + k][0]
        cols[f"med_{code}1"] = np.where(flags[code] == 1, r.poisson(2, n), 0)
    hba1c = np.where(dm == 1, r.normal(7.6, 1.1, n), r.normal(5.4, 0.35, n))
    measured = (dm == 1) | (r.random(n) < 0.35)
    cols["obs_4548-4_last"] = np.where(measured, np.round(hba1c, 1), np.nan)
    bmi = r.normal(25 + 3.5 * dm + 0.03 * (age - 40), 4.0, n)
    cols["obs_39156-5_last"] = np.where(age >= 2, np.round(np.clip(bmi, 14, 60), 1), np.nan)
    sbp = r.normal(118 + 0.35 * (age - 40) + 16 * htn, 11, n)
    cols["obs_8480-6_mean"] = np.round(sbp, 1)
    chol = r.normal(185 + 35 * lip + 0.3 * (age - 40), 28, n)
    cols["obs_2093-3_last"] = np.where(r.random(n) < 0.8, np.round(chol), np.nan)
    egfr = np.clip(r.normal(100 - 0.7 * np.maximum(age - 30, 0) - 35 * ckd, 10, n), 5, 140)
    cols["obs_33914-3_last"] = np.round(egfr, 1)
    burden = dm + htn + lip + asth + ckd
    cols["enc_AMB"] = r.poisson(2 + 1.8 * burden + 0.03 * age)
    cols["enc_EMER"] = r.poisson(0.2 + 0.25 * burden + 0.3 * asth)
    cols["enc_IMP"] = r.poisson(0.05 + 0.2 * burden * (age > 60))
    cols["img_DX_chest"] = r.poisson(0.3 + 0.4 * asth + 0.01 * age)
    cols["img_US_abdomen"] = r.poisson(0.1 + 0.3 * ckd)
    p_dead = 1 / (1 + np.exp(-(-6 + 0.07 * age + 0.5 * burden)))
    dead = (r.random(n) < p_dead).astype(int)
    cols["deceased"] = dead
    cols["age_at_death"] = np.where(dead == 1, age, np.nan)
    return pd.DataFrame(cols)
