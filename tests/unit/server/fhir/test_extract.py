"""Tests of server.fhir.extract: value conversion per FHIR R4 search (search.html#ptypes),
the FHIRPath compiler, and its equivalence with plain fhirpathpy on Synthea data."""
from __future__ import annotations

import bz2
import functools
import json
import re
from calendar import timegm
from pathlib import Path

import fhirpathpy
import pytest
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models

from server.db.schema import INDEX_COLUMNS
from server.fhir import extract as ex
from server.fhir.transaction import resolve_local_references
from server.fhir.searchparams import SearchParam, registry

SYNTHEA = Path(__file__).resolve().parents[5] / "shared" / "data" / "synthea-us-120"
# A patient with 18 resource types (ImagingStudy, Medication, SupplyDelivery...), plus the
# organisations/locations and practitioners that Synthea loads first.
SYNTHEA_BUNDLES = ["b9590b16-804d-3d9f-0de0-b80b794f1017.json.bz2",
                   "0-hospitalInformation1625911868739.json.bz2",
                   "0-practitionerInformation1625911868739.json.bz2"]


def ts(text: str) -> float:
    """Epoch seconds of an ISO UTC time ``YYYY-MM-DDTHH:MM:SS``."""
    return float(timegm(tuple(int(p) for p in re.split(r"[-T:]", text)) + (0, 0, 0)))


def rows(resource: dict, kind: str, code: str) -> set[tuple]:
    """Column tuples (without the code) of one parameter."""
    return {r[1:] for r in ex.extract(resource)[kind] if r[0] == code}


def dates(resource: dict, code: str) -> set[tuple[float, float]]:
    """(low, high) of a date parameter, rounded to the microsecond."""
    return {(round(lo, 6), round(hi, 6)) for lo, hi in rows(resource, "date", code)}


def span(start: str, end: str) -> tuple[float, float]:
    """The expected (low, high) of the range [start, end) (ISO UTC times)."""
    return round(ts(start), 6), round(ts(end) - 1e-6, 6)


# --- result shape ------------------------------------------------------------------------------

def test_result_has_every_kind_and_column_order():
    out = ex.extract({"resourceType": "Patient", "id": "p", "gender": "male"})
    assert set(out) == set(INDEX_COLUMNS)
    for kind, kind_rows in out.items():
        assert all(len(r) == 1 + len(INDEX_COLUMNS[kind]) for r in kind_rows)


def test_unknown_or_missing_type_gives_no_rows():
    assert all(not v for v in ex.extract({"resourceType": "NoSuchType", "id": "x"}).values())
    assert all(not v for v in ex.extract({"id": "x"}).values())


def test_every_definition_compiles_without_fallback():
    print(f"fast: {ex.COMPILE_STATS.fast}, fallback: {ex.COMPILE_STATS.fallback}")
    assert ex.COMPILE_STATS.fast >= 1300
    assert ex.COMPILE_STATS.fallback == {}


# --- Patient: string, token, date ----------------------------------------------------------------

PATIENT = {
    "resourceType": "Patient", "id": "p1",
    "meta": {"lastUpdated": "2024-01-01T00:00:00Z", "profile": ["http://example.org/sd/p"],
             "tag": [{"system": "http://example.org/tags", "code": "t1", "display": "Tag One"}],
             "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                           "code": "R"}],
             "source": "http://example.org/source#a"},
    "active": True,
    "identifier": [
        {"system": "http://hospital.example/mrn", "value": "MRN-1",
         "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                              "code": "MR"}], "text": "Medical Record Number"}},
        {"value": "no-system"},
    ],
    "name": [{"use": "official", "family": "Müller-Lüdenscheidt", "given": ["José", "Ana  María"],
              "prefix": ["Dr."], "suffix": ["PhD"], "text": "Dr. José Müller"}],
    "telecom": [{"system": "phone", "value": "555-1234", "use": "home"},
                {"system": "email", "value": "jose@example.org"}],
    "gender": "male",
    "birthDate": "1970-03-15",
    "address": [{"line": ["1 Main St", "Apt 2"], "city": "Zürich", "state": "ZH",
                 "postalCode": "8001", "country": "CH", "text": "1 Main St, Zürich"}],
}


def test_patient_names_are_normalised_one_row_per_part():
    assert rows(PATIENT, "string", "family") == {("muller-ludenscheidt", "Müller-Lüdenscheidt")}
    assert rows(PATIENT, "string", "given") == {("jose", "José"), ("ana maria", "Ana  María")}
    assert rows(PATIENT, "string", "name") == {
        ("muller-ludenscheidt", "Müller-Lüdenscheidt"), ("jose", "José"),
        ("ana maria", "Ana  María"), ("dr.", "Dr."), ("phd", "PhD"),
        ("dr. jose muller", "Dr. José Müller")}


def test_patient_address_parts():
    assert rows(PATIENT, "string", "address") == {
        ("1 main st", "1 Main St"), ("apt 2", "Apt 2"), ("zurich", "Zürich"), ("zh", "ZH"),
        ("8001", "8001"), ("ch", "CH"), ("1 main st, zurich", "1 Main St, Zürich")}
    assert rows(PATIENT, "string", "address-city") == {("zurich", "Zürich")}
    assert rows(PATIENT, "string", "address-postalcode") == {("8001", "8001")}


def test_string_truncated_to_512():
    long = "x" * 600
    (value, exact), = rows({"resourceType": "Patient", "name": [{"family": long}]},
                           "string", "family")
    assert value == exact == "x" * 512


def test_patient_identifier_tokens_with_type():
    assert rows(PATIENT, "token", "identifier") == {
        ("http://hospital.example/mrn", "MRN-1", "medical record number",
         "http://terminology.hl7.org/CodeSystem/v2-0203", "MR"),
        (None, "no-system", None, None, None)}


def test_patient_telecom_code_and_boolean_tokens():
    assert rows(PATIENT, "token", "phone") == {(None, "555-1234", None, None, None)}
    assert rows(PATIENT, "token", "email") == {(None, "jose@example.org", None, None, None)}
    assert rows(PATIENT, "token", "telecom") == {(None, "555-1234", None, None, None),
                                                 (None, "jose@example.org", None, None, None)}
    assert rows(PATIENT, "token", "gender") == {(None, "male", None, None, None)}
    assert rows(PATIENT, "token", "active") == {(None, "true", None, None, None)}
    assert rows(PATIENT, "token", "deceased") == {(None, "false", None, None, None)}
    assert rows({**PATIENT, "deceasedDateTime": "2020-01-01"}, "token", "deceased") == {
        (None, "true", None, None, None)}


def test_patient_birthdate_is_a_day_range():
    assert dates(PATIENT, "birthdate") == {span("1970-03-15T00:00:00", "1970-03-16T00:00:00")}


def test_meta_parameters_but_not_id_or_last_updated():
    out = ex.extract(PATIENT)
    assert rows(PATIENT, "uri", "_profile") == {("http://example.org/sd/p",)}
    assert rows(PATIENT, "uri", "_source") == {("http://example.org/source#a",)}
    assert rows(PATIENT, "token", "_tag") == {
        ("http://example.org/tags", "t1", "tag one", None, None)}
    assert rows(PATIENT, "token", "_security") == {
        ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R", None, None, None)}
    codes = {r[0] for kind_rows in out.values() for r in kind_rows}
    assert "_id" not in codes and "_lastUpdated" not in codes


def test_duplicate_values_give_one_row():
    p = {"resourceType": "Patient", "name": [{"family": "Smith"}, {"family": "Smith"}],
         "identifier": [{"system": "s", "value": "1"}, {"system": "s", "value": "1"}]}
    out = ex.extract(p)
    assert [r for r in out["string"] if r[0] == "family"] == [("family", "smith", "Smith")]
    assert [r for r in out["token"] if r[0] == "identifier"] == [
        ("identifier", "s", "1", None, None, None)]
    for kind_rows in out.values():
        assert len(kind_rows) == len(set(kind_rows))


# --- Observation: choice types, quantity, Period, composite ---------------------------------

OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
BP = {
    "resourceType": "Observation", "id": "bp", "status": "final",
    "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs",
                              "display": "Vital Signs"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9",
                         "display": "Blood pressure panel"}], "text": "Blood Pressure"},
    "subject": {"reference": "Patient/p1"},
    "effectivePeriod": {"start": "2020-05-01T10:00:00+02:00", "end": "2020-05-01T10:30:00Z"},
    "component": [
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
         "valueQuantity": {"value": 120, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                           "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
         "valueQuantity": {"value": 80.5, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org",
                           "code": "mm[Hg]"}},
    ],
}


def test_codeable_concept_token_text_prefers_concept_text():
    assert rows(BP, "token", "code") == {
        ("http://loinc.org", "85354-9", "blood pressure", None, None)}
    assert rows(BP, "token", "category") == {
        (OBS_CATEGORY, "vital-signs", "vital signs", None, None)}
    text_only = {"resourceType": "Observation", "code": {"text": "Something Odd"}}
    assert rows(text_only, "token", "code") == {(None, None, "something odd", None, None)}


def test_effective_period_in_utc():
    assert dates(BP, "date") == {span("2020-05-01T08:00:00", "2020-05-01T10:30:01")}


def test_open_period_bounds():
    enc = {"resourceType": "Encounter", "period": {"start": "2021-01-01"}}
    assert rows(enc, "date", "date") == {(ts("2021-01-01T00:00:00"), ex.DATE_MAX)}
    enc = {"resourceType": "Encounter", "period": {"end": "2021"}}
    end = span("2021-01-01T00:00:00", "2022-01-01T00:00:00")[1]
    assert dates(enc, "date") == {(ex.DATE_MIN, end)}


def test_component_quantities_and_composites():
    assert rows(BP, "quantity", "component-value-quantity") == {
        (120.0, "http://unitsofmeasure.org", "mm[Hg]", "mm[Hg]"),
        (80.5, "http://unitsofmeasure.org", "mm[Hg]", "mm[Hg]")}
    assert rows(BP, "quantity", "value-quantity") == set()
    assert rows(BP, "quantity", "combo-value-quantity") == rows(BP, "quantity",
                                                                "component-value-quantity")
    assert rows(BP, "token", "component-code") == {
        ("http://loinc.org", "8480-6", None, None, None),
        ("http://loinc.org", "8462-4", None, None, None)}
    expected = {
        ("http://loinc.org", "8480-6", 120.0, "http://unitsofmeasure.org", "mm[Hg]",
         None, None, None, None, None),
        ("http://loinc.org", "8462-4", 80.5, "http://unitsofmeasure.org", "mm[Hg]",
         None, None, None, None, None)}
    assert rows(BP, "composite", "component-code-value-quantity") == expected
    assert rows(BP, "composite", "combo-code-value-quantity") == expected
    assert rows(BP, "composite", "code-value-quantity") == set()   # the panel has no value


def test_code_value_quantity_one_row_per_coding():
    obs = {"resourceType": "Observation",
           "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"},
                               {"system": "http://snomed.info/sct", "code": "27113001"}]},
           "valueQuantity": {"value": 70.2, "system": "http://unitsofmeasure.org", "code": "kg",
                             "unit": "kg"}}
    assert rows(obs, "composite", "code-value-quantity") == {
        ("http://loinc.org", "29463-7", 70.2, "http://unitsofmeasure.org", "kg",
         None, None, None, None, None),
        ("http://snomed.info/sct", "27113001", 70.2, "http://unitsofmeasure.org", "kg",
         None, None, None, None, None)}
    assert rows(obs, "quantity", "value-quantity") == {
        (70.2, "http://unitsofmeasure.org", "kg", "kg")}


def test_choice_types_select_the_right_element():
    code = {"coding": [{"system": "http://loinc.org", "code": "x"}]}
    concept = {"resourceType": "Observation", "code": code,
               "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct",
                                                    "code": "260385009"}], "text": "Negative"}}
    assert rows(concept, "token", "value-concept") == {
        ("http://snomed.info/sct", "260385009", "negative", None, None)}
    assert rows(concept, "quantity", "value-quantity") == set()
    assert rows(concept, "string", "value-string") == {("negative", "Negative")}
    assert rows(concept, "composite", "code-value-concept") == {
        ("http://loinc.org", "x", None, None, None, "http://snomed.info/sct", "260385009",
         None, None, None)}

    string = {"resourceType": "Observation", "code": code, "valueString": "Mild Pain"}
    assert rows(string, "string", "value-string") == {("mild pain", "Mild Pain")}
    assert rows(string, "composite", "code-value-string") == {
        ("http://loinc.org", "x", None, None, None, None, None, None, None, "mild pain")}
    assert rows(string, "token", "value-concept") == set()

    dated = {"resourceType": "Observation", "code": code, "valueDateTime": "2019-07"}
    lo, hi = span("2019-07-01T00:00:00", "2019-08-01T00:00:00")
    assert dates(dated, "value-date") == {(lo, hi)}
    (row,) = rows(dated, "composite", "code-value-date")
    assert row[:7] == ("http://loinc.org", "x", None, None, None, None, None)
    assert (round(row[7], 6), round(row[8], 6), row[9]) == (lo, hi, None)


def test_sampled_data_is_not_a_quantity():
    obs = {"resourceType": "Observation",
           "valueSampledData": {"origin": {"value": 0}, "period": 10, "dimensions": 1,
                                "data": "1 2 3"}}
    assert rows(obs, "quantity", "value-quantity") == set()


# --- Condition: dateTime with zone, Age, string choice --------------------------------------------

def test_condition_onset_with_timezone_is_converted_to_utc():
    cond = {"resourceType": "Condition", "onsetDateTime": "2011-06-05T09:32:14-04:00",
            "recordedDate": "2011-06-05T13:32:14Z", "subject": {"reference": "Patient/p1"}}
    assert dates(cond, "onset-date") == {span("2011-06-05T13:32:14", "2011-06-05T13:32:15")}
    assert rows(cond, "date", "recorded-date") == rows(cond, "date", "onset-date")
    assert rows(cond, "reference", "patient") == {("Patient", "p1", None, None, None)}


def test_condition_onset_age_range_and_string():
    cond = {"resourceType": "Condition",
            "onsetAge": {"value": 42, "unit": "a", "system": "http://unitsofmeasure.org",
                         "code": "a"},
            "abatementRange": {"low": {"value": 50, "code": "a"}, "high": {"value": 55}},
            }
    assert rows(cond, "quantity", "onset-age") == {(42.0, "http://unitsofmeasure.org", "a", "a")}
    assert rows(cond, "quantity", "abatement-age") == {(50.0, None, "a", None),
                                                       (55.0, None, None, None)}
    cond = {"resourceType": "Condition", "onsetString": "Since Childhood"}
    assert rows(cond, "string", "onset-info") == {("since childhood", "Since Childhood")}
    assert rows(cond, "date", "onset-date") == set()


# --- references -------------------------------------------------------------------------------

def _enc_ref(ref: dict) -> set[tuple]:
    return rows({"resourceType": "Encounter", "subject": ref}, "reference", "subject")


def test_reference_forms():
    assert _enc_ref({"reference": "Patient/123"}) == {("Patient", "123", None, None, None)}
    assert _enc_ref({"reference": "Patient/123/_history/4"}) == {
        ("Patient", "123", None, None, None)}
    url = "https://other.example/fhir/Patient/abc-1"
    assert _enc_ref({"reference": url}) == {("Patient", "abc-1", url, None, None)}
    assert _enc_ref({"reference": url + "/_history/2"}) == {
        ("Patient", "abc-1", url + "/_history/2", None, None)}
    assert _enc_ref({"reference": "urn:uuid:1363ed76-25b9-dc4f-6de7-6ee133d82db3"}) == {
        (None, None, "urn:uuid:1363ed76-25b9-dc4f-6de7-6ee133d82db3", None, None)}
    assert _enc_ref({"reference": "#contained1"}) == {(None, None, "#contained1", None, None)}
    assert _enc_ref({"identifier": {"system": "http://ids", "value": "77"}}) == {
        (None, None, None, "http://ids", "77")}
    assert _enc_ref({"display": "only a display"}) == set()


def test_canonical_reference_is_url_only():
    plan_def = {"resourceType": "PlanDefinition",
                "library": ["http://example.org/Library/lib|1.0"]}
    assert rows(plan_def, "reference", "depends-on") == {
        (None, None, "http://example.org/Library/lib|1.0", None, None)}


def test_where_resolve_is_patient():
    for subject, is_patient in [({"reference": "Patient/p1"}, True),
                                ({"reference": "http://x.org/fhir/Patient/p1"}, True),
                                ({"reference": "Group/g1"}, False),
                                ({"reference": "urn:uuid:0000"}, False),
                                ({"type": "Patient", "identifier": {"value": "9"}}, True)]:
        obs = {"resourceType": "Observation", "subject": subject}
        assert bool(rows(obs, "reference", "patient")) is is_patient, subject
        assert rows(obs, "reference", "subject")          # subject takes any target


def test_where_resolve_is_practitioner_on_encounter_participants():
    enc = {"resourceType": "Encounter",
           "participant": [{"individual": {"reference": "Practitioner/dr1"}},
                           {"individual": {"reference": "RelatedPerson/rp1"}}]}
    assert rows(enc, "reference", "practitioner") == {("Practitioner", "dr1", None, None, None)}
    assert rows(enc, "reference", "participant") == {("Practitioner", "dr1", None, None, None),
                                                     ("RelatedPerson", "rp1", None, None, None)}


def test_where_equality_on_related_artifact():
    lib = {"resourceType": "Library",
           "relatedArtifact": [{"type": "depends-on", "resource": "http://x/Library/a"},
                               {"type": "composed-of", "resource": "http://x/Library/b"}]}
    assert rows(lib, "reference", "depends-on") == {(None, None, "http://x/Library/a", None, None)}
    assert rows(lib, "reference", "composed-of") == {(None, None, "http://x/Library/b", None, None)}


# --- ImagingStudy, Immunization, Encounter --------------------------------------------------------

def test_imaging_study_modality_and_series():
    study = {"resourceType": "ImagingStudy", "status": "available",
             "subject": {"reference": "Patient/p1"}, "started": "2014-04-02T11:13:52+02:00",
             "series": [{"uid": "1.2.3.4", "modality": {
                 "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX",
                 "display": "Digital Radiography"},
                 "bodySite": {"system": "http://snomed.info/sct", "code": "51185008"},
                 "instance": [{"uid": "1.2.3.4.5", "sopClass": {
                     "system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.1"}}],
             }]}
    assert rows(study, "token", "modality") == {
        ("http://dicom.nema.org/resources/ontology/DCM", "DX", "digital radiography", None, None)}
    assert rows(study, "token", "series") == {(None, "1.2.3.4", None, None, None)}
    assert rows(study, "token", "instance") == {(None, "1.2.3.4.5", None, None, None)}
    assert rows(study, "token", "bodysite") == {
        ("http://snomed.info/sct", "51185008", None, None, None)}
    assert dates(study, "started") == {span("2014-04-02T09:13:52", "2014-04-02T09:13:53")}
    assert rows(study, "reference", "patient") == {("Patient", "p1", None, None, None)}


def test_immunization():
    imm = {"resourceType": "Immunization", "status": "completed",
           "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140",
                                       "display": "Influenza"}]},
           "patient": {"reference": "Patient/p1"}, "occurrenceDateTime": "2012-03-26",
           "lotNumber": "LOT-9", "primarySource": True}
    assert rows(imm, "token", "vaccine-code") == {
        ("http://hl7.org/fhir/sid/cvx", "140", "influenza", None, None)}
    assert dates(imm, "date") == {span("2012-03-26T00:00:00", "2012-03-27T00:00:00")}
    assert rows(imm, "reference", "patient") == {("Patient", "p1", None, None, None)}
    assert rows(imm, "string", "lot-number") == {("lot-9", "LOT-9")}
    imm_str = {"resourceType": "Immunization", "occurrenceString": "last spring"}
    assert rows(imm_str, "date", "date") == set()


def test_encounter_class_type_and_length():
    enc = {"resourceType": "Encounter", "status": "finished",
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
           "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "162673000",
                                 "display": "General examination"}]}],
           "length": {"value": 15, "unit": "min", "system": "http://unitsofmeasure.org",
                      "code": "min"},
           "serviceProvider": {"reference": "Organization/o1"}}
    assert rows(enc, "token", "class") == {
        ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB", None, None, None)}
    assert rows(enc, "token", "type") == {
        ("http://snomed.info/sct", "162673000", "general examination", None, None)}
    assert rows(enc, "quantity", "length") == {(15.0, "http://unitsofmeasure.org", "min", "min")}
    assert rows(enc, "reference", "service-provider") == {("Organization", "o1", None, None, None)}


def test_number_and_money():
    risk = {"resourceType": "RiskAssessment",
            "prediction": [{"probabilityDecimal": 0.25},
                           {"probabilityRange": {"low": {"value": 1}}}]}
    assert rows(risk, "number", "probability") == {(0.25,)}
    claim = {"resourceType": "ChargeItem", "priceOverride": {"value": 12.5, "currency": "EUR"}}
    assert rows(claim, "quantity", "price-override") == {
        (12.5, "urn:iso:std:iso:4217", "EUR", None)}


def test_molecular_sequence_coordinates():
    seq = {"resourceType": "MolecularSequence",
           "referenceSeq": {"chromosome": {"coding": [{"system": "http://chr", "code": "1"}]},
                            "windowStart": 100, "windowEnd": 200},
           "variant": [{"start": 120, "end": 121}]}
    assert rows(seq, "composite", "chromosome-window-coordinate") == {
        ("http://chr", "1", None, None, None, None, None, 100.0, 200.0, None)}
    # %resource.referenceSeq.chromosome: evaluated from the root, not the variant.
    assert rows(seq, "composite", "chromosome-variant-coordinate") == {
        ("http://chr", "1", None, None, None, None, None, 120.0, 121.0, None)}


def test_bundle_first_entry_is_a_reference():
    bundle = {"resourceType": "Bundle", "type": "document", "timestamp": "2020-01-01T00:00:00Z",
              "entry": [{"resource": {"resourceType": "Composition", "id": "c1"}},
                        {"resource": {"resourceType": "Patient", "id": "p1"}}]}
    assert rows(bundle, "reference", "composition") == {("Composition", "c1", None, None, None)}
    assert rows(bundle, "token", "type") == {(None, "document", None, None, None)}


# --- dates ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, low, end", [
    ("2020", "2020-01-01T00:00:00", "2021-01-01T00:00:00"),
    ("2020-02", "2020-02-01T00:00:00", "2020-03-01T00:00:00"),
    ("2020-12", "2020-12-01T00:00:00", "2021-01-01T00:00:00"),
    ("2020-02-29", "2020-02-29T00:00:00", "2020-03-01T00:00:00"),
    ("2020-02-29T23:59", "2020-02-29T23:59:00", "2020-03-01T00:00:00"),
    ("2020-02-29T23:59:59", "2020-02-29T23:59:59", "2020-03-01T00:00:00"),
    ("2020-02-29T23:59:59Z", "2020-02-29T23:59:59", "2020-03-01T00:00:00"),
    ("2020-03-01T01:00:00+01:00", "2020-03-01T00:00:00", "2020-03-01T00:00:01"),
    ("1950-06-01", "1950-06-01T00:00:00", "1950-06-02T00:00:00"),
])
def test_partial_dates_cover_their_precision(value, low, end):
    lo, hi = ex.date_range(value)
    assert lo == ts(low)
    assert hi == pytest.approx(ts(end) - 1e-6, abs=1e-7)


def test_fractional_seconds_and_invalid_dates():
    lo, hi = ex.date_range("2012-03-26T16:53:07.779+02:00")
    assert lo == pytest.approx(ts("2012-03-26T14:53:07") + 0.779)
    assert hi == pytest.approx(lo + 0.001 - 1e-6)
    for bad in ("2021-02-30", "20210101", "2021-13", "yesterday", "", None, 2021):
        assert ex.date_range(bad) is None


def test_timing_events():
    sr = {"resourceType": "ServiceRequest",
          "occurrenceTiming": {"event": ["2020-01-01", "2020-01-03"]}}
    assert dates(sr, "occurrence") == {span("2020-01-01T00:00:00", "2020-01-02T00:00:00"),
                                       span("2020-01-03T00:00:00", "2020-01-04T00:00:00")}
    # MedicationRequest date: MedicationRequest.dosageInstruction.timing.event
    req = {"resourceType": "MedicationRequest",
           "dosageInstruction": [{"timing": {"event": ["2020-01-01T08:00:00Z"]}}]}
    assert dates(req, "date") == {span("2020-01-01T08:00:00", "2020-01-01T08:00:01")}


# --- robustness and fallback --------------------------------------------------------------------

def test_malformed_data_never_raises():
    bad = {"resourceType": "Observation", "code": "not-a-concept", "subject": [1, None],
           "valueQuantity": {"value": "12"}, "effectiveDateTime": 2020,
           "component": [None, {"code": 5}], "meta": {"profile": [None, 3]},
           "category": [{"coding": "x"}]}
    out = ex.extract(bad)
    assert all(not v for k, v in out.items() if k != "token")


def test_fallback_to_fhirpathpy_for_unsupported_expressions():
    params = {
        "given-upper": SearchParam("given-upper", "string", "Patient.name.given.select(upper())",
                                   "urn:test:1", ("Patient",)),
        "single-given": SearchParam("single-given", "string", "Patient.name.given.single()",
                                    "urn:test:2", ("Patient",)),
    }
    plan = ex.compile_params("Patient", params)
    assert set(plan.errors) == {"given-upper", "single-given"} and not plan.fast
    out = ex.run_plan(plan, {"resourceType": "Patient", "name": [{"given": ["Ann", "Bo"]}]})
    # select() is evaluated by fhirpathpy; single() on two names fails at runtime: no rows.
    assert set(out["string"]) == {("given-upper", "ann", "ANN"), ("given-upper", "bo", "BO")}


def test_composite_fallback_evaluates_components_on_each_focus():
    spec = registry().get("Observation", "component-code-value-quantity")
    custom = SearchParam("cvq", "composite", "Observation.component.select($this)", "urn:test:3",
                         ("Observation",), components=spec.components)
    plan = ex.compile_params("Observation", {"cvq": custom})
    assert "cvq" in plan.errors
    got = {r[1:] for r in ex.run_plan(plan, BP)["composite"]}
    assert got == rows(BP, "composite", "component-code-value-quantity") and len(got) == 2


def test_split_union_respects_parentheses_and_strings():
    assert ex._split_union("A.b | (C.d | C.e) | F.where(x = 'a|b')") == [
        "A.b", "(C.d | C.e)", "F.where(x = 'a|b')"]


def test_unsupported_constructs_raise_unsupported_in_the_compiler():
    c = ex._Compiler("Patient")
    for expr in ("Patient.name.select(given)", "Patient.name.given.single()",
                 "Patient.name.family + 'x'"):
        with pytest.raises(ex.Unsupported):
            c.compile(ex._parse(expr), "Patient")


# --- equivalence with plain fhirpathpy on Synthea data ----------------------------------------

_MODEL = models["r4"]
_SYSTEM_TYPES = ("Boolean", "String", "Integer", "Decimal", "Date", "DateTime", "Time")


def _reference_text(expression: str, res_type: str) -> str:
    """The expression as plain fhirpathpy must see it to mean what the search spec means.

    * ``Resource.x``/``DomainResource.x`` -> ``<type>.x`` (fhirpathpy does not match supertypes);
    * ``x as T`` / ``x.as(T)`` -> ``x.ofType(T)`` (fhirpathpy's ``as`` errors on several items,
      e.g. two Observation components), System type names as the FHIR primitives;
    * ``resolve() is T`` -> a test of the reference itself (fhirpathpy cannot resolve).
    """
    text = re.sub(r"(?<![\w.%`])(Resource|DomainResource)\.", f"{res_type}.", expression)
    text = re.sub(r"\s+as\s+([A-Za-z][\w.]*)", r".ofType(\1)", text).replace(".as(", ".ofType(")
    for t in _SYSTEM_TYPES:
        text = text.replace(f"ofType({t})", f"ofType({t[0].lower()}{t[1:]})")
    return re.sub(r"resolve\(\)\s+is\s+([A-Za-z]+)", lambda m: (
        f"(reference.matches('^(https?://.+/)?{m[1]}/[-A-Za-z0-9.]{{1,64}}"
        f"(/_history/[-A-Za-z0-9.]{{1,64}})?$') or type = '{m[1]}')"), text)


@functools.lru_cache(maxsize=None)
def _fhirpathpy(text: str, raw: bool = False):
    return fhirpathpy.compile(text, _MODEL, {"returnRawData": True} if raw else None)


def reference_extract(resource: dict) -> dict[str, set[tuple]]:
    """Index rows computed with plain fhirpathpy and the shared value conversion."""
    res_type = resource["resourceType"]
    ctx = {"resource": resource}
    out: dict[str, set[tuple]] = {k: set() for k in INDEX_COLUMNS}
    for code, sp in registry().for_type(res_type).items():
        if code in ex.SKIPPED_PARAMS:
            continue
        text = _reference_text(sp.expression, res_type)
        if sp.type != "composite":
            values = _fhirpathpy(text)(resource, ctx)
            out[sp.type] |= set(ex.convert_values(sp.type, code, values))
            continue
        for branch in ex._split_union(text):       # a union's nodes lose their path
            for node in _fhirpathpy(branch, raw=True)(resource, ctx):
                parts = []
                for i, comp in enumerate(sp.components):
                    kind = "token" if i == 0 else registry().by_url[comp.definition].type
                    focus = ResourceNode.create_node(node.data, node.path)
                    values = _fhirpathpy(_reference_text(comp.expression, res_type))(focus, ctx)
                    parts.append((kind, ex.convert_values(kind, None, values)))
                out["composite"] |= set(ex.composite_rows(code, parts))
    return out


def load_synthea_bundle(name: str) -> list[dict]:
    """Resources of a Synthea transaction Bundle, with ``urn:uuid`` references rewritten to
    ``Type/id`` as the server's transaction processing does (FHIR R4 http.html#trules)."""
    path = SYNTHEA / name
    if not SYNTHEA.is_dir():
        pytest.skip(f"Synthea sample data not found at {SYNTHEA} (../shared/data)")
    return resolve_local_references(json.loads(bz2.decompress(path.read_bytes())))


@pytest.mark.shared_data
@pytest.mark.parametrize("bundle", SYNTHEA_BUNDLES)
def test_fast_extractor_matches_fhirpathpy_on_synthea(bundle):
    resources = load_synthea_bundle(bundle)
    mismatches = []
    for resource in resources:
        fast = ex.extract(resource)
        ref = reference_extract(resource)
        for kind in INDEX_COLUMNS:
            assert len(fast[kind]) == len(set(fast[kind])), "duplicates"
            if set(fast[kind]) != ref[kind]:
                mismatches.append((resource["resourceType"], resource["id"], kind,
                                   sorted(set(fast[kind]) - ref[kind], key=str)[:3],
                                   sorted(ref[kind] - set(fast[kind]), key=str)[:3]))
    assert not mismatches, mismatches[:5]
    assert sum(len(v) for r in resources[:50] for v in ex.extract(r).values()) > 0
