"""UCUM units (https://ucum.org): validation and conversion of clinical units.

Used by ``mappings`` to normalise lab values to one unit per LOINC code.
"""
from __future__ import annotations

from .errors import TerminologyError


class UnitError(TerminologyError):
    """An invalid UCUM expression, or a conversion between incommensurable units
    (for example mg/dL -> mmol/L, which needs a molar mass)."""

    issue_code = "invalid"
    http_status = 400


def is_valid(unit: str) -> bool:
    """True when ``unit`` is a valid UCUM expression (case-sensitive ``c/s`` form)."""
    raise NotImplementedError


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit``.

    Raises:
        UnitError: invalid units or incommensurable dimensions.
    """
    raise NotImplementedError


def canonical(value: float, unit: str) -> tuple[float, str]:
    """``value unit`` converted to the canonical (base-unit) form of its dimension,
    for example ``(1.0, "[lb_av]") -> (453.59237, "g")``.

    Raises:
        UnitError: invalid unit.
    """
    raise NotImplementedError
