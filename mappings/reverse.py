"""Reverse mapping: a patient-table row plus its events -> a complete FHIR R4 record.

The record holds Patient, Encounter, Condition, Observation, Procedure, MedicationRequest,
Immunization, DiagnosticReport and ImagingStudy resources with references between them
(``Patient/<id>``, ``Encounter/<id>``, ``Observation/<id>``), codes with displays (from a
terminology provider when given, else the event's display, else the table metadata) and
timestamps ``birth date + t_days`` in UTC. Ids are deterministic: ``<prefix>`` for the
Patient and ``<prefix>-<kind>-<n>`` for the others, numbered in event order.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from mappings.errors import MappingError

UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
MARITAL = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")   # FHIR R4 §2.24.0.1 id
_YEAR = 365.25
_ABBR = {"encounter": "enc", "condition_onset": "cond", "condition_abatement": "cond",
         "observation": "obs", "procedure": "proc", "medication": "med",
         "immunization": "imm", "diagnostic_report": "dr", "imaging_study": "img"}


def _v(x: Any) -> Any:
    """None for NaN/NA/NaT/None, the value otherwise (numpy scalars become Python ones)."""
    if x is None:
        return None
    try:
        if pd.isna(x):
            return None
    except (TypeError, ValueError):
        return x
    if hasattr(x, "item"):
        return x.item()
    return x


def fhir_datetime(birth: dt.datetime, t_days: float) -> str:
    """``birth + t_days`` as a FHIR dateTime in UTC (microseconds kept when present)."""
    t = birth + dt.timedelta(days=float(t_days))
    return t.isoformat(timespec="microseconds" if t.microsecond else "seconds")


def dicom_uid(*parts: Any) -> str:
    """A deterministic UID under the UUID-derived root ``2.25`` (PS3.5 §B.2)."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big") >> 1)


class _Displays:
    def __init__(self, provider, displays: Mapping[str, Mapping[str, str]] | None):
        self.provider = provider
        self.displays = displays or {}
        self._cs: dict[str, Any] = {}

    def __call__(self, system: str | None, code: str | None, fallback: str | None) -> str | None:
        if system and code and self.provider is not None:
            if system not in self._cs:
                try:
                    self._cs[system] = self.provider.code_system(system)
                except Exception:  # noqa: BLE001 - a provider failure must not lose the record
                    self._cs[system] = None
            cs = self._cs[system]
            c = cs.get(code) if cs is not None else None
            if c is not None and getattr(c, "display", None):
                return c.display
        if fallback:
            return fallback
        if system and code:
            return self.displays.get(system, {}).get(code)
        return None


def _coding(system, code, display) -> dict:
    c = {}
    if system:
        c["system"] = system
    if code is not None:
        c["code"] = str(code)
    if display:
        c["display"] = display
    return c


def _cc(system, code, display) -> dict | None:
    if code is None and not display:
        return None
    if code is None:
        return {"text": display}
    out = {"coding": [_coding(system, code, display)]}
    if display:
        out["text"] = display
    return out


def _birth(row: Mapping, id_prefix: str, birth_date, anchor) -> dt.date:
    if birth_date is not None:
        return birth_date if isinstance(birth_date, dt.date) else dt.date.fromisoformat(str(birth_date)[:10])
    bd = _v(row.get("birth_date"))
    if bd is not None:
        return pd.Timestamp(bd).date()
    year = _v(row.get("birth_year"))
    # No exact date: a deterministic day in the birth year (or age before the anchor).
    day = int.from_bytes(hashlib.sha256(id_prefix.encode()).digest()[:4], "big") % 365
    if year is None:
        age = _v(row.get("age"))
        if age is None:
            raise MappingError("the patient row has neither birth_date, birth_year nor age")
        anchor = anchor or dt.date.today()
        base = dt.datetime(anchor.year, anchor.month, anchor.day) - dt.timedelta(days=float(age) * _YEAR)
        return base.date()
    return dt.date(int(year), 1, 1) + dt.timedelta(days=min(day, 364))


def patient_resource(row: Mapping, pid: str, birth: dt.date, disp: _Displays) -> dict:
    """The Patient of a patient-table row."""
    p: dict[str, Any] = {"resourceType": "Patient", "id": pid, "active": True}
    sex = _v(row.get("sex"))
    if sex in ("male", "female", "other", "unknown"):
        p["gender"] = sex
    p["birthDate"] = birth.isoformat()
    b0 = dt.datetime(birth.year, birth.month, birth.day, tzinfo=dt.timezone.utc)
    age_d = _v(row.get("age_at_death"))
    if age_d is not None and not math.isnan(age_d):
        p["deceasedDateTime"] = fhir_datetime(b0, float(age_d) * _YEAR)
    elif _v(row.get("deceased")):
        p["deceasedBoolean"] = True
    ms = _v(row.get("marital_status"))
    if ms is not None:
        p["maritalStatus"] = _cc(MARITAL, ms, disp(MARITAL, ms, None))
    country = _v(row.get("country"))
    if country is not None:
        p["address"] = [{"country": str(country)}]
    lang = _v(row.get("language"))
    if lang is not None:
        p["communication"] = [{"language": _cc("urn:ietf:bcp:47", lang, disp("urn:ietf:bcp:47", lang, None))}]
    return p


def _plain_column(values: pd.Series) -> list:
    """A column as Python values, missing ones as None: :func:`_v` of every cell, by column
    (a virtual patient has thousands of events; a call per cell was a sixth of its time)."""
    arr = values.to_numpy()
    kind = arr.dtype.kind
    if kind == "f":
        return [None if m else v for v, m in zip(arr.tolist(), np.isnan(arr).tolist())]
    if kind in "iub":
        return arr.tolist()
    if kind != "O":
        return [_v(v) for v in arr]             # datetimes and the like: cell by cell
    missing = pd.isna(arr).tolist()
    return [None if m else (v.item() if isinstance(v, np.generic) else v)
            for v, m in zip(arr.tolist(), missing)]


def _ordered_events(events: pd.DataFrame | Iterable[Mapping]) -> list[dict]:
    if isinstance(events, pd.DataFrame):
        names = list(events.columns)
        columns = [_plain_column(events.iloc[:, j]) for j in range(len(names))]
        rows = [dict(zip(names, vals)) for vals in zip(*columns)]
    else:
        rows = [{k: _v(v) for k, v in dict(e).items()} for e in events]
    rows.sort(key=lambda r: (r.get("t_days") if r.get("t_days") is not None else math.inf,
                             str(r.get("event_id") or "")))
    return rows


def to_fhir_record(patient_row: Mapping | pd.Series, events: pd.DataFrame | Iterable[Mapping],
                   id_prefix: str, *, provider=None, displays: Mapping | None = None,
                   birth_date: dt.date | str | None = None, anchor: dt.date | None = None
                   ) -> list[dict]:
    """Build one patient's FHIR R4 record from a patient-table row and its event rows.

    Args:
        patient_row: row of the patient table (Series or dict; ``patient_id`` not needed).
        events: this patient's rows of the event table (DataFrame or dicts).
        id_prefix: the Patient id; other ids are ``<prefix>-<kind>-<n>``.
        provider: a ``terminologies`` TerminologyProvider for displays (optional).
        displays: ``{system: {code: display}}`` fallback (the event table metadata's
            ``displays``).
        birth_date: overrides the row's ``birth_date`` (the date ``t_days`` counts from).
        anchor: reference date used when the row has neither birth date nor birth year.

    Returns:
        The resources, Patient first (every one valid FHIR R4).

    Raises:
        MappingError: bad id prefix or a row without any birth information.
    """
    if not isinstance(id_prefix, str) or not _ID.match(id_prefix) or len(id_prefix) > 48:
        raise MappingError(f"id prefix {id_prefix!r} must be 1-48 characters of [A-Za-z0-9-.]")
    row = patient_row.to_dict() if isinstance(patient_row, pd.Series) else dict(patient_row)
    disp = _Displays(provider, displays)
    birth = _birth(row, id_prefix, birth_date, anchor)
    b0 = dt.datetime(birth.year, birth.month, birth.day, tzinfo=dt.timezone.utc)
    patient = patient_resource(row, id_prefix, birth, disp)
    subject = {"reference": f"Patient/{id_prefix}"}
    evs = _ordered_events(events)

    counters: dict[str, int] = {}
    ids: dict[str, str] = {}            # event_id -> "Type/id"
    kind_of: dict[str, str] = {}

    def new_id(kind: str) -> str:
        abbr = _ABBR[kind]
        counters[abbr] = counters.get(abbr, 0) + 1
        return f"{id_prefix}-{abbr}-{counters[abbr]}"

    def when(t):
        return fhir_datetime(b0, t) if t is not None else None

    def cc(e, fallback_system=None):
        system = e.get("system") or fallback_system
        return _cc(system, e.get("code"), disp(system, e.get("code"), e.get("display")))

    for i, e in enumerate(evs):
        if e.get("event_id") is None:
            e["event_id"] = f"_{i}"
        kind_of[e["event_id"]] = e.get("kind")

    def attached(e) -> bool:
        """Events that join their parent's resource (component, abatement, further series)."""
        parent, kind = e.get("parent_id"), e.get("kind")
        return parent is not None and kind_of.get(parent) == {
            "observation": "observation", "condition_abatement": "condition_onset",
            "imaging_study": "imaging_study"}.get(kind, "-")

    evs = [e for e in evs if not attached(e)] + [e for e in evs if attached(e)]
    # Pass 1: ids for every event that becomes a resource.
    for e in evs:
        eid, kind = e["event_id"], e.get("kind")
        if attached(e):
            continue
        rtype = {"encounter": "Encounter", "condition_onset": "Condition",
                 "condition_abatement": "Condition", "observation": "Observation",
                 "procedure": "Procedure", "medication": "MedicationRequest",
                 "immunization": "Immunization", "diagnostic_report": "DiagnosticReport",
                 "imaging_study": "ImagingStudy"}.get(kind)
        if rtype is None:
            continue
        ids[eid] = f"{rtype}/{new_id(kind)}"

    def enc_ref(e):
        ref = ids.get(e.get("encounter_id") or "")
        return {"reference": ref} if ref and ref.startswith("Encounter/") else None

    out: dict[str, dict] = {}
    for e in evs:
        eid, kind, parent = e["event_id"], e.get("kind"), e.get("parent_id")
        t, end = e.get("t_days"), e.get("end_t_days")
        if t is None:
            continue
        if kind == "encounter":
            r = {"resourceType": "Encounter", "id": ids[eid].split("/")[1], "status": "finished",
                 "class": _coding(e.get("value_system") or ACT_CODE, e.get("value_code") or "AMB",
                                  disp(e.get("value_system") or ACT_CODE, e.get("value_code") or "AMB",
                                       e.get("value_display"))),
                 "subject": subject, "period": {"start": when(t)}}
            if e.get("code") is not None:
                r["type"] = [cc(e)]
            if end is not None:
                r["period"]["end"] = when(max(end, t))
            out[eid] = r
        elif kind == "condition_abatement" and parent is not None and parent in out \
                and out[parent]["resourceType"] == "Condition":
            c = out[parent]
            c["abatementDateTime"] = when(t)
            c["clinicalStatus"] = _status_cc("resolved")
        elif kind in ("condition_onset", "condition_abatement"):
            if eid not in ids:
                continue
            r = {"resourceType": "Condition", "id": ids[eid].split("/")[1],
                 "clinicalStatus": _status_cc("active" if kind == "condition_onset" else "resolved"),
                 "verificationStatus": {"coding": [{
                     "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                     "code": "confirmed"}]},
                 "code": cc(e), "subject": subject}
            if e.get("category"):
                r["category"] = [{"coding": [{"system": COND_CATEGORY, "code": e["category"]}]}]
            r["onsetDateTime" if kind == "condition_onset" else "abatementDateTime"] = when(t)
            _put(r, "encounter", enc_ref(e))
            out[eid] = r
        elif kind == "observation":
            if parent is not None and kind_of.get(parent) == "observation":
                po = out.get(parent)
                if po is not None:
                    comp = {"code": cc(e)}
                    comp.update(_value(e, disp))
                    po.setdefault("component", []).append(comp)
                continue
            r = {"resourceType": "Observation", "id": ids[eid].split("/")[1], "status": "final"}
            if e.get("category"):
                r["category"] = [{"coding": [{"system": OBS_CATEGORY, "code": e["category"]}]}]
            r["code"] = cc(e) or {"text": "unknown"}
            r["subject"] = subject
            _put(r, "encounter", enc_ref(e))
            r["effectiveDateTime"] = when(t)
            r.update(_value(e, disp))
            out[eid] = r
        elif kind == "procedure":
            r = {"resourceType": "Procedure", "id": ids[eid].split("/")[1], "status": "completed",
                 "code": cc(e), "subject": subject}
            _put(r, "encounter", enc_ref(e))
            if end is not None:
                r["performedPeriod"] = {"start": when(t), "end": when(max(end, t))}
            else:
                r["performedDateTime"] = when(t)
            out[eid] = r
        elif kind == "medication":
            r = {"resourceType": "MedicationRequest", "id": ids[eid].split("/")[1],
                 "status": "completed", "intent": "order",
                 "medicationCodeableConcept": cc(e) or {"text": "unknown"}, "subject": subject}
            _put(r, "encounter", enc_ref(e))
            r["authoredOn"] = when(t)
            out[eid] = r
        elif kind == "immunization":
            r = {"resourceType": "Immunization", "id": ids[eid].split("/")[1], "status": "completed",
                 "vaccineCode": cc(e) or {"text": "unknown"}, "patient": subject}
            _put(r, "encounter", enc_ref(e))
            r["occurrenceDateTime"] = when(t)
            r["primarySource"] = True
            out[eid] = r
        elif kind == "diagnostic_report":
            r = {"resourceType": "DiagnosticReport", "id": ids[eid].split("/")[1], "status": "final"}
            if e.get("category"):
                r["category"] = [{"coding": [{"system": V2_0074, "code": e["category"]}]}]
            r["code"] = cc(e) or {"text": "unknown"}
            r["subject"] = subject
            _put(r, "encounter", enc_ref(e))
            r["effectiveDateTime"] = when(t)
            r["issued"] = when(t)
            out[eid] = r
        elif kind == "imaging_study":
            study_key = parent if parent is not None and parent in out else eid
            r = out.get(study_key)
            if r is None:
                suid = e.get("study_uid") or dicom_uid(id_prefix, "study", eid)
                r = {"resourceType": "ImagingStudy", "id": ids[eid].split("/")[1],
                     "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{suid}"}],
                     "status": "available", "subject": subject, "started": when(t),
                     "numberOfSeries": 0, "numberOfInstances": 0, "series": []}
                _put(r, "encounter", enc_ref(e))
                if e.get("code") is not None:
                    r["procedureCode"] = [cc(e)]
                out[eid] = r
            r["series"].append(_series(e, id_prefix, len(r["series"]) + 1, disp))
            r["numberOfSeries"] = len(r["series"])
            r["numberOfInstances"] = sum(s["numberOfInstances"] for s in r["series"])
    # Results of diagnostic reports: observations whose parent is the report.
    for e in evs:
        parent = e.get("parent_id")
        if e.get("kind") == "observation" and parent in out \
                and out[parent]["resourceType"] == "DiagnosticReport" and e["event_id"] in ids:
            out[parent].setdefault("result", []).append({"reference": ids[e["event_id"]]})
    return [patient, *out.values()]


def _put(r: dict, key: str, value) -> None:
    if value is not None:
        r[key] = value


def _status_cc(code: str) -> dict:
    return {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": code}]}


def _value(e: Mapping, disp) -> dict:
    v, code = e.get("value_num"), e.get("value_code")
    if v is not None:
        q: dict[str, Any] = {"value": _num(v)}
        unit = e.get("unit")
        if unit:
            q.update({"unit": unit, "system": UCUM, "code": unit})
        return {"valueQuantity": q}
    if code is not None:
        system = e.get("value_system")
        if system:
            return {"valueCodeableConcept": _cc(system, code, disp(system, code, e.get("value_display")))}
        return {"valueString": str(code)}
    return {}


def _num(v: float) -> float | int:
    f = float(v)
    return int(f) if f.is_integer() and abs(f) < 1e15 else f


def _series(e: Mapping, prefix: str, number: int, disp) -> dict:
    n = e.get("value_num")
    n = int(n) if n is not None and n >= 1 else 1
    s: dict[str, Any] = {"uid": e.get("series_uid") or dicom_uid(prefix, "series", e["event_id"]),
                         "number": number}
    mod = e.get("modality") or "OT"
    s["modality"] = _coding(DCM, mod, disp(DCM, mod, None))
    if e.get("body_site"):
        s["bodySite"] = _coding(SNOMED, e["body_site"], disp(SNOMED, e["body_site"], None))
    s["numberOfInstances"] = n
    sop = e.get("value_code")
    inst = []
    for i in range(n):
        it: dict[str, Any] = {"uid": dicom_uid(prefix, "instance", e["event_id"], i), "number": i + 1}
        if sop:
            it["sopClass"] = {"system": "urn:ietf:rfc:3986", "code": str(sop)}
        else:
            it["sopClass"] = {"system": "urn:ietf:rfc:3986", "code": "1.2.840.10008.5.1.4.1.1.7"}
        inst.append(it)
    s["instance"] = inst
    return s


def tables_to_fhir(patients: pd.DataFrame, events: pd.DataFrame, *, id_prefix: str = "",
                   provider=None, displays: Mapping | None = None, keep_ids: bool = False
                   ) -> Iterable[list[dict]]:
    """Records for every row of a patient table (``to_fhir_record`` per patient).

    Ids are ``<id_prefix><n>`` (row number), or the table's own ``patient_id`` when
    ``keep_ids`` is set.
    """
    groups = {pid: g for pid, g in events.groupby("patient_id", observed=True, sort=False)}
    empty = events.iloc[0:0]
    for n, (pid, row) in enumerate(patients.iterrows()):
        prefix = str(pid) if keep_ids else f"{id_prefix}{n}"
        yield to_fhir_record(row, groups.get(pid, empty), prefix, provider=provider,
                             displays=displays)


def validate_record(record: list[dict]) -> None:
    """Validate every resource with ``fhir.resources`` (R4B models, which accept R4 content).

    Raises:
        MappingError: naming the first invalid resource and the validation error.
    """
    from fhir.resources.R4B import get_fhir_model_class

    for r in record:
        try:
            get_fhir_model_class(r["resourceType"]).model_validate(r)
        except Exception as exc:  # noqa: BLE001 - pydantic.ValidationError and friends
            raise MappingError(f"{r.get('resourceType')}/{r.get('id')} is not valid: {exc}") from None
