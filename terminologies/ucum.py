"""UCUM units (https://ucum.org): validation and conversion of clinical units.

Used by ``mappings`` to normalise lab values to one unit per LOINC code.

Backed by ``ucumvert`` (a lark grammar of the UCUM specification that maps UCUM
atoms onto a ``pint`` registry). Two rules of UCUM that pint does not keep are
enforced here:

* arbitrary units (UCUM §4.5, ``[IU]``, ``[arb'U]``, ``[CFU]``, ...) are only
  commensurable with the same arbitrary unit (pint would treat them as plain numbers);
* annotations (``{beats}``, ``{1.73_m2}``) mean 1 (UCUM §2.6), so ``{beats}/min`` and
  ``/min`` are commensurable, as UCUM says.

The pint registry takes a few seconds to build; it is built once, on first use.
Canonical units are written with UCUM base atoms (m, g, s, K, mol, A, cd) in the
``g.m-3`` form (UCUM §2.2), so ``canonical`` results are themselves valid UCUM.
"""
from __future__ import annotations

import re
import threading
from collections import Counter
from functools import lru_cache

from .errors import TerminologyError


class UnitError(TerminologyError):
    """An invalid UCUM expression, or a conversion between incommensurable units
    (for example mg/dL -> mmol/L, which needs a molar mass)."""

    issue_code = "invalid"
    http_status = 400


# UCUM §4.5 / ucum-essence.xml: units marked isArbitrary="yes".
_ARBITRARY = re.compile(
    r"\[(?:IU|iU|arb'U|USP'U|GPL'U|MPL'U|APL'U|beth'U|anti'Xa'U|todd'U|dye'U|smgy'U|bdsk'U|ka'U|knk'U|"
    r"mclg'U|tb'U|CCID_50|TCID_50|EID_50|PFU|FFU|CFU|IR|BAU|AU|Amb'a'1'U|PNU|Lf|D'ag'U|FEU|ELU|EU)\]"
)
# UCUM special units that ucumvert does not parse (non-linear, UCUM §4.4 / isSpecial): valid,
# commensurable only with themselves.
_OPAQUE = frozenset({"[pH]", "[kp'_X]", "[kp'_C]", "[kp'_M]", "[kp'_Q]"})
# pint dimension -> UCUM base atom (UCUM §3.1 base units; mass in gram, not kg).
_BASE = (("[mass]", "g"), ("[length]", "m"), ("[time]", "s"), ("[temperature]", "K"),
         ("[substance]", "mol"), ("[current]", "A"), ("[luminosity]", "cd"))

_lock = threading.Lock()
_registry = None


def _ureg():
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                from ucumvert import PintUcumRegistry

                _registry = PintUcumRegistry()
    return _registry


@lru_cache(maxsize=4096)
def _parse_cached(unit: str):
    """``(quantity, None)`` or ``(None, error message)``: invalid units are cached too,
    so a column full of one bad unit is parsed once."""
    if not unit or unit != unit.strip() or " " in unit:
        return None, f"{unit!r} is not a valid UCUM unit"
    if unit == "1" or unit in _OPAQUE:
        return _ureg().Quantity(1, "dimensionless"), None
    # An arbitrary unit is opaque: parse the rest with the atom replaced by 1.
    expr = _ARBITRARY.sub("1", unit)
    try:
        return _ureg().from_ucum(expr), None
    except Exception as exc:  # ucumvert raises lark and pint errors of several kinds
        return None, f"{unit!r} is not a valid UCUM unit: {str(exc).splitlines()[0]}"


def _parse(unit: str):
    """The pint quantity of one ``unit`` (cached; UnitError when invalid)."""
    if not isinstance(unit, str):
        raise UnitError(f"{unit!r} is not a valid UCUM unit")
    q, error = _parse_cached(unit)
    if error is not None:
        raise UnitError(error)
    return q


def is_valid(unit: str) -> bool:
    """True when ``unit`` is a valid UCUM expression (case-sensitive ``c/s`` form)."""
    try:
        _parse(unit)
    except UnitError:
        return False
    return True


def _arbitrary_atoms(unit: str) -> Counter:
    # Sign by position: an atom after a '/' is in the denominator (UCUM §2.2 is left-assoc.).
    out: Counter = Counter()
    for m in _ARBITRARY.finditer(unit):
        sign = -1 if "/" in unit[: m.start()] else 1
        out[m.group(0)] += sign
    return Counter({k: v for k, v in out.items() if v})


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """``value`` in ``from_unit`` expressed in ``to_unit``.

    Every UCUM conversion is affine (linear, or linear plus an offset for Cel/[degF]),
    so the coefficients are computed once per unit pair with pint and cached.

    Raises:
        UnitError: invalid units or incommensurable dimensions.
    """
    if from_unit == to_unit:
        _parse(from_unit)
        return float(value)
    scale, offset = _affine(from_unit, to_unit)
    return float(value) * scale + offset


@lru_cache(maxsize=4096)
def _affine(from_unit: str, to_unit: str) -> tuple[float, float]:
    """``(scale, offset)`` with ``to = from * scale + offset``."""
    src, dst = _parse(from_unit), _parse(to_unit)
    if from_unit in _OPAQUE or to_unit in _OPAQUE:
        raise UnitError(f"cannot convert {from_unit!r} to {to_unit!r}: a special unit such as "
                        f"{(from_unit if from_unit in _OPAQUE else to_unit)!r} converts only to itself")
    if _arbitrary_atoms(from_unit) != _arbitrary_atoms(to_unit):
        raise UnitError(f"cannot convert {from_unit!r} to {to_unit!r}: arbitrary units are "
                        "only commensurable with themselves (UCUM §4.5)")
    if src.dimensionality != dst.dimensionality:
        raise UnitError(f"cannot convert {from_unit!r} to {to_unit!r}: incommensurable units "
                        f"({src.dimensionality} vs {dst.dimensionality})")
    ureg = _ureg()
    try:
        if _offset(src) or _offset(dst):  # Cel, [degF]: affine, magnitude is 1
            def f(x: float) -> float:
                return float(ureg.Quantity(x, src.units).to(dst.units).magnitude / dst.magnitude)
        else:
            def f(x: float) -> float:
                return float((x * src).to(dst.units).magnitude / dst.magnitude)
        zero = f(0.0)
        if zero == 0.0:
            return f(1.0), 0.0
        return (f(1000.0) - zero) / 1000.0, zero  # a wide span keeps the scale exact
    except Exception as exc:
        raise UnitError(f"cannot convert {from_unit!r} to {to_unit!r}: {exc}") from None


def _offset(q) -> bool:
    return not q._ok_for_muldiv()  # noqa: SLF001 - pint's own test for offset units


def canonical_unit(unit: str) -> str:
    """The UCUM canonical unit of ``unit``'s dimension (``"mg/dL"`` -> ``"g.m-3"``;
    a special unit such as ``[pH]`` is its own canonical unit)."""
    q = _parse(unit)
    if unit in _OPAQUE:
        return unit
    dims = q.dimensionality
    parts = []
    for key, atom in _BASE:
        exp = dims.get(key, 0)
        if exp:
            exp = int(exp) if float(exp).is_integer() else exp
            parts.append(atom if exp == 1 else f"{atom}{exp}")
    for atom, exp in sorted(_arbitrary_atoms(unit).items()):
        parts.insert(0, atom if exp == 1 else f"{atom}{exp}")
    return ".".join(parts) if parts else "1"


def canonical(value: float, unit: str) -> tuple[float, str]:
    """``value unit`` converted to the canonical (base-unit) form of its dimension,
    for example ``(1.0, "[lb_av]") -> (453.59237, "g")`` and ``(37, "Cel") ->
    (310.15, "K")``.

    Raises:
        UnitError: invalid unit.
    """
    target = canonical_unit(unit)
    if target == unit:
        return float(value), unit
    if target == "1":
        src = _parse(unit)
        return float((value * src).to("dimensionless").magnitude), "1"
    return convert(value, unit, target), target


__all__ = ["UnitError", "is_valid", "convert", "canonical", "canonical_unit"]
