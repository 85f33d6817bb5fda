"""Coherence rules shared by the event model (enforced while sampling) and the evaluation.

Everything here works on the two analysis tables of ``mappings``: the patient table
(one row per patient) and the event table (``patient_id, event_id, kind, t_days, ...``,
``t_days`` = days since birth).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

DAYS_PER_YEAR = 365.25

EVENT_COLUMNS = [
    "patient_id", "event_id", "kind", "t_days", "system", "code", "display",
    "value_num", "value_code", "unit", "encounter_id", "end_t_days", "modality", "body_site",
]

KINDS = [
    "encounter", "condition_onset", "observation", "diagnostic_report", "procedure",
    "medication", "immunization", "imaging_study", "condition_abatement",
]
# Order of kinds that share a timestamp: the encounter opens first (its events belong to
# it), onsets precede what treats or measures them, abatements close last.
KIND_RANK = {k: i for i, k in enumerate(KINDS)}

# Kinds whose first occurrence may be tied to a condition's onset (learned from data).
DEPENDENT_KINDS = (
    "observation", "diagnostic_report", "procedure", "medication", "immunization", "imaging_study",
)

_COND_COL = re.compile(r"^cond_(?P<code>.+)$")
_COND_SUFFIXES = ("_onset_age", "_onset_days", "_abatement_age", "_age", "_count", "_active")


def sort_events(events: pd.DataFrame) -> pd.DataFrame:
    """Events in sequence order: patient, time, kind rank, then code (stable)."""
    ev = events.copy()
    ev["_rank"] = ev["kind"].astype(object).map(KIND_RANK).fillna(len(KINDS)).astype(int)
    ev["_code"] = ev["code"].astype("string").fillna("")
    ev = ev.sort_values(["patient_id", "t_days", "_rank", "_code"], kind="mergesort")
    return ev.drop(columns=["_rank", "_code"]).reset_index(drop=True)


def patient_ids(patients: pd.DataFrame) -> pd.Series:
    """The ``patient_id`` of each row (column, else index), as strings."""
    if "patient_id" in patients.columns:
        return patients["patient_id"].astype(str).reset_index(drop=True)
    return pd.Series(patients.index.astype(str), name="patient_id")


def reference_days(patients) -> np.ndarray:
    """Last day (since birth) on which a patient may have events: death, else the reference age.

    Uses ``ref_t_days`` when the table has it; otherwise ``age_at_death`` (years) for
    deceased patients and ``age`` (years) for the others. Integer ages are read as
    completed years, so the bound is the end of that year of life. ``inf`` when unknown.

    Args:
        patients: a patient DataFrame, or a mapping column -> sequence of values.
    """
    frame = isinstance(patients, pd.DataFrame)
    cols = patients.columns if frame else patients.keys()
    n = len(patients) if frame else len(next(iter(patients.values()), ()))
    get = (lambda c: as_float(patients[c])) if frame else (lambda c: floats(patients[c]))
    if "ref_t_days" in cols:
        r = get("ref_t_days")
        return np.where(np.isnan(r), np.inf, r)
    ref = np.full(n, np.inf)
    if "age" in cols:
        age = get("age")
        ref = np.where(np.isnan(age), np.inf, _years_to_bound(age))
    if "age_at_death" in cols:
        dead = get("age_at_death")
        if "deceased" in cols:
            dead = np.where(get("deceased") > 0.5, dead, np.nan)
        ref = np.where(np.isnan(dead), ref, np.minimum(ref, _years_to_bound(dead)))
    return ref


def floats(values) -> np.ndarray:
    """A list of values as float64, NaN where missing or not a number."""
    out = np.empty(len(values))
    for i, v in enumerate(values):
        try:
            out[i] = np.nan if v is None or v is pd.NA else float(v)
        except (TypeError, ValueError):
            out[i] = np.nan
    return out


def as_float(s: pd.Series) -> np.ndarray:
    """A column as float64, NaN where missing or not a number."""
    try:
        return s.to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError):
        return pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _years_to_bound(years: np.ndarray) -> np.ndarray:
    years = np.asarray(years, float)
    whole = np.isfinite(years) & (np.abs(years - np.round(years)) < 1e-9)
    # A whole number of years is an age in completed years: the bound is that year's end.
    return np.where(whole, (years + 1.0) * DAYS_PER_YEAR - 1.0, years * DAYS_PER_YEAR)


@dataclass(frozen=True)
class ConditionColumn:
    """One ``cond_<code>`` flag of the patient table and its onset-age column, if any."""

    code: str
    flag: str
    onset_age: str | None


def condition_columns(patients: pd.DataFrame) -> list[ConditionColumn]:
    """The ``cond_<code>`` 0/1 columns (and ``cond_<code>_onset_age``) of a patient table."""
    cols = set(patients.columns)
    out = []
    for c in patients.columns:
        m = _COND_COL.match(str(c))
        if not m or any(str(c).endswith(s) for s in _COND_SUFFIXES) or m.group("code") == "other":
            continue
        vals = pd.to_numeric(patients[c], errors="coerce").dropna()
        if not vals.isin([0, 1]).all():  # a count ("cond_other"), not a 0/1 flag
            continue
        onset = f"{c}_onset_age"
        out.append(ConditionColumn(m.group("code"), c, onset if onset in cols else None))
    return out


def code_matches(column_code: str, system: str | None, code: str | None) -> bool:
    """Whether the code of a ``cond_<code>`` column names this (system, code)."""
    if code is None or (isinstance(code, float) and math.isnan(code)):
        return False
    code = str(code)
    if column_code == code:
        return True
    # Tolerate a system prefix in the column name ("sct_44054006", "SNOMED:44054006").
    return re.split(r"[_:|]", column_code)[-1] == code


def onset_window(onset_ages: pd.Series | np.ndarray) -> tuple[float, float]:
    """How far (days before, after) an onset may lie from ``onset_age`` and still match it.

    Whole-year onset ages are completed years (the onset lies within that year);
    fractional ones are read as exact, give or take a month.
    """
    a = pd.to_numeric(pd.Series(np.asarray(onset_ages).ravel()), errors="coerce").dropna().to_numpy()
    if len(a) and np.all(np.abs(a - np.round(a)) < 1e-9):
        return 0.0, DAYS_PER_YEAR
    return 31.0, 31.0


def learn_dependencies(events: pd.DataFrame, min_support: int = 3,
                       keys: tuple[str, ...] = ("kind", "system", "code")) -> list[dict]:
    """Pairs (event A, condition C) where, in every patient with A, C's onset came first.

    Args:
        events: event table.
        min_support: least number of patients with A for the rule to count.
        keys: columns that identify an event type A.

    Returns:
        ``[{"kind", "system", "code", "cond_system", "cond_code", "support"}]``.
    """
    ev = sort_events(events)
    ev["_pos"] = np.arange(len(ev))
    onsets = ev[ev["kind"] == "condition_onset"]
    first_on = onsets.groupby(["patient_id", "system", "code"], dropna=False,
                              observed=True)["_pos"].min()
    first_on = first_on.reset_index().rename(columns={"system": "cond_system", "code": "cond_code"})
    dep = ev[ev["kind"].isin(DEPENDENT_KINDS)]
    if dep.empty or first_on.empty:
        return []
    k = list(keys)
    first_a = (dep.groupby(["patient_id", *k], dropna=False, observed=True)["_pos"].min()
               .reset_index())
    support = (first_a.groupby(k, dropna=False, observed=True)["patient_id"].nunique()
               .rename("support").reset_index())
    support = support[support["support"] >= min_support]
    if support.empty:
        return []
    first_a = first_a.merge(support, on=k)
    pairs = first_a.merge(first_on, on="patient_id", suffixes=("", "_c"))
    pairs = pairs[pairs["_pos_c"] < pairs["_pos"]]
    cnt = pairs.groupby([*k, "cond_system", "cond_code", "support"], dropna=False,
                        observed=True)["patient_id"].nunique()
    cnt = cnt.rename("n").reset_index()
    rules = cnt[cnt["n"] == cnt["support"]]
    out = []
    for r in rules.itertuples(index=False):
        d = {c: _none(getattr(r, c)) for c in k}
        d.update(cond_system=_none(r.cond_system), cond_code=_none(r.cond_code), support=int(r.support))
        out.append(d)
    return out


def recurring_conditions(events: pd.DataFrame) -> list[tuple]:
    """(system, code) of conditions that begin again while still active (no abatement since).

    Any other condition is, in the training data, never re-entered while active, and the
    sampler keeps it so.
    """
    ev = sort_events(events[events["kind"].isin(["condition_onset", "condition_abatement"])])
    out = set()
    active: set = set()
    last = None
    for r in ev[["patient_id", "kind", "system", "code"]].itertuples(index=False):
        if r.patient_id != last:
            active, last = set(), r.patient_id
        key = (_none(r.system), _none(r.code))
        if r.kind == "condition_onset":
            if key in active:
                out.add(key)
            active.add(key)
        else:
            active.discard(key)
    return sorted(out, key=str)


def _none(v):
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    return v


def order_violations(events: pd.DataFrame, patients: pd.DataFrame | None = None,
                     dependencies: list[dict] | None = None,
                     keys: tuple[str, ...] = ("kind", "system", "code")) -> dict[str, int]:
    """Counts of broken order constraints in an event table, per rule.

    Rules: ``time_backwards`` (rows of a patient out of time order as given),
    ``end_before_start``, ``abatement_without_onset``, ``outside_encounter`` (an event with
    ``encounter_id`` outside that encounter's [t, end]), ``before_birth``,
    ``after_reference`` (after death or the reference age; needs ``patients``) and
    ``dependency`` (an event before the onset of a condition that always preceded it
    in the training data; needs ``dependencies``).
    """
    out = dict.fromkeys(
        ["time_backwards", "end_before_start", "abatement_without_onset", "outside_encounter",
         "before_birth", "after_reference", "dependency"], 0)
    if events.empty:
        out["total"] = 0
        return out
    ev = events.reset_index(drop=True)
    t = pd.to_numeric(ev["t_days"], errors="coerce").to_numpy(float)
    pid = ev["patient_id"].astype(str).to_numpy()
    same = np.r_[False, pid[1:] == pid[:-1]]
    out["time_backwards"] = int(np.sum(same & (np.r_[np.inf, t[:-1]] > t)))
    end = pd.to_numeric(ev["end_t_days"], errors="coerce").to_numpy(float)
    out["end_before_start"] = int(np.sum(end < t - 1e-9))
    out["before_birth"] = int(np.sum(t < 0))

    srt = sort_events(ev)
    srt["_pos"] = np.arange(len(srt))
    on = srt[srt["kind"] == "condition_onset"]
    ab = srt[srt["kind"] == "condition_abatement"]
    if len(ab):
        first_on = on.groupby(["patient_id", "system", "code"], dropna=False,
                              observed=True)["_pos"].min()
        m = ab.join(first_on.rename("_on"), on=["patient_id", "system", "code"])
        # An abatement at the very time of its onset still sorts after it (kind rank).
        out["abatement_without_onset"] = int(np.sum(~(m["_on"] < m["_pos"])))

    enc = srt[srt["kind"] == "encounter"][["event_id", "t_days", "end_t_days"]]
    member = srt[srt["encounter_id"].notna() & (srt["kind"] != "encounter")]
    if len(member) and len(enc):
        m = member.merge(enc, left_on="encounter_id", right_on="event_id", suffixes=("", "_enc"))
        lo = m["t_days_enc"].to_numpy(float)
        hi = pd.to_numeric(m["end_t_days_enc"], errors="coerce").to_numpy(float)
        tt = m["t_days"].to_numpy(float)
        out["outside_encounter"] = int(np.sum((tt < lo - 1e-9) | (~np.isnan(hi) & (tt > hi + 1e-9))))

    if patients is not None:
        ref = pd.Series(reference_days(patients), index=patient_ids(patients))
        r = ref.reindex(pid).to_numpy(float)
        out["after_reference"] = int(np.sum(~np.isnan(r) & (t > r + 1e-6)))

    if dependencies:
        k = list(keys)
        first_on = on.groupby(["patient_id", "system", "code"], dropna=False,
                              observed=True)["_pos"].min()
        first_on = first_on.rename("_on").reset_index().rename(
            columns={"system": "cond_system", "code": "cond_code"})
        rules = pd.DataFrame(dependencies)
        dep = srt[srt["kind"].isin(DEPENDENT_KINDS)]
        m = dep.merge(rules[[*k, "cond_system", "cond_code"]], on=k)
        if len(m):
            m = m.merge(first_on, on=["patient_id", "cond_system", "cond_code"], how="left")
            out["dependency"] = int(np.sum(~(m["_on"] < m["_pos"])))
    out["total"] = int(sum(out.values()))
    return out


def patient_consistency(patients: pd.DataFrame, events: pd.DataFrame) -> dict[str, int]:
    """Agreement of the patient table's condition flags with the events' condition onsets.

    Returns counts: ``missing_onset`` (flag 1, no onset), ``unexpected_onset`` (flag 0, an
    onset), ``onset_age_mismatch`` (first onset outside the window of ``onset_window``
    around ``cond_<code>_onset_age``) and ``checked`` (flags looked at).
    """
    out = {"missing_onset": 0, "unexpected_onset": 0, "onset_age_mismatch": 0, "checked": 0}
    cols = condition_columns(patients)
    if not cols:
        return out
    pids = patient_ids(patients)
    on = events[events["kind"] == "condition_onset"]
    f = on.groupby([on["patient_id"].astype(str), on["system"].astype(object).fillna(""),
                    on["code"].astype(object).fillna("")], sort=False,
                   observed=True)["t_days"].min()
    match: dict[tuple, list[str]] = {}
    first: dict[tuple, float] = {}
    for (pid, system, code), t in f.items():
        if (system, code) not in match:
            match[(system, code)] = [c.flag for c in cols if code_matches(c.code, system, code)]
        for flag in match[(system, code)]:
            first[(pid, flag)] = min(first.get((pid, flag), np.inf), float(t))
    ref = reference_days(patients)
    for c in cols:
        flags = pd.to_numeric(patients[c.flag], errors="coerce").fillna(0).to_numpy()
        ages = (pd.to_numeric(patients[c.onset_age], errors="coerce").to_numpy(float)
                if c.onset_age else np.full(len(patients), np.nan))
        before, after = onset_window(ages) if c.onset_age else (0.0, 0.0)
        for i, p in enumerate(pids):
            t = first.get((p, c.flag))
            out["checked"] += 1
            if flags[i] >= 0.5:
                if t is None:
                    out["missing_onset"] += 1
                elif not np.isnan(ages[i]):
                    target = min(max(ages[i] * DAYS_PER_YEAR, 0.0), ref[i])
                    if not (target - before - 1e-6 <= t <= target + after + 1e-6):
                        out["onset_age_mismatch"] += 1
            elif t is not None:
                out["unexpected_onset"] += 1
    return out
