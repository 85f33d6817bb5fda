"""synthport terminologies: code systems, value sets and concept maps in pure Python.

Imports nothing of synthport (DESIGN.md layering). See docs/terminology.md.

* ``model``: ``Concept``, ``Designation``, ``CodeSystemData`` (indexed code system, is-a closures).
* ``provider``: the ``TerminologyProvider`` protocol and ``InMemoryProvider``.
* ``errors``: ``TerminologyError`` and subclasses (``issue_code``/``http_status`` for the server).
* ``operations``: ``$lookup``, ``$validate-code``, ``$subsumes``, ``$expand``,
  ``ValueSet/$validate-code``, ``$translate``, one module each, plus Parameters parsing.
* ``importers``: SNOMED CT RF2, LOINC, ICD-10 ClaML, DICOM DCM, UCUM readers.
* ``ucum``: UCUM validation and unit conversion.
"""
