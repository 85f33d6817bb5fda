"""Every operation's output and every importer's CodeSystem validate as FHIR R4(B) JSON."""
from __future__ import annotations

import pytest
from fhir.resources.R4B.codesystem import CodeSystem
from fhir.resources.R4B.parameters import Parameters
from fhir.resources.R4B.valueset import ValueSet

from terminologies.importers import codesystem_kwargs, dicom_dcm, icd10_claml, loinc_csv, snomed_rf2
from terminologies.model import CodeSystemData
from terminologies.operations import (codesystem_lookup, codesystem_subsumes, codesystem_validate_code,
                                      conceptmap_translate, valueset_expand, valueset_validate_code)

from ._data import FIXTURES, ICD, SCT


def test_operation_outputs_validate(provider):
    ValueSet.model_validate(valueset_expand.expand(provider, url="http://example.org/vs/mixed",
                                                   include_designations=True, count=3, offset=1, filter="diabetes"))
    for out in (
        codesystem_lookup.lookup(provider, SCT, "73211009"),
        codesystem_validate_code.validate_code(provider, url=SCT, code="0"),
        codesystem_subsumes.subsumes(provider, SCT, "73211009", "44054006"),
        valueset_validate_code.validate_code(provider, url="http://example.org/vs/diabetes", system=SCT, code="1"),
        conceptmap_translate.translate(provider, url="http://example.org/cm/sct-icd", system=SCT, code="73211009"),
        conceptmap_translate.translate(provider, url="http://example.org/cm/sct-icd", system=ICD, code="E11",
                                       reverse=True),
    ):
        Parameters.model_validate(out)


@pytest.mark.parametrize("module,path", [
    (snomed_rf2, FIXTURES / "snomed_rf2"), (loinc_csv, FIXTURES / "loinc" / "Loinc.csv"),
    (icd10_claml, FIXTURES / "icd10_claml.xml"), (dicom_dcm, None),
])
def test_imported_codesystems_validate(module, path):
    meta, concepts = module.read(path) if path else module.read()
    cs = CodeSystemData.from_concepts(meta["url"], concepts, **codesystem_kwargs(meta))
    res = cs.to_resource()
    CodeSystem.model_validate(res)
    back = CodeSystemData.from_resource(res)
    assert [back.get(c) for c in back] == [cs.get(c) for c in cs]


def test_cid_value_sets_validate():
    for vs in dicom_dcm.cid_value_sets([4, 29, 7021]):
        ValueSet.model_validate(vs)


def test_importer_metadata_has_no_nulls(tmp_path):
    from terminologies.importers import ucum

    for meta, _ in (ucum.read(), loinc_csv.read(FIXTURES / "loinc" / "Loinc.csv"), dicom_dcm.read()):
        assert None not in meta.values()
        CodeSystem.model_validate({**meta, "content": "not-present"})
