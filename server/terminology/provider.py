"""``SqlTerminologyProvider``: terminology resources from the FHIR store, concepts of
imported code systems from the concept tables (docs/adr/0005-terminology-storage.md).

Resources are found through the search index (``idx_uri`` ``url`` rows, ``idx_reference``
``supplements`` rows) of their current versions, so a CodeSystem/ValueSet/ConceptMap
written through FHIR REST is used at once. Every worker caches parsed resources and
concept rows; the cache is keyed by a *generation* (the newest ``last_updated`` of a
terminology resource version and the newest ``term_codesystem.updated``), read once per
request by :meth:`SqlTerminologyProvider.refresh`. ``revision`` is that generation, as the
``terminologies`` caching contract asks.

A code system imported into the concept tables is served either fully loaded in memory
(up to ``full_load_max`` concepts: every operation at in-memory speed) or, above that, as
:class:`SqlCodeSystemData`: the same interface, with concepts read on demand (one
indexed query per concept, cached) and ancestors/descendants as recursive CTEs over
``term_parent``, so a 350,000-concept SNOMED CT release costs no start-up time and no
per-worker copy.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Iterator

import orjson
from sqlalchemy.engine import Engine

from server.db import schema as S
from terminologies.model import CodeSystemData, Concept, Designation
from terminologies.provider import InMemoryProvider, split_canonical

from . import TABLES_TAG

R = S.resource
TERMINOLOGY_TYPES = ("CodeSystem", "ValueSet", "ConceptMap")
FULL_LOAD_MAX = 50_000        # table-backed systems up to this size are loaded whole
_CONCEPT_CACHE = 100_000      # concepts kept per lazily read code system
_RESOURCE_CACHE = 256         # parsed resources / code systems kept per worker


def version_key(v: str | None) -> tuple:
    """Ordering of versions for "latest": numeric parts compared as numbers."""
    if v is None:
        return ((0, 0, ""),)
    return tuple((1, int(p), "") if p.isascii() and p.isdigit() else (0, 0, p) for p in v.replace("-", ".").split("."))


def encode_concept_data(c: Concept) -> bytes | None:
    """The JSON kept in ``term_concept.data`` (designations and properties)."""
    data: dict[str, Any] = {}
    if c.designations:
        data["d"] = [d.to_json() for d in c.designations]
    if c.properties:
        data["p"] = [[k, v] for k, v in c.properties]
    return orjson.dumps(data) if data else None


def decode_concept(code: str, display: str | None, inactive: bool, data: bytes | None,
                   parents: tuple[str, ...]) -> Concept:
    designations: tuple = ()
    properties: tuple = ()
    if data:
        d = orjson.loads(bytes(data))
        designations = tuple(Designation(x.get("language"), x.get("use"), x.get("value", ""))
                             for x in d.get("d", ()))
        properties = tuple((k, v) for k, v in d.get("p", ()))
    return Concept(code, display, parents, designations, properties, bool(inactive))


class _Sql:
    """Plain SQL on a pooled connection (the hot path: no statement building)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"

    def q(self, sql: str) -> str:
        return sql.replace("?", self.mark)

    def rows(self, sql: str, params: tuple) -> list[tuple]:
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute(self.q(sql), params)
            out = cur.fetchall()
            cur.close()
        finally:
            raw.close()
        return out


class _ByGet(Mapping):
    """Mapping access through ``get`` (which loads and caches concepts on demand)."""

    def __getitem__(self, code):
        c = self.get(code)
        if c is None:
            raise KeyError(code)
        return c

    def __contains__(self, code) -> bool:
        return self.get(code) is not None


class _SqlConcepts(_ByGet):
    """The concepts of one imported code system, read from ``term_concept`` on demand."""

    def __init__(self, sql: _Sql, cs_pk: int, count: int):
        self.sql, self.cs_pk, self.count = sql, cs_pk, count
        self._cache: OrderedDict[str, Concept | None] = OrderedDict()
        self._seq: dict[str, int] = {}           # source order of the codes read so far
        self._lock = threading.Lock()

    def get(self, code, default=None):
        with self._lock:
            if code in self._cache:
                self._cache.move_to_end(code)
                hit = self._cache[code]
                return default if hit is None else hit
        rows = self.sql.rows(
            "SELECT c.display, c.inactive, c.data, c.seq, p.parent FROM term_concept c "
            "LEFT JOIN term_parent p ON p.cs_pk = c.cs_pk AND p.child = c.code "
            "WHERE c.cs_pk = ? AND c.code = ?", (self.cs_pk, code))
        concept = None
        if rows:
            parents = tuple(r[4] for r in rows if r[4] is not None)
            concept = decode_concept(code, rows[0][0], rows[0][1], rows[0][2], parents)
        with self._lock:
            if rows:
                self._seq[code] = rows[0][3]
            self._cache[code] = concept
            if len(self._cache) > _CONCEPT_CACHE:
                self._cache.popitem(last=False)
        return default if concept is None else concept


    def prefetch(self, codes) -> dict[str, int]:
        """Read many concepts in a few queries (into the cache); returns code -> seq of
        those that exist. Codes already read are not asked again."""
        codes = list(dict.fromkeys(codes))
        with self._lock:
            seq, missing = {}, []
            for c in codes:
                if c in self._cache and self._cache[c] is None:
                    continue                      # known not to exist
                if c in self._cache and c in self._seq:
                    seq[c] = self._seq[c]
                else:
                    missing.append(c)
        for i in range(0, len(missing), 500):
            chunk = missing[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self.sql.rows(f"SELECT code, seq, display, inactive, data FROM term_concept "
                                 f"WHERE cs_pk = ? AND code IN ({marks})", (self.cs_pk, *chunk))
            parents: dict[str, list[str]] = {}
            for child, parent in self.sql.rows(f"SELECT child, parent FROM term_parent WHERE cs_pk = ? "
                                               f"AND child IN ({marks})", (self.cs_pk, *chunk)):
                parents.setdefault(child, []).append(parent)
            found = {}
            for code, n, display, inactive, data in rows:
                seq[code] = n
                found[code] = decode_concept(code, display, inactive, data, tuple(parents.get(code, ())))
            with self._lock:
                for code in chunk:
                    self._cache[code] = found.get(code)
                    if code in seq:
                        self._seq[code] = seq[code]
                while len(self._cache) > _CONCEPT_CACHE:
                    self._cache.popitem(last=False)
                if len(self._seq) > 2 * _CONCEPT_CACHE:
                    self._seq.clear()
        return seq

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        for (code,) in self.sql.rows("SELECT code FROM term_concept WHERE cs_pk = ? ORDER BY seq",
                                     (self.cs_pk,)):
            yield code

    def values(self):  # every concept, in source order (whole-system expansions)
        return iter(load_concepts(self.sql, self.cs_pk))

    def items(self):
        return ((c.code, c) for c in self.values())


def load_concepts(sql: _Sql, cs_pk: int) -> list[Concept]:
    """Every concept of an imported code system with its parents, in source order."""
    parents: dict[str, list[str]] = {}
    for child, parent in sql.rows("SELECT child, parent FROM term_parent WHERE cs_pk = ?", (cs_pk,)):
        parents.setdefault(child, []).append(parent)
    return [decode_concept(code, display, inactive, data, tuple(parents.get(code, ())))
            for code, display, inactive, data in sql.rows(
                "SELECT code, display, inactive, data FROM term_concept WHERE cs_pk = ? ORDER BY seq",
                (cs_pk,))]


class SqlCodeSystemData(CodeSystemData):
    """A ``CodeSystemData`` whose concepts and hierarchy stay in SQL.

    Concepts are read one at a time (cached); ``ancestors``/``descendants`` are recursive
    CTEs (``UNION``, so a cycle in bad data terminates); ``children``/``roots`` are single
    indexed queries. Supplements are applied per concept as it is read, with the
    library's own merge rule, instead of copying the system.
    """

    def __init__(self, sql: _Sql, cs_pk: int, count: int, url: str,
                 supplements_applied: tuple[CodeSystemData, ...] = (),
                 rows: _SqlConcepts | None = None, **meta: Any):
        self._sql, self._cs_pk, self._count = sql, cs_pk, count
        self._meta_kwargs = meta
        self._applied = supplements_applied
        self._rows = rows or _SqlConcepts(sql, cs_pk, count)     # shared with supplemented copies
        self._kids: OrderedDict[str, tuple[str, ...]] = OrderedDict()   # children, source order
        super().__init__(url, self._rows, **meta)
        if supplements_applied:
            self._concepts = _Supplemented(self, self._concepts, supplements_applied)

    def children(self, code: str) -> tuple[str, ...]:
        kids = self._kids.get(code)
        if kids is None:
            kids = tuple(r[0] for r in self._sql.rows(
                "SELECT p.child FROM term_parent p JOIN term_concept c ON c.cs_pk = p.cs_pk "
                "AND c.code = p.child WHERE p.cs_pk = ? AND p.parent = ? ORDER BY c.seq",
                (self._cs_pk, code)))
            self._remember_children({code: list(kids)})
        return kids

    def _remember_children(self, kids: dict[str, list[str]]) -> None:
        for parent, children in kids.items():
            self._kids[parent] = tuple(children)
        while len(self._kids) > _CONCEPT_CACHE:
            self._kids.popitem(last=False)

    def roots(self) -> list[str]:
        return [r[0] for r in self._sql.rows(
            "SELECT c.code FROM term_concept c WHERE c.cs_pk = ? AND NOT EXISTS (SELECT 1 FROM "
            "term_parent p WHERE p.cs_pk = c.cs_pk AND p.child = c.code) ORDER BY c.seq",
            (self._cs_pk,))]

    def _closure(self, code: str, up: bool) -> frozenset[str]:
        near, far = ("parent", "child") if up else ("child", "parent")
        rows = self._sql.rows(
            f"WITH RECURSIVE t(code) AS (SELECT {near} FROM term_parent WHERE cs_pk = ? AND {far} = ? "
            f"UNION SELECT p.{near} FROM term_parent p JOIN t ON p.{far} = t.code WHERE p.cs_pk = ?) "
            "SELECT code FROM t", (self._cs_pk, code, self._cs_pk))
        out = {r[0] for r in rows}
        out.discard(code)
        return frozenset(out)

    def _ancestors(self, code: str) -> frozenset[str]:
        return self._closure(code, True)

    def _descendants(self, code: str) -> frozenset[str]:
        # The library orders hierarchy expansions with order_of(descendants(code)) for a
        # subclass like this one: one closure query, then one bulk read (order_of).
        return self._closure(code, False)

    def prefetch(self, codes) -> dict[str, int]:
        """Read these concepts in bulk (an expansion reads each of them next)."""
        return self._rows.prefetch(codes)

    def order_of(self, codes) -> list[str]:
        codes = list(dict.fromkeys(codes))
        order = self._rows.prefetch(codes)
        extra = [c for c in codes if c not in order and c in self]   # supplement-only codes
        return sorted(order, key=order.__getitem__) + extra

    def apply_supplement(self, supplement: CodeSystemData) -> "SqlCodeSystemData":
        meta = dict(self._meta_kwargs)
        if meta.get("content") == "not-present" and len(supplement):
            meta["content"] = "fragment"
        return SqlCodeSystemData(self._sql, self._cs_pk, self._count, self.url,
                                 self._applied + (supplement,), self._rows, **meta)


class _Supplemented(_ByGet):
    """Concepts of a lazily read system with supplements merged in as they are read."""

    def __init__(self, owner: SqlCodeSystemData, base: _SqlConcepts,
                 supplements: tuple[CodeSystemData, ...]):
        self.owner, self.base, self.supplements = owner, base, supplements
        self._cache: dict[str, Concept | None] = {}

    def get(self, code, default=None):
        if code not in self._cache:
            concept = self.base.get(code)
            for s in self.supplements:
                sc = s.get(code)
                if sc is None:
                    continue
                one = CodeSystemData(self.owner.url, {code: concept} if concept else {},
                                     content=self.owner.content)
                piece = CodeSystemData(s.url, {code: sc}, content="supplement", meta=s.meta,
                                       supplements=s.supplements)
                concept = one.apply_supplement(piece).get(code)
            if len(self._cache) > _CONCEPT_CACHE:
                self._cache.clear()
            self._cache[code] = concept
        hit = self._cache[code]
        return default if hit is None else hit


    def _extra(self) -> list[str]:
        if self.owner.content == "complete":
            return []
        seen: dict[str, None] = {}
        for s in self.supplements:
            for code in s:
                if code not in seen and self.base.get(code) is None:
                    seen[code] = None
        return list(seen)

    def __len__(self) -> int:
        return len(self.base) + len(self._extra())

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        yield from self._extra()

    def values(self):
        for code in self:
            c = self.get(code)
            if c is not None:
                yield c


class SqlTerminologyProvider:
    """``TerminologyProvider`` over a :class:`server.store.SqlStore`.

    Args:
        store: the SQL store (its read engine is used).
        full_load_max: imported code systems up to this many concepts are loaded whole.
    """

    def __init__(self, store, full_load_max: int = FULL_LOAD_MAX):
        self.store = store
        self.engine: Engine = store._read_engine
        self.sql = _Sql(self.engine)
        self.full_load_max = full_load_max
        self.revision: tuple | None = None
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()

    # ------------------------------------------------------------------ cache
    def generation(self) -> tuple:
        """The cache key of the terminology content, one cheap query (index probes)."""
        q = "SELECT " + ", ".join(
            [f"(SELECT max(last_updated) FROM resource WHERE res_type = '{t}')" for t in TERMINOLOGY_TYPES]
            + ["(SELECT max(updated) FROM term_codesystem)", "(SELECT count(*) FROM term_codesystem)"])
        return tuple(self.sql.rows(q, ())[0])

    def refresh(self) -> "SqlTerminologyProvider":
        """Drop cached content if any terminology changed since the last call (any worker)."""
        gen = self.generation()
        with self._lock:
            if gen != self.revision:
                self._cache.clear()
                self.revision = gen
        return self

    def _cached(self, key: tuple, make):
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = make()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > _RESOURCE_CACHE:
                self._cache.popitem(last=False)
        return value

    # ------------------------------------------------------------------ resources
    def _current(self, res_type: str, table: str, param: str, column: str, value: str,
                 prefix: bool = False) -> list[tuple[int, dict]]:
        """Current versions of ``res_type`` whose index row ``param`` has ``value`` (cached
        for the generation: any write to a terminology resource changes it)."""
        return self._cached(("current", res_type, table, param, column, value, prefix),
                            lambda: self._current_sql(res_type, table, param, column, value, prefix))

    def _current_sql(self, res_type: str, table: str, param: str, column: str, value: str,
                     prefix: bool) -> list[tuple[int, dict]]:
        cond, params = f"i.{column} = ?", (res_type, param, value)
        if prefix:   # a canonical may carry |version (FHIR R4 §2.1.0.12 canonical)
            cond = f"(i.{column} = ? OR i.{column} LIKE ? ESCAPE '!')"
            esc = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
            params = (res_type, param, value, esc + "|%")
        rows = self.sql.rows(
            f"SELECT DISTINCT r.pk FROM {table} i JOIN resource r ON r.pk = i.res_pk "
            f"WHERE i.res_type = ? AND i.param = ? AND {cond} "
            "AND r.superseded_by IS NULL AND r.deleted = ?", params + (False,))
        return [(pk, self._body(pk)) for (pk,) in rows]

    def _body(self, pk: int) -> dict:
        def load():
            (body,), = self.sql.rows("SELECT body FROM resource WHERE pk = ?", (pk,))
            return orjson.loads(bytes(body))
        return self._cached(("body", pk), load)

    @staticmethod
    def _pick(found: list[tuple[int, dict]], version: str | None) -> tuple[int, dict] | None:
        if version is not None:
            found = [f for f in found if f[1].get("version") == version]
        if not found:
            return None
        return max(found, key=lambda f: (version_key(f[1].get("version")), f[0]))

    def code_system(self, url: str, version: str | None = None) -> CodeSystemData | None:
        """See ``TerminologyProvider.code_system``."""
        if version is None and "|" in url:
            url, version = split_canonical(url)
        picked = self._pick(self._current("CodeSystem", "idx_uri", "url", "value", url), version)
        if picked is None:
            return None
        pk, body = picked
        return self._cached(("cs", pk), lambda: self._make_code_system(body))

    def _make_code_system(self, body: dict) -> CodeSystemData:
        tagged = any(t.get("system") == TABLES_TAG["system"] and t.get("code") == TABLES_TAG["code"]
                     for t in (body.get("meta") or {}).get("tag", ()))
        if tagged:
            row = self.sql.rows("SELECT pk, concept_count, content FROM term_codesystem "
                                "WHERE url = ? AND version = ?", (body["url"], body.get("version") or ""))
            if row:
                return self._table_code_system(body, *row[0])
        return CodeSystemData.from_resource(body)

    def _table_code_system(self, body: dict, cs_pk: int, count: int, content: str) -> CodeSystemData:
        # The resource says not-present (its concepts are elsewhere); the data object
        # answers with the content mode of the import (complete, fragment...).
        meta = CodeSystemData.from_resource({k: v for k, v in body.items() if k not in ("concept", "count")})
        kwargs = dict(version=meta.version, name=meta.name, title=meta.title,
                      content=content or "complete", supplements=meta.supplements,
                      property_defs=meta.property_defs, meta=meta.meta)
        if count <= self.full_load_max:
            return CodeSystemData.from_concepts(body["url"], load_concepts(self.sql, cs_pk), **kwargs)
        return SqlCodeSystemData(self.sql, cs_pk, count, body["url"], **kwargs)

    def supplements(self, url: str) -> list[CodeSystemData]:
        """See ``TerminologyProvider.supplements``."""
        found = self._current("CodeSystem", "idx_reference", "supplements", "url", url, prefix=True)
        return [self._cached(("cs", pk), lambda b=body: CodeSystemData.from_resource(b))
                for pk, body in sorted(found) if body.get("content") == "supplement"]

    def value_set(self, url: str, version: str | None = None) -> dict | None:
        """See ``TerminologyProvider.value_set``."""
        if version is None and "|" in url:
            url, version = split_canonical(url)
        picked = self._pick(self._current("ValueSet", "idx_uri", "url", "value", url), version)
        if picked is None:
            return None
        self._cached(("prefetched", picked[0]), lambda: self.prefetch_value_set(picked[1]) or True)
        return picked[1]

    def prefetch_value_set(self, vs: dict) -> None:
        """Read the concepts a value set lists from lazily read code systems in bulk, so
        its expansion does not query them one by one."""
        compose = vs.get("compose") if isinstance(vs, dict) else None
        if not isinstance(compose, dict):
            return
        for inc in list(compose.get("include") or ()) + list(compose.get("exclude") or ()):
            if not isinstance(inc, dict) or not isinstance(inc.get("concept") or [], list):
                continue
            listed = [c.get("code") for c in inc.get("concept") or ()
                      if isinstance(c, dict) and isinstance(c.get("code"), str)]
            if listed and isinstance(inc.get("system"), str):
                cs = self.code_system(inc["system"], inc.get("version"))
                if isinstance(cs, SqlCodeSystemData):
                    cs.prefetch(listed)

    def concept_maps(self, url: str | None = None, source: str | None = None,
                     target: str | None = None) -> list[dict]:
        """See ``TerminologyProvider.concept_maps`` (every current ConceptMap, cached)."""
        def load():
            pks = [r[0] for r in self.sql.rows(
                "SELECT pk FROM resource WHERE res_type = ? AND superseded_by IS NULL AND deleted = ? "
                "ORDER BY pk", ("ConceptMap", False))]
            mem = InMemoryProvider()
            for pk in pks:
                mem.add(self._body(pk))
            return mem
        return self._cached(("maps",), load).concept_maps(url, source, target)

    # ------------------------------------------------------------------ helpers for the server
    def resource_by_id(self, res_type: str, res_id: str) -> dict | None:
        rows = self.sql.rows("SELECT pk, deleted FROM resource WHERE res_type = ? AND res_id = ? "
                             "ORDER BY version DESC LIMIT 1", (res_type, res_id))
        if not rows or rows[0][1]:
            return None
        return self._body(rows[0][0])


__all__ = ["SqlTerminologyProvider", "SqlCodeSystemData", "version_key", "FULL_LOAD_MAX"]
