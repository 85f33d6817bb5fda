"""The server side of the terminology service (no Flask).

* :mod:`server.terminology.provider`: :class:`SqlTerminologyProvider`, the
  ``terminologies.provider.TerminologyProvider`` over the FHIR store and the concept
  tables (docs/adr/0005-terminology-storage.md), with a per-process cache.
* :mod:`server.terminology.importer`: ``import_codesystem`` (bulk concept import,
  re-runnable) and ``build_supplement`` (the codes the store uses, with displays).
* :mod:`server.terminology.search`: resolves the token search modifiers ``:below``,
  ``:above``, ``:in`` and ``:not-in`` to code sets.

The operations themselves (``$lookup`` ...) are ``terminologies.operations``; their
glue to the FHIR REST layer is :mod:`server.fhir.terminology_ops`.
"""
from __future__ import annotations

TABLES_TAG = {"system": "urn:synthport:terminology", "code": "concept-tables",
              "display": "Concepts stored in the server's concept tables"}
