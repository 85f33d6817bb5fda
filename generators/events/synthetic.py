"""Small made-up patient and event tables in the shape of ``mappings`` output.

For tests and benchmarks only: encounters that contain condition onsets, medications
after the condition they treat, labs whose values depend on the patient's conditions,
recurring episodes with abatements, imaging studies, deaths.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .constraints import DAYS_PER_YEAR, EVENT_COLUMNS, sort_events

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"

HTN, DM, ASTHMA, SINUS = "38341003", "44054006", "195967001", "444814009"
COND_DISPLAY = {HTN: "Hypertension", DM: "Diabetes", ASTHMA: "Asthma", SINUS: "Viral sinusitis"}
MEDS = {HTN: ("314076", "lisinopril 10 MG Oral Tablet"), DM: ("860975", "metformin 500 MG Oral Tablet"),
        ASTHMA: ("895994", "fluticasone 0.11 MG/ACTUAT inhaler"),
        SINUS: ("308182", "Amoxicillin 250 MG Oral Capsule")}
REF_YEAR = 2025


def make_synthetic_tables(n_patients: int = 120, seed: int = 0, years: float = 5.0
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns (patients, events) for ``n_patients`` made-up patients."""
    rng = np.random.default_rng(seed)
    prow, ev = [], []
    for i in range(n_patients):
        pid = f"p{i:05d}"
        age = int(rng.integers(2, 90))
        ref = (age + rng.uniform(0.0, 0.99)) * DAYS_PER_YEAR
        deceased = bool(age > 60 and rng.random() < 0.15)
        start = max(0.0, ref - years * DAYS_PER_YEAR)
        conds = {}
        if age >= 25 and rng.random() < min(0.8, age / 90):
            conds[HTN] = rng.uniform(max(18.0, age - 30), ref / DAYS_PER_YEAR)
        if age >= 30 and rng.random() < min(0.5, age / 150):
            conds[DM] = rng.uniform(max(25.0, age - 20), ref / DAYS_PER_YEAR)
        if rng.random() < 0.12:
            conds[ASTHMA] = rng.uniform(1.0, min(15.0, ref / DAYS_PER_YEAR))
        episodes = sorted(rng.uniform(start, ref - 20, size=rng.integers(0, 3)).tolist()) \
            if ref - 20 > start else []
        if episodes:
            conds[SINUS] = episodes[0] / DAYS_PER_YEAR

        k = 0

        def add(kind, t, system, code, display, **kw):
            nonlocal k
            e = dict.fromkeys(EVENT_COLUMNS)
            e.update(patient_id=pid, event_id=f"{pid}-{k}", kind=kind, t_days=float(t), system=system,
                     code=code, display=display, value_num=np.nan, end_t_days=np.nan)
            e.update(kw)
            ev.append(e)
            k += 1
            return e["event_id"]

        def encounter(t, code, display, cls):
            return add("encounter", t, SNOMED, code, display, value_code=cls,
                       end_t_days=t + rng.uniform(45, 90) / 1440.0)

        # Long-standing conditions begin before the history window, outside any encounter.
        for c, a in conds.items():
            if c != SINUS and a * DAYS_PER_YEAR < start:
                add("condition_onset", a * DAYS_PER_YEAR, SNOMED, c, COND_DISPLAY[c])

        on_t = {c: a * DAYS_PER_YEAR for c, a in conds.items()}
        visits = [(t, "wellness") for t in np.arange(start + rng.uniform(0, 300), ref, 365.25)]
        visits += [(on_t[c], c) for c in (HTN, DM, ASTHMA) if c in on_t and on_t[c] >= start]
        visits += [(t, SINUS) for t in episodes]
        smoker = rng.random() < 0.2
        n_amb = n_well = 0
        last = {}
        for t, why in sorted(visits):
            if why == "wellness":
                n_well += 1
                e = encounter(t, "162673000", "General examination of patient", "AMB")
                h = 120 + 15 * (HTN in on_t and on_t[HTN] <= t) + rng.normal(0, 8)
                vals = [("8302-2", "Body Height", min(185.0, 60 + age * 6) + rng.normal(0, 5), "cm"),
                        ("29463-7", "Body Weight", min(85.0, 8 + age * 2.5) + rng.normal(0, 6), "kg"),
                        ("8480-6", "Systolic blood pressure", h, "mm[Hg]"),
                        ("8462-4", "Diastolic blood pressure", 0.6 * h + rng.normal(0, 5), "mm[Hg]")]
                if age >= 18:
                    a1c = 5.4 + 2.0 * (DM in on_t and on_t[DM] <= t) + rng.normal(0, 0.3)
                    vals.append(("4548-4", "Hemoglobin A1c", a1c, "%"))
                for code, disp, v, unit in vals:
                    add("observation", t, LOINC, code, disp, value_num=round(float(v), 1), unit=unit,
                        encounter_id=e)
                    last[code] = round(float(v), 1)
                add("observation", t, LOINC, "72166-2", "Tobacco smoking status",
                    value_code="449868002" if smoker else "266919005", encounter_id=e)
                add("immunization", t, CVX, "140", "Influenza, seasonal, injectable", encounter_id=e)
                if age >= 18:
                    add("diagnostic_report", t, LOINC, "57698-3", "Lipid panel", encounter_id=e)
                for c in (HTN, DM, ASTHMA):
                    if c in on_t and on_t[c] <= t:
                        add("medication", t, RXNORM, *MEDS[c], encounter_id=e)
                if ASTHMA in on_t and on_t[ASTHMA] <= t:
                    add("procedure", t + 0.01, SNOMED, "127783003", "Spirometry", encounter_id=e)
                    if rng.random() < 0.5:
                        add("imaging_study", t + 0.02, "http://dicom.nema.org/resources/ontology/DCM",
                            "DX", "Chest X-ray", modality="DX", body_site="51185008", encounter_id=e)
            else:
                n_amb += 1
                e = encounter(t, "185345009", "Encounter for symptom", "AMB")
                add("condition_onset", t, SNOMED, why, COND_DISPLAY[why], encounter_id=e)
                add("medication", t, RXNORM, *MEDS[why], encounter_id=e,
                    end_t_days=t + 10.0 if why == SINUS else np.nan)
                if why == SINUS:
                    add("condition_abatement", t + rng.uniform(7, 21), SNOMED, why, COND_DISPLAY[why])
        row = {"patient_id": pid, "sex": "F" if rng.random() < 0.5 else "M",
               "birth_year": REF_YEAR - age, "age": age, "deceased": deceased,
               "age_at_death": float(age) if deceased else np.nan,
               "enc_wellness": n_well, "enc_ambulatory": n_amb,
               "obs_4548-4_last": last.get("4548-4", np.nan), "obs_8480-6_last": last.get("8480-6", np.nan)}
        for c in (HTN, DM, ASTHMA, SINUS):
            row[f"cond_{c}"] = int(c in conds)
            row[f"cond_{c}_onset_age"] = round(conds[c], 3) if c in conds else np.nan
        prow.append(row)
    return pd.DataFrame(prow), sort_events(pd.DataFrame(ev, columns=EVENT_COLUMNS))
