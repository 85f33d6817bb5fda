"""SNOMED CT RF2 snapshot importer."""
from __future__ import annotations

import shutil

import pytest

from terminologies.errors import InvalidRequest
from terminologies.importers import codesystem_kwargs, snomed_rf2
from terminologies.model import CodeSystemData

from .._data import FIXTURES

RF2 = FIXTURES / "snomed_rf2"


def _load(path):
    meta, concepts = snomed_rf2.read(path)
    return meta, list(concepts)


def test_metadata():
    meta, _ = snomed_rf2.read(RF2)
    assert meta["url"] == "http://snomed.info/sct"
    assert meta["version"] == "http://snomed.info/sct/900000000000207008/version/20240101"
    assert meta["content"] == "complete" and meta["hierarchyMeaning"] == "is-a"


def test_concepts_hierarchy_and_displays():
    _, concepts = _load(RF2)
    by = {c.code: c for c in concepts}
    assert [c.code for c in concepts] == sorted(by, key=int)
    assert len(concepts) == 10
    assert by["73211009"].parents == ("126877002", "362969004")          # two active is-a
    assert by["46635009"].parents == ("73211009",)                       # inactive is-a ignored
    assert by["404684003"].parents == ("138875005",)
    assert by["44054006"].display == "Diabetes mellitus type 2"          # preferred, not first synonym
    assert by["11530004"].inactive and by["11530004"].parents == ()
    fsn = [d for d in by["73211009"].designations if d.use and d.use["code"] == "900000000000003001"]
    assert [d.value for d in fsn] == ["Diabetes mellitus (disorder)"]
    assert any(d.language == "es" for d in by["73211009"].designations)
    assert all("retired" not in d.value for d in by["73211009"].designations)  # inactive description
    assert ("sufficientlyDefined", True) in by["8801005"].properties


def test_without_language_refset_first_synonym_wins(tmp_path):
    shutil.copytree(RF2 / "Snapshot" / "Terminology", tmp_path / "Terminology")
    _, concepts = _load(tmp_path)
    by = {c.code: c for c in concepts}
    assert by["44054006"].display == "Type II diabetes mellitus"


def test_zip_gives_same_concepts(tmp_path):
    archive = shutil.make_archive(str(tmp_path / "rf2"), "zip", RF2)
    assert _load(archive)[1] == _load(RF2)[1]


def test_rerun_is_idempotent_and_indexes():
    meta, first = _load(RF2)
    assert _load(RF2)[1] == first
    cs = CodeSystemData.from_concepts(meta["url"], first, **codesystem_kwargs(meta))
    assert cs.subsumes("64572001", "44054006") == "subsumes"
    assert cs.descendants("73211009") == {"46635009", "44054006", "8801005"}


def test_missing_snapshot(tmp_path):
    (tmp_path / "readme.txt").write_text("no release here")
    with pytest.raises(InvalidRequest, match="Snapshot"):
        snomed_rf2.read(tmp_path)
    with pytest.raises(InvalidRequest):
        snomed_rf2.read(tmp_path / "absent")


def test_language_refset_choice(tmp_path):
    shutil.copytree(RF2, tmp_path / "rf2")
    lang = next((tmp_path / "rf2").rglob("der2_cRefset_LanguageSnapshot*.txt"))
    gb = "900000000000508004"
    with open(lang, "a", newline="") as f:   # en-GB prefers the other synonym of 44054006
        f.write("\t".join(["b0000000-0000-0000-0000-000000000001", "20240101", "1", "900000000000207008",
                           gb, "1000018011", snomed_rf2.PREFERRED]) + "\r\n")
    by_default = {c.code: c for c in snomed_rf2.read(tmp_path / "rf2")[1]}
    by_gb = {c.code: c for c in snomed_rf2.read(tmp_path / "rf2", language_refset=gb)[1]}
    assert by_default["44054006"].display == "Diabetes mellitus type 2"     # US English is the default
    assert by_gb["44054006"].display == "Type II diabetes mellitus"
    assert by_gb["73211009"].display == "Diabetes mellitus"                 # no GB row: first synonym
