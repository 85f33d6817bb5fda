"""Plain exceptions of the mappings package (server code maps them to its own errors)."""
from __future__ import annotations


class MappingError(Exception):
    """A record, table or DICOM object could not be mapped."""


class SpecError(MappingError):
    """A mapping specification file is invalid; the message names the bad field."""
