"""DICOM attribute matching (PS3.4 C.2.2.2) as SQL conditions and as Python predicates.

The rules, per :class:`server.dicom.attributes.MatchKey` kind:

* empty value or ``*``: universal matching (no condition);
* ``uid``: single value or UID list (``\\``-separated; QIDO-RS also ``,``, PS3.18
  §8.3.4.1); wildcards are refused (PS3.4 C.2.2.2.2 does not allow them on UI);
* ``str``: single value (case-sensitive, exact) or wildcard (``*`` any run, ``?`` one
  character, PS3.4 C.2.2.2.4);
* ``cs``: like ``str``, and a ``\\`` list matches any of its values (PS3.4 C.2.2.2.8);
* ``pn``: like ``str`` but case-insensitive (PS3.4 C.2.2.2.1 allows it for PN). With
  fuzzy matching (QIDO ``fuzzymatching=true``) also accent-insensitive, and a value
  without wildcards matches when every word of it is a prefix of some component of
  the name (``jo smi`` matches ``Smith^John``; ``^``, ``=``, spaces and commas
  separate words);
* ``date``: ``YYYYMMDD`` single value or range ``a-b`` / ``a-`` / ``-b`` (inclusive,
  PS3.4 C.2.2.2.5); an entity without a date never matches a range;
* ``time``: ``HHMMSS.FFFFFF`` (any precision) single value or range; a value of lower
  precision covers its whole span (``07`` matches 07:00:00 to 07:59:59.999999);
* ``int``: an integer or a ``\\`` list of integers.

Combined date-time range matching (PS3.4 C.2.2.2.5.1) is not done: StudyDate and
StudyTime ranges are applied independently.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, false, or_

from server.errors import InvalidRequest

WILDCARDS = ("*", "?")
_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_NAME_SPLIT = re.compile(r"[\s^=,]+")


# --------------------------------------------------------------------------- normalising
def fold(text: str) -> str:
    """Lower-case without accents (``Müller`` -> ``muller``)."""
    decomposed = unicodedata.normalize("NFKD", text or "")
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def name_tokens(name: str) -> str:
    """The folded name components as `` a b c `` (leading and trailing space), so that
    "some component starts with x" is ``LIKE '% x%'``."""
    words = [w for w in _NAME_SPLIT.split(fold(name)) if w]
    return " " + " ".join(words) + " " if words else ""


def time_key(value: str, upper: bool = False) -> str:
    """A DICOM TM as ``HHMMSS.FFFFFF`` (13 characters) for ordering; missing parts are
    0 (or their maximum when ``upper``); ``""`` for an empty or invalid value."""
    value = (value or "").strip().replace(":", "")
    m = _TIME_RE.match(value)
    if not m:
        return ""
    hh, mm, ss, frac = m.groups()
    fill = "9" if upper else "0"
    mm = mm if mm is not None else ("59" if upper else "00")
    ss = ss if ss is not None else ("59" if upper else "00")
    frac = (frac or ".")[1:]
    return f"{hh}{mm}{ss}.{frac.ljust(6, fill) if (frac or upper) else '000000'}"


def _check_date(value: str, key: str) -> str:
    value = value.strip()
    if not _DATE_RE.match(value):
        raise InvalidRequest(f"{key}: '{value}' is not a DICOM date (YYYYMMDD) or date range")
    return value


def _check_time(value: str, key: str, upper: bool) -> str:
    out = time_key(value, upper)
    if not out:
        raise InvalidRequest(f"{key}: '{value}' is not a DICOM time (HHMMSS.FFFFFF) or time range")
    return out


def is_universal(value: str | None) -> bool:
    """Empty or ``*`` (PS3.4 C.2.2.2.3)."""
    return value is None or value.strip() in ("", "*")


def has_wildcards(value: str) -> bool:
    return any(w in value for w in WILDCARDS)


def split_list(value: str, commas: bool = False) -> list[str]:
    """``a\\b`` (and ``a,b`` when ``commas``) -> ``['a', 'b']``."""
    if commas:
        value = value.replace(",", "\\")
    return [v.strip() for v in value.split("\\") if v.strip()]


@dataclass(frozen=True)
class Criterion:
    """A parsed match value.

    Attributes:
        op: ``any`` (list of exact values), ``wild`` (list of wildcard patterns, any of),
            ``range`` (lo/hi, either may be None), ``tokens`` (fuzzy name words),
            ``none`` (matches nothing).
        values: the values / patterns / words.
        lo, hi: range bounds (already normalised).
        ci: compare case-insensitively (values already lower-cased / folded).
        folded: compare accent-insensitively (values folded).
    """

    op: str
    values: tuple[Any, ...] = ()
    lo: Any = None
    hi: Any = None
    ci: bool = False
    folded: bool = False


#: Bound of an integer string (PS3.5 Table 6.2-1: IS is -2^31..2^31-1); the SQL columns
#: that hold IS values are 32-bit, and values beyond +-IS_MAX are neither matched nor stored.
IS_MAX = 2**31 - 1


def parse(kind: str, key: str, value: str, fuzzy: bool = False) -> Criterion | None:
    """Parse one match value; None means universal (no condition).

    Raises:
        InvalidRequest: a value the kind does not allow.
    """
    value = value.rstrip("\x00")       # PS3.5 §6.2: UI values are padded with NUL
    if "\x00" in value:
        # Never a DICOM character (PS3.5 §6.1), and PostgreSQL text cannot hold it
        raise InvalidRequest(f"{key}: the value contains a NUL character")
    if is_universal(value):
        return None
    value = value.strip()
    if kind == "uid":
        uids = split_list(value, commas=True)
        if any(has_wildcards(u) for u in uids):
            raise InvalidRequest(f"{key}: wildcards are not allowed in UID matching")
        if any(len(u) > 64 for u in uids):
            return Criterion("none")
        return Criterion("any", tuple(uids))
    if kind == "int":
        try:
            ints = tuple(int(v) for v in split_list(value))
        except ValueError:
            raise InvalidRequest(f"{key}: '{value}' is not an integer (or a \\ list of them)") from None
        if any(not -IS_MAX <= v <= IS_MAX for v in ints):
            # PS3.5 Table 6.2-1: IS is -2^31..2^31-1 (and the SQL columns are 32-bit)
            raise InvalidRequest(f"{key}: '{value[:40]}' is outside the range of an integer "
                                 f"string (IS, -{IS_MAX}..{IS_MAX})")
        return Criterion("any", ints)
    if kind == "date":
        if "-" in value:
            lo, _, hi = value.partition("-")
            lo = _check_date(lo, key) if lo.strip() else None
            hi = _check_date(hi, key) if hi.strip() else None
            if lo is None and hi is None:
                return None
            return Criterion("range", lo=lo, hi=hi)
        return Criterion("any", (_check_date(value, key),))
    if kind == "time":
        lo, sep, hi = value.partition("-")
        if not sep:
            hi = lo
        lo_k = _check_time(lo, key, False) if lo.strip() else None
        hi_k = _check_time(hi, key, True) if hi.strip() else None
        if lo_k is None and hi_k is None:
            return None
        return Criterion("range", lo=lo_k, hi=hi_k)
    if kind in ("cs", "modalities"):
        vals = split_list(value, commas=kind == "modalities")
        if any(has_wildcards(v) for v in vals):
            return Criterion("wild", tuple(vals))
        return Criterion("any", tuple(vals))
    if kind == "pn":
        if fuzzy:
            folded = fold(value)
            if has_wildcards(folded):
                return Criterion("wild", (folded,), ci=True, folded=True)
            words = tuple(w for w in _NAME_SPLIT.split(folded) if w)
            return Criterion("tokens", words, ci=True, folded=True) if words else None
        low = value.lower()
        return Criterion("wild" if has_wildcards(low) else "any", (low,), ci=True)
    # str
    return Criterion("wild" if has_wildcards(value) else "any", (value,))


# --------------------------------------------------------------------------- SQL
def _like_pattern(pattern: str) -> str:
    out = []
    for ch in pattern:
        if ch in ("\\", "%", "_"):
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _wild(col, pattern: str, sqlite: bool):
    """Case-sensitive wildcard match: GLOB on SQLite (its LIKE ignores ASCII case),
    LIKE on PostgreSQL."""
    if sqlite:
        return col.op("GLOB")(pattern.replace("[", "[[]"))
    return col.like(_like_pattern(pattern), escape="\\")


def sql_condition(crit: Criterion, col, *, sqlite: bool, ci_col=None, fold_col=None,
                  tokens_col=None):
    """The SQLAlchemy condition of a criterion on a column.

    Args:
        crit: from :func:`parse`.
        col: the column holding the value (for ``time`` the ``*_time_key`` column).
        sqlite: the dialect (wildcards differ).
        ci_col, fold_col, tokens_col: the lower-cased, folded and token columns of a
            person name.
    """
    if crit.op == "none":
        return false()
    target = fold_col if crit.folded else (ci_col if crit.ci and ci_col is not None else col)
    if crit.op == "any":
        return target == crit.values[0] if len(crit.values) == 1 else target.in_(crit.values)
    if crit.op == "wild":
        conds = [_wild(target, v, sqlite) if has_wildcards(v) else target == v for v in crit.values]
        return conds[0] if len(conds) == 1 else or_(*conds)
    if crit.op == "range":
        conds = [col != ""]
        if crit.lo is not None:
            conds.append(col >= crit.lo)
        if crit.hi is not None:
            conds.append(col <= crit.hi)
        return and_(*conds)
    if crit.op == "tokens":
        return and_(*[tokens_col.like("% " + _like_pattern(w) + "%", escape="\\")
                      for w in crit.values])
    raise ValueError(crit.op)


# --------------------------------------------------------------------------- Python
def _wild_regex(pattern: str) -> re.Pattern:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in pattern) + r"\Z", re.S)


def matches(kind: str, crit: Criterion | None, value: Any) -> bool:
    """Whether an entity's value matches (for sources that hold datasets in memory).

    Args:
        kind: the key's kind.
        crit: from :func:`parse` (None = universal).
        value: the entity's value (str, int, list for multi-valued / modalities, None).
    """
    if crit is None:
        return True
    if crit.op == "none":
        return False
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v is None or v == "":
            continue
        if kind == "int":
            try:
                v = int(v)
            except (TypeError, ValueError):
                continue
        else:
            v = str(v)
        if crit.folded:
            v = fold(v)
        elif crit.ci:
            v = v.lower()
        if kind == "time":
            v = time_key(v)
        if crit.op == "any" and v in crit.values:
            return True
        if crit.op == "wild" and any((_wild_regex(p).match(v) if has_wildcards(p) else v == p)
                                     for p in crit.values):
            return True
        if crit.op == "range" and (crit.lo is None or v >= crit.lo) \
                and (crit.hi is None or v <= crit.hi):
            return True
        if crit.op == "tokens":
            toks = name_tokens(v)
            if all(f" {w}" in toks for w in crit.values):
                return True
    return False
