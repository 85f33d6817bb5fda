"""DICOM DCM and UCUM code-system importers."""
from __future__ import annotations

import pytest

from terminologies import ucum
from terminologies.errors import InvalidRequest
from terminologies.importers import codesystem_kwargs, dicom_dcm
from terminologies.importers import ucum as ucum_importer
from terminologies.model import CodeSystemData

from .._data import FIXTURES


def test_dcm_from_pydicom():
    meta, it = dicom_dcm.read()
    concepts = list(it)
    assert meta["url"] == "http://dicom.nema.org/resources/ontology/DCM" and meta["content"] == "fragment"
    by = {c.code: c for c in concepts}
    assert len(by) == len(concepts) > 1000
    assert by["CT"].display == "Computed Tomography"
    assert ("cid", 29) in by["CT"].properties
    assert by["121322"].display                       # a numeric DCM code
    assert [c.code for c in dicom_dcm.read()[1]] == [c.code for c in concepts]
    CodeSystemData.from_concepts(meta["url"], concepts, **codesystem_kwargs(meta))


def test_dcm_cid_value_sets():
    (vs,) = list(dicom_dcm.cid_value_sets([29]))
    assert vs["url"].endswith("sect_CID_29.html")
    dcm = next(i for i in vs["compose"]["include"] if i["system"] == dicom_dcm.URL)
    assert {"code": "MR", "display": "Magnetic Resonance"} in dcm["concept"]
    assert list(dicom_dcm.cid_value_sets([999999])) == []


def test_ucum_common_units_are_valid():
    meta, it = ucum_importer.read()
    concepts = list(it)
    assert meta["url"] == "http://unitsofmeasure.org" and meta["content"] == "fragment"
    assert {"mg/dL", "mmol/L", "[lb_av]", "Cel", "10*3/uL"} <= {c.code for c in concepts}
    assert [c.code for c in concepts if not ucum.is_valid(c.code)] == []


def test_ucum_essence():
    meta, it = ucum_importer.read(FIXTURES / "ucum-essence-extract.xml")
    concepts = {c.code: c for c in it}
    assert meta["version"] == "2.1"
    assert set(concepts) == {"m", "g", "L", "[IU]"}
    assert concepts["m"].display == "meter" and ("property", "length") in concepts["m"].properties
    assert ("isArbitrary", True) in concepts["[IU]"].properties


def test_ucum_essence_errors(tmp_path):
    other = tmp_path / "x.xml"
    other.write_text("<ClaML/>")
    with pytest.raises(InvalidRequest):
        ucum_importer.read(other)
    broken = tmp_path / "y.xml"
    broken.write_text("<root>")
    with pytest.raises(InvalidRequest):
        ucum_importer.read(broken)
