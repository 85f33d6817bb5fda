"""LOINC table importer."""
from __future__ import annotations

import shutil

import pytest

from terminologies.errors import InvalidRequest
from terminologies.importers import loinc_csv

from .._data import FIXTURES

LOINC = FIXTURES / "loinc" / "Loinc.csv"


def test_concepts_and_properties():
    meta, it = loinc_csv.read(LOINC)
    concepts = list(it)
    assert meta["url"] == "http://loinc.org"
    assert [c.code for c in concepts] == ["2345-7", "4548-4", "8867-4", "29463-7", "8302-2", "99999-9"]
    glucose = concepts[0]
    assert glucose.display == "Glucose [Mass/volume] in Serum or Plasma"
    props = dict(glucose.properties)
    assert props["COMPONENT"] == "Glucose" and props["SYSTEM"] == "Ser/Plas" and props["SCALE_TYP"] == "Qn"
    assert props["EXAMPLE_UCUM_UNITS"] == "mg/dL" and props["CLASSTYPE"] == 1
    assert "METHOD_TYP" not in props                       # empty cells are skipped
    assert {d.value for d in glucose.designations} == {"Glucose SerPl-mCnc", "Glucose [Mass/Vol]"}
    deprecated = concepts[-1]
    assert deprecated.inactive and not glucose.inactive
    assert deprecated.display.endswith('with a "quoted", comma')
    assert {p["code"] for p in meta["property"]} >= {"COMPONENT", "PROPERTY", "EXAMPLE_UCUM_UNITS", "STATUS"}


def test_folder_zip_version_and_idempotence(tmp_path):
    release = tmp_path / "Loinc_2.77" / "LoincTable"
    release.mkdir(parents=True)
    shutil.copy(LOINC, release / "Loinc.csv")
    meta, it = loinc_csv.read(tmp_path / "Loinc_2.77")
    assert meta["version"] == "2.77"
    from_folder = list(it)
    archive = shutil.make_archive(str(tmp_path / "Loinc_2.77"), "zip", tmp_path / "Loinc_2.77")
    assert list(loinc_csv.read(archive)[1]) == from_folder
    assert list(loinc_csv.read(LOINC)[1]) == from_folder
    assert loinc_csv.read(LOINC, version="2.80")[0]["version"] == "2.80"


def test_not_a_loinc_table(tmp_path):
    bad = tmp_path / "Loinc.csv"
    bad.write_text('"CODE","NAME"\n"1","x"\n')
    with pytest.raises(InvalidRequest, match="LOINC_NUM"):
        loinc_csv.read(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest):
        loinc_csv.read(tmp_path / "empty")


def test_multiaxial_hierarchy_from_release_folder(tmp_path):
    meta, it = loinc_csv.read(FIXTURES / "loinc")
    concepts = list(it)
    by = {c.code: c for c in concepts}
    assert meta["hierarchyMeaning"] == "is-a"
    assert [c.code for c in concepts][:6] == ["2345-7", "4548-4", "8867-4", "29463-7", "8302-2", "99999-9"]
    assert by["2345-7"].parents == ("LP900002-2", "LP900001-1")
    assert by["LP900004-4"].display == "Vital signs (made-up part)" and by["LP900004-4"].parents == ("LP900003-3",)
    assert by["99999-9"].parents == ()
    from terminologies.importers import codesystem_kwargs
    from terminologies.model import CodeSystemData

    cs = CodeSystemData.from_concepts(meta["url"], concepts, **codesystem_kwargs(meta))
    assert cs.descendants("LP900003-3") == {"LP900004-4", "8867-4", "29463-7", "8302-2"}
    assert list(loinc_csv.read(FIXTURES / "loinc")[1]) == concepts
    flat = list(loinc_csv.read(FIXTURES / "loinc", hierarchy=False)[1])
    assert len(flat) == 6 and all(not c.parents for c in flat)
