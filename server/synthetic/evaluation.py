"""``synthport evaluate``: score a registered model against the real store, store the report.

Steps (docs/synthetic.md, "Evaluation"):

1. The real store is mapped exactly as ``synthport train`` mapped it
   (:func:`server.synthetic.training.map_store`, the training run's ``limit`` and
   ``min_count``) and split with the model's ``holdout.json`` into the training patients
   and the held-out ones (never seen by the model). Patients added to the store since
   training are left out; ``store_unchanged`` says whether the mapped tables still have
   the training fingerprint.
2. N synthetic patient rows are sampled (seed ``seed``; default N = the number of
   training patients) and events are generated for the first ``event_patients`` of them.
3. The report: the patient table's fidelity, privacy and utility
   (:func:`generators.evaluation.report.table_section`), the event sequences and code
   prevalence (:func:`generators.evaluation.report.event_section`), the image model
   against real images of the same classes, and the same table section for each baseline
   (:mod:`generators.baselines`) fitted on the same training rows.
4. The report is stored in the registry row (``evaluation``) and written as
   ``report.json`` and ``report.html`` to the model folder's ``evaluation/`` (and to
   ``out_dir`` when given).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from server.errors import InvalidRequest, NotFound
from server.source import RequestContext
from server.synthetic.registry import Registry, now

log = logging.getLogger("synthport.evaluate")

DEFAULT_BASELINES = ("gaussian_copula", "sdv_gaussian_copula", "ctgan", "tabularargn")
REPORT_FORMAT = "synthport-evaluation/1"


@dataclass
class EvaluateSettings:
    """What ``synthport evaluate`` was asked to do (stored in the report)."""

    n: int | None = None
    seed: int = 0
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    baseline_epochs: int | None = None
    event_patients: int = 200
    target: str | None = None
    images: bool = True
    images_per_class: int = 16
    risks: bool = True
    privacy_folds: int = 0      # >= 2: also cross-fitted risks (generators/evaluation/crossfit.py)
    privacy_repeats: int = 1    # passes of the cross-fit, each with its own split


def _patient_table(tables):
    from server.synthetic.training import IDENTIFYING

    df = tables.patients.drop(columns=[c for c in IDENTIFYING if c in tables.patients.columns])
    meta = {k: v for k, v in tables.patient_meta["columns"].items() if k in df.columns}
    return df, meta


def real_tables(store, info, identifiers: dict[str, set[str]] | None = None):
    """The real patient and event tables, mapped as model ``info`` was trained (its
    ``limit`` and ``min_count``); ``identifiers`` collects each patient's identifiers
    (``map_store``)."""
    from server.synthetic.training import TrainSettings, map_store

    ts = TrainSettings(limit=info.settings.get("limit"), min_count=info.settings.get("min_count"))
    return map_store(store, ts, RequestContext(caller="synthport-evaluate"),
                     {} if identifiers is None else identifiers)


def split_keys(tables, hold: dict | None) -> tuple[list[str], list[str], list[str]]:
    """(training keys, hold-out keys, notes): the model's split (``read_holdout``) over
    the patients in ``tables`` now; patients added or removed since are noted."""
    keys = set(tables.patients.index.astype(str))
    notes: list[str] = []
    if hold is None:
        notes.append("the model was trained before hold-outs existed: no real patient is "
                     "unseen, so DCR, attack risks and TSTR are skipped")
        return sorted(keys), [], notes
    train_keys = sorted(keys & set(hold["train"]))
    hold_keys = sorted(keys & set(hold["holdout"]))
    new = len(keys) - len(train_keys) - len(hold_keys)
    if new:
        notes.append(f"{new} patients were added to the store after training: left out")
    missing = len(hold["train"]) + len(hold["holdout"]) - len(train_keys) - len(hold_keys)
    if missing:
        notes.append(f"{missing} training or held-out patients are no longer in the store")
    return train_keys, hold_keys, notes


def _refit_sampler(model, train_settings: dict, meta: dict) -> Callable:
    """``fit_sample(train, n, seed)``: a new patient model of the stored one's class and
    hyper-parameters (``model.hyper``: backend, dropout, DP …), fitted on ``train`` with
    the stored training settings and sampled (for cross-fitted risks)."""
    def fit_sample(train, n: int, seed: int):
        import torch

        torch.manual_seed(seed)
        fresh = type(model)(**model.hyper)
        fresh.fit(train, meta, epochs=int(train_settings.get("epochs", 200)),
                  device=train_settings.get("device") or "cpu", progress=False)
        return fresh.sample(n, seed=seed)

    return fit_sample


def _crossfit_section(model, train_df, hold_df, meta, train_settings: dict,
                      settings: EvaluateSettings, echo) -> dict:
    import pandas as pd

    from generators.evaluation.crossfit import crossfit_risks

    return crossfit_risks(pd.concat([train_df, hold_df]),
                          _refit_sampler(model, train_settings, meta),
                          meta, folds=settings.privacy_folds, repeats=settings.privacy_repeats,
                          seed=settings.seed, progress=echo)


def _image_section(model_path: Path, dicom, holdout_ids: set[str], origin: str | None,
                   settings: EvaluateSettings) -> dict:
    from generators.images import ImageModel, collect_images, sample_dicom_paths
    from generators.images.quality import image_report
    from server.synthetic.training import training_images

    im = ImageModel.load(model_path / "images")
    if not im.classes:
        return {"status": "skipped", "reason": "the model has no trained image classes "
                                               "(procedural fallback images only)"}
    ctx = RequestContext(caller="synthport-evaluate")
    real, against = None, None
    if holdout_ids and dicom is not None:
        got, _ = training_images(dicom, ctx, im.size, only=holdout_ids, fallback=False)
        if got.images:
            real, against = got.images, "held-out patients' stored images"
    if real is None and origin == "store" and dicom is not None:
        got, _ = training_images(dicom, ctx, im.size, exclude=holdout_ids, fallback=False)
        real, against = got.images, "the training images (no held-out patient has images)"
    if real is None:
        real = collect_images(sample_dicom_paths(), size=im.size).images
        against = "the training images (pydicom's sample files)"
    t = time.perf_counter()
    rep = image_report(im, real, n_per_class=settings.images_per_class, seed=settings.seed)
    rep.update({"status": "ok", "against": against, "n_real": len(real),
                "seconds": round(time.perf_counter() - t, 3)})
    return rep


def _baseline_section(name: str, train, holdout, meta, n: int, settings: EvaluateSettings,
                      target: str | None, echo) -> dict:
    from generators.baselines import BASELINES, BaselineUnavailable, make_baseline
    from generators.evaluation.report import table_section

    desc = BASELINES.get(name, ("unknown", None))[0]
    try:
        t = time.perf_counter()
        gen = make_baseline(name, epochs=settings.baseline_epochs, seed=settings.seed)
        gen.fit(train, meta)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        syn = gen.sample(n, seed=settings.seed)
        sample_s = time.perf_counter() - t
    except BaselineUnavailable:
        echo(f"baseline {name}: skipped (package not installed)")
        return {"status": "skipped: package not installed", "description": desc,
                "package": BASELINES[name][1]}
    except KeyError as exc:
        return {"status": "failed", "description": desc, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a third-party baseline failing is reported, not fatal
        log.exception("baseline %s failed", name)
        return {"status": "failed", "description": desc, "reason": f"{type(exc).__name__}: {exc}"}
    sec = table_section(train, holdout, syn, meta, target=target, seed=settings.seed,
                        risks=settings.risks, run_anonymeter=False, reference_quality=False)
    sec["fidelity"].pop("column_shapes_details", None)
    sec["fidelity"]["worst_pairs"] = sec["fidelity"]["worst_pairs"][:20]
    sec.update({"status": "ok", "description": desc, "fit_seconds": round(fit_s, 3),
                "sample_seconds": round(sample_s, 3)})
    echo(f"baseline {name}: quality {sec['fidelity']['quality']:.3f}, exact copies "
         f"{sec['privacy']['exact_copies']}, fit {fit_s:.1f} s")
    return sec


def summary(report: dict) -> dict:
    """The headline figures of a report (also shown at the top of the page)."""
    def get(d, *path):
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return d

    def row(sec):
        if not isinstance(sec, dict) or "fidelity" not in sec:
            return {"status": sec.get("status") if isinstance(sec, dict) else None}
        u = sec.get("utility", {})
        return {
            "quality": get(sec, "fidelity", "quality"),
            "column_shapes": get(sec, "fidelity", "column_shapes"),
            "column_pair_trends": get(sec, "fidelity", "column_pair_trends"),
            "exact_copies": get(sec, "privacy", "exact_copies"),
            "dcr_share_closer_than_holdout_p5": get(sec, "privacy", "dcr",
                                                    "share_synthetic_closer_than_holdout_p5"),
            "dcr_share_closer_to_train": get(sec, "privacy", "dcr", "share_closer_to_train_than_holdout"),
            "singling_out_risk": get(sec, "privacy", "risks", "singling_out", "value"),
            "linkability_risk": get(sec, "privacy", "risks", "linkability", "value"),
            "inference_risk_max": get(sec, "privacy", "risks", "inference_max"),
            "crossfit_singling_out_risk": get(sec, "privacy", "crossfit", "singling_out", "value"),
            "crossfit_linkability_risk": get(sec, "privacy", "crossfit", "linkability", "value"),
            "crossfit_inference_risk_max": get(sec, "privacy", "crossfit", "inference_max"),
            "tstr_auc": get(u, "gbm", "tstr_auc"), "trtr_auc": get(u, "gbm", "trtr_auc"),
            "tstr_trtr_ratio": get(u, "gbm", "ratio"),
            "status": "ok",
        }

    out = {"model": row(report.get("patients", {})),
           "order_violations": get(report, "events", "order_violations_total"),
           "image_exact_copies": get(report, "images", "exact_copies"),
           "holdout_vs_train_quality": get(report, "patients", "fidelity", "holdout_vs_train_quality"),
           "baselines": {k: row(v) for k, v in (report.get("baselines") or {}).items()}}
    return out


def evaluate_model(registry: Registry, store, dicom, name: str, version: int | None = None,
                   settings: EvaluateSettings | None = None, out_dir: str | Path | None = None,
                   echo: Callable[[str], None] = print) -> dict:
    """Evaluate model ``name`` (newest version by default); store and write the report.

    Raises:
        NotFound: unknown model (version).
        InvalidRequest: bad settings (unknown baseline, N < 2).
        Unprocessable: the store holds too few patients.
    """
    import pandas as pd

    from generators.baselines import BASELINES
    from generators.evaluation.report import clean, event_section, table_section
    from generators.events import EventModel
    from generators.tabular import load_patient_model
    from server.synthetic.report_html import render_html
    from server.synthetic.training import _fingerprint, read_holdout, subset_tables

    settings = settings or EvaluateSettings()
    unknown = [b for b in settings.baselines if b not in BASELINES]
    if unknown:
        raise InvalidRequest(f"unknown baseline(s) {', '.join(unknown)}: "
                             f"choose from {', '.join(BASELINES)}")
    if settings.n is not None and settings.n < 2:
        raise InvalidRequest("--n must be at least 2")
    if settings.privacy_folds == 1 or settings.privacy_folds < 0:
        raise InvalidRequest("--privacy-folds must be 0 (off) or at least 2")
    if settings.privacy_repeats < 1:
        raise InvalidRequest("--privacy-repeats must be at least 1")
    info = registry.model(name, version)
    path = Path(info.path)
    if not (path / "patients").is_dir():
        raise NotFound(f"model {name} v{info.version}: folder {path} is missing")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. the real tables, mapped as training mapped them, split as training split them
    identifiers: dict[str, set[str]] = {}
    tables = real_tables(store, info, identifiers)
    timings["map_seconds"] = round(time.perf_counter() - t0, 3)
    keys = set(tables.patients.index.astype(str))
    hold = read_holdout(path)
    train_keys, hold_keys, notes = split_keys(tables, hold)
    if len(train_keys) < 2:
        raise InvalidRequest("fewer than 2 of the model's training patients are in the store")
    fp_now = _fingerprint(tables)
    train_t = subset_tables(tables, train_keys)
    hold_t = subset_tables(tables, hold_keys) if hold_keys else None
    train_df, meta = _patient_table(train_t)
    hold_df = _patient_table(hold_t)[0] if hold_t is not None else None
    echo(f"mapped {len(keys)} patients in {timings['map_seconds']:.1f} s: "
         f"{len(train_keys)} training, {len(hold_keys)} held out")

    # 2. synthetic rows
    n = int(settings.n or len(train_df))
    t = time.perf_counter()
    pm = load_patient_model(path / "patients")
    syn = pm.sample(n, seed=settings.seed)
    timings["sample_patients_seconds"] = round(time.perf_counter() - t, 3)
    target = settings.target

    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "model": info.name, "version": info.version,
        "created": now(), "settings": {**settings.__dict__, "n": n},
        "data": {"patients": len(keys), "train": len(train_keys), "holdout": len(hold_keys),
                 "columns": int(train_df.shape[1]), "events_train": int(len(train_t.events)),
                 "store_unchanged": fp_now == info.fingerprint,
                 "holdout_split": {k: v for k, v in (hold or {}).items()
                             if k not in ("train", "holdout", "holdout_dicom_patient_ids")}},
        "notes": notes,
    }
    t = time.perf_counter()
    report["patients"] = table_section(train_df, hold_df, syn, meta, target=target,
                                       seed=settings.seed, risks=settings.risks)
    timings["patients_seconds"] = round(time.perf_counter() - t, 3)
    p = report["patients"]
    echo(f"patient table: quality {p['fidelity']['quality']:.3f}, exact copies "
         f"{p['privacy']['exact_copies']} ({timings['patients_seconds']:.1f} s)")
    if settings.risks and settings.privacy_folds >= 2 and hold_df is not None and len(hold_df):
        t = time.perf_counter()
        p["privacy"]["crossfit"] = _crossfit_section(pm, train_df, hold_df, meta, info.settings,
                                                     settings, echo)
        timings["privacy_crossfit_seconds"] = round(time.perf_counter() - t, 3)

    # 3. events
    t = time.perf_counter()
    em = EventModel.load(path / "events")
    m = max(1, min(n, settings.event_patients))
    rows = syn.iloc[:m].copy()
    rows.index = pd.Index([f"syn-{i}" for i in range(m)], name="patient_id")
    syn_events = em.sample(rows, seed=settings.seed, keys=[str(i) for i in range(m)])
    timings["sample_events_seconds"] = round(time.perf_counter() - t, 3)
    displays = json.loads((path / "tables.json").read_text()).get("displays", {})
    t = time.perf_counter()
    report["events"] = event_section(
        train_t.events, train_t.patients, syn_events, rows,
        dependencies=em.meta.get("dependencies"),
        holdout_events=hold_t.events if hold_t is not None else None,
        n_holdout=len(hold_keys), displays=displays)
    timings["events_seconds"] = round(time.perf_counter() - t, 3)
    echo(f"events: {len(syn_events)} for {m} synthetic patients "
         f"({timings['sample_events_seconds']:.1f} s), order violations "
         f"{report['events']['order_violations_total']}")

    # 4. images
    if settings.images:
        t = time.perf_counter()
        hold_ids = {v for k in hold_keys for v in identifiers.get(k, ())}
        report["images"] = _image_section(path, dicom, hold_ids, info.settings.get("image_origin"),
                                          settings)
        timings["images_seconds"] = round(time.perf_counter() - t, 3)
    else:
        report["images"] = {"status": "skipped", "reason": "--no-images"}

    # 5. baselines on the same training rows
    report["baselines"] = {}
    for b in settings.baselines:
        t = time.perf_counter()
        report["baselines"][b] = _baseline_section(b, train_df, hold_df, meta, n, settings,
                                                   report["patients"]["utility"].get("target"), echo)
        timings[f"baseline_{b}_seconds"] = round(time.perf_counter() - t, 3)
    timings["total_seconds"] = round(time.perf_counter() - t0, 3)
    report["timings"] = timings
    report["summary"] = summary(report)
    report = clean(report)

    registry.set_evaluation(info.name, info.version, report)
    html = render_html(report)
    folders = [path / "evaluation"] + ([Path(out_dir)] if out_dir else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        (folder / "report.html").write_text(html, encoding="utf-8")
    report_files = [str(f / "report.html") for f in folders]
    echo(f"evaluation of {info.name} v{info.version} stored ({timings['total_seconds']:.1f} s): "
         + ", ".join(report_files))
    return report


def stored_evaluation(registry: Registry, name: str, version: int | None = None) -> dict:
    """The stored report of a model version (newest by default).

    Raises:
        NotFound: unknown model, or not evaluated yet.
    """
    info = registry.model(name, version)
    if not info.evaluation:
        raise NotFound(f"model {name} v{info.version} has no evaluation yet "
                       f"(run: synthport evaluate {name} --version {info.version})")
    return info.evaluation


def stored_evaluation_html(registry: Registry, name: str, version: int | None = None) -> str:
    """The stored report rendered as a self-contained HTML page."""
    from server.synthetic.report_html import render_html

    return render_html(stored_evaluation(registry, name, version))


__all__ = ["evaluate_model", "EvaluateSettings", "stored_evaluation", "stored_evaluation_html",
           "summary", "DEFAULT_BASELINES"]
