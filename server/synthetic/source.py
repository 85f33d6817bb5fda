"""``SyntheticSource``: the FHIR Source protocol over a cohort (read-only, generated).

* read / vread (version 1 only) / instance history: the id encodes the patient index
  (``<cohort>-<i>`` for the Patient, ``<cohort>-<i>-<kind>-<n>`` for the others), so
  only that patient is generated.
* search: ``Patient`` on the cohort index (vectorised: ``_id``, ``identifier``,
  ``gender``, ``birthdate`` with prefixes, ``family``, ``given``, ``name``,
  ``deceased``), paged by ``_offset`` in the ``next`` link, with an exact total. Clinical
  types: candidate patients come from ``patient``/``subject`` (that patient only) or from
  the index (condition flags for ``Condition?code``), only those are generated, and every parameter is then
  evaluated on the generated resources with the same FHIRPath index values the real
  store uses (:func:`server.fhir.extract.extract`). These pages are stateless too: the
  ``next`` link carries the position in the candidate list (``_cursor``) and the matches
  of that patient already returned (``_skip``); a page generates at most
  ``synthetic_scan_budget`` patients, so it may hold fewer than ``_count`` entries.
* ``Patient/{id}/$everything``: the whole record (``_type``, ``_count`` + ``_offset``).
* every write answers 405 with an OperationOutcome (:class:`MethodNotAllowed`).
"""
from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pandas as pd

from server.errors import InvalidRequest, MethodNotAllowed, NotFound, NotImplementedYet
from server.source import RequestContext, SearchResult, StoredResource, WriteResult
from server.synthetic.cohort import Cohort

CLINICAL_TYPES = ("Condition", "Observation", "Encounter", "Procedure", "MedicationRequest",
                  "Immunization", "DiagnosticReport", "ImagingStudy")
SERVED_TYPES = ("Patient",) + CLINICAL_TYPES
PATIENT_PARAMS = ("_id", "identifier", "gender", "birthdate", "family", "given", "name", "deceased")
RESULT_PARAMS = {"_count", "_offset", "_cursor", "_skip", "_total", "_summary", "_elements",
                 "_format", "_pretty", "_sort"}
# Patient-table columns that say which patients have a code (mappings column names). Only
# condition flags: the event model generates a condition's onset exactly when the row has
# its flag; other counts are not binding on the event model, so those searches scan.
CODE_PREFIX = {"Condition": "cond"}
_SAFE = re.compile(r"[^A-Za-z0-9.\-]")
_EPOCH = dt.date(1970, 1, 1)


def _read_only(name: str) -> MethodNotAllowed:
    return MethodNotAllowed(f"Synthetic cohort '{name}' is read-only: its virtual patients are "
                            "generated from a model, they cannot be created, changed or deleted")


class SyntheticSource:
    """FHIR source of one cohort. Stateless apart from the cohort's per-process caches."""

    writable = False

    def __init__(self, cohort: Cohort, config: dict | None = None):
        self.cohort = cohort
        self.name = cohort.name
        cfg = config or {}
        self.default_count = int(cfg.get("default_count", 50))
        self.max_count = int(cfg.get("max_count", 1000))
        self.scan_budget = int(cfg.get("synthetic_scan_budget", 200))

    # ------------------------------------------------------------------ capability
    def capabilities(self, base_url: str = "") -> dict:
        """The CapabilityStatement: read-only interactions, the types and parameters served."""
        from server.fhir.capability import capability_statement

        cs = capability_statement(base_url, False, f"synthetic cohort {self.name}")
        rest = cs["rest"][0]
        rest["interaction"] = [{"code": "search-system"}]
        rest["documentation"] = ("Synthetic cohort (read-only, generated on demand). "
                                 "See docs/synthetic.md for the search parameters supported.")
        out = []
        for r in rest["resource"]:
            if r["type"] not in SERVED_TYPES:
                continue
            r = dict(r, interaction=[{"code": c} for c in
                                     ("read", "vread", "history-instance", "search-type")],
                     searchInclude=[], searchRevInclude=[], conditionalRead="not-supported",
                     operation=[o for o in r.get("operation", []) if o["name"] == "everything"])
            if r["type"] == "Patient":
                r["searchParam"] = [p for p in r["searchParam"] if p["name"] in PATIENT_PARAMS]
            else:
                r["searchParam"] = [p for p in r["searchParam"]
                                    if p["type"] in ("token", "string", "date", "reference")
                                    and p["name"] != "_lastUpdated"]
            out.append(r)
        rest["resource"] = out
        rest["operation"] = []
        return cs

    # ------------------------------------------------------------------ reads
    def _patient_of(self, res_id: str) -> int:
        i = self.cohort.index_of(res_id)
        if i is None:
            raise NotFound(f"no resource with id '{res_id}' in synthetic cohort '{self.name}'")
        return i

    def read(self, ctx: RequestContext, res_type: str, res_id: str) -> StoredResource:
        i = self._patient_of(res_id)
        if res_type == "Patient" and res_id == self.cohort.patient_id(i):
            return self.cohort.patient_stored(i)
        s = self.cohort.record(i).stored.get((res_type, res_id))
        if s is None:
            raise NotFound(f"{res_type}/{res_id} is not known in synthetic cohort '{self.name}'")
        return s

    def vread(self, ctx: RequestContext, res_type: str, res_id: str, version: int) -> StoredResource:
        s = self.read(ctx, res_type, res_id)
        if version != 1:
            raise NotFound(f"{res_type}/{res_id} has only version 1 (synthetic resources are never changed)")
        return s

    def history(self, ctx: RequestContext, res_type: str | None, res_id: str | None,
                params: list[tuple[str, str]]) -> SearchResult:
        if res_type and res_id:
            s = self.read(ctx, res_type, res_id)
            s = StoredResource(s.res_type, s.res_id, 1, s.last_updated, body=s.body, method="POST")
            return SearchResult(matches=[s], total=1, self_params=params)
        return SearchResult(matches=[], total=0, self_params=params, warnings=[
            "type and system history of a synthetic cohort are empty: its resources have one "
            "version each; read them or search"])

    # ------------------------------------------------------------------ writes
    def create(self, ctx, res_type, body, if_none_exist=None) -> WriteResult:
        raise _read_only(self.name)

    def update(self, ctx, res_type, res_id, body, if_match=None) -> WriteResult:
        raise _read_only(self.name)

    def conditional_update(self, ctx, res_type, params, body) -> WriteResult:
        raise _read_only(self.name)

    def patch(self, ctx, res_type, res_id, patch, if_match=None) -> WriteResult:
        raise _read_only(self.name)

    def delete(self, ctx, res_type, res_id) -> WriteResult:
        raise _read_only(self.name)

    def conditional_delete(self, ctx, res_type, params) -> WriteResult:
        raise _read_only(self.name)

    def bundle(self, ctx, bundle) -> dict:
        raise _read_only(self.name)

    def operation(self, ctx, res_type, res_id, name, params) -> dict:
        raise NotImplementedYet(f"${name} is not served by synthetic cohorts; use the real "
                                "source at /fhir for terminology operations")

    # ------------------------------------------------------------------ search
    def _paging(self, params: list[tuple[str, str]], warnings: list[str]) -> tuple[int, int]:
        count, offset = self.default_count, 0
        for k, v in params:
            if k in ("_count", "_offset", "_cursor", "_skip"):
                try:
                    n = int(v)
                except ValueError:
                    raise InvalidRequest(f"{k} must be an integer, got '{v}'") from None
                if n < 0:
                    raise InvalidRequest(f"{k} must not be negative")
                if k == "_count":
                    count = n
                elif k == "_offset":
                    offset = n
        if count > self.max_count:
            warnings.append(f"_count {count} is above the maximum {self.max_count}; capped")
            count = self.max_count
        return count, offset

    @staticmethod
    def _split(params: list[tuple[str, str]]) -> tuple[list[tuple[str, str | None, str]], dict]:
        crit, special = [], {}
        for k, v in params:
            if k in RESULT_PARAMS:
                special.setdefault(k, v)
                continue
            name, _, mod = k.partition(":")
            crit.append((name, mod or None, v))
        return crit, special

    def _unknown(self, ctx: RequestContext, msg: str, warnings: list[str]) -> None:
        if ctx.handling == "strict":
            raise InvalidRequest(msg)
        warnings.append(msg)

    def search(self, ctx: RequestContext, res_type: str | None,
               params: list[tuple[str, str]]) -> SearchResult:
        warnings: list[str] = []
        if res_type is None:
            raise InvalidRequest("search a resource type on a synthetic cohort "
                                 "(system-level search is not supported)")
        if res_type not in SERVED_TYPES:
            from server.fhir.searchparams import RESOURCE_TYPES

            if res_type not in RESOURCE_TYPES:
                raise NotFound(f"Unknown resource type '{res_type}'")
            return SearchResult(matches=[], total=0, self_params=params)
        crit, special = self._split(params)
        count, offset = self._paging(params, warnings)
        if "_sort" in special:
            self._unknown(ctx, "_sort is not supported on synthetic cohorts (index order)", warnings)
        summary = special.get("_summary")
        elements = [e for e in special.get("_elements", "").split(",") if e] or None
        if res_type == "Patient" and all(c[0] in PATIENT_PARAMS for c in crit):
            return self._search_patients(ctx, params, crit, count, offset, warnings, summary,
                                         elements)
        return self._scan(ctx, res_type, params, crit, count, warnings, summary, elements)

    # -- Patient on the index
    def _search_patients(self, ctx, params, crit, count, offset, warnings, summary, elements):
        ix = self.cohort.index
        mask = np.ones(len(ix), dtype=bool)
        for name, mod, value in crit:
            mask &= self._patient_mask(name, mod, value)
        hits = np.flatnonzero(mask)
        total = int(len(hits))
        page = hits[offset:offset + count]
        matches = [] if summary == "count" else [self.cohort.patient_stored(int(i)) for i in page]
        base = [(k, v) for k, v in params if k not in ("_offset",)]
        nxt = base + [("_offset", str(offset + count))] if offset + count < total and count else None
        prev = base + [("_offset", str(max(0, offset - count)))] if offset > 0 and count else None
        return SearchResult(matches=matches, total=total, self_params=params, next_params=nxt,
                            prev_params=prev, warnings=warnings, summary_count=summary == "count",
                            elements=elements, summary=summary if summary != "count" else None)

    def _patient_mask(self, name: str, mod: str | None, value: str) -> np.ndarray:
        ix, c = self.cohort.index, self.cohort
        n = len(ix)
        out = np.zeros(n, dtype=bool)
        if mod == "missing":
            missing = value == "true"
            col = {"gender": "_gender", "birthdate": "_birth"}.get(name)
            if col is None:
                return np.full(n, not missing)
            isna = ix[col].isna().to_numpy()
            return isna if missing else ~isna
        for v in value.split(","):
            if name in ("_id", "identifier"):
                if name == "identifier":
                    sys_, bar, code = v.rpartition("|")
                    if bar and sys_ and sys_ != "urn:synthport:synthetic-patient":
                        continue
                    v = code
                i = c.index_of(v)
                if i is not None and v == c.patient_id(i):
                    out[i] = True
            elif name == "gender":
                out |= (ix["_gender"] == v.rpartition("|")[2]).to_numpy()
            elif name == "deceased":
                dead = ix["deceased"].astype(bool).to_numpy() if "deceased" in ix.columns \
                    else np.zeros(n, bool)
                out |= dead if v == "true" else ~dead
            elif name == "birthdate":
                out |= _date_mask(ix["_birth"].to_numpy(dtype=np.int64), v)
            elif name in ("family", "given", "name"):
                cols = {"family": ["_family"], "given": ["_given"],
                        "name": ["_family", "_given"]}[name]
                for col in cols:
                    out |= _string_mask(ix[col], v, mod)
            else:  # pragma: no cover - guarded by PATIENT_PARAMS
                raise InvalidRequest(f"unsupported parameter {name}")
        return out

    # -- everything else: candidates from the index, then exact evaluation
    def _candidates(self, res_type: str, crit, warnings) -> np.ndarray:
        ix = self.cohort.index
        mask = np.ones(len(ix), dtype=bool)
        for name, mod, value in crit:
            if name in ("patient", "subject") or (res_type == "Patient" and name == "_id"):
                m = np.zeros(len(ix), dtype=bool)
                for v in value.split(","):
                    i = self.cohort.index_of(v.rsplit("/", 1)[-1])
                    if i is not None and (name == "_id" or v.rsplit("/", 1)[-1] == self.cohort.patient_id(i)):
                        m[i] = True
                mask &= m
            elif name == "_id" and res_type != "Patient":
                m = np.zeros(len(ix), dtype=bool)
                for v in value.split(","):
                    i = self.cohort.index_of(v)
                    if i is not None:
                        m[i] = True
                mask &= m
            elif name == "code" and res_type in CODE_PREFIX and mod is None:
                mask &= self._code_mask(res_type, value)
        if res_type == "ImagingStudy":
            from server.synthetic.dicom import imaging_first

            return imaging_first(ix, np.flatnonzero(mask))
        return np.flatnonzero(mask)

    def _code_mask(self, res_type: str, value: str) -> np.ndarray:
        ix = self.cohort.index
        prefix = CODE_PREFIX[res_type]
        m = np.zeros(len(ix), dtype=bool)
        for v in value.split(","):
            code = _SAFE.sub("_", v.rpartition("|")[2])
            cols = [c for c in (f"{prefix}_{code}", f"{prefix}_{code}_n", f"{prefix}_{code}_last")
                    if c in ix.columns]
            if not cols:   # outside the model's vocabulary: patients with "other" codes
                cols = [c for c in (f"{prefix}_other", f"{prefix}_other_n") if c in ix.columns]
            for col in cols:
                s = ix[col]
                m |= (s.notna() & (s.astype(str) != "0")).to_numpy() if s.dtype == object or \
                    isinstance(s.dtype, pd.CategoricalDtype) else (s.fillna(0).to_numpy() > 0)
        return m

    def _scan(self, ctx, res_type, params, crit, count, warnings, summary, elements):
        from server.fhir.searchparams import registry

        known = registry().for_type(res_type)
        checks = []
        for name, mod, value in crit:
            sp = known.get(name)
            if name == "_id":
                checks.append((name, "id", mod, value))
            elif sp is None or sp.type not in ("token", "string", "date", "reference"):
                self._unknown(ctx, f"search parameter '{name}' is not supported on "
                                   f"{res_type} in a synthetic cohort; ignored", warnings)
            elif mod not in (None, "exact", "contains", "missing") or \
                    (mod in ("exact", "contains") and sp.type != "string"):
                self._unknown(ctx, f"modifier :{mod} of '{name}' is not supported on a "
                                   "synthetic cohort; ignored", warnings)
            else:
                checks.append((name, sp.type, mod, value))
        cand = self._candidates(res_type, crit, warnings)
        cursor = skip = 0
        for k, v in params:
            if k == "_cursor":
                cursor = int(v)
            elif k == "_skip":
                skip = int(v)
        matches: list[StoredResource] = []
        pos, taken, scanned = cursor, skip, 0
        want = count if summary != "count" else len(cand) * 1000
        budget = self.scan_budget if summary != "count" else 10 * self.scan_budget
        while pos < len(cand) and len(matches) < want and scanned < budget:
            rec = self.cohort.record(int(cand[pos]))
            scanned += 1
            hits = [r for r in rec.resources if r["resourceType"] == res_type
                    and all(_matches(r, c) for c in checks)]
            hits = hits[taken:]
            room = want - len(matches)
            if len(hits) > room:
                matches += [rec.stored[(r["resourceType"], r["id"])] for r in hits[:room]]
                taken += room
                break
            matches += [rec.stored[(r["resourceType"], r["id"])] for r in hits]
            pos, taken = pos + 1, 0
        done = pos >= len(cand)
        base = [(k, v) for k, v in params if k not in ("_cursor", "_skip")]
        nxt = None if done or count == 0 else base + [("_cursor", str(pos)), ("_skip", str(taken))]
        total = len(matches) if (done and cursor == 0 and skip == 0) else None
        if summary == "count":
            if not done:
                warnings.append(f"the count needs more than {budget} virtual patients to be "
                                "generated; no total given (page through the results instead)")
            return SearchResult(matches=[], total=len(matches) if done else None,
                                self_params=params, warnings=warnings, summary_count=True)
        return SearchResult(matches=matches, total=total, self_params=params, next_params=nxt,
                            warnings=warnings, elements=elements, summary=summary)

    # ------------------------------------------------------------------ $everything
    def everything(self, ctx: RequestContext, patient_id: str,
                   params: list[tuple[str, str]]) -> SearchResult:
        i = self._patient_of(patient_id)
        if patient_id != self.cohort.patient_id(i):
            raise NotFound(f"Patient/{patient_id} is not known in synthetic cohort '{self.name}'")
        rec = self.cohort.record(i)
        types = None
        count, offset = None, 0
        for k, v in params:
            if k == "_type":
                types = {t.strip() for t in v.split(",") if t.strip()}
            elif k in ("_count", "_offset"):
                try:
                    n = int(v)
                except ValueError:
                    raise InvalidRequest(f"{k} must be an integer, got '{v}'") from None
                if k == "_count":
                    count = min(n, self.max_count)
                else:
                    offset = n
        items = [rec.stored[(r["resourceType"], r["id"])] for r in rec.resources
                 if types is None or r["resourceType"] in types]
        total = len(items)
        if count is None:
            page, nxt = items[offset:], None
        else:
            page = items[offset:offset + count]
            base = [(k, v) for k, v in params if k != "_offset"]
            nxt = base + [("_offset", str(offset + count))] if offset + count < total else None
        return SearchResult(matches=page, total=total, self_params=params, next_params=nxt)


# ---------------------------------------------------------------------------- matching

def _string_mask(col: pd.Series, value: str, mod: str | None) -> np.ndarray:
    from server.fhir.extract import normalize_string

    s = col.astype(str)
    if mod == "exact":
        return (s == value).to_numpy()
    v = normalize_string(value)
    low = s.str.lower()
    if mod == "contains":
        return low.str.contains(v, regex=False).to_numpy()
    return low.str.startswith(v).to_numpy()


def _date_mask(days: np.ndarray, value: str) -> np.ndarray:
    """Birth dates (whole days, UTC) against a FHIR date search value (§3.1.1.4.5)."""
    from server.fhir.search import _prefix, date_search_range

    prefix, rest = _prefix(value)
    sl, sh = date_search_range(rest)
    lo = days.astype(np.float64) * 86400.0
    hi = lo + 86400.0 - 1e-6
    return _date_cmp(prefix, lo, hi, sl, sh)


def _date_cmp(p: str, lo, hi, sl: float, sh: float):
    # Same table as server.fhir.search._date_cond (resource range [lo, hi], search [sl, sh)).
    contained = (lo >= sl) & (hi < sh)
    if p == "eq":
        return contained
    if p == "ne":
        return ~contained if isinstance(contained, np.ndarray) else not contained
    if p == "gt":
        return hi >= sh
    if p == "lt":
        return lo < sl
    if p == "ge":
        return (hi >= sh) | contained
    if p == "le":
        return (lo < sl) | contained
    if p == "sa":
        return lo >= sh
    if p == "eb":
        return hi < sl
    return (lo < sh) & (hi >= sl)   # ap: overlap


def _matches(resource: dict, check: tuple[str, str, str | None, str]) -> bool:
    """One search parameter on one generated resource, on its FHIRPath index values."""
    from server.fhir.extract import extract, normalize_string
    from server.fhir.search import _prefix, date_search_range

    name, kind, mod, value = check
    if kind == "id":
        return resource.get("id") in value.split(",")
    rows = resource.get("_idx")
    if rows is None:
        rows = extract(resource)
    mine = [r for r in rows.get(kind, ()) if r[0] == name]
    if mod == "missing":
        return (not mine) == (value == "true")
    for v in value.split(","):
        if kind == "token":
            sys_, bar, code = v.rpartition("|") if "|" in v else (None, "", v)
            for r in mine:
                if (not code or r[2] == code) and (not bar or sys_ == "" and r[1] is None
                                                  or sys_ and r[1] == sys_):
                    return True
        elif kind == "string":
            nv = normalize_string(v)
            for r in mine:
                if mod == "exact" and r[2] == v or mod == "contains" and nv in (r[1] or "") \
                        or mod is None and (r[1] or "").startswith(nv):
                    return True
        elif kind == "date":
            prefix, rest = _prefix(v)
            sl, sh = date_search_range(rest)
            if any(_date_cmp(prefix, r[1], r[2], sl, sh) for r in mine if r[1] is not None):
                return True
        elif kind == "reference":
            t, _, rid = v.rpartition("/")
            t = t.rsplit("/", 1)[-1]
            for r in mine:
                if r[2] == rid and (not t or r[1] == t):
                    return True
    return False


__all__ = ["SyntheticSource", "SERVED_TYPES", "CLINICAL_TYPES"]
