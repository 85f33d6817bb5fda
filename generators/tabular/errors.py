"""Exceptions of the tabular generator (server code maps them to its own errors)."""
from __future__ import annotations


class TabularModelError(ValueError):
    """Bad input to a tabular model: unknown column, impossible condition, bad metadata."""


class ModelFileError(TabularModelError):
    """A saved model folder is missing, damaged or from an incompatible format version."""
