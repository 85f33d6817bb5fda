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
    assert [c.code for c in concepts] == ["IV", "E10-E14", "E10", "E10.0", "E10.9", "E11", "E11.0", "E11.9"]
    assert by["E11"].display == "Non-insulin-dependent diabetes mellitus"     # whitespace collapsed
    assert by["E11.9"].parents == ("E11",) and by["IV"].parents == ()
    assert ("kind", "block") in by["E10-E14"].properties
    e10 = dict(by["E10"].properties)
    assert e10["inclusion"] == "Juvenile-onset diabetes"
    assert e10["exclusion"] == "diabetes mellitus in pregnancy (O24.-)"
    assert [d.value for d in by["E10"].designations] == ["Juvenile-onset diabetes"]
    cs = CodeSystemData.from_concepts(meta["url"], concepts, **codesystem_kwargs(meta))
    assert cs.subsumes("IV", "E11.9") == "subsumes"


def test_modifiers_generate_codes():
    by = {c.code: c for c in icd10_claml.read(CLAML)[1]}
    e100 = by["E10.0"]
    assert e100.display == "With coma" and e100.parents == ("E10",)
    assert ("kind", "modifier") in e100.properties and ("inclusion", "Hyperosmolar coma") in e100.properties
    assert "E10.1" not in by                                 # ExcludeModifierClass
    assert by["E11.0"].parents == ("E11",)                   # ValidModifierClass
    assert by["E11.9"].parents == ("E11",) and ("kind", "category") in by["E11.9"].properties  # explicit class kept
    assert len(by) == 8


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


def test_nested_modifiers(tmp_path):
    doc = tmp_path / "nested.xml"
    doc.write_text("""<?xml version="1.0"?>
<ClaML version="2.0.0"><Title name="t" version="1">t</Title>
<Modifier code="S4"/><Modifier code="S5"/>
<ModifierClass modifier="S4" code=".0"><Rubric kind="preferred"><Label>Zero</Label></Rubric></ModifierClass>
<ModifierClass modifier="S4" code=".1"><Rubric kind="preferred"><Label>One</Label></Rubric></ModifierClass>
<ModifierClass modifier="S5" code="0"><Rubric kind="preferred"><Label>Site A</Label></Rubric></ModifierClass>
<ModifierClass modifier="S5" code="9"><Rubric kind="preferred"><Label>Site B</Label></Rubric></ModifierClass>
<Class code="M00" kind="category"><ModifiedBy code="S4"/><ModifiedBy code="S5"/>
<Rubric kind="preferred"><Label>Arthritis</Label></Rubric></Class>
</ClaML>""")
    by = {c.code: c for c in icd10_claml.read(doc)[1]}
    assert set(by) == {"M00", "M00.0", "M00.1", "M00.00", "M00.09", "M00.10", "M00.19"}
    assert by["M00.19"].parents == ("M00.1",) and by["M00.19"].display == "Site B"
