"""A cohort: (model, seed, size) -> a patient-level index built once, and records on demand.

Creating a cohort samples the patient model once for all ``size`` rows (vectorised;
row i depends only on (model, seed, i)) and stores the rows, with the columns search
needs (gender, birth date, names, condition flags, counts, modalities), in
``<data_dir>/cohorts/<name>/index.parquet``. The index is a cache of a pure function:
rebuilding it from the same model and seed gives the same rows.

Virtual patient i's record is ``mappings.reverse.to_fhir_record(row_i,
EventModel.sample(row_i, seed, keys=[i]), "<cohort>-<i>", birth_date=..., anchor=...)``
with, added here: a name and an identifier (counter-based draws from small built-in
name lists), DICOM UIDs that encode the patient index (so a UID finds its patient
without any stored mapping), and ``meta`` (version 1, the cohort's creation instant,
the HTEST security label; for a differentially private patient model, an extension
stating epsilon, delta and what the guarantee covers). Every resource is serialised once with sorted keys, so the
bytes are the same on every request, worker and restart.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from server.errors import InternalError, InvalidRequest, NotFound
from server.source import StoredResource
from server.synthetic.registry import (MAX_COHORT_SIZE, CohortInfo, Registry,
                                       check_cohort_name, now)

log = logging.getLogger("synthport.synthetic")

INDEX_FILE = "index.parquet"
YEAR_DAYS = 365.25
HTEST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "HTEST",
         "display": "test health data"}
IDENTIFIER_SYSTEM = "urn:synthport:synthetic-patient"
#: Meta extension on every resource of a cohort whose patient model is differentially
#: private (docs/synthetic.md, "Differential privacy").
DP_EXTENSION = "urn:synthport:fhir:StructureDefinition:differential-privacy"


def dp_extension(dp: dict) -> dict:
    """The ``meta.extension`` that states a cohort's DP guarantee and what it covers."""
    g = dp.get("patients", {})
    return {"url": DP_EXTENSION, "extension": [
        {"url": "epsilon", "valueDecimal": float(dp["epsilon"])},
        {"url": "delta", "valueDecimal": float(dp["delta"])},
        {"url": "mechanism", "valueString": g.get("mechanism", "DP-SGD")},
        {"url": "neighbouring", "valueString": g.get("neighbouring", "add/remove one patient")},
        {"url": "scope", "valueString": dp.get("scope", "patient table")},
    ]}
# Patient-table columns that mappings.reverse.patient_resource reads.
PATIENT_COLUMNS = ("sex", "age_at_death", "deceased", "marital_status", "country", "language")

# Small built-in name lists (common across Europe; no real person is meant).
FAMILY = ["Garcia", "Martin", "Muller", "Rossi", "Dubois", "Novak", "Jansen", "Silva",
          "Nielsen", "Kowalski", "Horvat", "Popescu", "Schmidt", "Lopez", "Bernard", "Ricci",
          "Andersen", "Virtanen", "Murphy", "Fischer", "Moreau", "Costa", "Peeters", "Weber",
          "Fernandez", "Lambert", "Bianchi", "Berg", "Kovac", "Lindqvist", "Santos", "Meyer"]
GIVEN_F = ["Maria", "Anna", "Sofia", "Elena", "Laura", "Julia", "Emma", "Clara", "Ines",
           "Eva", "Lucia", "Marta", "Sara", "Nora", "Alice", "Ida"]
GIVEN_M = ["Jan", "Luca", "Pierre", "Marco", "David", "Pablo", "Tomas", "Lukas", "Jonas",
           "Mateo", "Hugo", "Erik", "Leon", "Noah", "Piotr", "Oscar"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    # SplitMix64 finaliser (Steele et al. 2014): counter-based, vectorised, no RNG state.
    z = (z ^ (z >> np.uint64(30))) * _C1
    z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def draw(seed: int, rows: np.ndarray, purpose: str) -> np.ndarray:
    """64-bit draws, a pure function of (seed, row, purpose)."""
    k = np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}|{purpose}".encode(),
                                                 digest_size=8).digest(), "little"))
    with np.errstate(over="ignore"):
        return _mix(_mix(np.asarray(rows, dtype=np.uint64) * _GOLDEN + k) ^ k)


# ---------------------------------------------------------------------------- UIDs
# A UID under the UUID-derived root 2.25 (PS3.5 §B.2) whose 128-bit value is
# [64-bit cohort key | 32-bit patient index | 8-bit study | 8-bit series | 16-bit instance],
# so any Study/Series/SOP Instance UID of a cohort names its virtual patient.

def cohort_key(name: str, seed: int, model: str, version: int) -> int:
    h = hashlib.blake2b(f"synthport|{name}|{seed}|{model}|{version}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") | (1 << 63)


def make_uid(key: int, i: int, study: int, series: int = 0, instance: int = 0) -> str:
    if not (0 <= i < 2**32 and 0 < study < 256 and 0 <= series < 256 and 0 <= instance < 65536):
        raise InternalError("DICOM UID out of the cohort's range")
    return f"2.25.{(key << 64) | (i << 32) | (study << 24) | (series << 16) | instance}"


def parse_uid(key: int, uid: str) -> tuple[int, int, int, int] | None:
    """(patient index, study, series, instance) of a cohort UID, or None."""
    if not uid or not uid.startswith("2.25.") or not (uid[5:].isascii() and uid[5:].isdigit()) or len(uid) > 64:
        return None
    n = int(uid[5:])
    if n >> 64 != key:
        return None
    low = n & ((1 << 64) - 1)
    return low >> 32, (low >> 24) & 0xFF, (low >> 16) & 0xFF, low & 0xFFFF


# ---------------------------------------------------------------------------- index build

def _birth_dates(df: pd.DataFrame, seed: int, anchor: dt.date) -> np.ndarray:
    """Birth dates (days since 1970-01-01): the anchor minus the sampled age (the age the
    events were generated for, ``mappings``' "age at the reference date"); where the age
    is missing, a counter-based day in the sampled birth year."""
    n = len(df)
    anchor_days = (anchor - dt.date(1970, 1, 1)).days
    day = (draw(seed, np.arange(n), "birth-day") % np.uint64(365)).astype(np.int64)
    ages = pd.to_numeric(df["age"], errors="coerce").to_numpy(dtype=float) \
        if "age" in df.columns else np.full(n, np.nan)
    years = pd.to_numeric(df["birth_year"], errors="coerce").to_numpy(dtype=float) \
        if "birth_year" in df.columns else np.full(n, np.nan)
    years = np.where(np.isnan(years), anchor.year - 40, years).astype(np.int64)
    jan1 = (years - 1970).astype("datetime64[Y]").astype("datetime64[D]").astype(np.int64)
    from_age = anchor_days - np.round(np.nan_to_num(ages, nan=0.0) * YEAR_DAYS).astype(np.int64)
    out = np.where(np.isnan(ages), jan1 + day, from_age)
    return np.minimum(out, anchor_days - 1)


_WORKER_MODEL: dict[str, object] = {}
PARALLEL_MIN_ROWS = 20_000


def _sample_chunk(args: tuple[str, int, int, int, int]) -> pd.DataFrame:
    """Rows ``start .. start+n-1`` in a worker process (the model loaded once per process)."""
    import torch

    from generators.tabular import load_patient_model

    path, start, n, seed, batch = args
    torch.set_num_threads(1)
    pm = _WORKER_MODEL.get(path)
    if pm is None:
        pm = _WORKER_MODEL[path] = load_patient_model(path)
    return pm.sample(n, seed=seed, start=start, batch_size=batch)


def sample_rows(pm, size: int, seed: int, batch: int = 32768, workers: int = 1,
                model_path: str | Path | None = None) -> pd.DataFrame:
    """``pm.sample(size, seed)``, split over ``workers`` processes for large cohorts.

    Row i depends only on (model, seed, i) (``PatientModel.sample(start=...)``), so the
    chunks concatenate to exactly the rows of one call.
    """
    if workers <= 1 or model_path is None or size < PARALLEL_MIN_ROWS:
        return _plain(pm.sample(size, seed=seed, batch_size=batch))
    import concurrent.futures as cf
    import multiprocessing as mp

    step = -(-size // (workers * 4))
    chunks = [(str(model_path), a, min(step, size - a), seed, batch) for a in range(0, size, step)]
    # spawn, not fork: the caller may be a threaded gunicorn worker holding torch's pools.
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_sample_chunk, chunks))
    return pd.concat([_plain(p) for p in parts])


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Categorical columns as plain values: a sample's categories depend on the values
    drawn, so chunks (and cohorts of other sizes) would otherwise differ in dtype only."""
    cats = [c for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)]
    return df.astype({c: object for c in cats}) if cats else df


def build_index(pm, size: int, seed: int, anchor: dt.date, batch: int = 32768, *,
                workers: int = 1, model_path: str | Path | None = None) -> pd.DataFrame:
    """The cohort's patient rows and the search columns (``_gender``, ``_birth``...)."""
    df = sample_rows(pm, size, seed, batch, workers, model_path)
    idx = np.arange(size)
    sex = df["sex"].astype("object") if "sex" in df.columns else pd.Series([None] * size)
    gender = sex.where(sex.isin(["male", "female", "other", "unknown"]), None)
    fam = draw(seed, idx, "family") % np.uint64(len(FAMILY))
    giv = draw(seed, idx, "given") % np.uint64(len(GIVEN_F))
    female = (gender == "female").to_numpy()
    given = np.where(female, np.array(GIVEN_F, dtype=object)[giv.astype(np.int64)],
                     np.array(GIVEN_M, dtype=object)[giv.astype(np.int64)])
    birth = _birth_dates(df, seed, anchor)
    img_cols = [c for c in df.columns if c.startswith("img_")]
    n_img = df[img_cols].fillna(0).sum(axis=1).to_numpy().astype(np.int32) if img_cols \
        else np.zeros(size, np.int32)
    extra = pd.DataFrame({"_gender": gender.to_numpy(), "_birth": birth.astype(np.int32),
                          "_family": np.array(FAMILY, dtype=object)[fam.astype(np.int64)],
                          "_given": given, "_n_img": n_img})
    out = pd.concat([df.reset_index(drop=True), extra], axis=1)
    return out


def create_cohort(registry: Registry, name: str, model: str, size: int, seed: int,
                  model_version: int | None = None) -> CohortInfo:
    """Register a cohort and build its index (a failed build leaves nothing behind).

    Raises:
        InvalidRequest: bad name, size or seed. NotFound: unknown model.
        Conflict: the name (or its AE title) is taken.
    """
    from generators.tabular import load_patient_model

    check_cohort_name(name)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_COHORT_SIZE:
        raise InvalidRequest(f"size must be an integer from 1 to {MAX_COHORT_SIZE}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise InvalidRequest("seed must be an integer from 0 to 2**63-1")
    m = registry.model(model, model_version)
    tables = json.loads((Path(m.path) / "tables.json").read_text())
    ref = tables["patient_meta"]["table"].get("reference_date") or "2025-01-01"
    info = CohortInfo(name=name, model_name=m.name, model_version=m.version, seed=seed,
                      size=size, created=now(), status="building",
                      settings={"anchor": str(ref)[:10]})
    registry.add_cohort(info)
    folder = registry.cohort_dir(name)
    tmp = folder.with_name(f".tmp-{name}")
    try:
        t0 = time.perf_counter()
        pm = load_patient_model(Path(m.path) / "patients")   # argn or ctgan, by model.json
        index = build_index(pm, size, seed, dt.date.fromisoformat(info.settings["anchor"]),
                            workers=min(8, os.cpu_count() or 1), model_path=Path(m.path) / "patients")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        index.to_parquet(tmp / INDEX_FILE, index=False)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        info.settings["build_seconds"] = round(time.perf_counter() - t0, 3)
        info.status = "ready"
        registry.set_cohort_status(name, "ready", info.settings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        registry.delete_cohort_row(name)
        raise
    return info


# ---------------------------------------------------------------------------- runtime

@dataclass
class Record:
    """A virtual patient's resources, serialised once."""

    patient: int
    resources: list[dict]
    stored: dict[tuple[str, str], StoredResource]


class Cohort:
    """A loaded cohort: index in memory, event/image models loaded once per process."""

    def __init__(self, registry: Registry, info: CohortInfo, cache_size: int = 1000):
        self.info = info
        self.name = info.name
        self.seed = info.seed
        self.size = info.size
        self.model = registry.model(info.model_name, info.model_version)
        self.model_path = Path(self.model.path)
        self.anchor = dt.date.fromisoformat(info.settings.get("anchor", "2025-01-01"))
        self.last_updated = float(info.created)
        self.instant = dt.datetime.fromtimestamp(self.last_updated, dt.timezone.utc) \
            .isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.key = cohort_key(info.name, info.seed, info.model_name, info.model_version)
        dp = (self.model.settings or {}).get("dp")
        self._meta_ext = [dp_extension(dp)] if dp else None
        path = registry.cohort_dir(info.name) / INDEX_FILE
        if not path.exists():
            raise InternalError(f"the index of cohort {info.name} is missing ({path})")
        self.index = pd.read_parquet(path)
        self.model_columns = [c for c in self.index.columns if not c.startswith("_")]
        tables = json.loads((self.model_path / "tables.json").read_text())
        self.displays = tables.get("displays", {})
        self.patient_meta = tables.get("patient_meta", {})
        self._events = None
        self._images = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, Record] = OrderedDict()
        self._patients: OrderedDict[int, StoredResource] = OrderedDict()
        self._pcols: dict[str, list] | None = None
        self.cache_size = max(1, int(cache_size))
        self._id_re = re.compile(rf"^{re.escape(self.name)}-(\d+)(?:-[a-z]+-\d+)?$")

    # -- models
    @property
    def events(self):
        if self._events is None:
            from generators.events import EventModel

            self._events = EventModel.load(self.model_path / "events")
        return self._events

    @property
    def images(self):
        if self._images is None:
            from generators.images import ImageModel

            self._images = ImageModel.load(self.model_path / "images")
        return self._images

    # -- ids
    def patient_id(self, i: int) -> str:
        return f"{self.name}-{i}"

    def index_of(self, res_id: str) -> int | None:
        """The patient index an id encodes, or None (not this cohort's, or out of range)."""
        m = self._id_re.match(res_id or "")
        if not m or (len(m.group(1)) > 1 and m.group(1).startswith("0")):
            return None
        i = int(m.group(1))
        return i if i < self.size else None

    def birth_date(self, i: int) -> dt.date:
        return dt.date(1970, 1, 1) + dt.timedelta(days=int(self._patient_columns()["_birth"][i]))

    # -- resources
    def _meta(self, r: dict) -> dict:
        r["meta"] = {"versionId": "1", "lastUpdated": self.instant, "security": [HTEST]}
        if self._meta_ext:
            r["meta"]["extension"] = self._meta_ext
        return r

    def _row(self, i: int) -> dict:
        row = self.index.iloc[i]
        return {c: row[c] for c in self.model_columns}

    def _patient_columns(self) -> dict[str, list]:
        """The columns a Patient resource is made of, as Python lists (a search page of a
        thousand Patients must not pay a DataFrame row lookup per patient)."""
        cols = self._pcols
        if cols is None:
            names = [c for c in PATIENT_COLUMNS if c in self.index.columns]
            cols = {c: self.index[c].astype("object").where(self.index[c].notna(), None).tolist()
                    for c in names + ["_family", "_given", "_birth"]}
            self._pcols = cols
        return cols

    def patient_resource(self, i: int) -> dict:
        """The Patient alone (what search pages need), equal to the one in the record."""
        from mappings.reverse import patient_resource

        cols = self._patient_columns()
        row = {c: v[i] for c, v in cols.items() if not c.startswith("_")}
        disp = lambda s, c, f: f or self.displays.get(s or "", {}).get(c)  # noqa: E731
        p = patient_resource(row, self.patient_id(i), self.birth_date(i), disp)
        return self._finish_patient(p, i)

    def _finish_patient(self, p: dict, i: int) -> dict:
        cols = self._patient_columns()
        p["identifier"] = [{"system": IDENTIFIER_SYSTEM, "value": self.patient_id(i)}]
        p["name"] = [{"use": "official", "family": str(cols["_family"][i]),
                      "given": [str(cols["_given"][i])]}]
        return self._meta(p)

    def stored(self, r: dict) -> StoredResource:
        return StoredResource(r["resourceType"], r["id"], 1, self.last_updated,
                              body=orjson.dumps(r, option=orjson.OPT_SORT_KEYS))

    def patient_stored(self, i: int) -> StoredResource:
        rec = self._cache.get(i)
        if rec is not None:
            return rec.stored[("Patient", self.patient_id(i))]
        hit = self._patients.get(i)
        if hit is not None:
            return hit
        s = self.stored(self.patient_resource(i))
        with self._lock:
            self._patients[i] = s
            while len(self._patients) > 10 * self.cache_size:
                self._patients.popitem(last=False)
        return s

    def record(self, i: int) -> Record:
        """Every resource of virtual patient i (bounded LRU per process)."""
        with self._lock:
            rec = self._cache.get(i)
            if rec is not None:
                self._cache.move_to_end(i)
                return rec
        rec = self._generate(i)
        with self._lock:
            self._cache[i] = rec
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return rec

    def _generate(self, i: int) -> Record:
        from mappings.reverse import to_fhir_record

        if not 0 <= i < self.size:
            raise NotFound(f"patient index {i} is outside cohort {self.name} (size {self.size})")
        rows = self.index.iloc[i:i + 1][self.model_columns].copy()
        rows.index = pd.Index([self.patient_id(i)], name="patient_id")
        events = self.events.sample(rows, seed=self.seed, keys=[str(i)])
        record = to_fhir_record(self._row(i), events, self.patient_id(i), displays=self.displays,
                                birth_date=self.birth_date(i), anchor=self.anchor)
        record[0] = self.patient_resource(i)   # the same dict as a Patient read gives
        study = 0
        for r in record[1:]:
            if r["resourceType"] == "ImagingStudy" and study < 255:
                study += 1
                self._imaging_uids(r, i, study)
            self._meta(r)
        stored = {}
        for r in record:
            s = self.stored(r)
            stored[(s.res_type, s.res_id)] = s
        return Record(i, record, stored)

    def _imaging_uids(self, r: dict, i: int, study: int) -> None:
        """UIDs that encode (patient, study, series, instance); DICOM answers from them."""
        from generators.images.data import norm_modality
        from generators.images.render import SECONDARY_CAPTURE, SOP_CLASS

        r["identifier"] = [{"system": "urn:dicom:uid",
                            "value": "urn:oid:" + make_uid(self.key, i, study)}]
        for s_n, series in enumerate(r.get("series", [])[:255], start=1):
            series["uid"] = make_uid(self.key, i, study, s_n)
            modality = norm_modality((series.get("modality") or {}).get("code"))
            for k, inst in enumerate(series.get("instance", [])[:65535], start=1):
                inst["uid"] = make_uid(self.key, i, study, s_n, k)
                # the SOP Class of the instance DICOM renders (generators.images.render)
                inst["sopClass"] = {"system": "urn:ietf:rfc:3986",
                                    "code": SOP_CLASS.get(modality, SECONDARY_CAPTURE)}
            series["instance"] = series.get("instance", [])[:65535]
        r["series"] = r.get("series", [])[:255]


_COHORTS: dict[tuple[str, str], tuple[float, Cohort]] = {}
_COHORTS_LOCK = threading.Lock()


def load_cohort(registry: Registry, name: str, cache_size: int = 1000) -> Cohort:
    """The loaded cohort (once per process and creation instant).

    Raises:
        NotFound: no such cohort, or it is not ready.
    """
    info = registry.cohort(name)
    if info.status != "ready":
        raise NotFound(f"synthetic cohort {name!r} is {info.status}, not ready")
    key = (str(registry.engine.url), name)
    with _COHORTS_LOCK:
        hit = _COHORTS.get(key)
        if hit is not None and hit[0] == info.created:
            return hit[1]
    cohort = Cohort(registry, info, cache_size)
    with _COHORTS_LOCK:
        _COHORTS[key] = (info.created, cohort)
    return cohort


__all__ = ["Cohort", "Record", "create_cohort", "load_cohort", "build_index", "make_uid",
           "parse_uid", "cohort_key", "draw"]
