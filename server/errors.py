"""One error hierarchy, and one table from error to HTTP status, FHIR issue code,
DICOMweb status and DIMSE status.

Sources and stores raise these; the HTTP and DIMSE layers translate them with
:func:`describe`. Nothing here imports Flask.
"""
from __future__ import annotations

from dataclasses import dataclass

from terminologies import errors as terminology_errors


class SynthportError(Exception):
    """Base of every error a client may see.

    Args:
        message: human-readable diagnostics.
        expression: FHIRPath of the offending element(s), if known.
        warnings: additional OperationOutcome issues (severity, code, text).
    """

    def __init__(self, message: str, expression: list[str] | None = None,
                 issues: list[dict] | None = None):
        super().__init__(message)
        self.message = message
        self.expression = expression or []
        self.issues = issues or []


class InvalidRequest(SynthportError):
    """Malformed request or query (bad parameter, bad syntax)."""


class InvalidResource(SynthportError):
    """A resource failed validation (structure, cardinality, datatypes)."""


class NotFound(SynthportError):
    """No such resource, version or route."""


class Gone(SynthportError):
    """The resource was deleted."""


class MethodNotAllowed(SynthportError):
    """Interaction not allowed on this source (e.g. writes on a synthetic cohort)."""


class NotAcceptable(SynthportError):
    """No representation in the requested format."""


class UnsupportedMediaType(SynthportError):
    """Request body in a format the server does not read."""


class Conflict(SynthportError):
    """Id / version conflict or an update whose target does not match."""


class PreconditionFailed(SynthportError):
    """If-Match version mismatch, or a conditional operation with several matches."""


class MultipleMatches(PreconditionFailed):
    """A conditional operation matched more than one resource."""


class TooLarge(SynthportError):
    """Body, bundle or page larger than the configured limit."""


class Unprocessable(SynthportError):
    """Well-formed but cannot be processed (business rule)."""


class NotImplementedYet(SynthportError):
    """A valid FHIR feature that this server does not implement."""


class Unauthorized(SynthportError):
    """Missing or invalid credentials."""


class Forbidden(SynthportError):
    """Authenticated but not allowed."""


class InternalError(SynthportError):
    """Unexpected server failure (message is safe to show)."""


class InsufficientStorage(SynthportError):
    """The store ran out of disk or another resource while writing (PS3.4 A7xx)."""


class SopClassMismatch(InvalidResource):
    """A DICOM data set does not match its SOP Class (file meta vs data set, or a re-sent
    SOP Instance UID with another SOP Class): PS3.4 A9xx."""


class StudyMismatch(Conflict):
    """STOW-RS to ``/studies/{study}`` with an instance of another study (PS3.18 §10.5)."""


class CodeInvalid(NotFound):
    """A code that its (known) code system does not have, where the operation needs it
    (``CodeSystem/$lookup``, ``$subsumes``)."""


class TooCostly(Unprocessable):
    """A result larger than the server will compute (e.g. a ValueSet expansion)."""


class InstanceRefused(SynthportError):
    """A DICOM instance refused on policy, e.g. an executable file preamble (PS3.10 §7.5)."""


# DIMSE status values (PS3.4 Annex C / PS3.7 Annex C), named rather than hex in code.
DIMSE_SUCCESS = 0x0000
DIMSE_REFUSED_OUT_OF_RESOURCES = 0xA700
DIMSE_ERROR_CANNOT_UNDERSTAND = 0xC000
DIMSE_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
DIMSE_REFUSED_NOT_AUTHORIZED = 0x0124
DIMSE_MOVE_DESTINATION_UNKNOWN = 0xA801
DIMSE_PROCESSING_FAILURE = 0x0110
DIMSE_NO_SUCH_OBJECT_INSTANCE = 0x0112
# Storage failure reasons (PS3.4 Table B.2-1, PS3.18 Table I.2-2 FailureReason (0008,1197)).
DIMSE_STORE_DATASET_SOP_CLASS_MISMATCH = 0xA900
DIMSE_STORE_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
# Study Instance UID of an instance differs from the STOW-RS target study; not named by the
# standard (a Cxxx "cannot understand" code), same value as dcm4chee-arc uses.
DIMSE_STORE_STUDY_UID_MISMATCH = 0xC409
DIMSE_SOP_CLASS_NOT_SUPPORTED = 0x0122
DIMSE_PENDING = 0xFF00                  # C-FIND/C-GET/C-MOVE: a match / a sub-operation follows
DIMSE_PENDING_WARNING = 0xFF01          # C-FIND pending, optional keys not supported
DIMSE_CANCEL = 0xFE00                   # matching / sub-operations ended by C-CANCEL
DIMSE_WARNING_SUBOPS_FAILED = 0xB000    # C-GET/C-MOVE: one or more sub-operations failed
DIMSE_STORE_WARNING_COERCION = 0xB000   # C-STORE: stored, some elements coerced
DIMSE_STORE_WARNING_DISCARDED = 0xB006  # C-STORE: stored, some elements discarded
DIMSE_REFUSED_SUBOPS = 0xA702           # C-GET/C-MOVE: unable to perform sub-operations


@dataclass(frozen=True)
class ErrorInfo:
    http_status: int
    issue_code: str          # FHIR R4 IssueType (valueset issue-type)
    dicomweb_status: int     # PS3.18 §8.6 HTTP status for DICOMweb
    dimse_status: int        # PS3.4 status


# The one table. Order matters only for subclasses listed before their bases.
ERROR_TABLE: dict[type[SynthportError], ErrorInfo] = {
    MultipleMatches: ErrorInfo(412, "multiple-matches", 409, DIMSE_ERROR_CANNOT_UNDERSTAND),
    PreconditionFailed: ErrorInfo(412, "conflict", 409, DIMSE_ERROR_CANNOT_UNDERSTAND),
    InvalidRequest: ErrorInfo(400, "invalid", 400, DIMSE_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
    InvalidResource: ErrorInfo(422, "structure", 400, DIMSE_ERROR_CANNOT_UNDERSTAND),
    NotFound: ErrorInfo(404, "not-found", 404, DIMSE_NO_SUCH_OBJECT_INSTANCE),
    Gone: ErrorInfo(410, "deleted", 410, DIMSE_NO_SUCH_OBJECT_INSTANCE),
    MethodNotAllowed: ErrorInfo(405, "not-supported", 405, DIMSE_REFUSED_NOT_AUTHORIZED),
    NotAcceptable: ErrorInfo(406, "not-supported", 406, DIMSE_ERROR_CANNOT_UNDERSTAND),
    UnsupportedMediaType: ErrorInfo(415, "not-supported", 415, DIMSE_ERROR_CANNOT_UNDERSTAND),
    Conflict: ErrorInfo(409, "conflict", 409, DIMSE_PROCESSING_FAILURE),
    TooLarge: ErrorInfo(413, "too-costly", 413, DIMSE_REFUSED_OUT_OF_RESOURCES),
    Unprocessable: ErrorInfo(422, "processing", 400, DIMSE_PROCESSING_FAILURE),
    NotImplementedYet: ErrorInfo(501, "not-supported", 501, DIMSE_ERROR_CANNOT_UNDERSTAND),
    Unauthorized: ErrorInfo(401, "login", 401, DIMSE_REFUSED_NOT_AUTHORIZED),
    Forbidden: ErrorInfo(403, "forbidden", 403, DIMSE_REFUSED_NOT_AUTHORIZED),
    InternalError: ErrorInfo(500, "exception", 500, DIMSE_PROCESSING_FAILURE),
    InsufficientStorage: ErrorInfo(507, "exception", 507, DIMSE_REFUSED_OUT_OF_RESOURCES),
    SopClassMismatch: ErrorInfo(422, "structure", 409, DIMSE_STORE_DATASET_SOP_CLASS_MISMATCH),
    StudyMismatch: ErrorInfo(409, "conflict", 409, DIMSE_STORE_STUDY_UID_MISMATCH),
    InstanceRefused: ErrorInfo(422, "security", 409, DIMSE_ERROR_CANNOT_UNDERSTAND),
    CodeInvalid: ErrorInfo(404, "code-invalid", 404, DIMSE_NO_SUCH_OBJECT_INSTANCE),
    TooCostly: ErrorInfo(422, "too-costly", 400, DIMSE_REFUSED_OUT_OF_RESOURCES),
    SynthportError: ErrorInfo(500, "exception", 500, DIMSE_PROCESSING_FAILURE),
}

# Plain HTTP status -> issue code, for errors raised by the web framework itself.
HTTP_ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found",
                    405: "not-supported", 406: "not-supported", 409: "conflict",
                    410: "deleted", 412: "conflict", 413: "too-costly", 415: "not-supported",
                    422: "processing", 429: "throttled", 501: "not-supported"}


# terminologies/ raises plain exceptions (it imports nothing of the server); this is the
# one place they become errors of the table above (most specific class first in the MRO).
TERMINOLOGY_ERRORS: dict[type[Exception], type[SynthportError]] = {
    terminology_errors.UnknownSystem: NotFound,
    terminology_errors.UnknownValueSet: NotFound,
    terminology_errors.UnknownConceptMap: NotFound,
    terminology_errors.UnknownCode: CodeInvalid,
    terminology_errors.InvalidRequest: InvalidRequest,
    terminology_errors.TooCostly: TooCostly,
    terminology_errors.TerminologyError: Unprocessable,
}


def from_terminology(err: Exception) -> SynthportError:
    """The server error for a ``terminologies.errors.TerminologyError``."""
    for cls in type(err).__mro__:
        if cls in TERMINOLOGY_ERRORS:
            return TERMINOLOGY_ERRORS[cls](getattr(err, "message", str(err)))
    return InternalError(f"Terminology failure: {type(err).__name__}")


def describe(err: SynthportError) -> ErrorInfo:
    """Return the table row for an error (walking up its class hierarchy)."""
    for cls in type(err).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[SynthportError]


def operation_outcome(message: str, code: str = "exception", severity: str = "error",
                      expression: list[str] | None = None,
                      extra: list[dict] | None = None) -> dict:
    """Build an OperationOutcome dict (FHIR R4 §6.1.2)."""
    issue = {"severity": severity, "code": code, "diagnostics": message}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue] + list(extra or [])}


def outcome_for(err: SynthportError) -> tuple[int, dict]:
    """HTTP status and OperationOutcome for an error."""
    info = describe(err)
    return info.http_status, operation_outcome(err.message, info.issue_code,
                                               expression=err.expression, extra=err.issues)
