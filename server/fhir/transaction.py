"""transaction and batch Bundles (FHIR R4 http §3.1.0.11).

A transaction is atomic: every entry is validated before the write lock is taken,
then all writes happen in one SQL transaction; any failure rolls everything back
and the response is one OperationOutcome naming the failing entry. Processing order
follows §3.1.0.11.2: DELETE, then POST, then PUT/PATCH, then GET/HEAD; ``urn:uuid:``
and conditional references (``Patient?identifier=…``) are resolved before writing.
A batch runs each entry on its own and reports each outcome in its entry.
"""
from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import orjson

from server.db.engine import begin_write
from server.errors import (InvalidRequest, MultipleMatches, NotImplementedYet, PreconditionFailed,
                           SynthportError, TooLarge, outcome_for)
from server.fhir.ids import new_id
from server.fhir.searchparams import RESOURCE_TYPES
from server.fhir.timeutil import instant
from server.fhir.validation import valid_id, validate
from server.source import RequestContext, StoredResource

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content", 304: "304 Not Modified"}


@dataclass
class Entry:
    index: int
    method: str
    res_type: str | None
    res_id: str | None
    query: str | None
    full_url: str | None
    resource: dict | None
    if_none_exist: str | None = None
    if_match: str | None = None
    raw_url: str = ""
    result: dict = field(default_factory=dict)
    pending_refs: list = field(default_factory=list)   # reference nodes resolved under the lock
    item: object = None                                 # prepared PendingWrite


def write_gate(store):
    """The gate a transaction on ``store`` queues at before its write transaction:
    ``store.write_gate`` when set (the loader's workers share a multiprocessing lock), else
    None. Writers of a SQLite file also queue on its lock file at ``BEGIN IMMEDIATE``
    (server/db/engine.py); PostgreSQL runs writers concurrently."""
    return getattr(store, "write_gate", None)


def process_bundle(store, ctx: RequestContext, bundle: dict) -> dict:
    """Process a transaction or batch Bundle and return its response Bundle."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise InvalidRequest("POST to the base URL needs a Bundle of type transaction or batch")
    btype = bundle.get("type")
    if btype == "document":
        raise InvalidRequest(
            "This is a document Bundle, not a transaction: POST it to /fhir/Bundle to store the "
            "document as one resource, or load it with `synthport load`, which splits it into its "
            "resources (FHIR R4 documents §3.3.1)", ["Bundle.type"])
    if btype not in ("transaction", "batch"):
        raise InvalidRequest(f"Bundle.type must be transaction or batch, got '{btype}'", ["Bundle.type"])
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise InvalidRequest("Bundle.entry must be an array", ["Bundle.entry"])
    # A synthetic cohort (batch of reads through the access guard) has no store settings.
    limit = int((getattr(store, "config", None) or {}).get("max_bundle_entries", 100_000))
    if len(entries) > limit:
        raise TooLarge(f"Bundle has {len(entries)} entries; the limit is {limit}")
    if btype == "batch":
        return _batch(store, ctx, entries)
    return _transaction(store, ctx, entries)


# ---------------------------------------------------------------------- parsing
def _parse_entry(i: int, raw: dict, ctx: RequestContext) -> Entry:
    where = f"Bundle.entry[{i}]"
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} is not an object", [where])
    req = raw.get("request")
    if not isinstance(req, dict):
        raise InvalidRequest(f"{where}.request is required in a transaction/batch", [f"{where}.request"])
    method = str(req.get("method", "")).upper()
    if method not in _ORDER:
        raise InvalidRequest(f"{where}.request.method '{req.get('method')}' is not supported",
                             [f"{where}.request.method"])
    url = req.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}.request.url is required", [f"{where}.request.url"])
    rel = url
    if ctx.base_url and rel.startswith(ctx.base_url):
        rel = rel[len(ctx.base_url):]
    elif "://" in rel:
        rel = urlsplit(rel).path.split("/fhir/", 1)[-1] + (("?" + urlsplit(rel).query) if urlsplit(rel).query else "")
    rel = rel.lstrip("/")
    path, _, query = rel.partition("?")
    parts = [p for p in path.split("/") if p]
    res_type = parts[0] if parts else None
    res_id = parts[1] if len(parts) > 1 else None
    if res_type is not None and res_type not in RESOURCE_TYPES and not res_type.startswith("$"):
        raise InvalidRequest(f"{where}.request.url names unknown type '{res_type}'", [f"{where}.request.url"])
    resource = raw.get("resource")
    e = Entry(i, method, res_type, res_id, query or None, raw.get("fullUrl"), resource,
              req.get("ifNoneExist"), req.get("ifMatch"), url)
    if method in ("POST", "PUT"):
        if not isinstance(resource, dict):
            raise InvalidRequest(f"{where}.resource is required for {method}", [f"{where}.resource"])
        if res_type and resource.get("resourceType") != res_type:
            raise InvalidRequest(f"{where}: resource type '{resource.get('resourceType')}' does not "
                                 f"match request.url '{url}'", [f"{where}.resource"])
    if method == "PUT" and not res_id and not query:
        raise InvalidRequest(f"{where}: PUT needs Type/id or Type?criteria", [f"{where}.request.url"])
    if method == "PUT" and res_id and not valid_id(res_id):
        raise InvalidRequest(f"{where}: invalid id '{res_id}'", [f"{where}.request.url"])
    if method == "DELETE" and not res_id and not query:
        raise InvalidRequest(f"{where}: DELETE needs Type/id or Type?criteria", [f"{where}.request.url"])
    return e


def _patch_ops(e: Entry) -> list:
    """JSON Patch carried in a Binary (FHIR R4 http §3.1.0.7.1)."""
    r = e.resource
    if isinstance(r, dict) and r.get("resourceType") == "Binary" and r.get("data"):
        try:
            return orjson.loads(base64.b64decode(r["data"]))
        except (ValueError, orjson.JSONDecodeError):
            raise InvalidRequest(f"Bundle.entry[{e.index}]: Binary.data is not a JSON Patch") from None
    raise NotImplementedYet(f"Bundle.entry[{e.index}]: PATCH in a Bundle must be a Binary holding "
                            "a JSON Patch (FHIRPath Patch is not supported)")


def _walk_refs(node, mapping: dict[str, str], late: set[str], pending: list) -> None:
    """Rewrite references in place (FHIR R4 http §3.1.0.11.2).

    References to entries whose identity is only known under the write lock (conditional
    creates/updates: ``late``) and conditional references (``Type?criteria``) are
    collected in ``pending`` instead.
    """
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str):
                if k == "reference":
                    if v in mapping:
                        node[k] = mapping[v]
                    elif v in late or ("?" in v and not v.startswith(("http://", "https://", "urn:", "#"))):
                        pending.append(node)
                elif v in mapping and v.startswith("urn:"):
                    node[k] = mapping[v]
            elif isinstance(v, (dict, list)):
                _walk_refs(v, mapping, late, pending)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, (dict, list)):
                _walk_refs(v, mapping, late, pending)


def resolve_local_references(bundle: dict) -> list[dict]:
    """The resources of a Bundle with references to entries' ``fullUrl`` rewritten to
    ``Type/id`` (keeping the resources' own ids), as a transaction would resolve them."""
    mapping = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
               for e in bundle.get("entry") or [] if "fullUrl" in e and "id" in e.get("resource", {})}
    resources = [e["resource"] for e in bundle.get("entry") or [] if "resource" in e]
    for r in resources:
        _walk_refs(r, mapping, set(), [])
    return resources


def _response(status: int, stored: StoredResource | None, with_body: bool) -> dict:
    resp = {"status": _STATUS_TEXT.get(status, str(status))}
    if stored is not None and not stored.deleted:
        resp["location"] = f"{stored.res_type}/{stored.res_id}/_history/{stored.version}"
        resp["etag"] = stored.etag
        resp["lastModified"] = instant(stored.last_updated)
    out = {"response": resp}
    if with_body and stored is not None and stored.body:
        out["resource"] = orjson.loads(stored.body)
    return out


# ---------------------------------------------------------------------- transaction
def _transaction(store, ctx: RequestContext, raw_entries: list) -> dict:
    """Atomic transaction. CPU work (validation, reference rewriting, index extraction,
    serialisation) happens before the write lock; under it only lookups and SQL writes."""
    from server.store import PendingWrite, apply_json_patch, parse_etag, strip_meta

    entries = [_parse_entry(i, raw, ctx) for i, raw in enumerate(raw_entries)]
    seen: set[str] = set()
    for e in entries:
        if e.res_id and e.method != "GET":
            key = f"{e.res_type}/{e.res_id}"
            if key in seen:
                raise InvalidRequest(f"Bundle.entry[{e.index}]: {key} appears more than once in the "
                                     "transaction (FHIR R4 http §3.1.0.11.2)")
            seen.add(key)
        if e.method in ("POST", "PUT"):
            _validate_entry(e)
    with_body = ctx.prefer_return == "representation"
    writes = [e for e in entries if e.method in ("POST", "PUT")]

    # -- before the lock: identities known without the database
    mapping: dict[str, str] = {}
    late: set[str] = set()
    for e in entries:
        if e.method == "POST":
            e.res_type = e.resource["resourceType"]
            if e.if_none_exist:
                late.update(u for u in (e.full_url,) if u)
                continue
            e.res_id = new_id()
        elif e.method in ("PUT", "PATCH") and not e.res_id:
            late.update(u for u in (e.full_url,) if u)
            continue
        if e.method in ("POST", "PUT", "PATCH"):
            if e.method == "PUT":
                if e.resource.get("id") not in (None, e.res_id):
                    raise InvalidRequest(f"Bundle.entry[{e.index}]: resource id "
                                         f"'{e.resource.get('id')}' differs from URL id '{e.res_id}'")
                e.resource["id"] = e.res_id
            _map(mapping, e, f"{e.res_type}/{e.res_id}")
    for e in writes:
        nodes: list[dict] = []
        _walk_refs(e.resource, mapping, late, nodes)
        e.pending_refs = [(n, None) for n in nodes]
    # Conditional references to data already stored are resolved on a read connection
    # and re-checked under the lock (docs/fhir.md).
    cond_cache: dict[str, str] = {}
    if any(e.pending_refs for e in writes):
        with store.engine.connect() as rconn:
            for e in writes:
                resolved = []
                for node, _ in e.pending_refs:
                    ref = node["reference"]
                    target = None if ref in late else _try_conditional(store, rconn, ref, cond_cache)
                    if target:
                        node["reference"] = target
                    resolved.append((node, ref if target else None))
                e.pending_refs = resolved
    for e in writes:
        if e.res_id and all(orig is not None for _, orig in e.pending_refs):
            e.item = PendingWrite(e.res_type, e.res_id, e.resource, e.method).prepare()

    # -- under the lock; the loader's workers queue at their shared gate first
    gate = write_gate(store)
    held = False
    conn = begin_write(store.engine)
    try:
        if gate is not None:   # a gate held too long (a stuck peer): SQLite's own lock still rules
            held = gate.acquire(timeout=60)
        with conn.begin():
            ordered = sorted(entries, key=lambda x: (_ORDER[x.method], x.index))
            for e in (x for x in ordered if x.method == "DELETE"):
                e.result = _at(e, lambda: _tx_delete(store, conn, e))
            creates: dict[str, str] = {}
            for e in (x for x in ordered if x.method == "POST" and x.if_none_exist):
                cond = f"{e.res_type}?{e.if_none_exist}"
                if cond in creates:
                    e.res_id = creates[cond]
                    e.result = {"response": {"status": "200 OK", "location": f"{e.res_type}/{e.res_id}"}}
                    _map(mapping, e, f"{e.res_type}/{e.res_id}")
                    continue
                store._lock_condition(conn, cond)
                found = _at(e, lambda: store.match(conn, e.res_type, e.if_none_exist))
                if len(found) > 1:
                    raise MultipleMatches(f"Bundle.entry[{e.index}]: ifNoneExist matched {len(found)}")
                if found:
                    existing = store.load(conn, [found[0][0]])[0]
                    e.res_id = existing.res_id
                    e.result = _response(200, existing, with_body)
                else:
                    e.res_id = new_id()
                creates[cond] = e.res_id
                _map(mapping, e, f"{e.res_type}/{e.res_id}")
                # A conditional reference with the same criteria names this entry's target
                # even before it is written (Synthea's Location -> Organization?identifier=…).
                mapping[cond] = f"{e.res_type}/{e.res_id}"
            for e in (x for x in ordered if x.method in ("PUT", "PATCH") and not x.res_id):
                found = _at(e, lambda: store.match(conn, e.res_type, e.query))
                if len(found) > 1:
                    raise MultipleMatches(f"Bundle.entry[{e.index}]: conditional {e.method} "
                                          f"matched {len(found)} resources")
                if found:
                    e.res_id = found[0][1]
                elif e.method == "PUT":
                    e.res_id = (e.resource or {}).get("id") or new_id()
                else:
                    raise PreconditionFailed(f"Bundle.entry[{e.index}]: conditional PATCH matched nothing")
                if e.method == "PUT":
                    if e.resource.get("id") not in (None, e.res_id):
                        raise InvalidRequest(f"Bundle.entry[{e.index}]: resource id "
                                             f"'{e.resource.get('id')}' differs from the matched "
                                             f"{e.res_type}/{e.res_id}")
                    e.resource["id"] = e.res_id
                _map(mapping, e, f"{e.res_type}/{e.res_id}")
            _settle_references(store, conn, writes, mapping, cond_cache)
            for e in writes:
                if e.result:  # conditional create that matched: nothing to write
                    continue
                if e.item is None:
                    e.item = PendingWrite(e.res_type, e.res_id, e.resource, e.method).prepare()
            # PUT/PATCH need the current versions (locked in a stable order on PostgreSQL)
            targets = sorted({(x.res_type, x.res_id) for x in entries if x.method in ("PUT", "PATCH")})
            for t, i in targets:
                store._lock_condition(conn, f"{t}/{i}")
            current = store.current_rows(conn, targets)
            pending = []
            for e in (x for x in ordered if x.method in ("POST", "PUT", "PATCH") and not x.result):
                if e.method == "POST":
                    pending.append((e, e.item))
                    continue
                cur = current.get((e.res_type, e.res_id))
                want = parse_etag(e.if_match)
                if want is not None and (cur is None or cur.deleted or cur.version != want):
                    raise PreconditionFailed(f"Bundle.entry[{e.index}]: ifMatch {e.if_match} does not "
                                             f"match {e.res_type}/{e.res_id}")
                if e.method == "PATCH":
                    if cur is None or cur.deleted:
                        raise PreconditionFailed(f"Bundle.entry[{e.index}]: cannot PATCH missing "
                                                 f"{e.res_type}/{e.res_id}")
                    body = apply_json_patch(orjson.loads(cur.body), _patch_ops(e))
                    _at(e, lambda: validate(body, e.res_type))
                    e.item = PendingWrite(e.res_type, e.res_id, body, "PATCH").prepare()
                elif cur is not None and not cur.deleted and \
                        strip_meta(orjson.loads(cur.body)) == strip_meta(e.item.body):
                    e.result = _response(200, store.stored(cur), with_body)
                    continue
                e.item.prev_pk = cur.pk if cur is not None else None
                e.item.prev_version = cur.version if cur is not None else 0
                pending.append((e, e.item))
            stored = store.write_versions(conn, [p for _, p in pending])
            for (e, p), s in zip(pending, stored):
                created = e.method == "POST" or p.prev_pk is None
                e.result = _response(201 if created else 200, s, with_body)
    finally:
        conn.close()
        if held:
            gate.release()
    # GET/HEAD after the writes are committed
    for e in entries:
        if e.method in ("GET", "HEAD"):
            e.result = _run_get(store, ctx, e)
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "transaction-response",
            "entry": [e.result for e in entries]}


def _settle_references(store, conn, writes: list[Entry], mapping: dict[str, str],
                       cache: dict[str, str]) -> None:
    """Under the lock: resolve late and conditional references, re-check pre-resolved ones."""
    pre = {node["reference"] for e in writes for node, orig in e.pending_refs if orig}
    alive = store.current_ids(conn, [tuple(r.split("/", 1)) for r in pre]) if pre else set()
    for e in writes:
        changed = False
        for node, orig in e.pending_refs:
            if orig is not None:
                if node["reference"] in alive:
                    continue
                cache.pop(orig, None)
                ref = orig
            else:
                ref = node["reference"]
            node["reference"] = mapping.get(ref) or _resolve_conditional(store, conn, e, ref, cache)
            changed = True
        if changed:
            e.item = None  # re-prepare with the final references


def _try_conditional(store, conn, ref: str, cache: dict[str, str]) -> str | None:
    if ref in cache:
        return cache[ref]
    res_type, _, query = ref.partition("?")
    if res_type not in RESOURCE_TYPES or not query:
        return None
    try:
        found = store.match(conn, res_type, query)
    except SynthportError:
        return None
    if len(found) != 1:
        return None
    cache[ref] = f"{res_type}/{found[0][1]}"
    return cache[ref]


def _validate_entry(e: Entry) -> None:
    _at(e, lambda: validate(e.resource, e.resource.get("resourceType")))


def _at(e: Entry, fn):
    """Run fn; prefix any error with the entry it came from."""
    try:
        return fn()
    except SynthportError as exc:
        where = f"Bundle.entry[{e.index}]"
        if not exc.message.startswith(where):
            exc.message = f"{where}: {exc.message}"
            exc.args = (exc.message,)
            exc.expression = [f"{where}.resource.{p.split('.', 1)[-1]}" if "." in p else p
                              for p in exc.expression] or [where]
        raise


def _map(mapping: dict[str, str], e: Entry, target: str) -> None:
    if e.full_url:
        mapping[e.full_url] = target
        if e.full_url.startswith("urn:"):
            return
        # An absolute fullUrl like http://x/fhir/Patient/1 also matches its relative form.
        mapping[e.full_url.split("/fhir/", 1)[-1]] = target


def _resolve_conditional(store, conn, e: Entry, ref: str, cache: dict[str, str]) -> str:
    if ref in cache:
        return cache[ref]
    res_type, _, query = ref.partition("?")
    if res_type not in RESOURCE_TYPES:
        raise InvalidRequest(f"Bundle.entry[{e.index}]: conditional reference '{ref}' names an unknown type")
    found = store.match(conn, res_type, query)
    if len(found) != 1:
        raise PreconditionFailed(f"Bundle.entry[{e.index}]: conditional reference '{ref}' matched "
                                 f"{len(found)} resources; exactly one is required "
                                 "(FHIR R4 http §3.1.0.11.3)")
    cache[ref] = f"{res_type}/{found[0][1]}"
    return cache[ref]


def _tx_delete(store, conn, e: Entry) -> dict:
    if e.res_id:
        cur = store._latest(conn, e.res_type, e.res_id)
        if cur is None or cur.deleted:
            return {"response": {"status": "204 No Content"}}
        store._delete_locked(conn, e.res_type, e.res_id)
        return {"response": {"status": "204 No Content"}}
    found = store.match(conn, e.res_type, e.query)
    if len(found) > 1:
        raise MultipleMatches(f"conditional DELETE matched {len(found)} resources")
    for _pk, rid in found:
        store._delete_locked(conn, e.res_type, rid)
    return {"response": {"status": "204 No Content"}}


# ---------------------------------------------------------------------- batch
def _batch(store, ctx: RequestContext, raw_entries: list) -> dict:
    out = []
    with_body = ctx.prefer_return == "representation"
    for i, raw in enumerate(raw_entries):
        try:
            e = _parse_entry(i, raw, ctx)
            out.append(_run_one(store, ctx, e, with_body))
        except SynthportError as exc:
            status, oo = outcome_for(exc)
            out.append({"response": {"status": str(status), "outcome": oo}})
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "batch-response", "entry": out}


def _run_one(store, ctx: RequestContext, e: Entry, with_body: bool) -> dict:
    if e.method in ("GET", "HEAD"):
        return _run_get(store, ctx, e)
    if e.method == "POST":
        r = store.create(ctx, e.resource["resourceType"], e.resource, e.if_none_exist)
    elif e.method == "PUT":
        if e.res_id:
            r = store.update(ctx, e.res_type, e.res_id, e.resource, e.if_match)
        else:
            r = store.conditional_update(ctx, e.res_type, parse_qsl(e.query or ""), e.resource)
    elif e.method == "PATCH":
        r = store.patch(ctx, e.res_type, e.res_id, _patch_ops(e), e.if_match)
    else:
        if e.res_id:
            try:
                r = store.delete(ctx, e.res_type, e.res_id)
            except SynthportError as exc:
                if type(exc).__name__ != "NotFound":
                    raise
                return {"response": {"status": "204 No Content"}}
        else:
            r = store.conditional_delete(ctx, e.res_type, parse_qsl(e.query or ""))
    return _response(r.status, r.resource, with_body)


def _run_get(store, ctx: RequestContext, e: Entry) -> dict:
    from server.fhir.bundles import search_bundle

    try:
        if e.res_type and e.res_id:
            parts = e.raw_url.split("?")[0].rstrip("/").split("/")
            if "_history" in parts and parts[-1] != "_history":
                s = store.vread(ctx, e.res_type, e.res_id, int(parts[-1]))
            else:
                s = store.read(ctx, e.res_type, e.res_id)
            out = _response(200, s, True)
            out["response"].pop("location", None)
            return out
        params = parse_qsl(e.query or "", keep_blank_values=True)
        result = store.search(ctx, e.res_type, params)
        return {"resource": search_bundle(ctx, e.res_type, result), "response": {"status": "200 OK"}}
    except SynthportError as exc:
        status, oo = outcome_for(exc)
        return {"response": {"status": str(status), "outcome": oo}}
