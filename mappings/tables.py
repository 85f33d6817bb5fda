"""Records -> patient table + event table, each with its column metadata.

Entry point: :func:`map_records`. Schemas and decisions are in docs/mappings.md; the
column names are a contract with ``generators/``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import gc
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from mappings.events import LOINC, EventExtractor, type_event_table
from mappings.spec import MappingSpec, load_spec

YEAR_DAYS = 365.25
_SAFE = re.compile(r"[^A-Za-z0-9.\-]")

# Domain -> (column prefix, event kind, code system used in metadata when the event has none)
DOMAIN_PREFIX = {"condition": "cond", "medication": "med", "procedure": "proc",
                 "observation": "obs", "encounter": "enc", "imaging": "img",
                 "immunization": "imm"}


def column_key(code: str) -> str:
    """A code as it appears in a column name (characters other than ``A-Za-z0-9.-`` -> ``_``)."""
    return _SAFE.sub("_", str(code))


@dataclass
class MappedTables:
    """The analysis tables of a set of records and their metadata.

    Attributes:
        patients: one row per patient, index ``patient_id``.
        events: one row per clinical event (columns ``EVENT_COLUMNS``).
        patient_meta: ``{"table": {...}, "columns": {name: {...}}}`` (JSON-serialisable).
        event_meta: the same for the event table, plus units and code displays.
    """

    patients: pd.DataFrame
    events: pd.DataFrame
    patient_meta: dict
    event_meta: dict
    skipped: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)   # CPU seconds per phase


# ---------------------------------------------------------------------------- units


def _ucum_convert() -> Callable[[float, str, str], float] | None:
    """``terminologies.ucum.convert``, imported lazily (None when not available)."""
    try:
        from terminologies import ucum
    except ImportError:  # pragma: no cover - terminologies is part of the package
        return None
    return ucum.convert


def normalise_units(events: pd.DataFrame, spec: MappingSpec) -> tuple[pd.DataFrame, dict]:
    """Convert numeric observation values to one unit per code (UCUM via terminologies).

    The target unit is the spec's ``units.loinc[code]`` or else the code's most frequent
    unit. Values whose unit cannot be converted (unknown unit, incommensurable dimensions)
    keep their own unit in the event table and are left out of the patient-table statistics.

    Returns:
        (events, units): ``units[code] = {"unit", "converted", "unconvertible"}``.
    """
    units: dict[str, dict] = {}
    mask = events["value_num"].notna() & events["unit"].notna() & (events["kind"] == "observation")
    if not mask.any():
        return events, units
    sub = events.loc[mask, ["code", "unit"]].astype("object")
    groups = sub.groupby(["code", "unit"], sort=True)
    counts = groups.size()
    positions = groups.indices           # (code, unit) -> positions in sub, ascending
    convert = _ucum_convert()
    new_units = events["unit"].astype("object").copy()
    new_vals = events["value_num"].copy()
    for code, grp in counts.groupby(level=0, sort=True):
        by_unit = {u: int(n) for (_, u), n in grp.items()}
        target = spec.units.loinc.get(code) or max(sorted(by_unit), key=lambda u: by_unit[u])
        info = {"unit": target, "converted": 0, "unconvertible": {}}
        for u, n in by_unit.items():
            if u == target:
                continue
            rows = sub.index[positions[(code, u)]]
            try:
                if convert is None:
                    raise NotImplementedError
                vals = [convert(float(v), u, target) for v in new_vals.loc[rows]]
            except Exception:  # noqa: BLE001 - UnitError, or UCUM support missing
                info["unconvertible"][u] = n
                continue
            new_vals.loc[rows] = vals
            new_units.loc[rows] = target
            info["converted"] += n
        units[code] = info
    # a shallow copy is enough: both columns are replaced, never written in place
    out = events.copy(deep=False)
    out["value_num"] = new_vals.astype("float64")
    out["unit"] = new_units
    return out, units


# ---------------------------------------------------------------------------- vocabulary


def select_vocabulary(pairs: pd.DataFrame, key: str, top_k: int, min_count: int) -> list[tuple[str, int]]:
    """The ``top_k`` keys by number of distinct patients, each with at least ``min_count``.

    Ties are broken by the key, so the choice is deterministic.
    """
    if pairs.empty or top_k <= 0:
        return []
    counts = pairs.drop_duplicates(["patient_id", key]).groupby(key, observed=True).size()
    counts = counts[counts >= min_count]
    ranked = sorted(((str(k), int(v)) for k, v in counts.items()), key=lambda kv: (-kv[1], kv[0]))
    return ranked[:top_k]


# ---------------------------------------------------------------------------- patient table


class _Builder:
    def __init__(self, index: pd.Index):
        self.index = index
        self.cols: dict[str, pd.Series] = {}
        self.meta: dict[str, dict] = {}

    def add(self, name: str, values: pd.Series, **meta: Any) -> None:
        self.cols[name] = values.reindex(self.index) if isinstance(values, pd.Series) else values
        self.meta[name] = {k: v for k, v in meta.items() if v is not None}


def _count_matrix(df: pd.DataFrame, key: str, selected: list[str], index: pd.Index,
                  value: str | None = None) -> tuple[pd.DataFrame, pd.Series]:
    """Per patient: event counts per selected key, and the count of other keys' events."""
    if df.empty:
        return pd.DataFrame(0, index=index, columns=selected), pd.Series(0, index=index)
    sel = df[key].isin(selected)
    tab = (df[sel].groupby(["patient_id", key], observed=True).size().unstack(fill_value=0)
           if sel.any() else pd.DataFrame(index=index))
    tab = tab.reindex(index=index, columns=selected, fill_value=0).fillna(0).astype("int64")
    other = df[~sel].groupby("patient_id").size().reindex(index, fill_value=0).astype("int64")
    return tab, other


def build_patient_table(demo: pd.DataFrame, events: pd.DataFrame, spec: MappingSpec,
                        units: dict, displays: dict, reference_ts: float) -> tuple[pd.DataFrame, dict]:
    """The patient table and its column metadata (see docs/mappings.md for every column)."""
    demo = demo.set_index("patient_id")
    index = pd.Index(demo.index, name="patient_id")
    b = _Builder(index)
    birth = demo["birth_ts"].astype("float64")
    death = demo["death_ts"].astype("float64")

    def cat(series, categories=None):
        s = series.astype("object").where(series.notna(), None)
        return pd.Categorical(s, categories=categories) if categories else s.astype("category")

    b.add("sex", pd.Series(cat(demo["sex"], ["female", "male", "other", "unknown"]), index=index),
          kind="categorical", source="Patient.gender",
          system="http://hl7.org/fhir/administrative-gender")
    bd = pd.to_datetime(demo["birth_date"].where(demo["birth_date"].astype("object").map(
        lambda s: isinstance(s, str) and len(s) >= 10)).astype("object").map(
        lambda s: s[:10] if isinstance(s, str) else None), errors="coerce")
    b.add("birth_date", bd.astype("datetime64[ns]"), kind="datetime", source="Patient.birthDate",
          identifying=True,
          description="exact birth date: needed to restore dates to the day; generators may drop it")
    years = demo["birth_date"].astype("object").map(
        lambda s: int(s[:4]) if isinstance(s, str) and s[:4].isdigit() else None)
    b.add("birth_year", years.astype("Int64"), kind="numerical", integer=True,
          source="Patient.birthDate")
    b.add("age", ((reference_ts - birth) / 86400.0 / YEAR_DAYS).astype("float64"),
          kind="numerical", unit="a", source="Patient.birthDate",
          description="age in years at the reference date")
    flag = demo["deceased_flag"].map(lambda v: v is True)
    b.add("deceased", (death.notna() | flag).astype("bool"), kind="categorical", binary=True,
          source="Patient.deceased[x]")
    b.add("age_at_death", ((death - birth) / 86400.0 / YEAR_DAYS).astype("float64"),
          kind="numerical", unit="a", source="Patient.deceasedDateTime")
    b.add("marital_status", pd.Series(cat(demo["marital_status"]), index=index), kind="categorical",
          source="Patient.maritalStatus",
          system="http://terminology.hl7.org/CodeSystem/v3-MaritalStatus")
    b.add("country", pd.Series(cat(demo["country"]), index=index), kind="categorical",
          source="Patient.address.country")
    b.add("language", pd.Series(cat(demo["language"]), index=index), kind="categorical",
          source="Patient.communication.language", system="urn:ietf:bcp:47")

    voc = spec.vocabulary
    vocab_meta: dict[str, list] = {}
    ev = events
    t_years = ev["t_days"] / YEAR_DAYS

    def disp(system, code):
        return displays.get((system, code))

    def code_system_of(df, key):
        return (df.dropna(subset=[key]).drop_duplicates(key).set_index(key)["system"]
                .astype("object").to_dict()) if not df.empty else {}

    def add_count_columns(df, domain, prefix, k, m, *, description=None, other_description=None):
        """One count column per vocabulary code of ``df`` (patient_id, code, system) and
        one ``<prefix>_other`` for the codes outside it."""
        codes = [c for c, _ in select_vocabulary(df, "code", k, m)]
        systems = code_system_of(df, "code")
        tab, other = _count_matrix(df, "code", codes, index)
        extra = {"description": description} if description else {}
        for c in codes:
            b.add(f"{prefix}_{column_key(c)}", tab[c], kind="numerical", integer=True,
                  domain=domain, system=systems.get(c), code=c, display=disp(systems.get(c), c),
                  stat="count", **extra)
        extra = {"description": other_description} if other_description else {}
        b.add(f"{prefix}_other", other, kind="numerical", integer=True, domain=domain, other=True,
              **extra)

    for domain in spec.patient_table.domains:
        prefix = DOMAIN_PREFIX[domain]
        k, m = voc.settings(domain)
        if domain == "condition":
            df = ev.loc[ev["kind"] == "condition_onset", ["patient_id", "code", "system"]].astype("object")
            df["t"] = t_years[df.index]
            sel = select_vocabulary(df, "code", k, m)
            codes = [c for c, _ in sel]
            systems = code_system_of(df, "code")
            first = (df[df["code"].isin(codes)].groupby(["patient_id", "code"])["t"].min()
                     .unstack() if codes else pd.DataFrame(index=index))
            first = first.reindex(index=index, columns=codes)
            for c in codes:
                name = f"{prefix}_{column_key(c)}"
                b.add(name, first[c].notna().astype("int8"), kind="categorical", binary=True,
                      domain=domain, system=systems.get(c), code=c, display=disp(systems.get(c), c))
                b.add(f"{name}_onset_age", first[c].astype("float64"), kind="numerical", unit="a",
                      domain=domain, system=systems.get(c), code=c, display=disp(systems.get(c), c),
                      stat="first_onset_age")
            oth = df[~df["code"].isin(codes)].drop_duplicates(["patient_id", "code"])
            b.add(f"{prefix}_other", oth.groupby("patient_id").size().reindex(index, fill_value=0)
                  .astype("int64"), kind="numerical", integer=True, domain=domain, other=True,
                  description="number of distinct conditions outside the vocabulary")
        elif domain in ("medication", "procedure", "immunization"):
            kind = {"medication": "medication", "procedure": "procedure",
                    "immunization": "immunization"}[domain]
            df = ev.loc[ev["kind"] == kind, ["patient_id", "code", "system"]].astype("object")
            if domain == "medication":
                atc = df["system"] == spec.medication.atc_system
                df.loc[atc, "code"] = df.loc[atc, "code"].str[:spec.medication.atc_level_chars]
            add_count_columns(df, domain, prefix, k, m, other_description=(
                f"number of {kind} events outside the vocabulary"))
        elif domain == "encounter":
            df = ev.loc[ev["kind"] == "encounter", ["patient_id", "value_code", "value_system"]].astype("object")
            df = df.rename(columns={"value_code": "code", "value_system": "system"})
            df["code"] = df["code"].fillna("unknown")
            add_count_columns(df, domain, prefix, k, m, description="encounters of this class")
        elif domain == "imaging":
            df = ev.loc[ev["kind"] == "imaging_study",
                        ["patient_id", "modality", "body_site", "event_id", "parent_id"]].astype("object")
            df["study"] = df["parent_id"].fillna(df["event_id"])
            df["code"] = df["modality"].fillna("unknown") + "_" + df["body_site"].fillna("unknown")
            df = df.drop_duplicates(["patient_id", "study", "code"])
            sel = select_vocabulary(df, "code", k, m)
            codes = [c for c, _ in sel]
            tab, other = _count_matrix(df, "code", codes, index)
            for c in codes:
                mod, _, site = c.partition("_")
                b.add(f"{prefix}_{column_key(c)}", tab[c], kind="numerical", integer=True,
                      domain=domain, modality=mod, body_site=site,
                      display=disp("http://snomed.info/sct", site), stat="count",
                      description="imaging studies with a series of this modality and body site")
            b.add(f"{prefix}_other", other, kind="numerical", integer=True, domain=domain, other=True)
        elif domain == "observation":
            sel_cols = ["patient_id", "code", "system", "value_num", "value_code", "unit", "t_days"]
            df = ev.loc[ev["kind"] == "observation", sel_cols].copy()
            for c in ("patient_id", "code", "system", "value_code", "unit"):
                df[c] = df[c].astype("object")
            df = df[df["value_num"].notna() | df["value_code"].notna()]
            sel = select_vocabulary(df, "code", k, m)
            codes = [c for c, _ in sel]
            systems = code_system_of(df, "code")
            # ties in time are broken by value, not by id, so "last" does not depend on ids
            df = df[df["code"].isin(codes)].sort_values(
                ["patient_id", "code", "t_days", "value_num", "value_code"], kind="stable")
            groups = {k: g for k, g in df.groupby("code", sort=False)}
            for c in codes:
                d = groups.get(c, df.iloc[0:0])
                target = units.get(c, {}).get("unit")
                numeric = d["value_num"].notna().sum() >= d["value_code"].notna().sum()
                base = f"{prefix}_{column_key(c)}"
                common = dict(domain=domain, system=systems.get(c), code=c,
                              display=disp(systems.get(c), c))
                if numeric:
                    d = d[d["value_num"].notna()]
                    if target is not None:
                        d = d[d["unit"] == target]
                    g = d.groupby("patient_id")["value_num"]
                    stats = {"last": g.last(), "mean": g.mean(), "min": g.min(), "max": g.max(),
                             "n": g.size()}
                    for st in spec.patient_table.obs_stats:
                        if st == "n":
                            b.add(f"{base}_n", stats["n"].reindex(index, fill_value=0).astype("int64"),
                                  kind="numerical", integer=True, stat="n", **common)
                        else:
                            b.add(f"{base}_{st}", stats[st].astype("float64"), kind="numerical",
                                  unit=target, stat=st, **common)
                else:
                    d = d[d["value_code"].notna()]
                    g = d.groupby("patient_id")["value_code"]
                    b.add(f"{base}_last", pd.Series(cat(g.last()), index=g.last().index),
                          kind="categorical", stat="last", **common)
                    if "n" in spec.patient_table.obs_stats:
                        b.add(f"{base}_n", g.size().reindex(index, fill_value=0).astype("int64"),
                              kind="numerical", integer=True, stat="n", **common)
            oth = ev.loc[(ev["kind"] == "observation") & ~ev["code"].astype("object").isin(codes), "patient_id"]
            b.add(f"{prefix}_other_n", oth.astype("object").value_counts().reindex(index, fill_value=0)
                  .astype("int64"), kind="numerical", integer=True, domain=domain, other=True)
        vocab_meta[domain] = [{"code": c, "patients": n} for c, n in sel]

    table = pd.DataFrame(b.cols, index=index)
    for name, md in b.meta.items():
        md["dtype"] = str(table[name].dtype)
    meta = {
        "table": {
            "name": "patients", "key": "patient_id", "spec": spec.name,
            "reference_date": dt.datetime.fromtimestamp(reference_ts, dt.timezone.utc).date().isoformat(),
            "n_patients": int(len(table)),
            "vocabulary": {"top_k": voc.top_k, "min_count": voc.min_count,
                           "selected": vocab_meta},
        },
        "columns": b.meta,
    }
    return table, meta


EVENT_COLUMN_META = {
    "patient_id": {"kind": "key"},
    "event_id": {"kind": "key", "description": "source resource id (#suffix for derived events)"},
    "kind": {"kind": "categorical"},
    "t_days": {"kind": "numerical", "unit": "d", "description": "days since birth (UTC)"},
    "system": {"kind": "categorical", "description": "canonical code system URL"},
    "code": {"kind": "categorical"},
    "display": {"kind": "text"},
    "value_num": {"kind": "numerical", "description": "observation value in `unit`; "
                                                      "imaging: number of instances"},
    "value_code": {"kind": "categorical", "description": "coded/string value; encounter class; "
                                                         "imaging: SOP Class UID"},
    "unit": {"kind": "categorical", "system": "http://unitsofmeasure.org"},
    "encounter_id": {"kind": "key"},
    "end_t_days": {"kind": "numerical", "unit": "d"},
    "modality": {"kind": "categorical", "system": "http://dicom.nema.org/resources/ontology/DCM"},
    "body_site": {"kind": "categorical", "system": "http://snomed.info/sct"},
    "value_system": {"kind": "categorical"},
    "value_display": {"kind": "text"},
    "parent_id": {"kind": "key", "description": "panel of a component, report of a result, "
                                                "onset of an abatement, first series of a study"},
    "category": {"kind": "categorical"},
    "study_uid": {"kind": "key"},
    "series_uid": {"kind": "key"},
}


def map_records(records: Iterable[list[dict]], spec: MappingSpec | str | None = None,
                include_patient: Callable[[dict], bool] | None = None, **vocabulary) -> MappedTables:
    """Map patient records to the patient and event tables.

    Records are consumed one at a time (pass a generator to keep memory flat). A patient
    may come in several records (for example one per EHDS document): the parts are merged
    and a resource with the same type and id is counted once.

    Args:
        records: iterable of records (lists of FHIR resource dicts, one patient each).
        spec: a MappingSpec, a spec path/name, or None for ``mappings/specs/default.toml``.
        include_patient: optional predicate on the Patient resource (consent filtering).
        **vocabulary: overrides of the spec's vocabulary (``top_k``, ``min_count``,
            ``reference_date``).
    """
    spec = resolve_spec(spec, **vocabulary)
    ex = EventExtractor(spec)
    excluded = 0
    c0 = time.process_time()
    with paused_gc():
        for rec in records:
            if include_patient is not None:
                p = next((r for r in rec if r.get("resourceType") == "Patient"), None)
                if p is None or not include_patient(p):
                    excluded += 1
                    continue
            ex.add_record(rec)
    return finish_tables(ex, spec, {"read_and_extract": time.process_time() - c0}, excluded)


@contextlib.contextmanager
def paused_gc():
    """Pause the cyclic garbage collector (restored on exit, also on errors).

    JSON trees and event rows hold no reference cycles, but hundreds of thousands of them
    make every full collection walk them all: about a third of the extraction and a
    fifth of the table building. Nothing is leaked: reference counting frees them as
    usual, and the collector runs again afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def resolve_spec(spec: MappingSpec | str | None, **vocabulary) -> MappingSpec:
    """A MappingSpec from a spec, a path/name or None (default), with vocabulary overrides."""
    if not isinstance(spec, MappingSpec):
        spec = load_spec(spec or "default")
    if vocabulary:
        spec = spec.with_vocabulary(**vocabulary)
    return spec


def finish_tables(ex: EventExtractor, spec: MappingSpec, timings: dict[str, float],
                  excluded: int = 0) -> MappedTables:
    """The tables of an extractor that has seen every record."""
    with paused_gc():
        return _finish_tables(ex, spec, timings, excluded)


def _finish_tables(ex: EventExtractor, spec: MappingSpec, timings: dict[str, float],
                   excluded: int) -> MappedTables:
    clock = time.process_time
    c0 = clock()
    demo = ex.demographics()
    events = ex.build_events(demo)
    timings["event_table"] = clock() - c0
    c0 = clock()
    events, units = normalise_units(events, spec)
    timings["units"] = clock() - c0
    c0 = clock()
    if spec.vocabulary.reference_date is not None:
        rd = spec.vocabulary.reference_date
        ref_ts = dt.datetime(rd.year, rd.month, rd.day, tzinfo=dt.timezone.utc).timestamp()
    else:
        birth = demo.set_index("patient_id")["birth_ts"].astype("float64")
        abs_t = events["t_days"].to_numpy() * 86400.0 + birth.reindex(events["patient_id"]).to_numpy()
        ref_ts = float(np.nanmax(abs_t)) if len(abs_t) else dt.datetime.now(dt.timezone.utc).timestamp()
        # the day after the last event, so that every event is before the reference date
        ref_ts = (np.floor(ref_ts / 86400.0) + 1) * 86400.0
    patients, pmeta = build_patient_table(demo, events, spec, units, ex.displays, ref_ts)
    timings["patient_table"] = clock() - c0
    c0 = clock()
    events = type_event_table(events)
    def pairs(sys_col, code_col):
        d = events[[sys_col, code_col]].dropna().drop_duplicates()
        return set(zip(d[sys_col].astype("object"), d[code_col].astype("object")))

    used = pairs("system", "code") | pairs("value_system", "value_code")
    used |= {("http://snomed.info/sct", c) for c in events["body_site"].dropna().unique()}
    used |= {("http://dicom.nema.org/resources/ontology/DCM", c)
             for c in events["modality"].dropna().unique()}
    displays = {}
    for (s, c), d in sorted(ex.displays.items()):
        if (s, c) in used:
            displays.setdefault(s, {})[c] = d
    emeta = {
        "table": {"name": "events", "spec": spec.name, "n_events": int(len(events)),
                  "n_patients": int(events["patient_id"].nunique()),
                  "kinds": {k: int(v) for k, v in events["kind"].value_counts().items() if v},
                  "units": units, "displays": displays},
        "columns": {c: {**EVENT_COLUMN_META[c], "dtype": str(events[c].dtype)} for c in events.columns},
    }
    skipped = dict(ex.skipped)
    if excluded:
        skipped["excluded by include_patient"] = excluded
    timings["typing_and_metadata"] = clock() - c0
    return MappedTables(patients, events, pmeta, emeta, skipped, timings)


def vocabulary_counts(events: pd.DataFrame, kind: str) -> Counter:
    """Number of distinct patients per code for one event kind (for inspection)."""
    df = events.loc[events["kind"] == kind, ["patient_id", "code"]].drop_duplicates()
    return Counter(df["code"].astype("object"))


__all__ = ["MappedTables", "map_records", "paused_gc", "normalise_units", "select_vocabulary",
           "build_patient_table", "column_key", "LOINC"]
