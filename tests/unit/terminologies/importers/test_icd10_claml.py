"""ICD-10 ClaML importer."""
from __future__ import annotations

import pytest

from terminologies.errors import InvalidRequest
from terminologies.importers import codesystem_kwargs, icd10_claml
from terminologies.model import CodeSystemData

from .._data import FIXTURES

CLAML = FIXTURES / "icd10_claml.xml"


def test_classes():
    meta, it = icd10_claml.read(CLAML)
    concepts = list(it)
    assert meta["url"] == "http://hl7.org/fhir/sid/icd-10" and meta["version"] == "2019"
    assert meta["title"] == "ICD-10 test extract"
    by = {c.code: c for c in concepts}
    assert [c.code for c in concepts] == ["IV", "E10-E14", "E10", "E11", "E11.9"]
    assert by["E11"].display == "Non-insulin-dependent diabetes mellitus"     # whitespace collapsed
    assert by["E11.9"].parents == ("E11",) and by["IV"].parents == ()
    assert ("kind", "block") in by["E10-E14"].properties
    e10 = dict(by["E10"].properties)
    assert e10["inclusion"] == "Juvenile-onset diabetes"
    assert e10["exclusion"] == "diabetes mellitus in pregnancy (O24.-)"
    assert [d.value for d in by["E10"].designations] == ["Juvenile-onset diabetes"]
    cs = CodeSystemData.from_concepts(meta["url"], concepts, **codesystem_kwargs(meta))
    assert cs.subsumes("IV", "E11.9") == "subsumes"


def test_idempotent():
    assert list(icd10_claml.read(CLAML)[1]) == list(icd10_claml.read(CLAML)[1])


def test_xxe_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    evil = tmp_path / "evil.xml"
    evil.write_text(f"""<?xml version="1.0"?>
<!DOCTYPE ClaML [<!ENTITY xxe SYSTEM "file://{secret}">]>
<ClaML version="2.0.0"><Title name="x" version="1">t</Title>
<Class code="A" kind="category"><Rubric kind="preferred"><Label>&xxe;</Label></Rubric></Class></ClaML>""")
    with pytest.raises(InvalidRequest, match="refused"):
        meta, it = icd10_claml.read(evil)
        list(it)


def test_billion_laughs_is_refused(tmp_path):
    bomb = tmp_path / "bomb.xml"
    bomb.write_text("""<?xml version="1.0"?>
<!DOCTYPE ClaML [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>
<ClaML><Class code="A"><Rubric kind="preferred"><Label>&b;</Label></Rubric></Class></ClaML>""")
    with pytest.raises(InvalidRequest):
        meta, it = icd10_claml.read(bomb)
        list(it)


def test_not_claml(tmp_path):
    other = tmp_path / "other.xml"
    other.write_text("<root/>")
    with pytest.raises(InvalidRequest, match="not ClaML"):
        icd10_claml.read(other)
    broken = tmp_path / "broken.xml"
    broken.write_text("<ClaML><Class code='A'>")
    with pytest.raises(InvalidRequest):
        list(icd10_claml.read(broken)[1])
