"""Small hand-written FHIR R4 records for the mappings tests."""
from __future__ import annotations

import zlib

SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
UCUM = "http://unitsofmeasure.org"


def cc(system, code, display=None):
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return {"coding": [c]}


def qty(value, unit):
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def patient_record(pid: str, *, gender="female", birth="1980-05-17", weight_unit="kg",
                   weight=70.0, diabetes=True, rare_code=None, deceased=None, with_imaging=True,
                   urn=True) -> list[dict]:
    """One patient: 2 encounters, conditions, a BP panel, weights, a lab report, meds,
    an immunization, a procedure and an imaging study. ``urn`` writes urn:uuid references."""
    def ref(t, i):
        return {"reference": f"urn:uuid:{i}" if urn else f"{t}/{i}"}

    subj = ref("Patient", pid)
    e1, e2 = f"{pid}-e1", f"{pid}-e2"
    p = {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": birth,
         "maritalStatus": cc("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "M", "Married"),
         "address": [{"country": "ES"}],
         "communication": [{"language": cc("urn:ietf:bcp:47", "es", "Spanish")}]}
    if deceased:
        p["deceasedDateTime"] = deceased
    rs = [
        p,
        {"resourceType": "Encounter", "id": e1, "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB",
                   "display": "ambulatory"},
         "type": [cc(SCT, "185349003", "Encounter for check up")], "subject": subj,
         "period": {"start": "2010-03-01T10:00:00+01:00", "end": "2010-03-01T10:30:00+01:00"}},
        {"resourceType": "Encounter", "id": e2, "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
         "type": [cc(SCT, "50849002", "Emergency room admission")], "subject": subj,
         "period": {"start": "2012-07-09T23:30:00-05:00", "end": "2012-07-10T02:00:00-05:00"}},
        {"resourceType": "Condition", "id": f"{pid}-c1", "code": cc(SCT, "444814009", "Viral sinusitis"),
         "subject": subj, "encounter": ref("Encounter", e1),
         "onsetDateTime": "2010-03-01T10:00:00+01:00", "abatementDateTime": "2010-03-15T10:00:00+01:00",
         "category": [cc("http://terminology.hl7.org/CodeSystem/condition-category", "encounter-diagnosis")]},
        {"resourceType": "Observation", "id": f"{pid}-bp", "status": "final",
         "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")],
         "code": cc(LOINC, "85354-9", "Blood pressure panel"), "subject": subj,
         "encounter": ref("Encounter", e1), "effectiveDateTime": "2010-03-01T10:05:00+01:00",
         "component": [
             {"code": cc(LOINC, "8480-6", "Systolic blood pressure"), "valueQuantity": qty(121.0, "mm[Hg]")},
             {"code": cc(LOINC, "8462-4", "Diastolic blood pressure"), "valueQuantity": qty(79.0, "mm[Hg]")}]},
        {"resourceType": "Observation", "id": f"{pid}-w1", "status": "final",
         "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")],
         "code": cc(LOINC, "29463-7", "Body weight"), "subject": subj, "encounter": ref("Encounter", e1),
         "effectiveDateTime": "2010-03-01T10:06:00+01:00", "valueQuantity": qty(weight, weight_unit)},
        {"resourceType": "Observation", "id": f"{pid}-w2", "status": "final",
         "code": cc(LOINC, "29463-7", "Body weight"), "subject": subj, "encounter": ref("Encounter", e2),
         "effectiveDateTime": "2012-07-10T00:10:00-05:00", "valueQuantity": qty(72.0, "kg")},
        {"resourceType": "Observation", "id": f"{pid}-smk", "status": "final",
         "code": cc(LOINC, "72166-2", "Tobacco smoking status"), "subject": subj,
         "effectiveDateTime": "2010-03-01T10:07:00+01:00",
         "valueCodeableConcept": cc(SCT, "266919005", "Never smoker")},
        {"resourceType": "Observation", "id": f"{pid}-glu", "status": "final",
         "code": cc(LOINC, "2339-0", "Glucose"), "subject": subj, "encounter": ref("Encounter", e2),
         "effectiveDateTime": "2012-07-10T00:20:00-05:00", "valueQuantity": qty(104.0, "mg/dL")},
        {"resourceType": "Observation", "id": f"{pid}-err", "status": "entered-in-error",
         "code": cc(LOINC, "2339-0", "Glucose"), "subject": subj,
         "effectiveDateTime": "2012-07-10T00:20:00-05:00", "valueQuantity": qty(999.0, "mg/dL")},
        {"resourceType": "DiagnosticReport", "id": f"{pid}-dr", "status": "final",
         "code": cc(LOINC, "51990-0", "Basic metabolic panel"), "subject": subj,
         "encounter": ref("Encounter", e2), "effectiveDateTime": "2012-07-10T00:20:00-05:00",
         "result": [ref("Observation", f"{pid}-glu")]},
        {"resourceType": "Procedure", "id": f"{pid}-pr", "status": "completed",
         "code": cc(SCT, "430193006", "Medication reconciliation"), "subject": subj,
         "encounter": ref("Encounter", e2),
         "performedPeriod": {"start": "2012-07-10T00:30:00-05:00", "end": "2012-07-10T00:45:00-05:00"}},
        {"resourceType": "MedicationRequest", "id": f"{pid}-m1", "status": "active", "intent": "order",
         "medicationCodeableConcept": {"coding": [
             {"system": RXNORM, "code": "860975", "display": "metformin 500 MG"},
             {"system": ATC, "code": "A10BA02", "display": "metformin"}]},
         "subject": subj, "encounter": ref("Encounter", e2), "authoredOn": "2012-07-10T00:40:00-05:00"},
        {"resourceType": "Medication", "id": f"{pid}-med",
         "code": cc(RXNORM, "313782", "Acetaminophen 325 MG Oral Tablet")},
        {"resourceType": "MedicationRequest", "id": f"{pid}-m2", "status": "completed", "intent": "order",
         "medicationReference": ref("Medication", f"{pid}-med"), "subject": subj,
         "authoredOn": "2010-03-01T10:20:00+01:00"},
        {"resourceType": "Immunization", "id": f"{pid}-imm", "status": "completed",
         "vaccineCode": cc("http://hl7.org/fhir/sid/cvx", "140", "Influenza, seasonal"),
         "patient": subj, "occurrenceDateTime": "2010-03-01T10:25:00+01:00", "primarySource": True},
    ]
    if diabetes:
        rs.append({"resourceType": "Condition", "id": f"{pid}-c2",
                   "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"},
                                       {"system": SCT, "code": "44054006", "display": "Diabetes mellitus type 2"}]},
                   "subject": subj, "onsetDateTime": "2012-07-10"})
    if rare_code:
        rs.append({"resourceType": "Condition", "id": f"{pid}-c3", "code": cc(SCT, rare_code, "Rare thing"),
                   "subject": subj, "onsetDateTime": "2011-01-01T00:00:00Z"})
    if with_imaging:
        rs.append({"resourceType": "ImagingStudy", "id": f"{pid}-img", "status": "available",
                   "subject": subj, "encounter": ref("Encounter", e2), "started": "2012-07-10T01:00:00-05:00",
                   "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:2.25.{zlib.crc32(pid.encode())}1"}],
                   "procedureCode": [cc(SCT, "399208008", "Plain chest X-ray")],
                   "series": [
                       {"uid": f"2.25.{zlib.crc32(pid.encode())}2", "number": 1, "numberOfInstances": 2,
                        "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CR"},
                        "bodySite": {"system": SCT, "code": "51185008", "display": "Thoracic structure"},
                        "instance": [{"uid": "2.25.1", "sopClass": {"system": "urn:ietf:rfc:3986",
                                                                   "code": "1.2.840.10008.5.1.4.1.1.1"}},
                                     {"uid": "2.25.2", "sopClass": {"system": "urn:ietf:rfc:3986",
                                                                   "code": "1.2.840.10008.5.1.4.1.1.1"}}]},
                       {"uid": f"2.25.{zlib.crc32(pid.encode())}3", "number": 2, "numberOfInstances": 1,
                        "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"},
                        "bodySite": {"system": SCT, "code": "51185008", "display": "Thoracic structure"},
                        "instance": [{"uid": "2.25.3", "sopClass": {"system": "urn:ietf:rfc:3986",
                                                                   "code": "1.2.840.10008.5.1.4.1.1.1.1"}}]}]})
    return rs


def small_cohort() -> list[list[dict]]:
    """Five patients; one has weight in [lb_av], one a rare condition, one no diabetes."""
    return [
        patient_record("p1"),
        patient_record("p2", gender="male", birth="1950-01-01", weight_unit="[lb_av]", weight=154.0),
        patient_record("p3", diabetes=False, rare_code="999999999", deceased="2015-02-03T04:05:06Z"),
        patient_record("p4", birth="1999-12-31", urn=False),
        patient_record("p5", with_imaging=False),
    ]
