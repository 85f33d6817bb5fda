"""Test data for the terminology tests: a small SNOMED-like polyhierarchy, value sets
and concept maps (made-up displays; well-known public codes)."""
from __future__ import annotations

from pathlib import Path

from terminologies.model import CodeSystemData, Concept, Designation

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "terminologies"
SCT = "http://snomed.info/sct"
ICD = "http://hl7.org/fhir/sid/icd-10"
FSN = {"system": SCT, "code": "900000000000003001", "display": "Fully specified name"}

# (code, display, parents, inactive)
DIABETES = [
    ("404684003", "Clinical finding", (), False),
    ("64572001", "Disease", ("404684003",), False),
    ("362969004", "Disorder of endocrine system", ("64572001",), False),
    ("126877002", "Disorder of glucose metabolism", ("64572001",), False),
    ("73211009", "Diabetes mellitus", ("362969004", "126877002"), False),
    ("46635009", "Diabetes mellitus type 1", ("73211009",), False),
    ("44054006", "Diabetes mellitus type 2", ("73211009",), False),
    ("8801005", "Secondary diabetes mellitus", ("73211009",), False),
    ("11530004", "Brittle diabetes mellitus", (), True),
    ("38341003", "Hypertensive disorder", ("64572001",), False),
]


def diabetes_cs(version: str = "20240101") -> CodeSystemData:
    concepts = []
    for code, display, parents, inactive in DIABETES:
        designations = (Designation("en", FSN, f"{display} (disorder)"),)
        if code == "73211009":
            designations += (Designation("es", None, "diabetes mellitus (trastorno)"),)
        props = (("sufficientlyDefined", code == "8801005"), ("moduleId", "900000000000207008"))
        concepts.append(Concept(code, display, parents, designations, props, inactive))
    return CodeSystemData.from_concepts(SCT, concepts, version=version, name="SNOMED_CT", title="SNOMED CT")


ICD_CS = {
    "resourceType": "CodeSystem", "url": ICD, "version": "2019", "name": "ICD10", "content": "complete",
    "concept": [{"code": "E10-E14", "display": "Diabetes mellitus", "concept": [
        {"code": "E10", "display": "Insulin-dependent diabetes mellitus"},
        {"code": "E11", "display": "Non-insulin-dependent diabetes mellitus"},
        {"code": "E14", "display": "Unspecified diabetes mellitus"}]}],
}

VS_DIABETES = {
    "resourceType": "ValueSet", "url": "http://example.org/vs/diabetes", "version": "1", "status": "active",
    "compose": {"include": [{"system": SCT, "filter": [{"property": "concept", "op": "is-a", "value": "73211009"}]}]},
}
VS_ENDOCRINE_NO_T1 = {
    "resourceType": "ValueSet", "url": "http://example.org/vs/endocrine-no-t1", "status": "active",
    "compose": {
        "include": [{"system": SCT, "filter": [{"property": "concept", "op": "descendent-of", "value": "362969004"}]}],
        "exclude": [{"system": SCT, "concept": [{"code": "46635009"}]}],
    },
}
VS_MIXED = {
    "resourceType": "ValueSet", "url": "http://example.org/vs/mixed", "status": "active",
    "compose": {"include": [
        {"system": ICD, "concept": [{"code": "E11"}, {"code": "E10", "display": "Type 1 DM"}]},
        {"valueSet": ["http://example.org/vs/diabetes"]},
    ]},
}
CM_SCT_ICD = {
    "resourceType": "ConceptMap", "url": "http://example.org/cm/sct-icd", "version": "1", "status": "active",
    "sourceUri": "http://example.org/vs/diabetes", "targetUri": "http://example.org/vs/icd",
    "group": [{
        "source": SCT, "target": ICD, "targetVersion": "2019",
        "element": [
            {"code": "46635009", "display": "Diabetes mellitus type 1",
             "target": [{"code": "E10", "display": "Insulin-dependent diabetes mellitus", "equivalence": "equivalent"}]},
            {"code": "44054006", "target": [{"code": "E11", "equivalence": "wider"}]},
            {"code": "73211009", "target": [{"code": "E14", "equivalence": "narrower"},
                                            {"code": "E10-E14", "equivalence": "subsumes"}]},
            {"code": "38341003", "target": [{"equivalence": "unmatched", "comment": "not diabetes"}]},
        ],
        "unmapped": {"mode": "fixed", "code": "E14", "display": "Unspecified diabetes mellitus"},
    }],
}


def params(result: dict) -> dict[str, list]:
    """Parameters -> name -> list of (unwrapped value or dict of parts)."""
    from terminologies.operations.parameters import parse_parameters

    return parse_parameters(result)
