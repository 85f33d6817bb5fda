"""FHIR R4 search executed on SQLite and PostgreSQL (server.fhir.search.execute / match_pks).

Resources are written straight into the ``resource`` table plus their ``extract()`` index
rows by the small helpers below (one row per version, ``superseded_by`` on the old row).
"""
from __future__ import annotations

import bz2
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from sqlalchemy import select, update

from server.db.engine import make_engine, migrate
from server.db.schema import INDEX_COLUMNS, INDEX_TABLES, resource as RES
from server.errors import InvalidRequest, NotImplementedYet
from server.fhir.extract import extract
from server.fhir.search import execute, match_pks, parse

SYNTHEA = Path(__file__).resolve().parents[4].parent / "shared" / "data" / "synthea-us-120"


# --------------------------------------------------------------------------- write helpers


def _index(conn, pk: int, body: dict) -> None:
    for kind, rows in extract(body).items():
        if rows:
            cols = INDEX_COLUMNS[kind]
            conn.execute(INDEX_TABLES[kind].insert(),
                         [{"res_pk": pk, "res_type": body["resourceType"], "param": r[0],
                           **dict(zip(cols, r[1:]))} for r in rows])


def insert(conn, body: dict, *, last_updated: float | None = None) -> int:
    """Write version 1 of a resource and its index rows; returns its pk."""
    pk = conn.execute(RES.insert().values(
        res_type=body["resourceType"], res_id=body["id"], version=1,
        last_updated=time.time() if last_updated is None else last_updated, deleted=False,
        method="POST", superseded_by=None, body=orjson.dumps(body))).inserted_primary_key[0]
    _index(conn, pk, body)
    return pk


def new_version(conn, body: dict | None = None, *, res_type: str | None = None,
                res_id: str | None = None, deleted: bool = False) -> int:
    """Write the next version (or a delete tombstone) and supersede the current one."""
    res_type = res_type or body["resourceType"]
    res_id = res_id or body["id"]
    old_pk, version = conn.execute(
        select(RES.c.pk, RES.c.version).where(RES.c.res_type == res_type, RES.c.res_id == res_id,
                                              RES.c.superseded_by.is_(None))).one()
    pk = conn.execute(RES.insert().values(
        res_type=res_type, res_id=res_id, version=version + 1, last_updated=time.time(),
        deleted=deleted, method="DELETE" if deleted else "PUT", superseded_by=None,
        body=None if deleted else orjson.dumps(body))).inserted_primary_key[0]
    conn.execute(update(RES).where(RES.c.pk == old_pk).values(superseded_by=pk))
    if not deleted:
        _index(conn, pk, body)
    return pk


# --------------------------------------------------------------------------- fixtures


def ts(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


MR = "http://terminology.hl7.org/CodeSystem/v2-0203"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def _world() -> list[dict]:
    def obs(id_, code, subject, **kw):
        system = kw.pop("system", LOINC)
        coding = {"code": code, **({"system": system} if system else {})}
        if "display" in kw:
            coding["display"] = kw.pop("display")
        return {"resourceType": "Observation", "id": id_, "status": kw.pop("status", "final"),
                "code": {"coding": [coding]}, "subject": {"reference": subject}, **kw}

    return [
        {"resourceType": "Organization", "id": "o2", "name": "Umbrella Group"},
        {"resourceType": "Organization", "id": "o1", "name": "Acme Health", "partOf": {"reference": "Organization/o2"}},
        {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Doctor", "given": ["Joe"]}]},
        {"resourceType": "Patient", "id": "p1", "active": True, "gender": "male", "birthDate": "1974-12-25",
         "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
         "identifier": [{"system": "http://acme.org/mrn", "value": "12345",
                         "type": {"coding": [{"system": MR, "code": "MR"}]}}],
         "managingOrganization": {"reference": "Organization/o1"},
         "meta": {"tag": [{"system": "http://acme.org/tags", "code": "needs-review"}],
                  "profile": ["http://example.org/StructureDefinition/vip"], "source": "http://src.example/a"}},
        {"resourceType": "Patient", "id": "p2", "gender": "female", "birthDate": "1980-03",
         "name": [{"family": "Éclair", "given": ["Renée"]}],
         "identifier": [{"system": "http://other.org/id", "value": "12345"}],
         "generalPractitioner": [{"reference": "Practitioner/dr1"}],
         "managingOrganization": {"reference": "http://elsewhere.example/fhir/Organization/o9"}},
        {"resourceType": "Patient", "id": "p3", "birthDate": "2001",
         "name": [{"family": "Eve", "given": ["Severine"], "text": "50% a,b$c|d"}],
         "identifier": [{"value": "x|1"}]},
        obs("obs1", "8480-6", "Patient/p1", display="Systolic blood pressure",
            effectiveDateTime="2013-01-14T10:00:00Z", performer=[{"reference": "Practitioner/dr1"}],
            valueQuantity={"value": 120, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}),
        obs("obs2", "8462-4", "Patient/p1", display="Diastolic blood pressure", status="preliminary",
            effectivePeriod={"start": "2013-01-21"},
            valueQuantity={"value": 80, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}),
        obs("obs3", "8480-6", "Patient/p2", effectiveDateTime="2013-03-14",
            valueQuantity={"value": 5.4, "unit": "milligram", "system": UCUM, "code": "mg"}),
        obs("obs4", "85354-9", "Patient/p2", display="Blood pressure panel",
            effectiveDateTime="2015-06-15T08:00:00+02:00",
            component=[{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                        "valueQuantity": {"value": 150, "system": UCUM, "code": "mm[Hg]"}},
                       {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                        "valueQuantity": {"value": 95, "system": UCUM, "code": "mm[Hg]"}}]),
        obs("obs5", "x-local", "Group/g1", system=None, status="amended",
            effectivePeriod={"end": "2013-01-21"}, valueString="Hello Wörld"),
        obs("obs6", "x-local", "Patient/p3", system="http://local.codes", effectiveDateTime="2013-01-14",
            valueCodeableConcept={"coding": [{"system": "http://snomed.info/sct", "code": "260385009"}]}),
        {"resourceType": "Group", "id": "g1", "type": "person", "actual": True, "name": "Peter's group"},
        {"resourceType": "Provenance", "id": "prov1", "recorded": "2013-01-15T00:00:00Z",
         "target": [{"reference": "Observation/obs1"}], "agent": [{"who": {"reference": "Practitioner/dr1"}}]},
        {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
         "subject": {"reference": "Patient/p1"},
         "period": {"start": "2020-01-01T10:00:00Z", "end": "2020-01-01T12:00:00Z"}},
        {"resourceType": "RiskAssessment", "id": "ra1", "status": "final", "subject": {"reference": "Patient/p1"},
         "prediction": [{"probabilityDecimal": 0.8}]},
        {"resourceType": "RiskAssessment", "id": "ra2", "status": "final", "subject": {"reference": "Patient/p1"},
         "prediction": [{"probabilityDecimal": 100}]},
        {"resourceType": "RiskAssessment", "id": "ra3", "status": "final", "subject": {"reference": "Patient/p1"},
         "prediction": [{"probabilityDecimal": 99.4}]},
        {"resourceType": "ValueSet", "id": "vs1", "status": "active", "url": "http://acme.org/fhir/ValueSet/123"},
        {"resourceType": "ValueSet", "id": "vs2", "status": "active", "url": "http://acme.org/fhir/ValueSet/124"},
        {"resourceType": "ValueSet", "id": "vs3", "status": "active", "url": "http://acme.org/fhir"},
        {"resourceType": "MolecularSequence", "id": "ms1", "coordinateSystem": 0,
         "referenceSeq": {"chromosome": {"coding": [{"system": "http://chr", "code": "1"}]},
                          "windowStart": 100, "windowEnd": 200}},
    ]


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def world(engine):
    """The world above, written with last_updated = 2020-01-01T00:00Z + n hours."""
    pks = {}
    with engine.begin() as conn:
        for n, body in enumerate(_world()):
            pks[body["id"]] = insert(conn, body, last_updated=ts(2020, 1, 1) + 3600 * n)
    return pks


def run(engine, res_type, params, **kw):
    with engine.connect() as conn:
        return execute(conn, parse(res_type, params, **kw))


def ids_of(engine, pks) -> list[str]:
    if not pks:
        return []
    with engine.connect() as conn:
        got = dict(conn.execute(select(RES.c.pk, RES.c.res_id).where(RES.c.pk.in_(pks))).all())
    return [got[pk] for pk in pks]


def ids(engine, res_type, params, **kw) -> set[str]:
    return set(ids_of(engine, run(engine, res_type, params, handling="strict", **kw).pks))


def ordered(engine, res_type, params) -> list[str]:
    return ids_of(engine, run(engine, res_type, params, handling="strict").pks)


# --------------------------------------------------------------------------- token


def test_token(engine, world):
    o = "Observation"
    assert ids(engine, o, [("code", "8480-6")]) == {"obs1", "obs3"}
    assert ids(engine, o, [("code", f"{LOINC}|8480-6")]) == {"obs1", "obs3"}
    assert ids(engine, o, [("code", "http://other|8480-6")]) == set()
    assert ids(engine, o, [("code", "|x-local")]) == {"obs5"}
    assert ids(engine, o, [("code", "x-local")]) == {"obs5", "obs6"}
    assert ids(engine, o, [("code", "http://local.codes|")]) == {"obs6"}
    assert ids(engine, o, [("code", "8480-6,8462-4")]) == {"obs1", "obs2", "obs3"}       # OR
    assert ids(engine, o, [("code", "8480-6,8462-4"), ("status", "final")]) == {"obs1", "obs3"}  # AND
    assert ids(engine, o, [("status:not", "final")]) == {"obs2", "obs5"}
    assert ids(engine, o, [("status:not", "final,amended")]) == {"obs2"}
    assert ids(engine, o, [("code:text", "blood")]) == {"obs1", "obs2", "obs4"}
    assert ids(engine, o, [("code:text", "Pressure pan")]) == {"obs4"}
    assert ids(engine, o, [("code:text", "ressure")]) == set()                    # word starts only
    assert ids(engine, "Patient", [("identifier", "12345")]) == {"p1", "p2"}
    assert ids(engine, "Patient", [("identifier", "http://acme.org/mrn|12345")]) == {"p1"}
    assert ids(engine, "Patient", [("identifier:of-type", f"{MR}|MR|12345")]) == {"p1"}
    assert ids(engine, "Patient", [("identifier:of-type", f"{MR}|MR|99")]) == set()
    assert ids(engine, "Patient", [("identifier", r"x\|1")]) == {"p3"}               # escaped '|'
    assert ids(engine, "Patient", [("active", "true")]) == {"p1"}
    assert ids(engine, "Patient", [("gender:not", "male")]) == {"p2", "p3"}          # incl. missing


def test_missing_all_types(engine, world):
    assert ids(engine, "Patient", [("gender:missing", "true")]) == {"p3"}
    assert ids(engine, "Patient", [("gender:missing", "false")]) == {"p1", "p2"}
    assert ids(engine, "Patient", [("family:missing", "false")]) == {"p1", "p2", "p3"}
    assert ids(engine, "Patient", [("general-practitioner:missing", "false")]) == {"p2"}
    assert ids(engine, "Observation", [("value-quantity:missing", "true")]) == {"obs4", "obs5", "obs6"}
    assert ids(engine, "Observation", [("date:missing", "true")]) == set()
    assert ids(engine, "ValueSet", [("url:missing", "false")]) == {"vs1", "vs2", "vs3"}
    assert ids(engine, "RiskAssessment", [("probability:missing", "false")]) == {"ra1", "ra2", "ra3"}


# --------------------------------------------------------------------------- string


def test_string(engine, world):
    p = "Patient"
    assert ids(engine, p, [("name", "pet")]) == {"p1"}
    assert ids(engine, p, [("name", "PETER")]) == {"p1"}
    assert ids(engine, p, [("name", "eter")]) == set()
    assert ids(engine, p, [("name:contains", "eter")]) == {"p1"}
    assert ids(engine, p, [("given", "eve")]) == set()
    assert ids(engine, p, [("given:contains", "eve")]) == {"p3"}                      # Severine
    assert ids(engine, p, [("family", "eclair")]) == {"p2"}                           # accents
    assert ids(engine, p, [("family", "ÉCL")]) == {"p2"}
    assert ids(engine, p, [("family:exact", "Éclair")]) == {"p2"}
    assert ids(engine, p, [("family:exact", "eclair")]) == set()
    assert ids(engine, p, [("name", "chalmers,eve")]) == {"p1", "p3"}
    assert ids(engine, p, [("name", "peter"), ("name", "james")]) == {"p1"}
    assert ids(engine, p, [("name", "peter"), ("name", "renee")]) == set()
    # LIKE wildcards are literal; escaped separators (§3.1.1.4.19)
    assert ids(engine, p, [("name", "50%")]) == {"p3"}
    assert ids(engine, p, [("name", "5_%")]) == set()
    assert ids(engine, p, [("name:contains", r"a\,b\$c\|d")]) == {"p3"}
    assert ids(engine, p, [("name:contains", "%")]) == {"p3"}


# --------------------------------------------------------------------------- date


def test_date_prefixes(engine, world):
    o = "Observation"
    # obs1 2013-01-14T10:00:00Z, obs2 [2013-01-21, open), obs3 2013-03-14, obs4 2015-06-15T06:00Z,
    # obs5 (open, 2013-01-21], obs6 2013-01-14 (day)
    assert ids(engine, o, [("date", "2013-01-14")]) == {"obs1", "obs6"}
    assert ids(engine, o, [("date", "eq2013-01-14T10:00:00Z")]) == {"obs1"}
    assert ids(engine, o, [("date", "2013-01-14T11:00:00+01:00")]) == {"obs1"}      # timezone
    assert ids(engine, o, [("date", "2013-01-14T10:00")]) == {"obs1"}
    assert ids(engine, o, [("date", "2013")]) == {"obs1", "obs3", "obs6"}
    assert ids(engine, o, [("date", "2013-01")]) == {"obs1", "obs6"}
    assert ids(engine, o, [("date", "ne2013")]) == {"obs2", "obs4", "obs5"}
    assert ids(engine, o, [("date", "lt2013-01-14T10:00Z")]) == {"obs5", "obs6"}
    assert ids(engine, o, [("date", "gt2013-01-14T10:00Z")]) == {"obs2", "obs3", "obs4", "obs5", "obs6"}
    assert ids(engine, o, [("date", "ge2013-03-14")]) == {"obs2", "obs3", "obs4"}
    assert ids(engine, o, [("date", "le2013-01-14")]) == {"obs1", "obs5", "obs6"}
    assert ids(engine, o, [("date", "sa2013-01-20")]) == {"obs2", "obs3", "obs4"}
    assert ids(engine, o, [("date", "eb2013-01-21")]) == {"obs1", "obs6"}
    assert ids(engine, o, [("date", "eb2013-01-22")]) == {"obs1", "obs5", "obs6"}
    # ap: overlap with the value widened by 10% of its distance from now (obs2 is open-ended)
    assert ids(engine, o, [("date", "ap2015-06-01")]) == {"obs2", "obs4"}
    assert ids(engine, o, [("date", "ge2013-01-14"), ("date", "le2013-01-14")]) == {"obs1", "obs5", "obs6"}
    assert ids(engine, o, [("date", "2013-01-14,2015")]) == {"obs1", "obs4", "obs6"}
    assert ids(engine, "Encounter", [("date", "ge2020-01-01T11:00:00Z")]) == {"e1"}
    assert ids(engine, "Encounter", [("date", "sa2020-01-01T11:00:00Z")]) == set()
    assert ids(engine, "Patient", [("birthdate", "1980")]) == {"p2"}
    assert ids(engine, "Patient", [("birthdate", "1980-03-05")]) == set()             # month > day
    assert ids(engine, "Patient", [("birthdate", "lt1980-03-05")]) == {"p1", "p2"}


def test_last_updated_and_id(engine, world):
    # written at 2020-01-01T00:00Z + n hours in _world() order: o2=0h, o1=1h, dr1=2h, p1=3h, p2=4h, p3=5h
    assert ids(engine, "Patient", [("_lastUpdated", "ge2020-01-01T04:00:00Z")]) == {"p2", "p3"}
    assert ids(engine, "Patient", [("_lastUpdated", "lt2020-01-01T04:00:00Z")]) == {"p1"}
    assert ids(engine, "Patient", [("_lastUpdated", "2020-01-01T04:00:00Z")]) == {"p2"}
    assert ids(engine, "Patient", [("_lastUpdated", "2020-01-01")]) == {"p1", "p2", "p3"}
    assert ids(engine, "Patient", [("_lastUpdated", "eb2020-01-01T04:00Z")]) == {"p1"}
    assert ids(engine, "Patient", [("_id", "p1,p3,obs1")]) == {"p1", "p3"}
    assert ids(engine, "Patient", [("_id", "p1"), ("_id", "p2")]) == set()
    assert ids(engine, "Patient", [("_id:not", "p1")]) == {"p2", "p3"}
    assert ids(engine, "Patient", [("_id", "P1")]) == set()                           # case sensitive


# --------------------------------------------------------------------------- number / quantity


def test_number(engine, world):
    r = "RiskAssessment"     # ra1 0.8, ra2 100, ra3 99.4
    assert ids(engine, r, [("probability", "100")]) == {"ra2"}
    assert ids(engine, r, [("probability", "99")]) == {"ra3"}                         # [98.5, 99.5)
    assert ids(engine, r, [("probability", "1e2")]) == {"ra2", "ra3"}                 # one digit: [50, 150)
    assert ids(engine, r, [("probability", "0.8")]) == {"ra1"}
    assert ids(engine, r, [("probability", "8e-1")]) == {"ra1"}
    assert ids(engine, r, [("probability", "gt0.8")]) == {"ra2", "ra3"}
    assert ids(engine, r, [("probability", "ge0.8")]) == {"ra1", "ra2", "ra3"}
    assert ids(engine, r, [("probability", "lt99.4")]) == {"ra1"}
    assert ids(engine, r, [("probability", "le99.4")]) == {"ra1", "ra3"}
    assert ids(engine, r, [("probability", "ne100")]) == {"ra1", "ra3"}
    assert ids(engine, r, [("probability", "sa99.4")]) == {"ra2"}
    assert ids(engine, r, [("probability", "eb99.4")]) == {"ra1"}
    assert ids(engine, r, [("probability", "ap95")]) == {"ra2", "ra3"}


def test_quantity(engine, world):
    o = "Observation"   # obs1 120 mm[Hg], obs2 80 mm[Hg], obs3 5.4 mg (unit "milligram")
    assert ids(engine, o, [("value-quantity", "5.4")]) == {"obs3"}
    assert ids(engine, o, [("value-quantity", f"5.4|{UCUM}|mg")]) == {"obs3"}
    assert ids(engine, o, [("value-quantity", f"5.4|{UCUM}|g")]) == set()
    assert ids(engine, o, [("value-quantity", "5.4||mg")]) == {"obs3"}
    assert ids(engine, o, [("value-quantity", "5.4||milligram")]) == {"obs3"}         # unit
    assert ids(engine, o, [("value-quantity", "5.44")]) == set()
    assert ids(engine, o, [("value-quantity", f"gt100|{UCUM}|mm[Hg]")]) == {"obs1"}
    assert ids(engine, o, [("value-quantity", "le80")]) == {"obs2", "obs3"}
    assert ids(engine, o, [("value-quantity", "ap110")]) == {"obs1"}
    assert ids(engine, o, [("value-quantity", "ne120")]) == {"obs2", "obs3"}
    assert ids(engine, o, [("component-value-quantity", "gt140")]) == {"obs4"}


# --------------------------------------------------------------------------- reference


def test_reference(engine, world):
    o = "Observation"
    assert ids(engine, o, [("subject", "p1")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("subject", "Patient/p1")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("subject", "Group/p1")]) == set()
    assert ids(engine, o, [("subject:Patient", "p2")]) == {"obs3", "obs4"}
    assert ids(engine, o, [("subject:Group", "g1")]) == {"obs5"}
    assert ids(engine, o, [("patient", "p1,p3")]) == {"obs1", "obs2", "obs6"}
    assert ids(engine, o, [("subject", "http://my.server/fhir/Patient/p1")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("subject", "Patient/p1/_history/3")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("subject:missing", "false"), ("patient:missing", "true")]) == {"obs5"}
    assert ids(engine, "Patient", [("organization", "http://elsewhere.example/fhir/Organization/o9")]) == {"p2"}
    assert ids(engine, "Patient", [("organization", "o9")]) == {"p2"}
    assert ids(engine, "Patient", [("general-practitioner", "Practitioner/dr1")]) == {"p2"}


def test_reference_identifier(engine):
    with engine.begin() as conn:
        insert(conn, {"resourceType": "Observation", "id": "x1", "status": "final", "code": {"text": "t"},
                      "subject": {"identifier": {"system": "http://acme.org/mrn", "value": "123456"}}})
        insert(conn, {"resourceType": "Observation", "id": "x2", "status": "final", "code": {"text": "t"},
                      "subject": {"identifier": {"value": "123456"}}})
    o = "Observation"
    assert ids(engine, o, [("subject:identifier", "http://acme.org/mrn|123456")]) == {"x1"}
    assert ids(engine, o, [("subject:identifier", "123456")]) == {"x1", "x2"}
    assert ids(engine, o, [("subject:identifier", "|123456")]) == {"x2"}


# --------------------------------------------------------------------------- uri / composite / meta


def test_uri(engine, world):
    v = "ValueSet"
    assert ids(engine, v, [("url", "http://acme.org/fhir/ValueSet/123")]) == {"vs1"}
    assert ids(engine, v, [("url", "http://acme.org/fhir/ValueSet/12")]) == set()
    assert ids(engine, v, [("url:below", "http://acme.org/fhir/")]) == {"vs1", "vs2"}
    assert ids(engine, v, [("url:below", "http://acme.org/fhir")]) == {"vs1", "vs2", "vs3"}
    assert ids(engine, v, [("url:above", "http://acme.org/fhir/ValueSet/123/_history/5")]) == {"vs1", "vs3"}
    both = "http://acme.org/fhir/ValueSet/123,http://acme.org/fhir/ValueSet/124"
    assert ids(engine, v, [("url", both)]) == {"vs1", "vs2"}


def test_composite(engine, world):
    o = "Observation"
    assert ids(engine, o, [("code-value-quantity", f"{LOINC}|8480-6$gt100")]) == {"obs1"}
    assert ids(engine, o, [("code-value-quantity", "8480-6$lt100")]) == {"obs3"}
    assert ids(engine, o, [("code-value-quantity", f"8480-6$5.4|{UCUM}|mg")]) == {"obs3"}
    assert ids(engine, o, [("code-value-quantity", "8462-4$gt100")]) == set()
    assert ids(engine, o, [("component-code-value-quantity", f"{LOINC}|8480-6$gt140")]) == {"obs4"}
    # the components must match in the same component (not 8480-6 in one, 95 in another)
    assert ids(engine, o, [("component-code-value-quantity", "8480-6$95")]) == set()
    assert ids(engine, o, [("component-code-value-quantity", "8480-6$lt100,8462-4$95")]) == {"obs4"}
    assert ids(engine, o, [("code-value-concept", "x-local$http://snomed.info/sct|260385009")]) == {"obs6"}
    assert ids(engine, o, [("code-value-string", "x-local$hello w")]) == {"obs5"}
    assert ids(engine, o, [("code-value-string", "x-local$world")]) == set()
    assert ids(engine, "MolecularSequence",
               [("chromosome-window-coordinate", "1$ge100$le200")]) == {"ms1"}
    assert ids(engine, "MolecularSequence",
               [("chromosome-window-coordinate", "1$gt100$le200")]) == set()


def test_meta_params(engine, world):
    assert ids(engine, "Patient", [("_tag", "http://acme.org/tags|needs-review")]) == {"p1"}
    assert ids(engine, "Patient", [("_tag", "needs-review")]) == {"p1"}
    assert ids(engine, "Patient", [("_profile", "http://example.org/StructureDefinition/vip")]) == {"p1"}
    assert ids(engine, "Patient", [("_source", "http://src.example/a")]) == {"p1"}
    assert ids(engine, "Patient", [("_security:missing", "true")]) == {"p1", "p2", "p3"}


# --------------------------------------------------------------------------- chains / _has


def test_chaining(engine, world):
    o = "Observation"
    assert ids(engine, o, [("subject:Patient.name", "peter")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("patient.name", "eclair")]) == {"obs3", "obs4"}
    # subject targets Patient, Practitioner, Organization, Location...: 'name' on each of them
    assert ids(engine, o, [("subject.name", "peter,joe,acme")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("subject:Group.type", "person")]) == {"obs5"}
    assert ids(engine, o, [("subject.type", "person")]) == {"obs5"}                 # Group only
    assert ids(engine, o, [("subject.identifier", "http://acme.org/mrn|12345")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("subject:Patient.organization.name", "acme")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("patient.organization.partof.name", "umbrella")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("patient.general-practitioner.name", "joe")]) == {"obs3", "obs4"}
    assert ids(engine, o, [("patient.name", "peter,renee")]) == {"obs1", "obs2", "obs3", "obs4"}
    assert ids(engine, o, [("patient.gender:missing", "true")]) == {"obs6"}
    assert ids(engine, o, [("patient._id", "p1")]) == {"obs1", "obs2"}
    assert ids(engine, o, [("patient.name", "nobody")]) == set()
    with pytest.raises(InvalidRequest):
        run(engine, o, [("subject.nonexistent", "x")])


def test_reverse_chaining(engine, world):
    p = "Patient"
    assert ids(engine, p, [("_has:Observation:patient:code", "8480-6")]) == {"p1", "p2"}
    assert ids(engine, p, [("_has:Observation:patient:code", "85354-9,x-local")]) == {"p2", "p3"}
    assert ids(engine, p, [("_has:Observation:patient:code", "8480-6"),
                           ("_has:Observation:patient:status", "preliminary")]) == {"p1"}
    assert ids(engine, p, [("_has:Observation:subject:_has:Provenance:target:agent", "Practitioner/dr1")]) == {"p1"}
    assert ids(engine, p, [("_has:Observation:patient:performer.name", "joe")]) == {"p1"}
    assert ids(engine, "Practitioner", [("_has:Patient:general-practitioner:name", "renee")]) == {"dr1"}
    assert ids(engine, "Group", [("_has:Observation:subject:code", "x-local")]) == {"g1"}


def test_combined_criteria(engine, world):
    """One criterion drives (a pk list), the others are probes: same results either way."""
    o = "Observation"
    assert ids(engine, o, [("date", "ge2013-01-14"), ("code", "8480-6")]) == {"obs1", "obs3"}
    assert ids(engine, o, [("code", "8480-6"), ("patient.name", "peter")]) == {"obs1"}
    assert ids(engine, o, [("patient.name", "peter,renee"), ("subject", "p2")]) == {"obs3", "obs4"}
    assert ids(engine, o, [("status", "final"), ("value-quantity", "gt100"), ("date", "2013")]) == {"obs1"}
    assert ids(engine, o, [("code:text", "blood"), ("status:not", "final"), ("date:missing", "false")]) == {"obs2"}
    assert ids(engine, "Patient", [("_has:Observation:patient:code", "8480-6"), ("gender", "female"),
                                   ("name", "renee")]) == {"p2"}
    assert ids(engine, "Patient", [("_id", "p1,p2"), ("birthdate", "lt1990")]) == {"p1", "p2"}


# --------------------------------------------------------------------------- sort


def test_sort(engine, world):
    p = "Patient"
    assert ordered(engine, p, [("_sort", "birthdate")]) == ["p1", "p2", "p3"]
    assert ordered(engine, p, [("_sort", "-birthdate")]) == ["p3", "p2", "p1"]
    # missing values sort last in both directions
    assert ordered(engine, p, [("_sort", "gender")]) == ["p2", "p1", "p3"]
    assert ordered(engine, p, [("_sort", "-gender")]) == ["p1", "p2", "p3"]
    # multi-valued: ascending uses the smallest value, descending the largest
    # p1 names {chalmers, peter, james}, p2 {eclair, renee}, p3 {eve, severine, 50% a,b$c|d}
    assert ordered(engine, p, [("_sort", "name")]) == ["p3", "p1", "p2"]
    assert ordered(engine, p, [("_sort", "-name")]) == ["p3", "p2", "p1"]
    assert ordered(engine, p, [("_sort", "-_id")]) == ["p3", "p2", "p1"]
    assert ordered(engine, p, [("_sort", "-_lastUpdated")]) == ["p3", "p2", "p1"]
    o = "Observation"
    assert ordered(engine, o, [("_sort", "status,-date")]) == ["obs5", "obs4", "obs3", "obs6", "obs1", "obs2"]
    assert ordered(engine, o, [("_sort", "-status,date")]) == ["obs2", "obs6", "obs1", "obs3", "obs4", "obs5"]
    assert ordered(engine, o, [("_sort", "subject,_id")]) == ["obs5", "obs1", "obs2", "obs3", "obs4", "obs6"]
    assert ordered(engine, o, [("_sort", "value-quantity,_id")]) == ["obs3", "obs2", "obs1", "obs4", "obs5", "obs6"]
    # a repeated _sort adds inner sort orders
    assert ordered(engine, o, [("_sort", "code"), ("_sort", "-_id")]) == \
        ["obs2", "obs3", "obs1", "obs4", "obs6", "obs5"]
    assert ordered(engine, o, [("_sort:desc", "date")])[0] == "obs2"


# --------------------------------------------------------------------------- paging / snapshots


def test_paging_is_stable_under_writes(engine):
    with engine.begin() as conn:
        for i in range(5):
            insert(conn, {"resourceType": "Patient", "id": f"q{i}", "name": [{"family": f"Fam{i}"}]})
    page1 = run(engine, "Patient", [("_count", "2"), ("_sort", "_id")])
    assert ids_of(engine, page1.pks) == ["q0", "q1"] and page1.total == 5
    assert page1.prev_params is None
    nxt = dict(page1.next_params)
    assert nxt["_snapshot"] == str(page1.snapshot) and nxt["_offset"] == "2" and nxt["_count"] == "2"
    assert ("_sort", "_id") in page1.next_params

    with engine.begin() as conn:          # concurrent writes between page 1 and page 2
        new_version(conn, {"resourceType": "Patient", "id": "q2", "name": [{"family": "Changed"}]})
        new_version(conn, res_type="Patient", res_id="q3", deleted=True)
        insert(conn, {"resourceType": "Patient", "id": "q00", "name": [{"family": "New"}]})

    page2 = run(engine, "Patient", page1.next_params)
    assert ids_of(engine, page2.pks) == ["q2", "q3"] and page2.total == 5
    assert page2.snapshot == page1.snapshot
    with engine.connect() as conn:        # the old version of q2
        assert conn.execute(select(RES.c.version).where(RES.c.pk == page2.pks[0])).scalar() == 1
    assert dict(page2.prev_params)["_offset"] == "0"
    page3 = run(engine, "Patient", page2.next_params)
    assert ids_of(engine, page3.pks) == ["q4"] and page3.next_params is None
    back = run(engine, "Patient", page3.prev_params)
    assert ids_of(engine, back.pks) == ["q2", "q3"]
    # a fresh search sees the writes
    fresh = run(engine, "Patient", [("_count", "10"), ("_sort", "_id")])
    assert ids_of(engine, fresh.pks) == ["q0", "q00", "q1", "q2", "q4"] and fresh.snapshot > page1.snapshot
    assert ids(engine, "Patient", [("family", "changed")]) == {"q2"}
    assert ids(engine, "Patient", [("family", "fam2")]) == set()                  # old version not current
    assert set(ids_of(engine, run(engine, "Patient", [("family", "fam2"),
                                                      ("_snapshot", str(page1.snapshot))]).pks)) == {"q2"}


def test_default_order_and_offset(engine, world):
    all_ = ids_of(engine, run(engine, "Observation", []).pks)
    assert all_ == ["obs1", "obs2", "obs3", "obs4", "obs5", "obs6"]          # pk order
    page = run(engine, "Observation", [("_count", "2"), ("_offset", "4")])
    assert ids_of(engine, page.pks) == ["obs5", "obs6"] and page.next_params is None
    assert dict(page.prev_params)["_offset"] == "2"
    assert run(engine, "Observation", [("_offset", "100")]).pks == []


def test_total_and_count_zero(engine, world):
    page = run(engine, "Observation", [("status", "final")])
    assert page.total == 4 and len(page.pks) == 4
    page = run(engine, "Observation", [("status", "final"), ("_total", "none")])
    assert page.total is None and len(page.pks) == 4
    page = run(engine, "Observation", [("status", "final"), ("_total", "estimate"), ("_count", "1")])
    assert page.total == 4 and len(page.pks) == 1 and page.next_params
    page = run(engine, "Observation", [("_count", "0"), ("_totalMethod", "count")], handling="strict")
    assert page.total == 6 and page.pks == [] and page.next_params is None
    page = run(engine, "Observation", [("_summary", "count"), ("_include", "Observation:patient")])
    assert page.total == 6 and page.pks == [] and page.include_pks == []
    page = run(engine, "Observation", [("_count", "5000")])
    assert page.total == 6 and any("5000" in w for w in page.warnings)


def test_empty_database(engine):
    page = run(engine, "Patient", [("name", "x")])
    assert (page.pks, page.total, page.snapshot, page.next_params) == ([], 0, 0, None)
    with engine.connect() as conn:
        assert match_pks(conn, "Patient", [("name", "x")]) == []


# --------------------------------------------------------------------------- _include / _revinclude


def test_include(engine, world):
    page = run(engine, "Observation", [("code", "8480-6"), ("_include", "Observation:patient")])
    assert set(ids_of(engine, page.pks)) == {"obs1", "obs3"}
    assert set(ids_of(engine, page.include_pks)) == {"p1", "p2"}
    page = run(engine, "Observation", [("_id", "obs1,obs5"), ("_include", "Observation:subject:Group")])
    assert ids_of(engine, page.include_pks) == ["g1"]
    page = run(engine, "Observation", [("_id", "obs1,obs5"), ("_include", "Observation:subject")])
    assert set(ids_of(engine, page.include_pks)) == {"p1", "g1"}
    page = run(engine, "Observation", [("_id", "obs1"), ("_include", "*")])
    assert set(ids_of(engine, page.include_pks)) == {"p1", "dr1"}
    page = run(engine, "Observation", [("_id", "obs1"), ("_include", "Patient:organization")])
    assert page.include_pks == []                                # applies to Patients only
    # not iterated: Patient:organization does not apply to included patients
    page = run(engine, "Observation", [("_id", "obs1"), ("_include", "Observation:patient"),
                                       ("_include", "Patient:organization")])
    assert ids_of(engine, page.include_pks) == ["p1"]


def test_include_iterate_and_revinclude(engine, world):
    params = [("_id", "obs1"), ("_include", "Observation:patient"),
              ("_include:iterate", "Patient:organization"), ("_include:iterate", "Organization:partof")]
    page = run(engine, "Observation", params)
    assert set(ids_of(engine, page.include_pks)) == {"p1", "o1", "o2"}
    page = run(engine, "Observation", [("_id", "obs1"), ("_include", "Observation:patient"),
                                       ("_include:recurse", "Patient:organization")])
    assert set(ids_of(engine, page.include_pks)) == {"p1", "o1"}
    # matches are never repeated as includes
    page = run(engine, "Organization", [("_include:iterate", "Organization:partof")])
    assert set(ids_of(engine, page.pks)) == {"o1", "o2"} and page.include_pks == []
    page = run(engine, "Observation", [("_id", "obs1,obs2"), ("_revinclude", "Provenance:target")])
    assert ids_of(engine, page.include_pks) == ["prov1"]
    page = run(engine, "Patient", [("_id", "p1"), ("_revinclude", "Observation:patient"),
                                   ("_revinclude:iterate", "Provenance:target")])
    assert set(ids_of(engine, page.include_pks)) == {"obs1", "obs2", "prov1"}
    page = run(engine, "Patient", [("_id", "p2"), ("_revinclude", "Observation:subject:Group")])
    assert page.include_pks == []
    page = run(engine, "Practitioner", [("_revinclude", "*")])
    assert set(ids_of(engine, page.include_pks)) == {"p2", "obs1", "prov1"}


def test_include_uses_snapshot_versions(engine, world):
    with engine.begin() as conn:
        new_pk = new_version(conn, {"resourceType": "Organization", "id": "o1", "name": "Acme 2"})
        new_version(conn, res_type="Provenance", res_id="prov1", deleted=True)
    page = run(engine, "Patient", [("_id", "p1"), ("_include", "Patient:organization"),
                                   ("_revinclude", "Provenance:target")])
    assert page.include_pks == [new_pk]
    # an older snapshot includes what was current then
    page = run(engine, "Observation", [("_id", "obs1"), ("_snapshot", str(world["prov1"])),
                                       ("_include", "Observation:patient"),
                                       ("_include:iterate", "Patient:organization"),
                                       ("_revinclude", "Provenance:target")])
    assert set(page.include_pks) == {world["p1"], world["o1"], world["prov1"]}


# --------------------------------------------------------------------------- system-level search


def test_system_search(engine, world):
    page = run(engine, None, [("_id", "p1,obs1,o2")])
    assert set(ids_of(engine, page.pks)) == {"p1", "obs1", "o2"} and page.total == 3
    page = run(engine, None, [("_lastUpdated", "lt2020-01-01T02:00:00Z")])
    assert set(ids_of(engine, page.pks)) == {"o1", "o2"}
    page = run(engine, None, [("_lastUpdated", "lt2020-01-01T05:00:00Z"), ("_sort", "-_lastUpdated"),
                              ("_count", "2")])
    assert ids_of(engine, page.pks) == ["p2", "p1"] and page.total == 5
    assert ids_of(engine, run(engine, None, page.next_params).pks) == ["dr1", "o1"]
    page = run(engine, None, [("_tag", "needs-review")])
    assert ids_of(engine, page.pks) == ["p1"]
    page = run(engine, None, [("_type", "Patient,Practitioner"), ("name", "peter,joe")])
    assert set(ids_of(engine, page.pks)) == {"p1", "dr1"}
    page = run(engine, None, [("_type", "Organization,Practitioner")])
    assert set(ids_of(engine, page.pks)) == {"o1", "o2", "dr1"}
    page = run(engine, None, [("name", "peter")])                 # lenient: ignored, warned
    assert page.warnings and page.total == len(_world())
    with pytest.raises(InvalidRequest):
        run(engine, None, [("name", "peter")], handling="strict")


def test_type_level_type_param(engine, world):
    assert ids(engine, "Patient", [("_type", "Patient")]) == {"p1", "p2", "p3"}
    assert ids(engine, "Patient", [("_type", "Observation")]) == set()


# --------------------------------------------------------------------------- errors


def test_errors(engine, world):
    with pytest.raises(InvalidRequest):
        run(engine, "Patient", [("foo", "bar")], handling="strict")
    page = run(engine, "Patient", [("foo", "bar"), ("_text", "x")])
    assert page.total == 3 and len(page.warnings) == 2
    with pytest.raises(NotImplementedYet):
        run(engine, "Patient", [("_filter", "name eq x")], handling="strict")
    with pytest.raises(NotImplementedYet):
        run(engine, "Condition", [("code:in", "http://vs")])


# --------------------------------------------------------------------------- match_pks


def test_match_pks(engine, world):
    with engine.connect() as conn:
        assert match_pks(conn, "Patient", [("identifier", "http://acme.org/mrn|12345")]) == [(world["p1"], "p1")]
        assert sorted(r for _, r in match_pks(conn, "Patient", [("identifier", "12345")])) == ["p1", "p2"]
        assert match_pks(conn, "Patient", [("identifier", "12345"), ("_count", "1"), ("_sort", "name")]) \
            and len(match_pks(conn, "Patient", [("identifier", "12345")])) == 2
        with pytest.raises(InvalidRequest):
            match_pks(conn, "Patient", [("bogus", "1")])
    with engine.begin() as conn:
        body = dict(_world()[3], gender="other")
        new_pk = new_version(conn, body)
    with engine.connect() as conn:
        assert match_pks(conn, "Patient", [("identifier", "http://acme.org/mrn|12345")]) == [(new_pk, "p1")]
        assert match_pks(conn, "Patient", [("gender", "male")]) == []
    with engine.begin() as conn:
        new_version(conn, res_type="Patient", res_id="p1", deleted=True)
    with engine.connect() as conn:
        assert match_pks(conn, "Patient", [("identifier", "http://acme.org/mrn|12345")]) == []
        assert match_pks(conn, "Observation", [("patient.identifier", "http://acme.org/mrn|12345")]) == []
        assert [r for _, r in match_pks(conn, "Observation", [("patient", "p1")])] == ["obs1", "obs2"]


# --------------------------------------------------------------------------- real data (Synthea)


def _load_bundle(conn, path: Path) -> list[dict]:
    bundle = orjson.loads(bz2.open(path).read())
    resources = [e["resource"] for e in bundle["entry"]]
    full = {e["fullUrl"]: f'{e["resource"]["resourceType"]}/{e["resource"]["id"]}' for e in bundle["entry"]}

    def fix(x):
        if isinstance(x, dict):
            return {k: (full.get(v, v) if k == "reference" and isinstance(v, str) else fix(v))
                    for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x

    resources = [fix(r) for r in resources]
    # Batched: one multi-row INSERT for the resources, one per index table.
    now = time.time()
    pks = conn.execute(RES.insert().returning(RES.c.pk, sort_by_parameter_order=True), [
        {"res_type": r["resourceType"], "res_id": r["id"], "version": 1, "last_updated": now,
         "deleted": False, "method": "POST", "superseded_by": None, "body": orjson.dumps(r)}
        for r in resources]).scalars().all()
    rows: dict[str, list[dict]] = {kind: [] for kind in INDEX_TABLES}
    for pk, r in zip(pks, resources):
        for kind, found in extract(r).items():
            cols = INDEX_COLUMNS[kind]
            rows[kind] += [{"res_pk": pk, "res_type": r["resourceType"], "param": x[0],
                            **dict(zip(cols, x[1:]))} for x in found]
    for kind, batch in rows.items():
        if batch:
            conn.execute(INDEX_TABLES[kind].insert(), batch)
    return resources


def _synthea_file() -> Path:
    if not SYNTHEA.is_dir():
        pytest.skip(f"{SYNTHEA} not present (shared sample data)")
    files = sorted(p for p in SYNTHEA.glob("*.json.bz2") if not p.name.startswith("0-"))
    if not files:
        pytest.skip(f"no patient bundles in {SYNTHEA}")
    return files[0]


@pytest.mark.shared_data
def test_synthea_bundle(engine):
    path = _synthea_file()
    with engine.begin() as conn:
        resources = _load_bundle(conn, path)
    if engine.dialect.name == "postgresql":
        # Fresh tables have no planner statistics until autovacuum's first pass; a server
        # runs ANALYZE after bulk loads (without it PostgreSQL nests loops over chains).
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    by_type: dict[str, list[dict]] = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(r)
    patient = by_type["Patient"][0]

    def all_ids(res_type, params):
        """Every match, following the next links (pages of 500)."""
        page = run(engine, res_type, params + [("_count", "500")], handling="strict")
        total, pks = page.total, list(page.pks)
        while page.next_params:
            page = run(engine, res_type, page.next_params, handling="strict")
            pks += page.pks
        assert total == len(pks) == len(set(pks))
        return set(ids_of(engine, pks))

    # Observation?code=<the most frequent LOINC code>
    codes: dict[tuple, set] = {}
    for o in by_type["Observation"]:
        for c in o["code"].get("coding", []):
            codes.setdefault((c.get("system"), c["code"]), set()).add(o["id"])
    (system, code), expected = max(codes.items(), key=lambda kv: len(kv[1]))
    assert all_ids("Observation", [("code", f"{system}|{code}")]) == expected
    assert all_ids("Observation", [("code", code)]) == expected

    # Condition?patient=<id>
    expected = {c["id"] for c in by_type.get("Condition", [])
                if c["subject"]["reference"] == f"Patient/{patient['id']}"}
    assert all_ids("Condition", [("patient", patient["id"])]) == expected
    assert all_ids("Condition", [("patient", f"Patient/{patient['id']}")]) == expected

    # Encounter?date=ge<median start>
    from server.fhir.extract import date_range
    encs = by_type["Encounter"]
    starts = sorted(date_range(e["period"]["start"])[0] for e in encs)
    cut = datetime.fromtimestamp(starts[len(starts) // 2], timezone.utc).strftime("%Y-%m-%d")
    lo, hi = date_range(cut)
    expected = {e["id"] for e in encs
                if date_range(e["period"].get("end", e["period"]["start"]))[1] > hi}
    expected |= {e["id"] for e in encs if date_range(e["period"]["start"])[0] >= lo
                 and date_range(e["period"].get("end", e["period"]["start"]))[1] <= hi}
    got = all_ids("Encounter", [("date", f"ge{cut}")])
    assert got == expected and 0 < len(got) < len(encs)

    # chained and reverse chained on real references
    family = patient["name"][0]["family"]
    n_obs = len([o for o in by_type["Observation"] if o["subject"]["reference"] == f"Patient/{patient['id']}"])
    assert len(all_ids("Observation", [("subject:Patient.family", family)])) == n_obs
    assert all_ids("Patient", [("_has:Encounter:patient:status", "finished")]) == {patient["id"]}

    # sort by date descending, first page of 10 with a next link
    page = run(engine, "Observation", [("_sort", "-date"), ("_count", "10")])
    dates = []
    with engine.connect() as conn:
        for pk in page.pks:
            body = orjson.loads(conn.execute(select(RES.c.body).where(RES.c.pk == pk)).scalar())
            dates.append(date_range(body["effectiveDateTime"])[0])
    assert dates == sorted(dates, reverse=True) and page.next_params is not None


# --------------------------------------------------------------------------- query plans


def test_sqlite_plan_is_driven_by_the_index(engine, world):
    """SQLite has no statistics: the type test must not lure it into scanning the type."""
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite planner check")
    from server.fhir.search import _order_by, _where

    def plan(res_type, params):
        ps = parse(res_type, params)
        r = RES.alias("r")
        q = select(r.c.pk).where(*_where(ps, r, 10**9, True)) \
            .order_by(*_order_by(ps, r)).limit(51)
        sql = str(q.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
        with engine.connect() as conn:
            return [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]

    steps = plan("Observation", [("code", f"{LOINC}|8480-6")])
    assert any("SEARCH r USING INTEGER PRIMARY KEY" in s for s in steps), steps
    assert not any("ix_resource_current" in s for s in steps), steps
    steps = plan("Observation", [("subject:Patient.name", "peter"), ("status", "final")])
    assert any("SEARCH r USING INTEGER PRIMARY KEY" in s for s in steps), steps
    steps = plan("Patient", [("_has:Observation:patient:code", "8480-6")])
    assert any("ix_idx_reference_res_pk" in s for s in steps), steps
    # one pk list drives; the broad date range is a probe by res_pk, not a list of its own
    steps = plan("Observation", [("date", "ge2013"), ("code", f"{LOINC}|8480-6"), ("_sort", "-date")])
    assert any("SEARCH r USING INTEGER PRIMARY KEY" in s for s in steps), steps
    assert not any("ix_idx_date_res_type" in s for s in steps), steps
