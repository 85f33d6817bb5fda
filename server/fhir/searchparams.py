"""Registry of FHIR search parameters, from the specification's own definitions.

The definitions (``search-parameters.json``, a Bundle of SearchParameter) come from
the ``fhirstarter`` package's data files (R4B 4.3.0, identical to R4 4.0.1 for the
parameters of every R4 resource type we serve; see docs/adr/0002). We read the data
file without importing that package.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from fhirpathpy.models import models as _fp_models

# FHIR R4 4.0.1 resource types (from fhirpathpy's R4 model), the only types we serve.
_R4_TYPE2PARENT = _fp_models["r4"]["type2Parent"]
RESOURCE_TYPES: frozenset[str] = frozenset(
    [t for t, p in _R4_TYPE2PARENT.items() if p == "DomainResource"] + ["Bundle", "Binary", "Parameters"]
)


@dataclass(frozen=True)
class Component:
    definition: str          # canonical URL of the component's parameter
    expression: str          # FHIRPath relative to the composite's focus


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str                # number|date|string|token|reference|composite|quantity|uri|special
    expression: str          # full FHIRPath (may cover several base types)
    url: str
    base: tuple[str, ...]
    target: tuple[str, ...] = ()
    components: tuple[Component, ...] = ()
    description: str = ""


@dataclass
class Registry:
    by_url: dict[str, SearchParam] = field(default_factory=dict)
    by_type: dict[str, dict[str, SearchParam]] = field(default_factory=dict)

    def for_type(self, res_type: str) -> dict[str, SearchParam]:
        """All parameters of a type, including those on Resource/DomainResource."""
        out = dict(self.by_type.get("Resource", {}))
        if res_type != "Bundle" and res_type != "Binary" and res_type != "Parameters":
            out.update(self.by_type.get("DomainResource", {}))
        out.update(self.by_type.get(res_type, {}))
        return out

    def get(self, res_type: str, code: str) -> SearchParam | None:
        return (self.by_type.get(res_type, {}).get(code)
                or self.by_type.get("DomainResource", {}).get(code)
                or self.by_type.get("Resource", {}).get(code))


def _definitions_path() -> Path:
    spec = importlib.util.find_spec("fhirstarter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fhirstarter (search-parameter definitions) is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    return root / "fhir_specification" / "sequences" / "R4B" / "search-parameters.zip"


@functools.cache
def registry() -> Registry:
    """Load and index the definitions once per process."""
    with zipfile.ZipFile(_definitions_path()) as zf:
        bundle = json.loads(zf.read("search-parameters.json"))
    reg = Registry()
    for entry in bundle["entry"]:
        r = entry["resource"]
        if r.get("type") == "special" or not r.get("expression"):
            continue
        bases = tuple(b for b in r["base"] if b in RESOURCE_TYPES or b in ("Resource", "DomainResource"))
        if not bases:
            continue
        sp = SearchParam(
            code=r["code"], type=r["type"], expression=r["expression"], url=r["url"],
            base=bases, target=tuple(t for t in r.get("target", []) if t in RESOURCE_TYPES),
            components=tuple(Component(c["definition"], c["expression"]) for c in r.get("component", [])),
            description=(r.get("description") or "").split("\r\n")[0][:200],
        )
        reg.by_url[sp.url] = sp
        for b in bases:
            reg.by_type.setdefault(b, {})[sp.code] = sp
    return reg
