"""FHIR de-identification: the shipped default config on a fixture carrying every identifier,
then each method, the rule-order semantics and the FHIRPath-to-element mapping."""
import copy
import datetime as dt
import hashlib
import hmac
import json
import random
import re
import uuid
from pathlib import Path

import pytest

from server.deid import pseudonym as psn
from server.deid.fhir import (DeidConfig, DeidEngine, DeidProcessingError, decrypt_value,
                              reidentify_resource)
from server.errors import InvalidRequest
from server.fhir.validation import validate

FIXTURE = Path(__file__).parents[3] / "fixtures" / "deid" / "every-identifier-bundle.json"
TODAY = dt.date(2025, 6, 1)
KEY = bytes(range(64))
PA = "6f1c2d3e-1111-4a2b-9c3d-5e6f7a8b9c0d"

# Every identifying string the fixture carries (HIPAA Safe Harbor A-R, EHDS).
IDENTIFYING = [
    # A names (patient, relative, practitioners, contained author)
    "Theodora", "Maximilia", "Zebulon", "Quackenbush", "Bartholomew", "Eustace", "Oldenburg",
    "Whitfield", "Archibald", "Pemberton", "Cornelius", "Contained-Author", "Fitzgeraldine",
    # B geography below a state
    "Evergreen", "Apt 3B", "Springfieldton", "Middlesexville", "Capitolcityton", "Shelbyvillage",
    "Hanoverton", "Riverdale", "Hospital Plaza", "02139", "4307", "02141", "03601", "02110",
    # C dates (full dates and times)
    "1985-03-14", "1930-02-11", "1960-07-01", "2024-03-10", "2024-03-11", "2023-11-02",
    "2023-11-05", "09:30", "10:05", "14:45", "04:22",
    # D-F phone, fax, email
    "555-0199", "555-0142", "555-0177", "555-0100", "theodora.q@", "example-mail",
    "archibald@", "clinic-example",
    # G-L SSN, MRN, health plan, account, licence/certificate numbers
    "999-12-3456", "MRN-00472913", "MRN-00999111", "SUB-55512-A", "POLICY-7781-XYZ",
    "GROUP-8823", "ACCT-4455-6677", "MA-LIC-55519", "DL-S530-4721-9981", "PPT-X12345678",
    "VISIT-2024-88812", "1234567893", "1144221847",
    # EHDS national health id, insurance card
    "NHI-DE-8812345678", "EHIC-80276-001-4711",
    # L vehicle ids and plates, M device ids and serials
    "1HGCM82633A004352", "MA-7XK-492", "10987654d321", "7654321D", "DIST-555-ABC",
    "ASSET-77120", "00844588003288",
    # N URLs, O IP addresses
    "theodora-homepage", "photos.example.org", "ehr.example.org", "device-77",
    "ehr.example-hospital.org/source",
    "192.168.77.201", "203.0.113.77", "198.51.100.23",
    # P biometrics, Q photos
    "fingerprint", "UEhPVE9f", "face photo",
    # R other unique ids: original resource ids, document ids, DICOM-like OIDs
    PA, "0a9b8c7d-2222-4e5f-8a6b-1c2d3e4f5a6b", "pat-b-007", "pract-1", "org-1", "enc-1",
    "obs-1", "obs-2", "cond-1", "dev-1", "doc-1", "cov-1", "acct-1", "audit-1", "auth1",
    "DOC-MASTER-99812", "604688119", "fixture-bundle-1", "household",
]


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def _engine(pseudonym_key=None, **kw) -> DeidEngine:
    return DeidEngine(None, pseudonym_key=pseudonym_key, date_shift_key="fixture-date-key",
                      crypto_hash_key="fixture-hash-key", today=TODAY, **kw)


@pytest.fixture(scope="module", params=[KEY, None], ids=["pseudonym-key", "no-key"])
def deid(request):
    src = _fixture()
    before = copy.deepcopy(src)
    out = _engine(request.param).apply_bundle(src)
    assert src == before, "the input must not be changed"
    return src, out, request.param


def _resources(bundle):
    for e in bundle["entry"]:
        yield e["resource"]


def test_fixture_is_valid_and_carries_every_identifier():
    src = _fixture()
    validate(src, "Bundle")
    text = json.dumps(src)
    for s in IDENTIFYING:
        assert s in text, s


def test_nothing_identifying_survives(deid):
    _, out, _ = deid
    text = json.dumps(out).lower()
    left = [s for s in IDENTIFYING if s.lower() in text]
    assert not left, left


def test_output_validates(deid):
    _, out, _ = deid
    validate(out, "Bundle")
    for r in _resources(out):
        validate(r, r["resourceType"])
        for c in r.get("contained", []):
            validate(c, c["resourceType"])


def _references(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(obj, list):
        for x in obj:
            yield from _references(x)


def test_every_reference_resolves(deid):
    src, out, _ = deid
    full_urls = {e["fullUrl"] for e in out["entry"]}
    typed = {(r["resourceType"], r["id"]) for r in _resources(out)}
    n = 0
    for r in _resources(out):
        contained = {c["id"] for c in r.get("contained", [])}
        for ref in _references(r):
            n += 1
            if ref.startswith("#"):
                assert ref[1:] in contained, ref
            elif ref.startswith("urn:uuid:"):
                assert ref in full_urls, ref
                uuid.UUID(ref[9:])  # still a UUID
            else:
                t, _, i = ref.partition("/")
                assert (t, i) in typed, ref
    assert n == sum(1 for _ in _references(src)) - 1  # the note (Annotation) went, its author too
    # RESTful fullUrls follow their resources' new ids
    for e in out["entry"]:
        r = e["resource"]
        if not e["fullUrl"].startswith("urn:uuid:"):
            assert e["fullUrl"].endswith(f"/{r['resourceType']}/{r['id']}")
        if e["request"]["method"] == "PUT":
            assert e["request"]["url"] == f"{r['resourceType']}/{r['id']}"
    assert "ifNoneExist" not in out["entry"][0]["request"]


def _by_type(bundle, rtype):
    return [r for r in _resources(bundle) if r["resourceType"] == rtype]


def _days(a: str, b: str) -> int:
    return (dt.date.fromisoformat(b[:10]) - dt.date.fromisoformat(a[:10])).days


def test_dates_shifted_consistently_within_a_patient(deid):
    src, out, _ = deid
    pairs = []
    for s, o in zip(_resources(src), _resources(out)):
        for path in (("period", "start"), ("period", "end"), ("effectiveDateTime",), ("issued",),
                     ("onsetDateTime",), ("recordedDate",), ("date",), ("manufactureDate",),
                     ("servicePeriod", "start"), ("recorded",)):
            a, b = s, o
            for p in path:
                a, b = (a or {}).get(p), (b or {}).get(p)
            if isinstance(a, str) and isinstance(b, str) and s["resourceType"] != "Patient":
                subject = json.dumps(s)
                if PA in subject:
                    pairs.append((s["resourceType"], path, _days(a, b)))
    shifts = {d for _, _, d in pairs}
    assert len(pairs) >= 12 and len(shifts) == 1, pairs
    shift = shifts.pop()
    assert shift != 0 and -50 <= shift <= 50
    # times of day are dropped, zones kept
    enc = _by_type(out, "Encounter")[0]
    assert enc["period"]["start"].endswith("T00:00:00-05:00")
    # the shift is the engine's for this patient's scope key
    assert shift == _engine().date_shift_days(f"Patient/{PA}")


def test_ages_over_89_and_partial_dates(deid):
    _, out, _ = deid
    pa, pb = _by_type(out, "Patient")
    assert pa["birthDate"] == "1985"                     # year kept
    assert pa["_birthDate"]["extension"][0]["valueDateTime"] == "1985"
    assert "birthDate" not in pb                         # 95 years old: year removed too
    ages = {c["code"]["coding"][0]["code"]: c.get("onsetAge") for c in _by_type(out, "Condition")}
    assert "value" not in ages["396275006"] and ages["396275006"]["code"] == "a"  # 93 -> gone
    assert ages["195967001"]["value"] == 12
    assert _by_type(out, "Practitioner")[0]["birthDate"] == "1960"


def test_zip_codes_and_states(deid):
    _, out, _ = deid
    pa, pb = _by_type(out, "Patient")
    assert pa["address"] == [{"use": "home", "state": "MA", "postalCode": "02100-0000",
                              "country": "US", "period": {"start": "2010"}}]
    assert pb["address"][0]["postalCode"] == "00000"      # 036: fewer than 20,000 people
    assert pa["extension"][0]["valueAddress"] == {"state": "MA", "country": "US"}


def test_kept_clinical_content(deid):
    _, out, _ = deid
    pa = _by_type(out, "Patient")[0]
    assert pa["gender"] == "female" and pa["communication"][0]["preferred"] is True
    assert pa["maritalStatus"]["coding"][0]["code"] == "M"
    assert "contact" not in pa and "name" not in pa and "telecom" not in pa and "text" not in pa
    assert pa["photo"] == [{"contentType": "image/jpeg"}]
    obs = _by_type(out, "Observation")[0]
    assert obs["valueQuantity"] == {"value": 72, "unit": "beats/minute",
                                    "system": "http://unitsofmeasure.org", "code": "/min"}
    assert "note" not in obs
    race = pa["extension"][1]
    assert race["extension"] == [{"url": "ombCategory", "valueCoding": {
        "system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"}}]
    assert _by_type(out, "Organization")[0]["name"] == "Riverside General Hospital"
    doc = _by_type(out, "DocumentReference")[0]
    assert doc["content"][0]["attachment"]["contentType"] == "application/pdf"


def test_security_labels(deid):
    _, out, key = deid
    for r in list(_resources(out)) + [out]:
        codes = {s["code"] for s in r["meta"]["security"]}
        assert "REDACTED" in codes or "CRYTOHASH" in codes or "PSEUDED" in codes, r["resourceType"]
    codes = {s["code"] for s in _by_type(out, "Patient")[0]["meta"]["security"]}
    assert {"REDACTED", "ABSTRED", "PERTURBED"} <= codes
    assert ("PSEUDED" in codes) == (key is not None)
    v3 = [s for s in out["meta"]["security"] if s["code"] == "REDACTED"][0]
    assert v3["system"] == "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"


def test_patient_identifiers_are_pseudonyms_only_the_key_reverses(deid):
    src, out, key = deid
    pa = _by_type(out, "Patient")[0]
    if key is None:
        assert all("value" not in i for i in pa["identifier"])
        assert re.fullmatch(r"[0-9a-f]{64}", pa["id"])
        return
    values = [i["value"] for i in pa["identifier"]]
    assert all(v.startswith("psn-") for v in values)
    back = reidentify_resource(out, key)
    assert _by_type(back, "Patient")[0]["id"] == PA
    assert [i["value"] for i in _by_type(back, "Patient")[0]["identifier"]] == [
        i["value"] for i in _by_type(src, "Patient")[0]["identifier"]]
    obs = _by_type(back, "Observation")[0]
    assert obs["subject"]["reference"] == f"Patient/{PA}"
    assert obs["id"] == "obs-1"
    assert all(s["code"] != "PSEUDED" for s in obs["meta"]["security"])
    with pytest.raises(psn.PseudonymError):
        reidentify_resource(out, bytes(64))


def test_same_input_same_output_with_keys():
    a = _engine(KEY).apply_bundle(_fixture())
    b = _engine(KEY).apply_bundle(_fixture())
    assert a == b


def test_ephemeral_keys_are_reported():
    e = DeidEngine(None)
    assert set(e.ephemeral_keys) == {"cryptoHash", "dateShift", "encrypt"}
    assert DeidEngine(None, pseudonym_key=KEY).ephemeral_keys == []


# ----------------------------------------------------------------------------- methods
def eng(rules, processing_errors="raise", pseudonym_key=None, rng=None, **params) -> DeidEngine:
    return DeidEngine({"fhirVersion": "R4", "processingErrors": processing_errors,
                       "fhirPathRules": rules, "parameters": params},
                      crypto_hash_key="hk", date_shift_key="dk", encrypt_key=b"0" * 32,
                      pseudonym_key=pseudonym_key, today=TODAY, rng=rng)


PATIENT = {
    "resourceType": "Patient", "id": "p1",
    "name": [{"use": "official", "family": "Smith", "given": ["Ann", "Smith"]},
             {"use": "nickname", "given": ["Annie"],
              "_given": [{"extension": [{"url": "http://e.org/x", "valueString": "q"}]}]}],
    "birthDate": "1980-05-06", "gender": "female",
    "address": [{"city": "Boston", "state": "MA", "postalCode": "02134"}],
    "telecom": [{"system": "phone", "value": "555", "use": "home"},
                {"system": "email", "value": "a@b.c", "use": "work"}],
    "managingOrganization": {"reference": "Organization/o1"},
}


def test_keep_first_protects_from_later_rules():
    out = eng([{"path": "Patient.name.family", "method": "keep"},
               {"path": "nodesByType('HumanName')", "method": "redact"}]).apply(PATIENT)
    assert out["name"] == [{"family": "Smith"}]


def test_a_processed_element_is_not_processed_again():
    out = eng([{"path": "Patient.id", "method": "cryptoHash"},
               {"path": "Resource.id", "method": "redact"}]).apply(PATIENT)
    assert out["id"] == hmac.new(b"hk", b"p1", hashlib.sha256).hexdigest()


def test_union_of_equal_values_processes_both():
    # family and the second given name are both "Smith": a union must not merge them
    out = eng([{"path": "Patient.name.family | Patient.name.given", "method": "redact"}]
              ).apply(PATIENT)
    assert all("family" not in n and "given" not in n for n in out["name"])


def test_repeated_and_nested_elements_where():
    out = eng([{"path": "Patient.name.given.where($this = 'Ann')", "method": "redact"},
               {"path": "Patient.telecom.where(use = 'work').value", "method": "cryptoHash"}]
              ).apply(PATIENT)
    assert out["name"][0]["given"] == ["Smith"]
    assert out["telecom"][0]["value"] == "555"
    assert out["telecom"][1]["value"] == hmac.new(b"hk", b"a@b.c", hashlib.sha256).hexdigest()


def test_primitive_with_extension_part():
    out = eng([{"path": "Patient.name[1].given", "method": "substitute", "replaceWith": "X"}]
              ).apply(PATIENT)
    assert out["name"][1]["given"] == ["X"]
    assert "_given" not in out["name"][1]   # the extension part is replaced too
    out = eng([{"path": "nodesByType('Extension').value", "method": "redact"}]).apply(PATIENT)
    assert "_given" not in out["name"][1]   # extension without value removed (ext-1)


OBS = {
    "resourceType": "Observation", "id": "o1", "status": "final",
    "code": {"text": "x"},
    "valueQuantity": {"value": 120.0, "unit": "mmHg"},
    "component": [{"code": {"text": "a"}, "valueString": "secret-1"},
                  {"code": {"text": "b"}, "valueQuantity": {"value": 80}},
                  {"code": {"text": "c"}, "valueString": "secret-2"}],
    "extension": [{"url": "http://e.org/ip", "valueString": "10.1.2.3"}],
}


def test_choice_types():
    out = eng([{"path": "Observation.component.value.ofType(string)", "method": "redact"},
               {"path": "(Observation.value as Quantity).value", "method": "substitute",
                "replaceWith": 1}]).apply(OBS)
    assert [("valueString" in c) for c in out["component"]] == [False, False, False]
    assert out["component"][1]["valueQuantity"] == {"value": 80}
    assert out["valueQuantity"] == {"value": 1, "unit": "mmHg"}
    out = eng([{"path": "Observation.component.value", "method": "cryptoHash"}]).apply(OBS)
    assert out["component"][0]["valueString"] == hmac.new(b"hk", b"secret-1",
                                                          hashlib.sha256).hexdigest()
    assert isinstance(out["component"][1]["valueQuantity"]["value"], str)  # MS semantics


def test_extension_function_and_fallback_location():
    out = eng([{"path": "Observation.extension('http://e.org/ip').value", "method": "redact"}]
              ).apply(OBS)
    assert "extension" not in out


def test_nodes_by_type_inside_an_expression():
    out = eng([{"path": "nodesByType('HumanName').where(use = 'official').given",
                "method": "redact"}]).apply(PATIENT)
    assert "given" not in out["name"][0] and out["name"][1]["given"] == ["Annie"]
    out = eng([{"path": "nodesByName('value')", "method": "redact"}]).apply(PATIENT)
    assert all("value" not in t for t in out["telecom"])


def test_descendants_and_rule_types():
    out = eng([{"path": "Patient.descendants().ofType(HumanName)", "method": "redact"},
               {"path": "Observation.status", "method": "redact"}]).apply(PATIENT)
    assert "name" not in out and out["gender"] == "female"


def test_redact_partial_dates_ages_zip():
    res = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p"},
           "code": {"text": "x"},
           "onsetAge": {"value": 95, "unit": "a"}, "abatementAge": {"value": 40, "unit": "a"},
           "recordedDate": "2020-05-06T10:00:00Z"}
    p = dict(enablePartialAgesForRedact=True, enablePartialDatesForRedact=True,
             enablePartialZipCodesForRedact=True, restrictedZipCodeTabulationAreas=["021"])
    out = eng([{"path": "nodesByType('Age') | Condition.recordedDate", "method": "redact"}],
              **p).apply(res)
    # the whole Age is processed: unit and code go, the value only when over 89
    assert "onsetAge" not in out and out["abatementAge"] == {"value": 40}
    out = eng([{"path": "nodesByType('Age').value | Condition.recordedDate", "method": "redact"}],
              **p).apply(res)
    assert "value" not in out["onsetAge"] and out["abatementAge"]["value"] == 40
    assert out["recordedDate"] == "2020"
    out = eng([{"path": "nodesByType('Address')", "method": "redact"}], **p).apply(PATIENT)
    assert out["address"] == [{"postalCode": "00000"}]   # restricted area
    p["restrictedZipCodeTabulationAreas"] = []
    out = eng([{"path": "nodesByType('Address')", "method": "redact"}], **p).apply(PATIENT)
    assert out["address"] == [{"postalCode": "02100"}]
    out = eng([{"path": "nodesByType('Address')", "method": "redact", "partial": False}],
              **p).apply(PATIENT)
    assert "address" not in out
    out = eng([{"path": "Patient.birthDate", "method": "redact"}]).apply(PATIENT)
    assert "birthDate" not in out                        # no partial dates: all gone
    inst = {"resourceType": "Patient", "id": "p", "meta": {"lastUpdated": "2020-01-01T00:00:00Z"}}
    out = eng([{"path": "Patient.meta.lastUpdated", "method": "redact"}], **p).apply(inst)
    assert out["meta"]["lastUpdated"] == "2020-01-01T00:00:00Z"   # the year, as an instant
    out = eng([{"path": "Patient.meta.lastUpdated", "method": "redact"}]).apply(inst)
    assert "lastUpdated" not in out["meta"]


def test_date_shift():
    res = {"resourceType": "Encounter", "id": "e1", "status": "finished",
           "class": {"code": "AMB"},
           "period": {"start": "2020-02-28T23:10:05.123+02:00", "end": "2020-03-01"},
           "extension": [{"url": "http://e.org/y", "valueDate": "2019-05"},
                         {"url": "http://e.org/old", "valueDate": "1920-01-01"}]}
    e = eng([{"path": "nodesByType('dateTime') | nodesByType('date')", "method": "dateShift"}],
            enablePartialDatesForRedact=True)
    out = e.apply(res)
    d = e.date_shift_days("e1")   # scope resource: the resource's id
    assert out["period"]["start"] == (dt.date(2020, 2, 28) + dt.timedelta(days=d)).isoformat() \
        + "T00:00:00.000+02:00"
    assert out["period"]["end"] == (dt.date(2020, 3, 1) + dt.timedelta(days=d)).isoformat()
    assert out["extension"][0]["valueDate"] == "2019"            # no day: year only
    assert len(out["extension"]) == 1                            # 105 years ago: removed


def test_date_shift_scopes():
    r1 = {"resourceType": "Observation", "id": "a", "status": "final", "code": {"text": "x"},
          "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2020-01-10"}
    r2 = dict(r1, id="b")
    rule = [{"path": "nodesByType('dateTime')", "method": "dateShift"}]
    for scope, expect in (("resource", None), ("patient", "Patient/p1"), ("file", "f.ndjson"),
                          ("folder", "in")):
        e = eng(rule, dateShiftScope=scope)
        o1, o2 = e.apply_many([r1, r2], file="/x/f.ndjson", folder="/data/in/")
        if scope == "resource":
            assert o1["effectiveDateTime"] == _shift("2020-01-10", e.date_shift_days("a"))
            assert o2["effectiveDateTime"] == _shift("2020-01-10", e.date_shift_days("b"))
        else:
            assert o1["effectiveDateTime"] == o2["effectiveDateTime"] == \
                _shift("2020-01-10", e.date_shift_days(expect))
    with pytest.raises(InvalidRequest):
        eng(rule, dateShiftScope="planet")


def _shift(d: str, days: int) -> str:
    return (dt.date.fromisoformat(d) + dt.timedelta(days=days)).isoformat()


def test_crypto_hash_references():
    h = lambda s: hmac.new(b"hk", s.encode(), hashlib.sha256).hexdigest()  # noqa: E731
    res = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
           "contained": [{"resourceType": "Practitioner", "id": "c1"}],
           "subject": {"reference": "Patient/p1"},
           "performer": [{"reference": "#c1"},
                         {"reference": "http://h.org/fhir/Practitioner/9/_history/2"},
                         {"reference": "urn:uuid:6f1c2d3e-1111-4a2b-9c3d-5e6f7a8b9c0d"},
                         {"reference": "urn:oid:1.2.3.4"}],
           "identifier": [{"value": "1.2.840.10008.5.1"}]}
    out = eng([{"path": "Resource.id | nodesByType('Reference').reference | "
                        "nodesByType('Identifier').value", "method": "cryptoHash"}]).apply(res)
    assert out["id"] == h("o1") and out["contained"][0]["id"] == h("c1")
    assert out["subject"]["reference"] == f"Patient/{h('p1')}"
    refs = [p["reference"] for p in out["performer"]]
    assert refs[0] == f"#{h('c1')}"
    assert refs[1] == f"http://h.org/fhir/Practitioner/{h('9')}/_history/2"
    assert uuid.UUID(refs[2][9:]).version == 4 and refs[2] != res["performer"][2]["reference"]
    assert re.fullmatch(r"urn:oid:2\.25\.\d+", refs[3])
    assert re.fullmatch(r"2\.25\.\d+", out["identifier"][0]["value"])   # an OID stays an OID
    assert {s["code"] for s in out["meta"]["security"]} == {"CRYTOHASH"}


def test_encrypt():
    out = eng([{"path": "Patient.address.city", "method": "encrypt"}]).apply(PATIENT)
    token = out["address"][0]["city"]
    assert token != "Boston" and decrypt_value(token, b"0" * 32) == "Boston"
    again = eng([{"path": "Patient.address.city", "method": "encrypt"}]).apply(PATIENT)
    assert again["address"][0]["city"] != token          # random IV
    assert {s["code"] for s in out["meta"]["security"]} == {"MASKED"}


def test_substitute():
    out = eng([{"path": "Patient.address.city", "method": "keep"},
               {"path": "nodesByType('Address')", "method": "substitute",
                "replaceWith": {"city": "Nowhere", "state": "XX", "line": ["a", "b"]}}]
              ).apply(PATIENT)
    # the city was processed (kept) first: the substitution leaves it
    assert out["address"] == [{"city": "Boston", "state": "XX", "line": ["a", "b"]}]
    out = eng([{"path": "Patient.gender", "method": "substitute", "replaceWith": "unknown"}]
              ).apply(PATIENT)
    assert out["gender"] == "unknown"
    assert {s["code"] for s in out["meta"]["security"]} == {"SUBSTITUTED"}
    with pytest.raises(DeidProcessingError):
        eng([{"path": "Patient.gender", "method": "substitute", "replaceWith": {"a": 1}}]
            ).apply(PATIENT)


def test_perturb():
    res = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"},
           "valueQuantity": {"value": 100.0, "unit": "mg"},
           "component": [{"code": {"text": "n"}, "valueInteger": 50}]}
    rng = random.Random(7)
    for _ in range(20):
        out = eng([{"path": "Observation.value", "method": "perturb", "span": 10,
                    "roundTo": 1},
                   {"path": "Observation.component.value", "method": "perturb", "span": 0.5,
                    "rangeType": "proportional"}], rng=rng).apply(res)
        v = out["valueQuantity"]["value"]
        assert 95 <= v <= 105 and round(v, 1) == v
        n = out["component"][0]["valueInteger"]
        assert isinstance(n, int) and 37 <= n <= 63
        assert out["valueQuantity"]["unit"] == "mg"
    with pytest.raises(InvalidRequest):
        eng([{"path": "Observation.value", "method": "perturb"}])


def test_generalize():
    res = {"resourceType": "Patient", "id": "p", "birthDate": "1995-03-02",
           "multipleBirthInteger": 18,
           "communication": [{"language": {"coding": [{"code": "es-UY"}, {"code": "fr-FR"}]}}],
           "address": [{"postalCode": "1234567"}]}
    out = eng([
        {"path": "Patient.birthDate", "method": "generalize",
         "cases": {"$this >= @1990-01-01 and $this <= @2000-01-01": "@1990"}},
        {"path": "Patient.multipleBirth", "method": "generalize",
         "cases": {"$this >= 0 and $this < 20": "20"}},
        {"path": "Patient.communication.language.coding.code", "method": "generalize",
         "cases": {"$this in ('es-AR' | 'es-UY')": "'es'"}, "otherValues": "keep"},
        {"path": "Patient.address.postalCode", "method": "generalize",
         "cases": {"$this.startsWith('999')": "'x'"}},
    ]).apply(res)
    assert out["birthDate"] == "1990" and out["multipleBirthInteger"] == 20
    assert [c["code"] for c in out["communication"][0]["language"]["coding"]] == ["es", "fr-FR"]
    assert "address" not in out                                   # otherValues: redact
    with pytest.raises(DeidProcessingError):
        eng([{"path": "Patient.address", "method": "generalize", "cases": {"true": "1"}}]
            ).apply(PATIENT)


def test_pseudonymize_method():
    rules = [{"path": "Patient.telecom.value", "method": "pseudonymize", "context": "telecom"},
             {"path": "Resource.id | nodesByType('Reference').reference",
              "method": "pseudonymize", "withoutKey": "cryptoHash"}]
    out = eng(rules, pseudonym_key=KEY).apply(PATIENT)
    assert psn.reidentify(out["telecom"][0]["value"], KEY, "telecom") == "555"
    assert psn.reidentify(out["id"], KEY, "id") == "p1"
    org = out["managingOrganization"]["reference"]
    assert org.startswith("Organization/psn-") and psn.reidentify(org[13:], KEY, "id") == "o1"
    assert {s["code"] for s in out["meta"]["security"]} == {"PSEUDED"}
    back = reidentify_resource(out, KEY, contexts=("telecom",))
    assert back["telecom"][0]["value"] == "555" and back["id"] == "p1"
    assert back["managingOrganization"]["reference"] == "Organization/o1"
    # without the key: the fallback of each rule
    out = eng(rules).apply(PATIENT)
    assert all("value" not in t for t in out["telecom"])
    assert out["id"] == hmac.new(b"hk", b"p1", hashlib.sha256).hexdigest()
    with pytest.raises(DeidProcessingError):
        eng([{"path": "Patient.id", "method": "pseudonymize", "withoutKey": "raise"}]
            ).apply(PATIENT)


def test_processing_errors_skip_gives_an_empty_resource():
    rule = [{"path": "Patient.address", "method": "generalize", "cases": {"true": "1"}}]
    out = eng(rule, processing_errors="skip").apply(PATIENT)
    assert out == {"resourceType": "Patient", "meta": {"security": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "REDACTED", "display": "redacted"}]}}


def test_contained_and_bundle_entries_are_resources_of_their_own():
    b = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:6f1c2d3e-1111-4a2b-9c3d-5e6f7a8b9c0d",
         "resource": {"resourceType": "Patient", "id": "p", "gender": "male",
                      "contained": [{"resourceType": "Organization", "id": "o", "name": "N"}]}}]}
    out = eng([{"path": "Patient.gender", "method": "redact"},
               {"path": "Organization.name", "method": "redact"}]).apply_bundle(b)
    p = out["entry"][0]["resource"]
    assert "gender" not in p and p["contained"] == [{"resourceType": "Organization", "id": "o"}]
    assert "meta" not in p["contained"][0]        # contained resources carry no labels
    assert out["meta"]["security"][0]["code"] == "REDACTED"
    with pytest.raises(InvalidRequest):
        eng([]).apply_bundle(PATIENT)


@pytest.mark.parametrize("cfg, msg", [
    ([], "JSON object"),
    ({}, "fhirPathRules"),
    ({"fhirVersion": "Stu3", "fhirPathRules": []}, "fhirVersion"),
    ({"fhirPathRules": [{"path": "Patient.name"}]}, "path and a method"),
    ({"fhirPathRules": [{"path": "Patient.name", "method": "shred"}]}, "not supported"),
    ({"fhirPathRules": [{"path": "Patient.name.where(", "method": "redact"}]}, "Invalid FHIRPath"),
    ({"fhirPathRules": [{"path": "HumanName.given", "method": "redact"}]}, "resource type"),
    ({"fhirPathRules": [{"path": "Patient", "method": "substitute"}]}, "replaceWith"),
    ({"fhirPathRules": [{"path": "Patient", "method": "perturb", "span": -1}]}, "span"),
    ({"fhirPathRules": [{"path": "Patient", "method": "generalize", "cases": {}}]}, "cases"),
    ({"fhirPathRules": [{"path": "Patient", "method": "generalize",
                         "cases": {"true": "1"}, "otherValues": "drop"}]}, "otherValues"),
    ({"fhirPathRules": [], "parameters": {"encryptKey": "short"}}, "encryptKey"),
    ({"fhirPathRules": [], "parameters": {"enablePartialAgesForRedact": "yes"}}, "true or false"),
    ({"fhirPathRules": [], "parameters": {"restrictedZipCodeTabulationAreas": "036"}}, "array"),
    ({"fhirPathRules": [], "processingErrors": "ignore"}, "processingErrors"),
])
def test_config_validation(cfg, msg):
    with pytest.raises(InvalidRequest, match=msg):
        DeidConfig.load(cfg)


def test_config_files(tmp_path):
    assert DeidConfig.load(None).parameters.date_shift_scope == "patient"
    assert len(DeidConfig.load("default").rules) >= 20
    f = tmp_path / "c.json"
    f.write_text("{not json")
    with pytest.raises(InvalidRequest, match="not JSON"):
        DeidConfig.load(f)
    with pytest.raises(InvalidRequest, match="Cannot read"):
        DeidConfig.load(tmp_path / "missing.json")
    f.write_text(json.dumps({"fhirPathRules": [{"path": "Patient.name", "method": "REDACT"}]}))
    assert DeidConfig.load(str(f)).rules[0].method == "redact"


def test_strict_safe_harbor_keeps_years_only():
    out = DeidEngine("safe-harbor-strict", pseudonym_key=KEY, today=TODAY).apply_bundle(_fixture())
    dates = []

    def walk(o, k=None):
        if isinstance(o, dict):
            for kk, v in o.items():
                walk(v, kk)
        elif isinstance(o, list):
            for v in o:
                walk(v, k)
        elif isinstance(o, str) and re.match(r"^\d{4}(-\d{2})", o) and \
                not re.fullmatch(r"\d{4}-01-01T00:00:00(Z|[+-]\d{2}:\d{2})", o):
            dates.append((k, o))
    walk(out)
    assert not dates, dates
    enc = _by_type(out, "Encounter")[0]
    assert enc["period"] == {"start": "2024", "end": "2024"}
    assert _by_type(out, "Patient")[0]["meta"]["lastUpdated"] == "2024-01-01T00:00:00Z"
    assert _by_type(out, "AuditEvent")[0]["recorded"] == "2024-01-01T00:00:00-05:00"
    validate(out, "Bundle")


def test_conditional_references_keep_matching_their_targets():
    prac = {"resourceType": "Practitioner", "id": "x",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "9999"}]}
    enc = {"resourceType": "Encounter", "id": "e", "status": "finished", "class": {"code": "AMB"},
           "participant": [{"individual": {
               "reference":
                   "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi%7C9999&name=Bob"}}]}
    for key in (KEY, None):
        e = DeidEngine(None, pseudonym_key=key, crypto_hash_key="h")
        value = e.apply(prac)["identifier"][0]["value"]
        out = e.apply(enc)
        ref = out["participant"][0]["individual"]["reference"]
        assert value != "9999" and "Bob" not in ref
        assert ref == f"Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|{value}"
    back = reidentify_resource(DeidEngine(None, pseudonym_key=KEY).apply(enc), KEY)
    assert back["participant"][0]["individual"]["reference"] == \
        "Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|9999"


def test_long_ids_get_a_consistent_hash_and_errors_quote_no_data():
    long_id = "A-very-long-resource-identifier-0123456789"
    e = DeidEngine(None, pseudonym_key=KEY, crypto_hash_key="h")
    p = e.apply({"resourceType": "Patient", "id": long_id})
    o = e.apply({"resourceType": "Observation", "id": "o", "status": "final",
                 "code": {"text": "x"}, "subject": {"reference": f"Patient/{long_id}"}})
    assert re.fullmatch(r"[0-9a-f]{64}", p["id"])
    assert o["subject"]["reference"] == f"Patient/{p['id']}"
    bad = eng([{"path": "Patient.name.family.first() + 'x'", "method": "redact"}])
    with pytest.raises(DeidProcessingError) as exc:
        bad.apply(PATIENT)
    assert "Smith" not in exc.value.message
