"""``server.loader``: files, folders, archives and NDJSON into the real store (SQLite and PostgreSQL)."""
from __future__ import annotations

import bz2
import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from server import loader
from server.config import load_config
from server.source import RequestContext
from server.store import SqlStore

CTX = RequestContext()
SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"

PAT_URN = "urn:uuid:11111111-1111-4111-8111-111111111111"
DOC_PAT_URN = "urn:uuid:22222222-2222-4222-8222-222222222222"
ORG_URN = "urn:uuid:33333333-3333-4333-8333-333333333333"


def _cfg(db_url: str):
    return load_config({"database_url": db_url}, environ={})


def _patient(pid: str | None = None, family: str = "Doe", **extra) -> dict:
    p = {"resourceType": "Patient", "name": [{"family": family, "given": ["Ann"]}],
         "gender": "female", "birthDate": "1970-01-01", **extra}
    if pid:
        p["id"] = pid
    return p


def _obs(oid: str | None, subject: str) -> dict:
    o = {"resourceType": "Observation", "status": "final",
         "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
         "subject": {"reference": subject},
         "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org",
                           "code": "/min"}}
    if oid:
        o["id"] = oid
    return o


def _write_json(path: Path, doc) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(doc).encode())
    return path


def _tar_xz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name=name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _build_folder(root: Path) -> Path:
    """A folder with every kind of input the loader reads (11 resources, 7 files, 2 failing)."""
    d = root / "in"
    # transaction: a Patient PUT under a urn:uuid fullUrl + an Observation POST referencing it
    _write_json(d / "tx.json", {
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": PAT_URN, "resource": _patient("tx-pat"),
             "request": {"method": "PUT", "url": "Patient/tx-pat"}},
            {"resource": _obs(None, PAT_URN), "request": {"method": "POST", "url": "Observation"}},
        ]})
    # document: split into Composition + Patient + Observation, urn:uuid references rewritten
    _write_json(d / "doc.json", {
        "resourceType": "Bundle", "type": "document", "identifier": {"system": "urn:x", "value": "d1"},
        "timestamp": "2024-01-01T00:00:00Z", "entry": [
            {"fullUrl": "urn:uuid:44444444-4444-4444-8444-444444444444",
             "resource": {"resourceType": "Composition", "id": "comp1", "status": "final",
                          "type": {"coding": [{"system": "http://loinc.org", "code": "60591-5"}]},
                          "subject": {"reference": DOC_PAT_URN}, "date": "2024-01-01",
                          "author": [{"reference": DOC_PAT_URN}], "title": "Summary"}},
            {"fullUrl": DOC_PAT_URN, "resource": _patient("doc-pat", "Docs")},
            {"fullUrl": "urn:uuid:55555555-5555-4555-8555-555555555555",
             "resource": _obs("doc-obs", DOC_PAT_URN)},
        ]})
    # NDJSON: line 2 is invalid (bad date), lines 1 and 3 load; a blank line is ignored
    lines = [json.dumps(_patient("nd1")), json.dumps(_patient("nd-bad", birthDate="not-a-date")),
             "", json.dumps(_obs("nd-obs", "Patient/nd1"))]
    (d / "data.ndjson").write_text("\n".join(lines) + "\n")
    # broken JSON
    (d / "broken.json").write_text('{"resourceType": "Patient", ')
    # a plain resource, bzip2-compressed
    (d / "sub").mkdir()
    (d / "sub" / "pat.json.bz2").write_bytes(bz2.compress(json.dumps(_patient("bz-pat")).encode()))
    # not FHIR: skipped
    (d / "README.txt").write_text("not data")
    # tar.xz: a collection bundle, and a member whose name tries to escape
    collection = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": ORG_URN, "resource": {"resourceType": "Organization", "id": "org1", "name": "H"}},
        {"resource": {"resourceType": "Practitioner", "id": "prac1", "name": [{"family": "Who"}],
                      "extension": [{"url": "http://example.org/org", "valueReference": {"reference": ORG_URN}}]}},
    ]}
    _tar_xz(d / "archive.tar.xz", {
        "coll/collection.json": json.dumps(collection).encode(),
        "../../evil.json": json.dumps(_patient("evil")).encode(),
    })
    return d


def test_load_folder_of_every_kind(db_url, tmp_path, monkeypatch, capsys):
    d = _build_folder(tmp_path)
    work = tmp_path / "cwd" / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)   # "../../evil.json" would land in tmp_path/cwd if it were written
    cfg = _cfg(db_url)

    report = loader.load_paths(cfg, [str(d)], jobs=2, progress=False)

    assert report.resources == 11, report
    assert (report.files_ok, report.files_failed, report.files_skipped) == (5, 2, 1)
    assert report.rate > 0 and report.seconds > 0
    assert report.first_rate is not None and report.last_rate is not None
    reasons = {Path(p.split(":", 1)[0]).name: r for p, r in report.failed}
    assert set(reasons) == {"broken.json", "data.ndjson"}, report.failed
    assert "invalid JSON" in reasons["broken.json"]
    assert reasons["data.ndjson"].startswith("line 2:") and "birthDate" in reasons["data.ndjson"]
    out = capsys.readouterr().out
    assert "loaded 11 resources from 7 files" in out and "resources/s" in out
    assert "first 10%" in out and "last 10%" in out
    assert "FAILED" in out and "broken.json" in out

    store = SqlStore.from_url(db_url)
    try:
        for rt, rid in [("Patient", "tx-pat"), ("Patient", "doc-pat"), ("Composition", "comp1"),
                        ("Observation", "doc-obs"), ("Patient", "nd1"), ("Observation", "nd-obs"),
                        ("Patient", "bz-pat"), ("Organization", "org1"), ("Practitioner", "prac1"),
                        ("Patient", "evil")]:
            assert store.read(CTX, rt, rid).version == 1, (rt, rid)
        # urn:uuid references were rewritten to Type/id
        obs = json.loads(store.read(CTX, "Observation", "doc-obs").body)
        assert obs["subject"]["reference"] == "Patient/doc-pat"
        comp = json.loads(store.read(CTX, "Composition", "comp1").body)
        assert comp["subject"]["reference"] == "Patient/doc-pat"
        assert comp["author"][0]["reference"] == "Patient/doc-pat"
        prac = json.loads(store.read(CTX, "Practitioner", "prac1").body)
        assert prac["extension"][0]["valueReference"]["reference"] == "Organization/org1"
        tx_obs = store.search(CTX, "Observation", [("subject", "Patient/tx-pat")])
        assert len(tx_obs.matches) == 1
        assert json.loads(tx_obs.matches[0].body)["subject"]["reference"] == "Patient/tx-pat"
        with pytest.raises(Exception):
            store.read(CTX, "Patient", "nd-bad")

        # Loading again: resources with ids get no new versions.
        again = loader.load_paths(cfg, [str(d)], jobs=1, progress=False)
        assert again.files_failed == 2 and again.files_ok == 5
        for rt, rid in [("Patient", "tx-pat"), ("Patient", "doc-pat"), ("Composition", "comp1"),
                        ("Observation", "doc-obs"), ("Patient", "nd1"), ("Observation", "nd-obs"),
                        ("Patient", "bz-pat"), ("Organization", "org1"), ("Practitioner", "prac1"),
                        ("Patient", "evil")]:
            assert store.read(CTX, rt, rid).version == 1, (rt, rid)
    finally:
        store.engine.dispose()

    # The traversal member was data, never a file.
    assert not list(tmp_path.rglob("evil.json"))
    assert not (work / "../../evil.json").exists()
    assert not (tmp_path.parent / "evil.json").exists()


def test_ndjson_chunks_and_bad_lines(db_url, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "NDJSON_CHUNK", 2)
    lines = [json.dumps(_patient(f"p{i}")) for i in range(1, 6)]
    lines[3] = "{not json"                               # line 4: unparsable
    lines.append(json.dumps({"id": "x"}))                # line 6: no resourceType
    lines.append(json.dumps(_patient("dup")))            # line 7 and 8: same id in one chunk
    lines.append(json.dumps(_patient("dup", family="Other")))
    f = tmp_path / "res.ndjson.gz"
    f.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))

    report = loader.load_paths(_cfg(db_url), [str(f)], jobs=1, progress=False)

    reasons = sorted(r for _, r in report.failed)
    assert [r.split(":")[0] for r in reasons] == ["line 4", "line 6"], reasons
    assert "invalid JSON" in reasons[0] and "resourceType" in reasons[1]
    # p1, p2, p3, p5 and both writes of "dup" (retried one by one: two versions)
    assert report.resources == 6
    assert (report.files_ok, report.files_failed) == (0, 1)
    store = SqlStore.from_url(db_url)
    try:
        for pid in ("p1", "p2", "p3", "p5"):
            assert store.read(CTX, "Patient", pid).version == 1
        dup = store.read(CTX, "Patient", "dup")
        assert json.loads(dup.body)["name"][0]["family"] == "Other"
    finally:
        store.engine.dispose()


def test_first_phase_files_load_first(db_url, tmp_path):
    """A hospital bundle sorting last still loads before the bundle that references it."""
    d = tmp_path / "in"
    org_ident = "https://github.com/synthetichealth/synthea|org-1"
    _write_json(d / "a-patient.json", {
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": PAT_URN, "resource": _patient(None, "Ref",
                                                      managingOrganization={"reference": f"Organization?identifier={org_ident}"}),
             "request": {"method": "POST", "url": "Patient"}}]})
    _write_json(d / "z" / "hospitalInformation1.json", {
        "resourceType": "Bundle", "type": "batch", "entry": [
            {"fullUrl": ORG_URN, "resource": {"resourceType": "Organization", "name": "H",
                                              "identifier": [{"system": org_ident.split("|")[0],
                                                              "value": "org-1"}]},
             "request": {"method": "POST", "url": "Organization", "ifNoneExist": f"identifier={org_ident}"}},
            {"request": {"method": "POST", "url": "Organization"},
             "resource": {"resourceType": "Organization", "active": "maybe"}},   # invalid: reported
        ]})
    report = loader.load_paths(_cfg(db_url), [str(d)], jobs=2, progress=False)
    assert report.resources == 2, report.failed
    assert len(report.failed) == 1
    path, reason = report.failed[0]
    assert path.endswith("hospitalInformation1.json") and reason.startswith("Bundle.entry[1]:")
    store = SqlStore.from_url(db_url)
    try:
        pats = store.search(CTX, "Patient", [("family", "Ref")]).matches
        org = store.search(CTX, "Organization", [("name", "H")]).matches
        assert len(pats) == 1 and len(org) == 1
        assert json.loads(pats[0].body)["managingOrganization"]["reference"] == f"Organization/{org[0].res_id}"
    finally:
        store.engine.dispose()


def test_zip_archive_and_limit(db_url, tmp_path):
    z = tmp_path / "data.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("b/one.json", json.dumps(_patient("z1")))
        zf.writestr("a/two.ndjson", json.dumps(_patient("z2")) + "\n" + json.dumps(_patient("z3")) + "\n")
        zf.writestr("c/three.json", json.dumps(_patient("z4")))
        zf.writestr("dir/", b"")
    cfg = _cfg(db_url)
    report = loader.load_paths(cfg, [str(z)], jobs=1, progress=False, limit=2)
    assert (report.files_ok, report.resources) == (2, 3)   # a/two.ndjson, b/one.json
    report = loader.load_paths(cfg, [str(z)], jobs=1, progress=False)
    assert (report.files_ok, report.resources, report.failed) == (3, 4, [])
    store = SqlStore.from_url(db_url)
    try:
        assert all(store.read(CTX, "Patient", f"z{i}").version == 1 for i in range(1, 5))
    finally:
        store.engine.dispose()


def test_unknown_inputs_are_reported(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b")
    _write_json(tmp_path / "hist.json", {"resourceType": "Bundle", "type": "history", "entry": []})
    cfg = _cfg(f"sqlite:///{tmp_path}/db.sqlite")
    report = loader.load_paths(cfg, [str(tmp_path / "notes.csv"), str(tmp_path / "hist.json"),
                                     str(tmp_path / "missing.json")], jobs=1, progress=False)
    reasons = dict(report.failed)
    assert "unsupported file type" in reasons[str(tmp_path / "notes.csv")]
    assert "history" in reasons[str(tmp_path / "hist.json")]
    assert "no such file" in reasons[str(tmp_path / "missing.json")]
    assert report.resources == 0 and report.files_failed == 3


def test_split_bundle_drops_outcomes_and_duplicates():
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}},
        {"fullUrl": "urn:uuid:a", "resource": _patient("p1")},
        {"fullUrl": "urn:uuid:b", "resource": _patient("p1")},
        {"fullUrl": "urn:uuid:c", "resource": _obs(None, "urn:uuid:b")},
        {"search": {"mode": "match"}},
    ]}
    tx, origin = loader.split_bundle(bundle)
    assert tx["type"] == "transaction"
    assert [e["request"] for e in tx["entry"]] == [{"method": "PUT", "url": "Patient/p1"},
                                                    {"method": "POST", "url": "Observation"}]
    assert [e.get("fullUrl") for e in tx["entry"]] == ["urn:uuid:a", "urn:uuid:c"]
    assert tx["entry"][1]["resource"]["subject"]["reference"] == "Patient/p1"
    assert origin == [1, 3]
    assert loader._renumber("Bundle.entry[1]: bad", origin) == "Bundle.entry[3]: bad"


def test_rate_windows():
    # 10 completions of 10 resources, one per second after t0=0: 10 resources/s throughout
    marks = [(float(i), 10) for i in range(1, 11)]
    assert loader.rate_windows(marks, 0.0) == pytest.approx((10.0, 10.0))
    # the last tenth took 10 s instead of 1 s: slower at the end
    marks[-1] = (19.0, 10)
    first, last = loader.rate_windows(marks, 0.0)
    assert first == pytest.approx(10.0) and last == pytest.approx(1.0)
    assert loader.rate_windows([], 0.0) == (None, None)


def test_phase_names():
    assert loader.is_first_phase("0-hospitalInformation1.json.bz2")
    assert loader.is_first_phase("x/practitionerInformation2.json")
    assert not loader.is_first_phase("10-patient.json")
    assert not loader.is_first_phase("0a.json")


@pytest.mark.shared_data
def test_synthea_and_ehds_samples(db_url, tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sample data not present at {SHARED_DATA}")
    synthea = SHARED_DATA / "synthea-us-120"
    firsts = sorted(synthea.glob("0-*.json.bz2"))
    patient = min((p for p in synthea.glob("*.json.bz2") if not p.name.startswith("0-")),
                  key=lambda p: (p.stat().st_size, p.name))   # the smallest, to keep the test short
    assert len(firsts) == 2
    cfg = _cfg(db_url)
    # Patient file first on the command line: the 0-* bundles still load before it.
    report = loader.load_paths(cfg, [str(patient)] + [str(p) for p in firsts], jobs=2, progress=False)
    assert report.failed == [] and report.files_ok == 3 and report.resources > 100
    ehds = loader.load_paths(cfg, [str(SHARED_DATA / "ehds-es-200-seed1001.tar.xz")], jobs=2,
                             progress=False, limit=2)
    assert ehds.failed == [] and ehds.files_ok == 2 and ehds.resources > 1000
    store = SqlStore.from_url(db_url, auto_migrate=False)
    try:
        pats = store.search(CTX, "Patient", [("_count", "10")]).matches
        assert len(pats) == 3
        assert store.search(CTX, "Composition", []).matches   # from the documents
    finally:
        store.engine.dispose()
