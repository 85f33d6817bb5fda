"""Bulk import of code systems into the concept tables, and the store's own supplement.

See docs/adr/0005-terminology-storage.md. ``import_codesystem`` takes what the
``terminologies.importers`` readers produce (metadata + a stream of concepts) and
replaces the code system's rows in one SQL transaction, together with its CodeSystem
resource (``content: not-present``), so re-running an import leaves no duplicates
and a failed one leaves the previous release in place.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import orjson
from sqlalchemy import delete, insert, select, update

from server.db import schema as S
from server.db.engine import begin_write
from server.errors import InvalidRequest
from server.store import PendingWrite, SqlStore, strip_meta
from server.fhir.validation import validate
from terminologies.model import Concept

from . import TABLES_TAG
from .provider import encode_concept_data

BATCH = 5_000
COPY_CONCEPT = "COPY term_concept (cs_pk, code, seq, display, inactive, data) FROM STDIN"
COPY_EDGE = "COPY term_parent (cs_pk, child, parent) FROM STDIN"
SUPPLEMENT_URL = "urn:synthport:supplement:"
SUPPLEMENT_TAG = {"system": "urn:synthport:terminology", "code": "store-supplement",
                  "display": "Codes used in the store, with their displays"}
_SKIP_TYPES = ("CodeSystem", "ValueSet", "ConceptMap")


@dataclass
class ImportResult:
    url: str
    version: str | None
    res_id: str
    concepts: int
    edges: int
    seconds: float


def codesystem_id(url: str, version: str | None) -> str:
    """A stable resource id for an imported code system (same url + version, same id)."""
    return "cs-" + hashlib.sha256(f"{url}|{version or ''}".encode()).hexdigest()[:24]


def _put_resource(store: SqlStore, conn, body: dict) -> str:
    """Write ``body`` as the next version of its id in the caller's transaction; a body
    equal to the current version writes nothing (FHIR no-op update, docs/fhir.md)."""
    validate(body, body["resourceType"])
    key = (body["resourceType"], body["id"])
    store.lock_condition(conn, f"{key[0]}/{key[1]}")
    cur = store.current_rows(conn, [key]).get(key)
    if cur is not None and not cur.deleted and strip_meta(orjson.loads(cur.body)) == strip_meta(body):
        return "unchanged"
    store.write_versions(conn, [PendingWrite(key[0], key[1], body, "PUT",
                                             prev_pk=cur.pk if cur is not None else None,
                                             prev_version=cur.version if cur is not None else 0)])
    return "created" if cur is None or cur.deleted else "updated"


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" concepts", unit_scale=True, mininterval=0.5)


def import_codesystem(store: SqlStore, meta: dict, concepts: Iterable[Concept],
                      progress: bool = True, res_id: str | None = None) -> ImportResult:
    """Store a code system's concepts and is-a edges, replacing any earlier import of
    the same url + version, and its CodeSystem resource (``content: not-present``).

    Args:
        store: the SQL store.
        meta: CodeSystem top-level fields from an importer (``url`` required;
            ``version``, ``name``, ``title``, ``content``, ``property``, ...).
        concepts: the concepts, streamed (a later duplicate code replaces an earlier one).
        progress: show a tqdm progress bar on stderr.
        res_id: id of the CodeSystem resource (default: derived from url + version).
    """
    url = meta.get("url")
    if not url:
        raise InvalidRequest("The code system to import has no url")
    version = meta.get("version")
    res_id = res_id or meta.get("id") or codesystem_id(url, version)
    content = meta.get("content") or "complete"
    t0 = time.time()
    bar = _progress(None, meta.get("name") or url, progress)
    mark = "?" if store.engine.dialect.paramstyle == "qmark" else "%s"
    ins_concept = (f"INSERT INTO term_concept (cs_pk, code, seq, display, inactive, data) "
                   f"VALUES ({', '.join([mark] * 6)})")
    ins_edge = f"INSERT INTO term_parent (cs_pk, child, parent) VALUES ({mark}, {mark}, {mark})"
    T = S.term_codesystem
    n = edges = 0
    conn = begin_write(store.engine)
    try:
        with conn.begin():
            store.lock_condition(conn, f"terminology-import {url}|{version or ''}")
            row = conn.execute(select(T.c.pk).where(T.c.url == url, T.c.version == (version or ""))).first()
            values = {"res_id": res_id, "name": (meta.get("name") or "")[:256], "content": content,
                      "updated": time.time()}
            if row is None:
                cs_pk = conn.execute(insert(T).values(url=url, version=version or "", concept_count=0,
                                                      **values).returning(T.c.pk)).scalar_one()
            else:
                cs_pk = row[0]
                conn.execute(delete(S.term_concept).where(S.term_concept.c.cs_pk == cs_pk))
                conn.execute(delete(S.term_parent).where(S.term_parent.c.cs_pk == cs_pk))
            seen: set[str] = set()
            c_rows: list[tuple] = []
            e_rows: list[tuple] = []
            dup: list[Concept] = []

            pg = store.engine.dialect.name == "postgresql"

            def flush():
                if pg:     # COPY: an order of magnitude faster than executemany on PostgreSQL
                    with conn.connection.driver_connection.cursor() as cur:
                        for sql, rows in ((COPY_CONCEPT, c_rows), (COPY_EDGE, e_rows)):
                            if rows:
                                with cur.copy(sql) as copy:
                                    for row in rows:
                                        copy.write_row(row)
                else:
                    if c_rows:
                        conn.exec_driver_sql(ins_concept, c_rows)
                    if e_rows:
                        conn.exec_driver_sql(ins_edge, e_rows)
                if bar is not None:
                    bar.update(len(c_rows))
                c_rows.clear()
                e_rows.clear()

            for c in concepts:
                if c.code in seen:
                    dup.append(c)        # rare: rewritten after the stream (later one wins)
                    continue
                seen.add(c.code)
                n += 1
                c_rows.append((cs_pk, c.code, n, c.display, bool(c.inactive), encode_concept_data(c)))
                for p in dict.fromkeys(c.parents):
                    e_rows.append((cs_pk, c.code, p))
                edges += len(set(c.parents))
                if len(c_rows) >= BATCH:
                    flush()
            flush()
            for c in {c.code: c for c in dup}.values():
                conn.execute(update(S.term_concept).where(S.term_concept.c.cs_pk == cs_pk,
                                                         S.term_concept.c.code == c.code)
                             .values(display=c.display, inactive=bool(c.inactive),
                                     data=encode_concept_data(c)))
                old = conn.execute(delete(S.term_parent).where(
                    S.term_parent.c.cs_pk == cs_pk, S.term_parent.c.child == c.code)).rowcount
                for p in dict.fromkeys(c.parents):
                    conn.exec_driver_sql(ins_edge, [(cs_pk, c.code, p)])
                edges += len(set(c.parents)) - old
            conn.execute(update(T).where(T.c.pk == cs_pk).values(concept_count=n, updated=time.time()))
            _put_resource(store, conn, _resource(meta, res_id, n, content, edges > 0))
    finally:
        conn.close()
        if bar is not None:
            bar.close()
    return ImportResult(url, version, res_id, n, edges, time.time() - t0)


def _resource(meta: dict, res_id: str, count: int, content: str, hierarchy: bool) -> dict:
    """The CodeSystem resource of an import: metadata only, concepts in the tables."""
    body = {k: v for k, v in meta.items()
            if k not in ("resourceType", "id", "meta", "concept", "count", "content")}
    body = {"resourceType": "CodeSystem", "id": res_id,
            "meta": {"tag": [TABLES_TAG, {"system": TABLES_TAG["system"] + ":content", "code": content}]},
            "status": meta.get("status", "active"), **body,
            # FHIR R4 §4.8.5: not-present = the concepts are not in this resource.
            "content": "not-present", "count": count}
    if hierarchy:
        body.setdefault("hierarchyMeaning", "is-a")
    return body


# --------------------------------------------------------------------------- supplement


def _codings(node, out: dict[tuple[str, str], str | None]) -> None:
    """Every (system, code) -> display of the Codings (and Quantity units) in a resource.

    Only elements with a ``code`` count: an Identifier or ContactPoint has ``value``
    instead, so patient identifiers never reach a supplement.
    """
    if isinstance(node, dict):
        system, code = node.get("system"), node.get("code")
        if isinstance(system, str) and isinstance(code, str) and system and code:
            label = node.get("display") if "display" in node else node.get("unit")
            if out.get((system, code)) is None:
                out[(system, code)] = label if isinstance(label, str) and label else None
        for v in node.values():
            if isinstance(v, (dict, list)):
                _codings(v, out)
    elif isinstance(node, list):
        for v in node:
            _codings(v, out)


def used_codes(store: SqlStore) -> dict[str, dict[str, str | None]]:
    """system -> code -> display of every code used in a current, non-terminology resource.

    The token and quantity index rows say which (system, code) pairs exist; displays come
    from the resources' Codings (each body read once, every Coding in it harvested).
    """
    r = S.resource
    pairs: dict[tuple[str, str], int] = {}
    with store.engine.connect() as conn:
        for tb in (S.idx_token, S.idx_quantity):
            q = (select(tb.c.system, tb.c.code, tb.c.res_pk)
                 .select_from(tb.join(r, r.c.pk == tb.c.res_pk))
                 .where(r.c.superseded_by.is_(None), r.c.deleted.is_(False),
                        tb.c.system.is_not(None), tb.c.system != "", tb.c.code.is_not(None),
                        tb.c.code != "", tb.c.res_type.not_in(_SKIP_TYPES)))
            for system, code, pk in conn.execute(q):
                pairs.setdefault((system, code), pk)
        found: dict[tuple[str, str], str | None] = {}
        todo = sorted(set(pairs.values()))
        for i in range(0, len(todo), 500):
            for (body,) in conn.execute(select(r.c.body).where(r.c.pk.in_(todo[i:i + 500]))):
                _codings(orjson.loads(body), found)
        out: dict[str, dict[str, str | None]] = {}
        for (system, code) in sorted(pairs):
            if (system, code) in found:          # else: not a Coding (an identifier...)
                out.setdefault(system, {})[code] = found[(system, code)]
    return out


def supplement_id(system: str) -> str:
    return "supplement-" + hashlib.sha256(system.encode()).hexdigest()[:24]


def build_supplement(store: SqlStore, progress: bool = False) -> list[tuple[str, int, str]]:
    """Write one CodeSystem supplement per code system used in the store.

    Each lists every code of that system found in a stored resource's Codings with its
    display (FHIR R4 §4.8.2 supplements), so ``$lookup``/``$validate-code`` answer for what
    the store holds without a licensed release. Re-running replaces them (a supplement
    whose codes did not change is left as it is).

    Returns:
        ``(system, number of codes, created|updated|unchanged)`` per system.
    """
    used = used_codes(store)
    report = []
    items: Iterator = used.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(list(items), desc="supplements", unit=" systems")
    for system, codes in items:
        body = {
            "resourceType": "CodeSystem", "id": supplement_id(system),
            "meta": {"tag": [SUPPLEMENT_TAG]},
            "url": SUPPLEMENT_URL + hashlib.sha256(system.encode()).hexdigest()[:24],
            "name": "StoreSupplement" + re.sub(r"[^A-Za-z0-9]", "", system.rsplit("/", 1)[-1])[:40],
            "title": f"Codes of {system} used in this store",
            "status": "active", "content": "supplement", "supplements": system,
            "count": len(codes),
            "concept": [{"code": c, **({"display": d} if d else {})} for c, d in codes.items()],
        }
        conn = begin_write(store.engine)
        try:
            with conn.begin():
                how = _put_resource(store, conn, body)
        finally:
            conn.close()
        report.append((system, len(codes), how))
    return report


__all__ = ["import_codesystem", "build_supplement", "used_codes", "ImportResult", "codesystem_id"]
