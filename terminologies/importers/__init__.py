"""Streaming importers of terminology releases.

Each module has ``read(path, ...) -> (metadata, concepts)``: ``metadata`` is a dict of
CodeSystem top-level fields (``url``, ``version``, ``name``, ``title``, ``content``,
``property`` definitions, ...), ``concepts`` an iterator of ``terminologies.model.Concept``
in a deterministic order (same input -> same concepts), so re-running an import
produces the same data and the store can upsert without duplicates.
``CodeSystemData.from_concepts(meta["url"], concepts, **kwargs_from(meta))`` builds the
in-memory index; see ``codesystem_kwargs``.
"""
from __future__ import annotations


def drop_none(meta: dict) -> dict:
    """Metadata without None values (JSON null is not valid FHIR)."""
    return {k: v for k, v in meta.items() if v is not None}


def codesystem_kwargs(meta: dict) -> dict:
    """Keyword arguments for ``CodeSystemData.from_concepts`` from importer metadata."""
    skip = {"resourceType", "url", "version", "name", "title", "content", "supplements", "property"}
    return {
        "version": meta.get("version"), "name": meta.get("name"), "title": meta.get("title"),
        "content": meta.get("content", "complete"), "supplements": meta.get("supplements"),
        "property_defs": meta.get("property") or [],
        "meta": {k: v for k, v in meta.items() if k not in skip},
    }
