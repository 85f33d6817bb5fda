"""FHIR R4 resources that mirror stored DICOM: Patient, ImagingStudy, Endpoint.

Pure builders (no SQL): :class:`server.dicom.store.DicomStore` calls them inside its
write transaction and writes the results with ``SqlStore.write_versions``.

* Patient: matched by identifier ``{system: dicom_patient_id_system, value: PatientID}``;
  created from the header (name, birthDate, gender) only when absent, never
  overwritten (FHIR stays the authority on demographics).
* ImagingStudy (FHIR R4 imagingstudy.html): one per Study Instance UID, identified by
  ``{system: urn:dietf:rfc:3986, value: urn:oid:<uid>}`` (the system the R4 examples
  use), updated after every stored instance: a new instance is added to the current
  body's instance list, anything else rebuilds it from the SQL rows.
* Endpoint: one ``dicom-wado-rs`` endpoint for the DICOMweb base, created once.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any, Iterable

STUDY_UID_SYSTEM = "urn:dietf:rfc:3986"
SOP_CLASS_SYSTEM = "urn:ietf:rfc:3986"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ACCESSION_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                              "code": "ACSN"}]}
ENDPOINT_IDENTIFIER_SYSTEM = "urn:synthport:endpoint"
NO_PATIENT_ID_SYSTEM = "urn:synthport:dicom:study-without-patient-id"
_GENDER = {"M": "male", "F": "female", "O": "other"}
_LATERALITY = {"L": {"system": "http://snomed.info/sct", "code": "7771000", "display": "Left"},
               "R": {"system": "http://snomed.info/sct", "code": "24028007", "display": "Right"}}
_TZ_RE = re.compile(r"^([+-])(\d{2})(\d{2})$")
_TIME_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


def study_identifier(study_uid: str) -> dict:
    """The ImagingStudy identifier of a Study Instance UID."""
    return {"system": STUDY_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}


def fhir_date(value: str | None) -> str | None:
    """``YYYYMMDD`` -> ``YYYY-MM-DD`` (None when not a valid date)."""
    value = (value or "").strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:])).isoformat()
    except ValueError:
        return None


def fhir_offset(tz_offset: str | None, default: str) -> str:
    """TimezoneOffsetFromUTC (``+0100``) -> ``+01:00``; ``default`` when absent."""
    m = _TZ_RE.match((tz_offset or "").strip())
    if m:
        sign, hh, mm = m.groups()
        return f"{sign}{hh}:{mm}"
    return default


def fhir_datetime(date: str | None, time: str | None, tz_offset: str | None,
                  default_tz: str = "Z") -> str | None:
    """DICOM DA + TM (+ offset) -> FHIR dateTime (a date alone when there is no time;
    FHIR requires a zone with a time, ``default_tz`` when the header has none)."""
    day = fhir_date(date)
    if day is None:
        return None
    m = _TIME_RE.match((time or "").strip().replace(":", ""))
    if not m:
        return day
    hh, mm, ss, frac = m.groups()
    if int(hh) > 23 or int(mm or 0) > 59 or int(ss or 0) > 60:
        return day
    clock = f"{hh}:{mm or '00'}:{ss or '00'}{frac or ''}"
    return f"{day}T{clock}{fhir_offset(tz_offset, default_tz)}"


def human_name(pn: str) -> dict | None:
    """A DICOM PN (``Family^Given^Middle^Prefix^Suffix``, first component group) as a
    FHIR HumanName."""
    first = (pn or "").split("=")[0]
    comps = [c.strip() for c in first.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = comps[:5]
    name: dict[str, Any] = {}
    if family:
        name["family"] = family
    givens = [g for g in (given, middle) if g]
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    if not name:
        return None
    name["text"] = " ".join(p for p in (prefix, given, middle, family, suffix) if p)
    return name


def patient_resource(res_id: str, system: str, patient_id: str, name: str, birth_date: str,
                     sex: str, study_uid: str) -> dict:
    """A Patient created from a DICOM header.

    A header without PatientID gets a Patient per study, identified by
    ``urn:synthport:dicom:study-without-patient-id|<StudyInstanceUID>``.
    """
    ident = ({"system": system, "value": patient_id} if patient_id
             else {"system": NO_PATIENT_ID_SYSTEM, "value": study_uid})
    body: dict[str, Any] = {"resourceType": "Patient", "id": res_id, "identifier": [ident]}
    hn = human_name(name)
    if hn:
        body["name"] = [hn]
    if sex:
        body["gender"] = _GENDER.get(sex.strip().upper(), "unknown")
    bd = fhir_date(birth_date)
    if bd:
        body["birthDate"] = bd
    return body


def patient_identifier(system: str, patient_id: str, study_uid: str) -> tuple[str, str]:
    """(system, value) of the identifier that finds the Patient of a header."""
    if patient_id:
        return system, patient_id
    return NO_PATIENT_ID_SYSTEM, study_uid


def endpoint_resource(res_id: str, address: str) -> dict:
    """The DICOMweb (WADO-RS) Endpoint all ImagingStudies point to."""
    return {
        "resourceType": "Endpoint", "id": res_id, "status": "active",
        "identifier": [{"system": ENDPOINT_IDENTIFIER_SYSTEM, "value": "dicomweb"}],
        "name": "synthport DICOMweb",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                           "code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": address,
    }


def _coding(code: str) -> dict:
    return {"system": DCM_SYSTEM, "code": code}


def instance_item(inst: dict) -> dict:
    """The ``series.instance`` entry of one ``dicom_instance`` row."""
    item: dict[str, Any] = {"uid": inst["sop_uid"],
                            "sopClass": {"system": SOP_CLASS_SYSTEM,
                                         "code": f"urn:oid:{inst['sop_class_uid']}"}}
    if inst.get("instance_number") is not None and inst["instance_number"] >= 0:
        item["number"] = inst["instance_number"]
    return item


def imaging_study_resource(res_id: str, study: dict, series: Iterable[dict],
                           instances: Iterable[dict], patient_ref: str, endpoint_ref: str | None,
                           default_tz: str = "Z",
                           items_by_series: dict[int, list[dict]] | None = None) -> dict:
    """An ImagingStudy from the SQL rows of one study.

    Args:
        res_id: resource id.
        study: the ``dicom_study`` row as a mapping.
        series: its ``dicom_series`` rows, in order.
        instances: its ``dicom_instance`` rows (``series_pk``, ``sop_uid``,
            ``sop_class_uid``, ``instance_number``), in order.
        patient_ref: ``Patient/<id>``.
        endpoint_ref: ``Endpoint/<id>`` or None.
        default_tz: offset for times without TimezoneOffsetFromUTC.
        items_by_series: instead of ``instances``, the ready ``series.instance`` entries
            per series pk, in order (the incremental update of a stored study).
    """
    by_series: dict[int, list[dict]] = {}
    if items_by_series is not None:
        by_series = items_by_series
    else:
        for inst in instances:
            by_series.setdefault(inst["series_pk"], []).append(instance_item(inst))
    tz = study.get("timezone_offset")
    out_series = []
    modalities: list[str] = []
    total = 0
    for se in series:
        insts = by_series.get(se["pk"], [])
        if not insts:
            continue
        entry: dict[str, Any] = {"uid": se["series_uid"]}
        if se.get("series_number") is not None and se["series_number"] >= 0:
            entry["number"] = se["series_number"]
        entry["modality"] = _coding(se.get("modality") or "OT")
        if se.get("modality") and se["modality"] not in modalities:
            modalities.append(se["modality"])
        if se.get("series_description"):
            entry["description"] = se["series_description"]
        entry["numberOfInstances"] = len(insts)
        if se.get("body_part"):
            # BodyPartExamined is a DICOM CS term, kept as text (no SNOMED mapping yet).
            entry["bodySite"] = {"display": se["body_part"]}
        if se.get("laterality") in _LATERALITY:
            entry["laterality"] = _LATERALITY[se["laterality"]]
        started = fhir_datetime(se.get("series_date"), se.get("series_time"), tz, default_tz)
        if started:
            entry["started"] = started
        entry["instance"] = list(insts)
        total += len(insts)
        out_series.append(entry)
    body: dict[str, Any] = {
        "resourceType": "ImagingStudy", "id": res_id,
        "identifier": [study_identifier(study["study_uid"])],
        "status": "available" if total else "unknown",
    }
    if study.get("accession_number"):
        body["identifier"].append({"type": ACCESSION_TYPE, "value": study["accession_number"]})
    if modalities:
        body["modality"] = [_coding(m) for m in modalities]
    body["subject"] = {"reference": patient_ref}
    started = fhir_datetime(study.get("study_date"), study.get("study_time"), tz, default_tz)
    if started:
        body["started"] = started
    if study.get("referring_physician"):
        hn = human_name(study["referring_physician"])
        if hn:
            body["referrer"] = {"display": hn["text"]}
    if endpoint_ref:
        body["endpoint"] = [{"reference": endpoint_ref}]
    body["numberOfSeries"] = len(out_series)
    body["numberOfInstances"] = total
    if study.get("study_description"):
        body["description"] = study["study_description"]
    if out_series:
        body["series"] = out_series
    return body
