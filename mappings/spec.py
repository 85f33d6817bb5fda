"""Declarative mapping specifications (``mappings/specs/*.toml``), validated on load.

A specification says which FHIR resource types and which (FHIRPath-subset) fields feed
which event kinds and columns, how the clinical vocabulary of the patient table is chosen
(top-K codes by patient frequency, a minimum patient count below which codes are grouped
as ``other``, a reference date) and which unit each LOINC code is normalised to. The file
format is documented in docs/mappings.md.
"""
from __future__ import annotations

import datetime as dt
import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mappings.errors import SpecError
from mappings.paths import parse_path

SPEC_DIR = Path(__file__).with_name("specs")

EVENT_KINDS = ("encounter", "condition_onset", "condition_abatement", "observation", "procedure",
               "medication", "immunization", "diagnostic_report", "imaging_study")
EventKind = Literal["encounter", "condition_onset", "condition_abatement", "observation",
                    "procedure", "medication", "immunization", "diagnostic_report", "imaging_study"]
DOMAINS = ("condition", "medication", "procedure", "observation", "encounter", "imaging",
           "immunization")
Domain = Literal["condition", "medication", "procedure", "observation", "encounter", "imaging",
                 "immunization"]

# Resource types a spec may read (R4); a typo in a spec is caught here, not at map time.
RESOURCE_TYPES = frozenset({
    "Patient", "Encounter", "Condition", "Observation", "Procedure", "MedicationRequest",
    "MedicationAdministration", "MedicationStatement", "MedicationDispense", "Immunization",
    "DiagnosticReport", "ImagingStudy", "AllergyIntolerance", "CarePlan", "Device",
    "ServiceRequest", "Claim", "ExplanationOfBenefit", "DocumentReference",
})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_paths(v, info):
    vals = [v] if isinstance(v, str) else (v or [])
    for p in vals:
        try:
            parse_path(p)
        except ValueError as exc:
            raise ValueError(f"bad path in {info.field_name}: {exc}") from None
    return v


class DomainSettings(_Strict):
    """Per-domain override of the vocabulary settings."""

    top_k: int | None = Field(None, ge=0)
    min_count: int | None = Field(None, ge=1)


class VocabularySpec(_Strict):
    """How the patient table's clinical vocabulary is chosen.

    Codes are ranked by the number of distinct patients that have them; the ``top_k`` most
    frequent codes whose count is at least ``min_count`` get their own columns, every other
    code is counted in the domain's ``other`` column (so no rare code identifies anyone).
    """

    top_k: int = Field(50, ge=0)
    min_count: int = Field(5, ge=1)
    reference_date: dt.date | None = None
    domains: dict[Domain, DomainSettings] = Field(default_factory=dict)

    def settings(self, domain: str) -> tuple[int, int]:
        o = self.domains.get(domain)  # type: ignore[call-overload]
        k = o.top_k if o and o.top_k is not None else self.top_k
        m = o.min_count if o and o.min_count is not None else self.min_count
        return k, m


class DemographicsSpec(_Strict):
    """Paths on Patient for the demographic columns (first path that yields a value wins)."""

    sex: list[str] = ["gender"]
    birth_date: list[str] = ["birthDate"]
    deceased_date: list[str] = ["deceasedDateTime"]
    deceased_flag: list[str] = ["deceasedBoolean"]
    marital_status: list[str] = ["maritalStatus.coding.code"]
    country: list[str] = ["address.country"]
    language: list[str] = ["communication.language.coding.code"]

    _paths = field_validator("*")(_check_paths)


class EventSpec(_Strict):
    """One resource type feeding one event kind.

    Paths are relative to the resource, except ``modality``, ``body_site``, ``series_uid``,
    ``n_instances`` and ``sop_class``, which are relative to each ``for_each`` item
    (an ImagingStudy series).
    """

    resource: str
    kind: EventKind
    code: str | None = None
    time: list[str] = Field(min_length=1)
    end_time: list[str] = []
    value: str | None = None          # prefix of a value[x] choice ("value")
    value_code: str | None = None     # path to a Coding/CodeableConcept kept as the coded value
    components: str | None = None     # Observation.component: child events with parent_id
    children: str | None = None       # references whose targets get parent_id = this event
    encounter: str | None = None
    category: str | None = None
    medication_reference: str | None = None
    for_each: str | None = None
    modality: str | None = None
    body_site: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    n_instances: str | None = None
    sop_class: str | None = None
    exclude_status: list[str] = ["entered-in-error"]

    @field_validator("resource")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in RESOURCE_TYPES:
            raise ValueError(f"unknown or unsupported resource type {v!r}")
        return v

    _paths = field_validator("code", "time", "end_time", "value_code", "components", "children",
                             "encounter", "category", "medication_reference", "for_each",
                             "modality", "body_site", "study_uid", "series_uid", "n_instances",
                             "sop_class")(_check_paths)

    @field_validator("value")
    @classmethod
    def _choice_prefix(cls, v: str | None) -> str | None:
        if v is not None and not v.isidentifier():
            raise ValueError("value must be the name of a choice element, e.g. 'value'")
        return v


class MedicationSpec(_Strict):
    """Medication classes: ATC codes are truncated to ``atc_level_chars`` (5 = ATC level 4)."""

    atc_system: str = "http://www.whocc.no/atc"
    atc_level_chars: int = Field(5, ge=1, le=7)


class UnitsSpec(_Strict):
    """Target unit per LOINC code; codes not named use their most frequent unit in the data."""

    default: Literal["most_frequent"] = "most_frequent"
    loinc: dict[str, str] = {}


class PatientTableSpec(_Strict):
    """Which domains become patient-table columns and which observation statistics."""

    domains: list[Domain] = list(DOMAINS)
    obs_stats: list[Literal["last", "mean", "min", "max", "n"]] = ["last", "mean", "min", "max", "n"]


class MappingSpec(_Strict):
    """A complete mapping specification (one TOML/JSON file)."""

    version: Literal[1] = 1
    name: str
    description: str = ""
    code_systems: dict[str, str] = {}
    system_preference: list[str] = []
    vocabulary: VocabularySpec = VocabularySpec()
    demographics: DemographicsSpec = DemographicsSpec()
    medication: MedicationSpec = MedicationSpec()
    units: UnitsSpec = UnitsSpec()
    patient_table: PatientTableSpec = PatientTableSpec()
    events: list[EventSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _components_only_on_observations(self) -> "MappingSpec":
        for i, e in enumerate(self.events):
            if e.components and e.kind != "observation":
                raise ValueError(f"events.{i}.components is only allowed for kind 'observation'")
            if e.for_each and e.kind != "imaging_study":
                raise ValueError(f"events.{i}.for_each is only allowed for kind 'imaging_study'")
        return self

    def canonical_system(self, system: str | None) -> str | None:
        """The canonical URL of a code system (aliases from ``code_systems``)."""
        if system is None:
            return None
        return self.code_systems.get(system, system)

    def with_vocabulary(self, **changes) -> "MappingSpec":
        """A copy with vocabulary settings changed (``top_k=``, ``min_count=``, ``reference_date=``)."""
        voc = self.vocabulary.model_copy(update=changes)
        return self.model_copy(update={"vocabulary": VocabularySpec.model_validate(voc.model_dump())})


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg']}")
    return f"invalid mapping spec {source}:\n" + "\n".join(lines)


def parse_spec(data: dict, source: str = "<dict>") -> MappingSpec:
    """Validate a spec given as a dict.

    Raises:
        SpecError: naming each bad field (dotted location) and why.
    """
    try:
        return MappingSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, source)) from None


def load_spec(path_or_name: str | Path = "default") -> MappingSpec:
    """Load a spec from a ``.toml``/``.json`` path or a name in ``mappings/specs/``.

    Raises:
        SpecError: the file is missing, unparsable or invalid.
    """
    p = Path(path_or_name)
    if not p.suffix:
        p = SPEC_DIR / f"{path_or_name}.toml"
    if not p.is_file():
        raise SpecError(f"mapping spec not found: {p}")
    try:
        raw = p.read_bytes()
        data = tomllib.loads(raw.decode()) if p.suffix == ".toml" else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"mapping spec {p} cannot be parsed: {exc}") from None
    return parse_spec(data, str(p))
