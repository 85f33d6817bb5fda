"""SMART App Launch v2 scopes (SMART v2 §"Scopes for requesting clinical data").

A resource scope is ``<context>/<ResourceType|*>.<permissions>[?<param>=<value>&...]``
with context ``patient``, ``user`` or ``system`` and permissions a non-empty subsequence
of ``cruds`` *in that order* (``.dus`` is refused, ``.rs`` is fine). SMART v1 scopes map
onto v2: ``.read`` = ``.rs``, ``.write`` = ``.cud``, ``.*`` = ``.cruds``. Query
parameters narrow a scope to resources that match them (granular scopes, e.g.
``patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory``).

Nothing here imports Flask or touches the database: this module answers "does this set
of scopes permit that interaction on that type, and under which filters".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

PERMISSIONS = "cruds"
CONTEXTS = ("patient", "user", "system")
# Scopes that carry no data permission (SMART v2 §"Scopes for requesting identity data"
# and launch context); accepted and passed through, never grant resource access.
NON_RESOURCE = {"openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter",
                "offline_access", "online_access"}
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SAFE = ":/|,"
_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.([a-z*]+)(?:\?(.*))?$")


class ScopeError(ValueError):
    """A scope string that is not a valid SMART scope."""


@dataclass(frozen=True)
class Scope:
    """One resource scope.

    Attributes:
        context: ``patient``, ``user`` or ``system``.
        res_type: a resource type or ``*``.
        perms: permissions in canonical order, a subsequence of ``cruds``.
        params: granular filter, search parameters that a resource must match.
    """

    context: str
    res_type: str
    perms: str
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        # Re-encode so that the canonical text parses back to the same filter ('&', '='
        # or '%' inside a value); '|' ':' '/' ',' stay readable (token search syntax).
        q = "&".join(f"{quote(k, safe='')}={quote(v, safe=_SAFE)}" for k, v in self.params)
        return f"{self.context}/{self.res_type}.{self.perms}" + (f"?{q}" if q else "")

    def covers_type(self, res_type: str) -> bool:
        return self.res_type == "*" or self.res_type == res_type

    def covers(self, other: "Scope") -> bool:
        """Whether this scope grants everything ``other`` asks for."""
        if self.context != other.context and not (self.context == "system"):
            return False
        if not (self.res_type == "*" or self.res_type == other.res_type):
            return False
        if not set(other.perms) <= set(self.perms):
            return False
        # A narrower (granular) request is covered by a broader grant, not the reverse.
        return set(self.params) <= set(other.params)


def _perms(text: str) -> str:
    if text in _V1:
        return _V1[text]
    if not text or any(c not in PERMISSIONS for c in text):
        raise ScopeError(f"Permissions '{text}' are not SMART v2 (cruds) nor v1 (read, write, *)")
    order = [PERMISSIONS.index(c) for c in text]
    if order != sorted(order) or len(set(text)) != len(text):
        raise ScopeError(f"Permissions '{text}' must appear in the order c r u d s, "
                         "each at most once (SMART v2)")
    return text


def parse_scope(text: str) -> Scope | None:
    """Parse one scope; ``None`` for a scope that grants no resource access (``openid``).

    Raises:
        ScopeError: a malformed resource scope (``patient/Observation.dus``).
    """
    text = text.strip()
    if not text or text in NON_RESOURCE or text.startswith("launch/"):
        return None
    m = _SCOPE.match(text)
    if not m:
        raise ScopeError(f"'{text}' is not a SMART scope (context/Type.permissions)")
    context, res_type, perms, query = m.groups()
    return Scope(context, res_type, _perms(perms), _params(text, query))


def _params(text: str, query: str | None) -> tuple[tuple[str, str], ...]:
    """The granular filter of a scope. A filter that does not parse, or a parameter
    without a value, is refused: dropping it would grant more than was asked."""
    if query is None:
        return ()
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ScopeError(f"'{text}': the filter after '?' is not name=value[&name=value]") from None
    if not pairs or any(not k or not v for k, v in pairs):
        raise ScopeError(f"'{text}': every filter parameter needs a name and a value")
    return tuple(sorted(set(pairs)))


def parse_scopes(text: str | list[str] | tuple[str, ...]) -> list[Scope]:
    """Parse a space-separated scope string (or a list); non-resource scopes are dropped."""
    items = text.split() if isinstance(text, str) else list(text)
    return [s for s in (parse_scope(t) for t in items) if s is not None]


def grant(requested: str, allowed: str) -> str:
    """The scopes of ``requested`` that ``allowed`` covers, canonical and space-joined.

    A requested scope broader than what is allowed is narrowed to its intersection with
    each allowed scope (SMART lets a server grant fewer scopes than asked): context and
    type the narrower of the two, the permissions both have, and both filters (a resource
    must match every parameter of either). Non-resource scopes (``openid``...) are
    granted only when ``allowed`` lists them too. v1 scopes come out in v2 form.

    Raises:
        ScopeError: when a requested scope is malformed.
    """
    allowed_items = set(allowed.split())
    allowed_scopes = parse_scopes(allowed)
    out: list[str] = []
    for item in requested.split():
        s = parse_scope(item)
        if s is None:
            if item in allowed_items:
                out.append(item)
            continue
        if any(a.covers(s) for a in allowed_scopes):
            out.append(str(s))
            continue
        for a in allowed_scopes:
            if a.context != s.context and a.context != "system":
                continue
            if not (a.res_type == "*" or s.res_type in ("*", a.res_type)):
                continue
            perms = "".join(c for c in s.perms if c in a.perms)
            if perms:
                t = a.res_type if s.res_type == "*" else s.res_type
                params = tuple(sorted(set(a.params) | set(s.params)))
                out.append(str(Scope(s.context, t, perms, params)))
    return " ".join(dict.fromkeys(out))


class ScopeSet:
    """The granted scopes of one request, with the questions enforcement asks."""

    def __init__(self, scopes: list[Scope] | str):
        self.scopes = parse_scopes(scopes) if isinstance(scopes, str) else list(scopes)

    def __bool__(self) -> bool:
        return bool(self.scopes)

    def __str__(self) -> str:
        return " ".join(str(s) for s in self.scopes)

    def matching(self, res_type: str, perm: str) -> list[Scope]:
        """Scopes that permit ``perm`` (one of ``cruds``) on ``res_type``."""
        return [s for s in self.scopes if perm in s.perms and s.covers_type(res_type)]

    def permits(self, res_type: str, perm: str) -> bool:
        return bool(self.matching(res_type, perm))

    def filters(self, res_type: str, perm: str) -> list[tuple[tuple[str, str], ...]] | None:
        """Granular filters for ``perm`` on ``res_type``.

        Returns:
            ``None`` when an unfiltered scope permits it (no restriction); otherwise the
            list of alternative filters (a resource must match all pairs of at least one).
            An empty list means not permitted at all.
        """
        found = self.matching(res_type, perm)
        if any(not s.params for s in found):
            return None
        return [s.params for s in found]

    def contexts(self, res_type: str, perm: str) -> set[str]:
        """The contexts (patient/user/system) of the scopes that permit it."""
        return {s.context for s in self.matching(res_type, perm)}
