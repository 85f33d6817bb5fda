"""FHIR R4 terminology operations, one module per operation.

Every operation is a pure function: the first argument is a ``TerminologyProvider``,
the rest are keyword arguments already parsed from the FHIR ``Parameters`` body or
the query string (see ``parameters.parse_parameters``), and the result is FHIR JSON
(``Parameters``, or a ``ValueSet`` for ``$expand``). Errors are
``terminologies.errors.TerminologyError`` subclasses.
"""
