"""Errors raised by the terminology package.

Plain exceptions (no server imports, see DESIGN.md layering). Each carries the
FHIR ``OperationOutcome.issue.code`` (R4 value set ``issue-type``) in
``issue_code`` and a suggested HTTP status in ``http_status``; the server maps
them to an OperationOutcome.
"""
from __future__ import annotations


class TerminologyError(Exception):
    """Base class; ``str(err)`` is a message meant for the client."""

    issue_code = "processing"
    http_status = 400

    def __init__(self, message: str, *, issue_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if issue_code is not None:
            self.issue_code = issue_code


class UnknownSystem(TerminologyError):
    """A code system (url, optionally version) that the provider does not hold."""

    issue_code = "not-found"
    http_status = 404


class UnknownValueSet(TerminologyError):
    """A value set (url, optionally version) that the provider does not hold."""

    issue_code = "not-found"
    http_status = 404


class UnknownConceptMap(TerminologyError):
    """A concept map (url, optionally version) that the provider does not hold."""

    issue_code = "not-found"
    http_status = 404


class UnknownCode(TerminologyError):
    """A code that is not in a (known) code system, where the operation needs it
    (``$lookup``, ``$subsumes``). ``$validate-code`` answers ``result=false`` instead."""

    issue_code = "code-invalid"
    http_status = 404


class InvalidRequest(TerminologyError):
    """Missing, contradictory or malformed operation input (including bad
    value-set definitions such as an unknown filter operator)."""

    issue_code = "invalid"
    http_status = 400


class TooCostly(TerminologyError):
    """An expansion that would return more codes than the configured limit."""

    issue_code = "too-costly"
    http_status = 422
