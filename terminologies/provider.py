"""Where operations get code systems, value sets and concept maps from.

The server implements ``TerminologyProvider`` over its SQL store (with a cache);
tests and scripts use ``InMemoryProvider``.

Caching contract: operations cache derived data (value-set expansions) keyed by
canonical url + version and by ``provider.revision`` when the provider has that
attribute. A provider whose content can change must change ``revision`` whenever a
CodeSystem, ValueSet or ConceptMap is added, updated or deleted (the server can use
a counter or the latest ``lastUpdated`` of terminology resources). Without
``revision`` the provider is assumed to be immutable for its lifetime.
"""
from __future__ import annotations

import itertools
from typing import Protocol, runtime_checkable

from .errors import InvalidRequest
from .model import CodeSystemData

_revisions = itertools.count(1)


@runtime_checkable
class TerminologyProvider(Protocol):
    """Read access to terminology resources by canonical url (and version)."""

    def code_system(self, url: str, version: str | None = None) -> CodeSystemData | None:
        """The code system ``url`` (``version``, or the latest when None), or None.

        Supplements are not applied here; operations apply ``supplements(url)``.
        """

    def value_set(self, url: str, version: str | None = None) -> dict | None:
        """The FHIR ValueSet JSON for ``url`` (``version``, or the latest), or None."""

    def concept_maps(self, url: str | None = None, source: str | None = None,
                     target: str | None = None) -> list[dict]:
        """FHIR ConceptMap JSON resources matching every given criterion.

        Args:
            url: the ConceptMap canonical (optionally ``url|version``).
            source: ``ConceptMap.sourceUri``/``sourceCanonical`` (a value set url).
            target: ``ConceptMap.targetUri``/``targetCanonical``.
        """

    def supplements(self, url: str) -> list[CodeSystemData]:
        """Every CodeSystem with ``content=supplement`` whose ``supplements`` is ``url``
        (``supplements`` may carry ``|version``; match on the url part)."""


def _version_key(v: str | None) -> tuple:
    # Latest = highest version, comparing numeric parts numerically ("2.10" > "2.9").
    if v is None:
        return ((0, ""),)
    parts = []
    for p in v.replace("-", ".").split("."):
        parts.append((1, int(p), "") if p.isascii() and p.isdigit() else (0, 0, p))
    return tuple(parts)


def split_canonical(ref: str) -> tuple[str, str | None]:
    """``url|version`` -> ``(url, version)``."""
    url, _, version = ref.partition("|")
    return url, (version or None)


class InMemoryProvider:
    """A ``TerminologyProvider`` over resources held in memory.

    Example:
        >>> p = InMemoryProvider()
        >>> p.add({"resourceType": "CodeSystem", "url": "http://x", "content": "complete",
        ...        "concept": [{"code": "a"}]})
        >>> "a" in p.code_system("http://x")
        True
    """

    def __init__(self, *resources: dict | CodeSystemData) -> None:
        self._code_systems: dict[str, dict[str | None, CodeSystemData]] = {}
        self._value_sets: dict[str, dict[str | None, dict]] = {}
        self._concept_maps: list[dict] = []
        self.revision = next(_revisions)
        for r in resources:
            self.add(r)

    def add(self, resource: dict | CodeSystemData) -> None:
        """Add (or replace, same url + version) a CodeSystem, ValueSet or ConceptMap."""
        if isinstance(resource, CodeSystemData):
            self._code_systems.setdefault(resource.url, {})[resource.version] = resource
        elif isinstance(resource, dict):
            rt = resource.get("resourceType")
            if rt == "CodeSystem":
                cs = CodeSystemData.from_resource(resource)
                self._code_systems.setdefault(cs.url, {})[cs.version] = cs
            elif rt == "ValueSet":
                if not resource.get("url"):
                    raise InvalidRequest("ValueSet.url is required")
                self._value_sets.setdefault(resource["url"], {})[resource.get("version")] = resource
            elif rt == "ConceptMap":
                key = (resource.get("url"), resource.get("version"))
                self._concept_maps = [m for m in self._concept_maps
                                      if key[0] is None or (m.get("url"), m.get("version")) != key]
                self._concept_maps.append(resource)
            else:
                raise InvalidRequest(f"cannot add a {rt} to a terminology provider")
        else:
            raise InvalidRequest("expected a resource dict or CodeSystemData")
        self.revision = next(_revisions)

    @staticmethod
    def _pick(versions: dict, version: str | None):
        if not versions:
            return None
        if version is not None:
            return versions.get(version)
        return versions[max(versions, key=_version_key)]

    def code_system(self, url: str, version: str | None = None) -> CodeSystemData | None:
        """See ``TerminologyProvider.code_system``."""
        return self._pick(self._code_systems.get(url, {}), version)

    def value_set(self, url: str, version: str | None = None) -> dict | None:
        """See ``TerminologyProvider.value_set``."""
        return self._pick(self._value_sets.get(url, {}), version)

    def concept_maps(self, url: str | None = None, source: str | None = None,
                     target: str | None = None) -> list[dict]:
        """See ``TerminologyProvider.concept_maps``."""
        out = []
        u, v = split_canonical(url) if url else (None, None)
        for m in self._concept_maps:
            if u is not None and (m.get("url") != u or (v is not None and m.get("version") != v)):
                continue
            if source is not None and source not in (m.get("sourceUri"), m.get("sourceCanonical")):
                continue
            if target is not None and target not in (m.get("targetUri"), m.get("targetCanonical")):
                continue
            out.append(m)
        return out

    def supplements(self, url: str) -> list[CodeSystemData]:
        """See ``TerminologyProvider.supplements``."""
        return [cs for versions in self._code_systems.values() for cs in versions.values()
                if cs.content == "supplement" and cs.supplements
                and split_canonical(cs.supplements)[0] == url]
