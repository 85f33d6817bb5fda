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


class CompartmentReader:
    """``Patient/<id>/$everything`` of the real store, many patients on one snapshot.

    Exactly the resources and order of :func:`server.fhir.everything.patient_everything`
    without ``_count``/``_type``/``_since``: the Patient, every current resource with an
    indexed reference to ``Patient/<id>`` (the compartment, ascending ``pk``), then the
    current resources those reference other than Patients (ascending ``pk``). Instead of
    SQLAlchemy statements with ``IN`` lists of up to 900 bound pks per chunk, each patient
    costs three plain DBAPI statements whose compartment is a sub-select, and referenced
    resources (practitioners, organizations, medications), shared by many patients, are
    looked up once per export. The snapshot (by default the largest ``pk`` when the
    reader opens) holds for the whole export: one export is one state of the store.

    Args:
        engine: the store's SQLAlchemy engine (``SqlStore.engine``).
        snapshot: resources with a larger ``pk`` are not seen (a reader in another
            process passes the parent's snapshot).
    """

    # Referenced resources kept across patients (a few KB each): (type, id) -> (pk, body).
    CACHE_MAX = 100_000

    def __init__(self, engine, snapshot: int | None = None):
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self.mark = mark
        self.raw = engine.raw_connection()
        self.cur = self.raw.cursor()
        if snapshot is None:
            self.cur.execute("SELECT COALESCE(MAX(pk), 0) FROM resource")
            snapshot = int(self.cur.fetchone()[0])
        self.snapshot = int(snapshot)
        visible = f"pk <= {mark} AND (superseded_by IS NULL OR superseded_by > {mark})"
        current = f"{visible} AND deleted = {mark}"
        # server/fhir/everything.py: the compartment is "any indexed reference to Patient/<id>"
        in_comp = (f"pk IN (SELECT res_pk FROM idx_reference WHERE target_type = 'Patient' "
                   f"AND target_id = {mark}) AND {current}")
        self.sql_patient = (f"SELECT pk, deleted, body FROM resource WHERE res_type = 'Patient' "
                            f"AND res_id = {mark} AND {visible}")
        self.sql_comp = f"SELECT pk, res_type, res_id, body FROM resource WHERE {in_comp}"
        self.sql_targets = (f"SELECT DISTINCT target_type, target_id FROM idx_reference "
                            f"WHERE res_pk IN (SELECT pk FROM resource WHERE {in_comp}) "
                            f"AND res_pk <> {mark} AND target_type IS NOT NULL "
                            f"AND target_type <> 'Patient'")
        self.current = current
        self.cache: dict[tuple[str, str], tuple[int, bytes] | None] = {}

    def _vis(self) -> tuple:
        return (self.snapshot, self.snapshot, False)

    def bodies(self, patient_id: str) -> list[bytes] | None:
        """The JSON bodies of the patient's record: ``$everything`` in its order, with the
        Patient resources moved to the front as :func:`server.mapping_export.patient_record` does (None: no
        current Patient with this id at the snapshot)."""
        entries = self.entries(patient_id)
        return None if entries is None else [e[2] for e in entries]

    def entries(self, patient_id: str) -> list[tuple[str, str, bytes]] | None:
        """``(resourceType, id, JSON body)`` of each resource of :meth:`bodies`, in its order
        (type and id from the ``resource`` row, which are the body's own)."""
        cur, snap = self.cur, self.snapshot
        cur.execute(self.sql_patient, (patient_id, snap, snap))
        prow = cur.fetchone()
        if prow is None or prow[1]:
            return None
        ppk = prow[0]
        cur.execute(self.sql_comp, (patient_id, *self._vis()))
        comp = sorted((r for r in cur.fetchall() if r[0] != ppk), key=lambda r: r[0])
        targets = []
        if comp:
            cur.execute(self.sql_targets, (patient_id, *self._vis(), ppk))
            # a target inside the compartment is that compartment row (current at the snapshot)
            inside = {(r[1], r[2]) for r in comp}
            targets = [(t, i) for t, i in cur.fetchall() if (t, i) not in inside]
        self._resolve(targets)
        refs = {}
        for key in targets:
            hit = self.cache.get(key)
            if hit is not None:
                refs[hit[0]] = (key[0], key[1], hit[1])
        # referenced resources are never Patients (target_type <> 'Patient' above)
        out = ([("Patient", patient_id, prow[2])]
               + [(r[1], r[2], r[3]) for r in comp if r[1] == "Patient"]
               + [(r[1], r[2], r[3]) for r in comp if r[1] != "Patient"]
               + [refs[k] for k in sorted(refs)])
        return [e if isinstance(e[2], bytes) else (e[0], e[1], bytes(e[2])) for e in out if e[2]]

    def _resolve(self, targets) -> None:
        if len(self.cache) > self.CACHE_MAX:
            self.cache.clear()
        by_type: dict[str, list[str]] = {}
        for t, i in targets:
            if (t, i) not in self.cache:
                by_type.setdefault(t, []).append(i)
        for t, ids in by_type.items():
            for n in range(0, len(ids), 500):
                chunk = ids[n:n + 500]
                for i in chunk:
                    self.cache[(t, i)] = None
                marks = ", ".join([self.mark] * len(chunk))
                self.cur.execute(f"SELECT res_id, pk, body FROM resource WHERE res_type = {self.mark} "
                                 f"AND res_id IN ({marks}) AND {self.current}",
                                 (t, *chunk, *self._vis()))
                for res_id, pk, body in self.cur.fetchall():
                    self.cache[(t, res_id)] = (pk, body)

    def close(self) -> None:
        try:
            self.cur.close()
        finally:
            self.raw.close()
