"""Token search modifiers that need a terminology (FHIR R4 search §3.1.1.4.10 token).

``:below`` / ``:above`` (``system|code``): the code and its is-a descendants /
ancestors in the code system's hierarchy. ``:in`` / ``:not-in`` (value set URL, optionally
``|version``, or ``ValueSet/id``): the value set's expansion. Each becomes a set of
``(system, code)`` pairs that :mod:`server.fhir.search` turns into an IN list (``:not-in``:
``NOT EXISTS``).

A set larger than ``LARGE`` (``:below`` the root of SNOMED CT is every concept) is first
narrowed to the pairs the store actually holds for that search parameter, read from the
token index, so the SQL never carries hundreds of thousands of codes.
"""
from __future__ import annotations

from sqlalchemy import select

from server.db.schema import idx_token
from server.errors import InvalidRequest, from_terminology
from terminologies.errors import TerminologyError, UnknownSystem, UnknownValueSet
from terminologies.operations.valueset_expand import expand_codes

LARGE = 2_000


class TerminologyResolver:
    """A :data:`server.fhir.search.TermResolver` over a terminology provider.

    One instance per search: the provider's cache generation is checked once, on first use.
    """

    def __init__(self, provider):
        self.provider = provider
        self._fresh = False

    def __call__(self, conn, leaf, value) -> set[tuple[str | None, str]]:
        from server.fhir.search import ValueSetRef

        if not self._fresh:
            self.provider.refresh()
            self._fresh = True
        try:
            if isinstance(value, ValueSetRef):
                pairs = self._value_set(value.ref)
            else:
                pairs = self._hierarchy(leaf.modifier, value.system, value.code)
        except (UnknownSystem, UnknownValueSet) as exc:
            raise InvalidRequest(f"':{leaf.modifier}' on '{leaf.code}': {exc.message}") from exc
        except TerminologyError as exc:
            raise from_terminology(exc) from exc
        if len(pairs) > LARGE:
            pairs = self._narrow(conn, leaf, pairs)
        return pairs

    def _value_set(self, ref: str) -> set[tuple[str | None, str]]:
        if ref.startswith("ValueSet/"):
            body = self.provider.resource_by_id("ValueSet", ref.split("/", 1)[1])
            if body is None:
                raise InvalidRequest(f"{ref} is not known")
            return set(expand_codes(self.provider, body))
        return set(expand_codes(self.provider, ref))

    def _hierarchy(self, modifier: str, system: str, code: str) -> set[tuple[str | None, str]]:
        cs = self.provider.code_system(system)
        if cs is None:
            if self.provider.supplements(system):
                return {(system, code)}          # codes without a hierarchy: the code itself
            raise InvalidRequest(f"':{modifier}' needs the hierarchy of {system}, which is not "
                                 "loaded (synthport terminology import)")
        related = cs.descendants(code) if modifier == "below" else cs.ancestors(code)
        return {(system, code)} | {(system, c) for c in related}

    @staticmethod
    def _narrow(conn, leaf, pairs: set) -> set:
        """``pairs`` restricted to those indexed for ``leaf``'s parameter (any version)."""
        systems = sorted({s for s, _ in pairs if s is not None})
        q = select(idx_token.c.system, idx_token.c.code).where(idx_token.c.param == leaf.code).distinct()
        if leaf.types:
            q = q.where(idx_token.c.res_type.in_(leaf.types))
        if systems and all(s is not None for s, _ in pairs):
            q = q.where(idx_token.c.system.in_(systems))
        used = {(s or None, c) for s, c in conn.execute(q)}
        return pairs & used
