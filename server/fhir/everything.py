"""``Patient/{id}/$everything`` (FHIR R4 patient-operation-everything).

The patient, every current resource that references it (the patient compartment,
taken as "any indexed reference to Patient/{id}"; see docs/fhir.md), then the
resources those reference (practitioners, organizations, locations, medications),
in a stable order. No cap: with ``_count`` the result is paged by ``next`` links on a
snapshot, without it everything comes in one Bundle.
"""
from __future__ import annotations

from sqlalchemy import func, or_, select

from server.db import schema as S
from server.errors import Gone, InvalidRequest, NotFound
from server.fhir.timeutil import parse_instant
from server.source import RequestContext, SearchResult

R = S.resource
X = S.idx_reference


def _visible(snapshot: int):
    return [R.c.pk <= snapshot, R.c.deleted.is_(False),
            or_(R.c.superseded_by.is_(None), R.c.superseded_by > snapshot)]


def patient_everything(store, ctx: RequestContext, patient_id: str,
                       params: list[tuple[str, str]]) -> SearchResult:
    count, offset, since, types, snapshot = None, 0, None, None, None
    for k, v in params:
        if k == "_count":
            count = int(v) if v.isascii() and v.isdigit() else _bad(k, v)
        elif k == "_offset":
            offset = int(v) if v.isascii() and v.isdigit() else _bad(k, v)
        elif k == "_snapshot":
            snapshot = int(v) if v.isascii() and v.isdigit() else _bad(k, v)
        elif k == "_since":
            since = parse_instant(v)
        elif k == "_type":
            types = {t.strip() for t in v.split(",") if t.strip()}
    with store.engine.connect() as conn:
        if snapshot is None:
            snapshot = conn.execute(select(func.coalesce(func.max(R.c.pk), 0))).scalar_one()
        prow = conn.execute(select(R.c.pk, R.c.deleted).where(
            R.c.res_type == "Patient", R.c.res_id == patient_id, *_visible_any(snapshot))).first()
        if prow is None:
            raise NotFound(f"Patient/{patient_id} is not known")
        if prow.deleted:
            raise Gone(f"Patient/{patient_id} was deleted")
        comp = (select(R.c.pk).join(X, X.c.res_pk == R.c.pk)
                .where(X.c.target_type == "Patient", X.c.target_id == patient_id, *_visible(snapshot))
                .distinct())
        if since is not None:
            comp = comp.where(R.c.last_updated >= since)
        if types:
            comp = comp.where(R.c.res_type.in_(sorted(types)))
        comp_pks = sorted({r[0] for r in conn.execute(comp)} - {prow.pk})
        # Referenced resources outside the compartment (FHIR: "SHOULD include").
        ref_pks: list[int] = []
        if comp_pks:
            targets = set()
            for i in range(0, len(comp_pks), 900):
                chunk = comp_pks[i:i + 900]
                targets.update(conn.execute(
                    select(X.c.target_type, X.c.target_id).where(
                        X.c.res_pk.in_(chunk), X.c.target_type.is_not(None),
                        X.c.target_type != "Patient")).all())
            by_type: dict[str, set[str]] = {}
            for t, i_ in targets:
                by_type.setdefault(t, set()).add(i_)
            found = set()
            for t, ids in by_type.items():
                if types and t not in types:
                    continue
                ids_l = sorted(ids)
                for i in range(0, len(ids_l), 900):
                    found.update(r[0] for r in conn.execute(select(R.c.pk).where(
                        R.c.res_type == t, R.c.res_id.in_(ids_l[i:i + 900]), *_visible(snapshot))))
            ref_pks = sorted(found - set(comp_pks))
        ordered = ([prow.pk] if (not types or "Patient" in types) else []) + comp_pks + ref_pks
        total = len(ordered)
        page = ordered[offset:offset + count] if count is not None else ordered[offset:]
        matches = store.load(conn, page)
    base = [(k, v) for k, v in params if k not in ("_offset", "_snapshot")]
    nxt = prev = None
    if count is not None and offset + count < total:
        nxt = base + [("_snapshot", str(snapshot)), ("_offset", str(offset + count))]
    if count is not None and offset > 0:
        prev = base + [("_snapshot", str(snapshot)), ("_offset", str(max(0, offset - count)))]
    return SearchResult(matches=matches, total=total, self_params=params, next_params=nxt,
                        prev_params=prev)


def _visible_any(snapshot: int):
    """Visible as of the snapshot, deleted or not (to tell 404 from 410)."""
    return [R.c.pk <= snapshot, or_(R.c.superseded_by.is_(None), R.c.superseded_by > snapshot)]


def _bad(k: str, v: str):
    raise InvalidRequest(f"{k} must be a non-negative integer, got '{v}'")
