"""``synthport train``: map the real store to tables, fit the models, register them.

Steps: records of the real store are read through the source protocol
(:func:`server.mapping_export.iter_source_records`) and mapped with ``mappings.map_records``; the patient model
(``generators.tabular.PatientModel``; with ``--backend ctgan`` the optional
``generators.tabular.ctgan_backend.CtganPatientModel``, BUSL-1.1), the event model (``generators.events.EventModel``)
and the image model (``generators.images.ImageModel``: on the stored DICOM pixel data,
else on the sample files shipped with pydicom, see docs/synthetic.md) are fitted and
saved into a temporary folder that is renamed to ``models/<name>/v<version>`` at the
end; only then is the registry row written. An interrupted run leaves a ``.tmp-*``
folder that the next run removes, never a half-written version.

Hold-out: before fitting, a seeded fraction of the mapped patients (``holdout``, default
0.2) is set aside and never shown to any model (:func:`split_holdout`); its keys are
written to ``holdout.json`` in the model folder and ``synthport evaluate`` uses them as the
"real, never seen" reference (DCR, attack control set, TSTR test set).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from generators.tabular import CTGAN_LICENCE  # printed and stored with every CTGAN model
from server.errors import InvalidRequest, Unprocessable
from server.source import RequestContext
from server.synthetic.registry import MODEL_NAME, ModelInfo, Registry, now

log = logging.getLogger("synthport.train")

DEFAULT_LICENCE = ("synthport's own models (Apache-2.0-compatible dependencies only: torch, "
                   "numpy, pandas, pydicom)")

#: Why ``--dp-epsilon`` alone is refused (docs/synthetic.md, "Differential privacy").
NON_DP_REFUSAL = (
    "--dp-epsilon makes the patient model differentially private, but the event model (and "
    "the image model when it learns from stored DICOM) would still be fitted on the same "
    "patients WITHOUT differential privacy, so the cohort as a whole would not be DP. Pass "
    "--allow-non-dp-events to train them anyway: the model's registry row and every served "
    "resource then state that the guarantee covers the patient table only.")
NON_DP_SCOPE = ("patient-level attributes (the patient table: demographics, condition flags "
                "and onset ages, counts); NOT covered: the event model (encounters, "
                "observations, medications, procedures and their dates and values) and the "
                "image model, which were trained on the same patients without DP")

#: Columns that identify a real patient and are never modelled: the birth date of a
#: virtual patient is derived from (cohort seed, index) and the sampled birth year.
IDENTIFYING = ("birth_date",)


@dataclass
class TrainSettings:
    """What ``synthport train`` was asked to do (stored with the model)."""

    device: str = "cpu"
    epochs: int = 200
    event_epochs: int = 20
    image_epochs: int = 60
    limit: int | None = None
    backend: str = "argn"
    hidden: int = 256
    event_hidden: int = 192
    image_size: int = 64
    min_count: int | None = None
    holdout: float = 0.2
    holdout_seed: int = 0
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_clip: float = 1.0
    allow_non_dp: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d.pop("progress")
        return d


def _source_records(store, ctx: RequestContext, limit: int | None):
    from server.mapping_export import iter_source_records

    return iter_source_records(store, ctx, limit=limit)


def map_store(store, settings: TrainSettings, ctx: RequestContext | None = None,
              identifiers: dict[str, set[str]] | None = None):
    """The real store's records as ``mappings.MappedTables``.

    Args:
        identifiers: when given, filled with Patient id -> its identifier values (how
            the DICOM store links a Patient ID to a FHIR Patient).
    """
    from mappings.tables import map_records

    ctx = ctx or RequestContext(caller="synthport-train")
    recs = list(_source_records(store, ctx, settings.limit))
    if identifiers is not None:
        for rec in recs:
            for r in rec:
                if r.get("resourceType") == "Patient" and r.get("id"):
                    identifiers.setdefault(str(r["id"]), set()).update(
                        str(i["value"]) for i in r.get("identifier") or () if i.get("value"))
    if len(recs) < 2:
        raise Unprocessable(f"the store holds {len(recs)} patient(s); training needs at least 2 "
                            "(load data first: synthport load PATH, or run synthport demo)")
    vocab = {"min_count": settings.min_count} if settings.min_count is not None else {}
    return map_records(recs, **vocab)


def training_images(dicom, ctx: RequestContext, size: int, limit: int = 2000, *,
                    exclude: set[str] | frozenset = frozenset(),
                    only: set[str] | None = None, fallback: bool = True):
    """Pixel data for the image model: the stored DICOM instances, else the sample files
    shipped with pydicom (and pydicom-data / deid-data when installed).

    Args:
        exclude: DICOM Patient IDs whose instances are left out (the hold-out patients).
        only: when given, only instances of these Patient IDs are read.
        fallback: use the pydicom samples when the store has no usable image.

    Returns:
        (CollectedImages, origin) with origin ``"store"`` or ``"pydicom-samples"``.
    """
    import io

    import pydicom

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)   # undecodable samples are skipped

    from generators.images import collect_images, sample_dicom_paths

    refs = []
    if dicom is not None:
        try:
            refs = dicom.instance_refs(ctx)
        except Exception:  # noqa: BLE001 - no DICOM tables / nothing stored
            refs = []
    refs = [r for r in refs if r.patient_id not in exclude
            and (only is None or r.patient_id in only)][:limit]

    def stored():
        for ref in refs:
            try:
                yield pydicom.dcmread(io.BytesIO(dicom.open_instance(ctx, ref)))
            except Exception:  # noqa: BLE001 - counted as unreadable by collect_images
                continue

    if refs:
        got = collect_images(stored(), size=size)
        if got.images or not fallback:
            return got, "store"
    if not fallback:
        return collect_images([], size=size), "store"
    return collect_images(sample_dicom_paths(), size=size), "pydicom-samples"


HOLDOUT_FILE = "holdout.json"


def split_holdout(keys, fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split of patient keys into (train, hold-out).

    Every key gets the score BLAKE2b-64(``f"{seed}|{key}"``) (big-endian integer); the
    ``round(fraction * n)`` keys with the lowest (score, key) are held out, at most
    ``n - 2`` so that training keeps two patients. The split depends only on the set of
    keys, the fraction and the seed (not on their order), and a patient's score does not
    depend on the others, so adding patients moves few of them.

    Returns:
        (train keys, hold-out keys), each sorted.

    Raises:
        InvalidRequest: fraction outside [0, 1).
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise InvalidRequest(f"holdout must be a fraction in [0, 1), not {fraction!r}")
    keys = sorted({str(k) for k in keys})
    n_hold = min(int(round(float(fraction) * len(keys))), max(len(keys) - 2, 0))

    def score(k: str) -> tuple[int, str]:
        h = hashlib.blake2b(f"{int(seed)}|{k}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big"), k

    held = set(sorted(keys, key=score)[:n_hold])
    return [k for k in keys if k not in held], sorted(held)


def subset_tables(tables, keys):
    """``tables`` restricted to the patients ``keys`` (patient and event rows)."""
    import dataclasses

    keys = {str(k) for k in keys}
    patients = tables.patients.loc[tables.patients.index.astype(str).isin(keys)]
    events = tables.events.loc[tables.events["patient_id"].astype(str).isin(keys)]
    return dataclasses.replace(tables, patients=patients, events=events.reset_index(drop=True))


def _fingerprint(tables) -> str:
    h = hashlib.sha256()
    h.update(tables.patients.to_csv(index=True).encode())
    h.update(tables.events.to_csv(index=False).encode())
    return h.hexdigest()


def fit_models(tables, folder: Path, settings: TrainSettings, *, dicom=None,
               timings: dict | None = None, echo: Callable[[str], None] = print,
               exclude_images: set[str] | frozenset = frozenset()) -> Path:
    """Fit the three models on mapped tables and save them under ``folder``
    (``patients/``, ``events/``, ``images/``, ``tables.json``).

    ``tables`` are the training patients only (the hold-out is split off before);
    ``exclude_images`` are the DICOM Patient IDs of held-out patients."""
    import json

    from generators.events import EventModel
    from generators.images import ImageModel
    from generators.tabular import PatientModel

    timings = {} if timings is None else timings
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    patients = tables.patients.drop(columns=[c for c in IDENTIFYING if c in tables.patients.columns])
    pmeta = {k: v for k, v in tables.patient_meta["columns"].items() if k in patients.columns}
    t = time.perf_counter()
    dp = None
    if settings.dp_epsilon is not None:
        dp = {"epsilon": settings.dp_epsilon, "clip": settings.dp_clip}
        if settings.dp_delta is not None:
            dp["delta"] = settings.dp_delta
    if settings.backend == "ctgan":
        from generators.tabular.ctgan_backend import CtganPatientModel

        if dp:
            raise InvalidRequest("--dp-epsilon needs the default patient backend (argn)")
        pm = CtganPatientModel(generator_dim=[settings.hidden] * 2,
                               discriminator_dim=[settings.hidden] * 2).fit(
            patients, pmeta, epochs=settings.epochs, device=settings.device,
            progress=settings.progress)
    else:
        pm = PatientModel(hidden=settings.hidden, dp=dp).fit(
            patients, pmeta, epochs=settings.epochs, device=settings.device,
            progress=settings.progress)
    pm.save(folder / "patients")
    timings["patients_seconds"] = round(time.perf_counter() - t, 3)
    echo(f"patient model ({settings.backend}): {len(pm.columns)} columns, "
         f"{timings['patients_seconds']:.1f} s")
    if dp:
        g = pm.training["dp"]
        echo(f"patient model is ({g['epsilon']:.3g}, {g['delta']:.3g})-DP: noise multiplier "
             f"{g['noise_multiplier']:.3g}, clip {g['clip_norm']}, {g['steps']} steps")

    t = time.perf_counter()
    em = EventModel(hidden=settings.event_hidden, d_in=max(16, settings.event_hidden // 2)).fit(
        patients, tables.events, epochs=settings.event_epochs, device=settings.device,
        progress=settings.progress)
    em.save(folder / "events")
    timings["events_seconds"] = round(time.perf_counter() - t, 3)
    echo(f"event model: {timings['events_seconds']:.1f} s")

    t = time.perf_counter()
    im = ImageModel(size=settings.image_size)
    origin = "none (procedural fallback)"
    n_images = 0
    if settings.image_epochs > 0:
        images, origin = training_images(dicom, RequestContext(caller="synthport-train"),
                                         settings.image_size, exclude=exclude_images)
        n_images = len(images.images)
        if images.images:
            im.fit(images.images, epochs=settings.image_epochs, device=settings.device,
                   progress=settings.progress)
    im.save(folder / "images")
    timings["images_seconds"] = round(time.perf_counter() - t, 3)
    echo(f"image model: {n_images} images ({origin}), {len(im.classes)} classes, "
         f"{timings['images_seconds']:.1f} s")
    displays = tables.event_meta["table"].get("displays", {})
    (folder / "tables.json").write_text(json.dumps({
        "patient_meta": tables.patient_meta, "event_meta": tables.event_meta,
        "displays": displays, "image_origin": origin}, default=str, sort_keys=True))
    return folder


def train(registry: Registry, store, dicom, name: str, settings: TrainSettings,
          echo: Callable[[str], None] = print) -> ModelInfo:
    """Fit and register a new version of model ``name``.

    Raises:
        InvalidRequest: bad name or settings.
        Unprocessable: too little data.
    """
    import json

    if not MODEL_NAME.match(name):
        raise InvalidRequest(f"model name {name!r} must match {MODEL_NAME.pattern}")
    if settings.backend not in ("argn", "ctgan"):
        raise InvalidRequest(f"unknown backend {settings.backend!r} (argn or ctgan)")
    licence = DEFAULT_LICENCE
    if settings.backend == "ctgan":
        echo("WARNING: " + CTGAN_LICENCE)
        licence = CTGAN_LICENCE
        try:
            import ctgan  # noqa: F401
        except ImportError:
            raise InvalidRequest("the ctgan backend needs the optional extra: "
                                 "pip install 'synthport[ctgan]'") from None
        if settings.dp_epsilon is not None:
            raise InvalidRequest("--dp-epsilon needs the default patient backend (argn): "
                                 "the ctgan backend has no differentially private training")
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InvalidRequest("--device cuda asked for but torch sees no CUDA device")
    if not 0.0 <= float(settings.holdout) < 1.0:
        raise InvalidRequest(f"holdout must be a fraction in [0, 1), not {settings.holdout!r}")
    if settings.dp_epsilon is not None:
        if not settings.dp_epsilon > 0:
            raise InvalidRequest("--dp-epsilon must be positive")
        if not settings.allow_non_dp:
            raise InvalidRequest(NON_DP_REFUSAL)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ctx = RequestContext(caller="synthport-train")
    identifiers: dict[str, set[str]] = {}
    tables = map_store(store, settings, ctx, identifiers)
    timings["map_seconds"] = round(time.perf_counter() - t0, 3)
    keys = tables.patients.index.astype(str)
    train_keys, held = split_holdout(keys, settings.holdout, settings.holdout_seed)
    echo(f"mapped {len(tables.patients)} patients, {len(tables.events)} events "
         f"in {timings['map_seconds']:.1f} s; {len(held)} patients held out "
         f"(fraction {settings.holdout}, seed {settings.holdout_seed})")
    train_tables = subset_tables(tables, train_keys) if held else tables
    exclude_images = {v for k in held for v in identifiers.get(k, ())}
    holdout = {"fraction": float(settings.holdout), "seed": int(settings.holdout_seed),
               "method": "lowest BLAKE2b-64(f'{seed}|{patient key}'), see split_holdout",
               "n_train": len(train_keys), "n_holdout": len(held),
               "holdout_sha256": hashlib.sha256("\n".join(held).encode()).hexdigest()}
    version = registry.next_version(name)
    final = registry.model_dir(name, version)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-v{version}-{os.getpid()}"
    try:
        fit_models(train_tables, tmp, settings, dicom=dicom, timings=timings, echo=echo,
                   exclude_images=exclude_images)
        # The keys themselves stay in the model folder (server-side), not in the registry
        # row that the admin API serves: they are the real store's Patient ids.
        (tmp / HOLDOUT_FILE).write_text(json.dumps(
            {**holdout, "train": train_keys, "holdout": held,
             "holdout_dicom_patient_ids": sorted(exclude_images)}, indent=0))
        timings["total_seconds"] = round(time.perf_counter() - t0, 3)
        os.rename(tmp, final)   # atomic on one file system: the version appears complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    origin = json.loads((final / "tables.json").read_text()).get("image_origin")
    pjson = json.loads((final / "patients" / "model.json").read_text())
    patient_model = {"backend": settings.backend, "format": pjson.get("format")}
    if settings.backend == "ctgan":
        patient_model["packages"] = pjson.get("training", {}).get("packages", {})
        patient_model["licence"] = "BUSL-1.1 (ctgan); see the licence field"
    dp_info = None
    if settings.dp_epsilon is not None:
        g = pjson["training"]["dp"]
        dp_info = {"patients": g, "epsilon": g["epsilon"], "delta": g["delta"],
                   "scope": NON_DP_SCOPE,
                   "events": "not differentially private",
                   "images": ("not differentially private" if origin == "store" else
                              f"not trained on patient data ({origin})")}
    info = ModelInfo(name=name, version=version, kinds=["patients", "events", "images"],
                     path=str(final), fingerprint=_fingerprint(tables),
                     settings={**settings.to_json(), "image_origin": origin,
                               "n_patients": int(len(tables.patients)),
                               "n_events": int(len(tables.events)),
                               "n_train_events": int(len(train_tables.events)),
                               "holdout": holdout, "dp": dp_info,
                               "patient_model": patient_model},
                     timings=timings, evaluation=None, licence=licence, created=now())
    registry.register_model(info)
    echo(f"registered model {name} v{version} ({timings['total_seconds']:.1f} s) at {final}")
    return info


def read_holdout(model_path: str | Path) -> dict | None:
    """The model folder's ``holdout.json`` (None for models trained before hold-outs)."""
    import json

    p = Path(model_path) / HOLDOUT_FILE
    return json.loads(p.read_text()) if p.is_file() else None


__all__ = ["train", "TrainSettings", "CTGAN_LICENCE", "NON_DP_REFUSAL", "NON_DP_SCOPE", "map_store", "fit_models",
           "training_images", "split_holdout", "subset_tables", "read_holdout", "HOLDOUT_FILE"]
