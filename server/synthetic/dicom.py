"""``SyntheticDicomSource``: the DicomSource protocol over a cohort (DICOMweb and DIMSE).

Everything comes from the same generated record as FHIR: each ImagingStudy of virtual
patient i is a study here, with the same Study/Series/SOP Instance UIDs (they encode
(i, study, series, instance), see :mod:`server.synthetic.cohort`), patient id
(``<cohort>-<i>``), name, birth date, sex, study date/time (``started``), modality and
body part (``series.bodySite`` mapped to Body Part Examined). Pixel data come from the
cohort's image model: a radiograph (or any single-image modality) is seeded by its SOP
Instance UID, a CT/MR series by its Series Instance UID (one coherent volume, sliced),
and rendered to a valid PS3.10 file by ``generators.images.render``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pydicom

from server.dicom import attributes as A
from server.dicom import matching
from server.dicom.source import InstanceRef, StoreOutcome
from server.errors import InvalidRequest, MethodNotAllowed, NotFound
from server.source import RequestContext
from server.synthetic.cohort import Cohort, parse_uid

SEX = {"male": "M", "female": "F", "other": "O"}
# Matrix (rows, columns) of rendered images: CT/MR at 256 (the benchmark size),
# projection radiographs at a size a viewer shows well; others the renderer's default.
MATRIX = {"CT": (256, 256), "MR": (256, 256), "CR": (1024, 1024), "DX": (1024, 1024),
          "US": (480, 640), "OP": (768, 1024), "MG": (1024, 832)}
CROSS_SECTIONAL = {"CT", "MR", "PT", "NM"}
# SNOMED CT body sites seen in Synthea-shaped data -> Body Part Examined (PS3.16 Annex L).
BODY_SITE_EXTRA = {"51185008": "CHEST", "261179002": "CHEST", "302509004": "HEART",
                   "12921003": "PELVIS", "8205005": "WRIST", "72696002": "KNEE",
                   "40983000": "ARM", "61685007": "LEG", "85050009": "HUMERUS",
                   "71854001": "FEMUR", "344001": "ANKLE", "16982005": "SHOULDER",
                   "81680005": "NECK", "421060004": "SPINE", "80891009": "HEART",
                   "39607008": "LUNG", "113345001": "ABDOMEN", "81745001": "EYE"}


def body_part_of(code: str | None) -> str:
    """Body Part Examined for a SNOMED CT body site code ("" when not known)."""
    if not code:
        return ""
    from generators.images.render import ANATOMY

    inverse = {v[0]: k for k, v in ANATOMY.items()}
    return inverse.get(code) or BODY_SITE_EXTRA.get(code, "")


def _da(value: str | None) -> str:
    return (value or "")[:10].replace("-", "")


def _tm(value: str | None) -> str:
    if not value or "T" not in value:
        return ""
    return value.split("T", 1)[1][:8].replace(":", "")


class SyntheticDicomSource:
    """DICOM view of one cohort (read-only)."""

    writable = False

    def __init__(self, cohort: Cohort | None = None, *, loader=None, name: str | None = None,
                 scan_budget: int = 200, cache_instances: int = 64):
        self._cohort = cohort
        self._loader = loader
        self.name = name or cohort.name
        self.ae_title = self.name.upper()[:16]
        self.scan_budget = scan_budget
        self._lock = threading.Lock()
        self._bytes: OrderedDict[str, bytes] = OrderedDict()
        self._volumes: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_instances = cache_instances

    @property
    def cohort(self) -> Cohort:
        if self._cohort is None:   # DIMSE: loaded on first use, not at listener start
            self._cohort = self._loader()
        return self._cohort

    # ------------------------------------------------------------------ entities
    def instances(self, i: int) -> list[dict[str, Any]]:
        """Every instance of patient i as one flat attribute dict (patient..instance)."""
        from generators.images.data import norm_modality
        from generators.images.render import SECONDARY_CAPTURE, SOP_CLASS

        c = self.cohort
        rec = c.record(i)
        patient = rec.resources[0]
        name = patient.get("name", [{}])[0]
        pat = {"PatientID": patient["id"],
               "PatientName": f"{name.get('family', '')}^{' '.join(name.get('given', []))}",
               "PatientBirthDate": _da(patient.get("birthDate")),
               "PatientSex": SEX.get(patient.get("gender"), "")}
        out = []
        for r in rec.resources:
            if r["resourceType"] != "ImagingStudy":
                continue
            suid = r["identifier"][0]["value"].removeprefix("urn:oid:")
            series = r.get("series", [])
            proc = (r.get("procedureCode") or [{}])[0]
            study = {**pat, "StudyInstanceUID": suid, "StudyDate": _da(r.get("started")),
                     "StudyTime": _tm(r.get("started")),
                     "StudyID": str(parse_uid(c.key, suid)[1]), "AccessionNumber": "",
                     "ReferringPhysicianName": "",
                     "StudyDescription": (proc.get("text") or "")[:64],
                     "ModalitiesInStudy": sorted({s["modality"]["code"] for s in series}),
                     "NumberOfStudyRelatedSeries": len(series),
                     "NumberOfStudyRelatedInstances": sum(len(s.get("instance", [])) for s in series),
                     "_fhir": f"ImagingStudy/{r['id']}"}
            for s in series:
                modality = norm_modality(s["modality"]["code"])
                ser = {**study, "SeriesInstanceUID": s["uid"], "Modality": modality,
                       "SeriesNumber": int(s.get("number", 1)),
                       "BodyPartExamined": body_part_of((s.get("bodySite") or {}).get("code")),
                       "SeriesDate": study["StudyDate"],
                       "NumberOfSeriesRelatedInstances": len(s.get("instance", []))}
                rows, cols = MATRIX.get(modality) or _default_matrix(modality)
                for inst in s.get("instance", []):
                    out.append({**ser, "SOPInstanceUID": inst["uid"],
                                "SOPClassUID": SOP_CLASS.get(modality, SECONDARY_CAPTURE),
                                "InstanceNumber": int(inst.get("number", 1)),
                                "Rows": rows, "Columns": cols,
                                "BitsAllocated": 8 if modality in ("US", "OP") else 16,
                                "InstanceAvailability": "ONLINE"})
        return out

    def _candidates(self, query: dict[str, str]) -> np.ndarray:
        c = self.cohort
        ix = c.index
        # Every patient is a candidate: the index's imaging counts come from the patient
        # model and need not agree with the studies the event model generates.
        mask = np.ones(len(ix), bool)
        pid = query.get("PatientID")
        if pid and not matching.has_wildcards(pid):
            m = np.zeros(len(ix), bool)
            i = c.index_of(pid)
            if i is not None and pid == c.patient_id(i):
                m[i] = True
            mask &= m
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            v = query.get(key)
            if v and not matching.is_universal(v):
                m = np.zeros(len(ix), bool)
                for uid in matching.split_list(v, commas=True):
                    p = parse_uid(c.key, uid)
                    if p is not None and p[0] < len(ix):
                        m[p[0]] = True
                mask &= m
        keyed = any(query.get(k) and not matching.is_universal(query.get(k)) for k in
                    ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        sex = query.get("PatientSex")
        if sex and not matching.is_universal(sex) and not matching.has_wildcards(sex):
            inv = {v: k for k, v in SEX.items()}
            wanted = {inv.get(s) for s in matching.split_list(sex)}
            mask &= ix["_gender"].isin(wanted).to_numpy()
        return imaging_first(ix, np.flatnonzero(mask)) if not keyed else np.flatnonzero(mask)

    def find(self, ctx: RequestContext, level: str, query: dict[str, str], *,
             includefields: set[str] | None = None, include_all: bool = False,
             fuzzy: bool = False, limit: int | None = None, offset: int = 0) -> list[pydicom.Dataset]:
        if level not in A.LEVEL_ORDER:
            raise InvalidRequest(f"unknown query level {level!r}")
        crits = []
        for key, value in query.items():
            mk = A.MATCH_KEYS.get(key)
            if mk is None:
                continue
            crit = matching.parse(mk.kind, key, value, fuzzy)
            if crit is not None:
                crits.append((key, mk.kind, crit))
        depth = A.LEVEL_ORDER.index(level)
        unique = A.LEVEL_UNIQUE_KEY[level]
        results: list[pydicom.Dataset] = []
        want = None if limit is None else offset + limit
        seen = 0
        for n, i in enumerate(self._candidates(query)):
            if n >= self.scan_budget:
                break
            groups: OrderedDict[str, list[dict]] = OrderedDict()
            for inst in self.instances(int(i)):
                groups.setdefault(inst[unique], []).append(inst)
            for key, members in groups.items():
                if not any(all(matching.matches(kind, crit, m.get(k)) for k, kind, crit in crits)
                           for m in members):
                    continue
                seen += 1
                if seen <= offset:
                    continue
                results.append(self._dataset(level, depth, members, query, includefields,
                                             include_all))
                if want is not None and seen >= want:
                    return results
        return results

    def _dataset(self, level, depth, members, query, includefields, include_all) -> pydicom.Dataset:
        first = members[0]
        attrs = {k: v for k, v in first.items() if not k.startswith("_")}
        if level == "PATIENT":
            attrs["NumberOfPatientRelatedStudies"] = len({m["StudyInstanceUID"] for m in members})
            attrs["NumberOfPatientRelatedSeries"] = len({m["SeriesInstanceUID"] for m in members})
            attrs["NumberOfPatientRelatedInstances"] = len(members)
        allowed_levels = set(A.LEVEL_ORDER[:depth + 1])
        keys = list(A.DEFAULTS[level])
        for lv in A.LEVEL_ORDER[:depth + 1]:
            keys.append(A.LEVEL_UNIQUE_KEY[lv])
        keys += [k for k in query if k in A.MATCH_KEYS]
        keys += sorted(includefields or ())
        if include_all:
            keys += [k for k in attrs if (A.level_of(k) or level) in allowed_levels]
        ds = pydicom.Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        for k in dict.fromkeys(keys):
            kw = A.canonical_name(k) if not k.isalpha() else k
            if "." in kw or kw == "SpecificCharacterSet":
                continue
            if pydicom.datadict.tag_for_keyword(kw) is None:
                continue
            lv = A.level_of(kw)
            if lv is not None and lv not in allowed_levels and kw not in attrs:
                continue
            v = attrs.get(kw)
            if v is None or v == "":
                if kw in A.OMIT_WHEN_EMPTY:
                    continue
                v = ""
            try:
                setattr(ds, kw, v)
            except (TypeError, ValueError):
                continue
        return ds

    # ------------------------------------------------------------------ retrieve
    def instance_refs(self, ctx: RequestContext, study_uid: str | None = None,
                      series_uid: str | None = None, sop_uid: str | None = None, *,
                      patient_id: str | None = None) -> list[InstanceRef]:
        given = {k: v for k, v in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                                   ("SOPInstanceUID", sop_uid), ("PatientID", patient_id)) if v}
        if not given:
            return []
        out = []
        for i in self._candidates(given):
            for m in self.instances(int(i)):
                if all(m.get(k) == v for k, v in given.items()):
                    out.append(InstanceRef(m["PatientID"], m["StudyInstanceUID"],
                                           m["SeriesInstanceUID"], m["SOPInstanceUID"],
                                           m["SOPClassUID"], "1.2.840.10008.1.2.1",
                                           m["InstanceNumber"], 0))
        if not out:
            raise NotFound("no synthetic instance under " +
                           ", ".join(f"{k} {v}" for k, v in given.items()))
        return out

    def open_instance(self, ctx: RequestContext, ref: InstanceRef) -> bytes:
        with self._lock:
            hit = self._bytes.get(ref.sop_uid)
            if hit is not None:
                self._bytes.move_to_end(ref.sop_uid)
                return hit
        p = parse_uid(self.cohort.key, ref.sop_uid)
        if p is None:
            raise NotFound(f"instance {ref.sop_uid} is not in cohort {self.name}")
        inst = next((m for m in self.instances(p[0]) if m["SOPInstanceUID"] == ref.sop_uid), None)
        if inst is None:
            raise NotFound(f"instance {ref.sop_uid} is not in cohort {self.name}")
        data = self.render(inst)
        with self._lock:
            self._bytes[ref.sop_uid] = data
            while len(self._bytes) > self._cache_instances:
                self._bytes.popitem(last=False)
        return data

    def render(self, inst: dict[str, Any]) -> bytes:
        """The PS3.10 bytes of one instance (deterministic: no clock, seeded by UIDs)."""
        from generators.images import instance_bytes, render_instance, seed_from_uid

        modality, body = inst["Modality"], inst["BodyPartExamined"]
        n = inst["NumberOfSeriesRelatedInstances"]
        if modality in CROSS_SECTIONAL and n > 1:
            vol = self._volume(inst["SeriesInstanceUID"], modality, body, n)
            array = vol[min(inst["InstanceNumber"], n) - 1]
        else:
            array = self.cohort.images.sample(modality, body, seed=seed_from_uid(inst["SOPInstanceUID"]))[0]
        attrs = {k: inst[k] for k in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                                      "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                      "StudyDate", "StudyTime", "Modality", "BodyPartExamined",
                                      "SeriesNumber", "InstanceNumber", "AccessionNumber",
                                      "StudyDescription", "StudyID")}
        ds = render_instance(array, attrs, (inst["Rows"], inst["Columns"]))
        return instance_bytes(ds)

    def _volume(self, series_uid: str, modality: str, body: str, n: int) -> np.ndarray:
        from generators.images import seed_from_uid

        with self._lock:
            vol = self._volumes.get(series_uid)
        if vol is None:
            vol = self.cohort.images.sample_series(modality, body, seed=seed_from_uid(series_uid),
                                                   n_slices=n)
            with self._lock:
                self._volumes[series_uid] = vol
                while len(self._volumes) > 4:
                    self._volumes.popitem(last=False)
        return vol

    def store_instance(self, ctx: RequestContext, data: bytes, **_: Any) -> StoreOutcome:
        raise MethodNotAllowed(f"Synthetic cohort '{self.name}' is read-only: instances cannot "
                               "be stored into it")


def imaging_first(ix, candidates: np.ndarray) -> np.ndarray:
    """Candidates whose index row predicts imaging studies first, then the others, each in
    index order: a scan finds studies early. The index counts only order the scan; what is
    returned is decided on the generated records (FHIR ImagingStudy search scans in the
    same order, so both list the same studies)."""
    if "_n_img" not in ix.columns or not len(candidates):
        return candidates
    none = ix["_n_img"].to_numpy()[candidates] <= 0
    return candidates[np.argsort(none, kind="stable")]


def _default_matrix(modality: str) -> tuple[int, int]:
    from generators.images.render import DEFAULT_MATRIX

    return tuple(DEFAULT_MATRIX.get(modality, (512, 512)))


def dimse_sources(config, sql, real) -> dict[str, Any]:
    """AE title -> DicomSource for the DIMSE listener: the real store under ``ae_title``,
    and every ready cohort under its name upper-cased (loaded on first use). Cohorts
    created later are served after the listener restarts."""
    from server.synthetic.cohort import load_cohort
    from server.synthetic.registry import Registry

    sources: dict[str, Any] = {str(config.get("ae_title") or "SYNTHPORT").strip(): real}
    try:
        reg = Registry(sql.engine, config.get("data_dir") or ".")
        cohorts = [c for c in reg.cohorts() if c.status == "ready"]
    except Exception:  # noqa: BLE001 - no registry tables yet: the real source only
        return sources
    cache = int(config.get("synthetic_cache_patients") or 1000)
    for info in cohorts:
        if info.ae_title in sources:
            continue
        sources[info.ae_title] = SyntheticDicomSource(
            loader=lambda n=info.name: load_cohort(reg, n, cache), name=info.name,
            scan_budget=int(config.get("synthetic_scan_budget") or 200))
    return sources


def refresh_dimse_sources(server, config, sql) -> int:
    """Add the cohorts created since the listener started to its AE title table.

    The handlers share one ``DimseState`` (``server.dimse.handlers``), reached through
    pynetdicom's public ``AssociationServer.get_handlers``; a new AE title is one more
    dict entry, so running associations are not disturbed. Returns how many were added.
    """
    from pynetdicom import evt

    from server.dimse.handlers import DimseState

    handlers = server.get_handlers(evt.EVT_REQUESTED)
    handlers = handlers if isinstance(handlers, list) else [handlers]
    state = next((a for _, args in handlers for a in (args or []) if isinstance(a, DimseState)), None)
    if state is None:
        return 0
    added = 0
    for ae, src in dimse_sources(config, sql, None).items():
        if src is not None and ae not in state.sources:
            state.sources[ae] = src
            added += 1
    return added


__all__ = ["SyntheticDicomSource", "dimse_sources", "refresh_dimse_sources", "body_part_of"]
