"""``$deidentify`` on the real store (all pages of $everything), on posted bodies, and the
``synthport deidentify`` / ``reidentify`` / ``new-pseudonym-key`` commands."""
from __future__ import annotations

import copy
import datetime as dt
import json
import re

import pytest
from click.testing import CliRunner

from server.deid import pseudonym as psn
from server.deid.fhir import DeidEngine
from server.errors import InvalidRequest, NotFound
from server.fhir.deidentify import deidentify_body, deidentify_patient, engine_from_settings
from server.fhir.validation import validate
from server.source import RequestContext
from server.store import SqlStore
from tests.unit.server.deid.test_fhir_deid import IDENTIFYING, KEY, PA, TODAY, _fixture

BASE = "http://fhir.test/fhir"


def _put_bundle() -> dict:
    b = _fixture()
    for e in b["entry"]:
        r = e["resource"]
        e["request"] = {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
    return b


@pytest.fixture
def store(db_url):
    s = SqlStore.from_url(db_url)
    out = s.bundle(RequestContext(), _put_bundle())
    assert all(e["response"]["status"].startswith("201") for e in out["entry"])
    yield s
    s.engine.dispose()


def _engine(key=KEY) -> DeidEngine:
    # a date key whose offset for patient A moves dates by more than a day, so that no
    # shifted date equals another original one
    return DeidEngine(None, pseudonym_key=key, date_shift_key="fixture-date-key", today=TODAY)


def test_deidentify_patient_reads_every_page(store):
    ctx = RequestContext(base_url=BASE)
    whole = deidentify_patient(store, ctx, PA, _engine())
    paged = deidentify_patient(store, ctx, PA, _engine(), [("_count", "2")])
    assert whole["resourceType"] == "Bundle" and whole["type"] == "collection"
    assert whole == paged
    types = sorted(e["resource"]["resourceType"] for e in whole["entry"])
    # the compartment (not Patient B's condition) and what it references
    assert types.count("Patient") == 1 and "Practitioner" in types and "Organization" in types
    assert types.count("Condition") == 2 and "Encounter" in types and "Device" in types
    text = json.dumps(whole).lower()
    left = [s for s in IDENTIFYING if s.lower() in text and s not in ("Eustace", "Oldenburg",
            "Whitfield", "Hanoverton", "03601", "1930-02-11", "MRN-00999111", "pat-b-007")]
    assert not left, left
    validate(whole, "Bundle")
    typed = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in whole["entry"]}
    for e in whole["entry"]:
        r = e["resource"]
        validate(r, r["resourceType"])
        assert e["fullUrl"] == f"{BASE}/{r['resourceType']}/{r['id']}"
        for ref in _refs(r):
            if not ref.startswith("#"):
                t, _, i = ref.partition("/")
                assert (t, i) in typed, ref
    # one offset for the whole record
    shift = _engine().date_shift_days(f"Patient/{PA}")
    enc = _of(whole, "Encounter")
    assert enc["period"]["start"][:10] == \
        (dt.date(2024, 3, 10) + dt.timedelta(days=shift)).isoformat()
    prac = _of(whole, "Practitioner")
    assert prac["qualification"][0]["period"]["start"] == \
        (dt.date(1990, 6, 1) + dt.timedelta(days=shift)).isoformat()
    # the controller reverses the pseudonyms
    patient = _of(whole, "Patient")
    assert psn.reidentify(patient["id"], KEY, "id") == PA
    with pytest.raises(NotFound):
        deidentify_patient(store, ctx, "no-such-patient", _engine())


def _of(bundle: dict, rtype: str) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype)


def _refs(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(obj, list):
        for x in obj:
            yield from _refs(x)


def test_deidentify_body_shapes():
    b = _fixture()
    patient = copy.deepcopy(b["entry"][0]["resource"])
    e = _engine()
    one = deidentify_body(patient, e)
    assert one["resourceType"] == "Patient" and "name" not in one
    assert deidentify_body({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": patient}]}, e) == one
    two = deidentify_body({"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": patient},
        {"name": "resource", "resource": b["entry"][1]["resource"]}]}, e)
    assert two["resourceType"] == "Parameters" and len(two["parameter"]) == 2
    assert two["parameter"][0]["resource"] == one
    bundle = deidentify_body(b, e)
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == len(b["entry"])
    for bad in ([], {"a": 1}, {"resourceType": "Parameters", "parameter": [{"name": "x"}]}):
        with pytest.raises(InvalidRequest):
            deidentify_body(bad, e)


def test_engine_from_settings(tmp_path):
    kf = tmp_path / "k.key"
    key = psn.new_key_file(kf)
    e = engine_from_settings({"pseudonym_key_file": str(kf), "deid_config": ""})
    assert e.pseudonym_key == key and not e.ephemeral_keys
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"fhirPathRules": [{"path": "Patient.gender", "method": "redact"}]}))
    e = engine_from_settings({"deid_config": str(cfg)})
    assert "gender" not in e.apply({"resourceType": "Patient", "id": "x", "gender": "male"})
    assert e.ephemeral_keys


# ----------------------------------------------------------------------------- commands
def _inputs(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    b = _fixture()
    (src / "bundle.json").write_text(json.dumps(b))
    lines = [e["resource"] for e in b["entry"] if e["resource"]["resourceType"] in
             ("Patient", "Observation")]
    (src / "sub" / "part.ndjson").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (src / "notes.txt").write_text("ignored")
    return src, b, lines


def test_cli_deidentify_and_reidentify(tmp_path):
    from server.cli import main

    src, b, lines = _inputs(tmp_path)
    kf = tmp_path / "keys" / "p.key"
    r = CliRunner().invoke(main, ["new-pseudonym-key", str(kf)])
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(main, ["new-pseudonym-key", str(kf)]).exit_code != 0
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["deidentify", str(src), "-o", str(out),
                                  "--pseudonym-key", str(kf)])
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["bundle.json", "sub/part.ndjson"]
    db = json.loads((out / "bundle.json").read_text())
    nd = [json.loads(x) for x in (out / "sub" / "part.ndjson").read_text().splitlines()]
    assert db["resourceType"] == "Bundle" and len(nd) == len(lines)
    text = (json.dumps(db) + json.dumps(nd)).lower()
    # (dates left out here: with this run's random date key a shifted date may equal
    # another original date; the date tests use fixed keys)
    assert not [s for s in IDENTIFYING if s.lower() in text and not re.match(r"\d{4}-", s)]
    # the same patient gets the same pseudonym in both files
    assert nd[0]["id"] == db["entry"][0]["resource"]["id"]
    assert nd[-1]["subject"]["reference"] == f"Patient/{nd[0]['id']}"

    back = tmp_path / "back"
    r = CliRunner().invoke(main, ["reidentify", str(out), "-o", str(back),
                                  "--pseudonym-key", str(kf)])
    assert r.exit_code == 0, r.output
    nd_back = [json.loads(x) for x in (back / "sub" / "part.ndjson").read_text().splitlines()]
    assert nd_back[0]["id"] == PA and [i.get("value") for i in nd_back[0]["identifier"]] == \
        [i["value"] for i in lines[0]["identifier"]]
    assert nd_back[-1]["subject"]["reference"] == f"Patient/{PA}"

    other = tmp_path / "other.key"
    psn.new_key_file(other)
    r = CliRunner().invoke(main, ["reidentify", str(out), "-o", str(tmp_path / "b2"),
                                  "--pseudonym-key", str(other)])
    assert r.exit_code == 1 and "not made with this key" in r.output
    assert not (tmp_path / "b2" / "bundle.json").exists()


def test_cli_without_key_and_with_a_bad_file(tmp_path):
    from server.cli import main

    src, _, _ = _inputs(tmp_path)
    (src / "broken.json").write_text("{nope")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"fhirPathRules": [
        {"path": "nodesByType('HumanName')", "method": "redact"}]}))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["deidentify", str(src), "-o", str(out), "--config", str(cfg)],
                           env={"SYNTHPORT_PSEUDONYM_KEY_FILE": ""})
    assert r.exit_code == 1
    assert "random key of this run" in r.output and "broken.json: " in r.output
    db = json.loads((out / "bundle.json").read_text())
    assert "name" not in db["entry"][0]["resource"]
    assert db["entry"][0]["resource"]["birthDate"] == "1985-03-14"   # this config keeps it
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fhirPathRules": [{"path": "Patient.x(", "method": "redact"}]}))
    r = CliRunner().invoke(main, ["deidentify", str(src), "-o", str(out), "--config", str(bad)])
    assert r.exit_code != 0 and "Invalid FHIRPath" in r.output
