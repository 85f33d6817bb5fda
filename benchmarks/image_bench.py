"""Image generator figures (prints figures, never pass/fail).

* collecting the training images: the DICOM files of pydicom, pydicom-data and deid-data
  (``pip install -e '.[test]'``), resized to S x S;
* training the conditional VAE on them (``--epochs``, ``--size``, ``--device``);
* a synthetic CT series of ``--slices`` (50) slices at 256 x 256, sampled and rendered to
  PS3.10 bytes (target <= 2 s), median of ``--repeat`` runs, each with a new series UID;
* a single radiograph (CR, 2500 x 2048) sampled and rendered to bytes (target <= 200 ms);
* after training, ``generators.images.quality.image_report`` against the training images
  (histogram and spectrum similarity, distance to closest record, exact copies).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/image_bench.py [--epochs 100] [--size 64]
        [--device cpu] [--threads 1] [--repeat 5] [--model DIR] [--save DIR]

``--model DIR`` skips collection and training and loads a saved model instead.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generators.images import (ImageModel, collect_images, instance_bytes,  # noqa: E402
                               render_instance, render_series, sample_dicom_paths, seed_from_uid,
                               series_bytes)
from generators.images.render import derived_uid  # noqa: E402


def attrs(modality: str, body_part: str, series: str, sop: str) -> dict:
    return dict(PatientID="SYN-1", PatientName="Synth^Bench", PatientBirthDate="19700101",
                PatientSex="F", StudyInstanceUID=derived_uid(series, "study"),
                SeriesInstanceUID=series, SOPInstanceUID=sop, StudyDate="20240102",
                StudyTime="101500", Modality=modality, BodyPartExamined=body_part,
                SeriesNumber=1, InstanceNumber=1, AccessionNumber="A1",
                StudyDescription="benchmark")


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for i in range(repeat):
        t0 = time.perf_counter()
        out = fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--slices", type=int, default=50)
    ap.add_argument("--model", help="load this saved model instead of training")
    ap.add_argument("--save", help="save the trained model here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}")
    if args.model:
        model = ImageModel.load(args.model)
        print(f"loaded {args.model}: classes {model.classes}")
    else:
        paths = sample_dicom_paths()
        t0 = time.perf_counter()
        got = collect_images(paths, size=args.size)
        print(f"collect: {len(paths)} files -> {len(got.images)} images in "
              f"{time.perf_counter() - t0:.1f} s; skipped {got.skipped}")
        model = ImageModel(size=args.size)
        t0 = time.perf_counter()
        model.fit(got.images, epochs=args.epochs, device=args.device, progress=sys.stderr.isatty())
        print(f"train: {args.epochs} epochs at {args.size} px on {len(got.images)} images: "
              f"{time.perf_counter() - t0:.1f} s (loss/pixel "
              f"{model.meta['training'].get('final_loss_per_pixel')})")
        print("classes: " + ", ".join(f"{m}/{b or '*'}={n}"
                                      for (m, b), n in zip(model.classes, model.class_counts)))
        if args.save:
            model.save(args.save)
        from generators.images.quality import image_report

        t0 = time.perf_counter()
        report = image_report(model, got.images, n_per_class=32)
        print(f"quality vs the training images ({time.perf_counter() - t0:.1f} s; "
              f"exact copies {report['exact_copies']}, must be 0):")
        for r in report["classes"]:
            print(f"  {r['modality']}/{r['body_part'] or '*'}: n_real {r['n_real']}, histogram "
                  f"{r['histogram_similarity']}, spectrum {r['spectrum_similarity']}, "
                  f"DCR min/median {r['dcr_min']}/{r['dcr_median']} (real-real NN median "
                  f"{r['real_nn_median']})")

    def ct_series(i: int) -> int:
        series = derived_uid("bench-ct", str(i))
        vol = model.sample_series("CT", "CHEST", seed_from_uid(series), args.slices)
        dsets = render_series(vol, attrs("CT", "CHEST", series, ""), (256, 256))
        return sum(len(b) for b in series_bytes(dsets))

    def ct_sample(i: int) -> None:
        model.sample_series("CT", "CHEST", seed_from_uid(derived_uid("bench-ct", str(i))),
                            args.slices)

    def radiograph(i: int) -> int:
        sop = derived_uid("bench-cr", str(i))
        img = model.sample("CR", "CHEST", seed_from_uid(sop))[0]
        return len(instance_bytes(render_instance(img, attrs("CR", "CHEST", derived_uid(sop, "s"),
                                                             sop), (2500, 2048))))

    ct_series(-1), radiograph(-1)  # warm-up (imports, first torch call)
    t_sample, _ = timed(ct_sample, args.repeat)
    t_ct, nbytes = timed(ct_series, args.repeat)
    print(f"CT series: {args.slices} slices 256x256 -> {nbytes / 1e6:.1f} MB DICOM: "
          f"{t_ct:.3f} s median of {args.repeat} (sampling {t_sample:.3f} s)   target <= 2 s "
          f"[class {model.resolve('CT', 'CHEST') or 'procedural'}]")
    t_cr, nbytes = timed(radiograph, args.repeat)
    print(f"radiograph: CR 2500x2048 -> {nbytes / 1e6:.1f} MB DICOM: {t_cr * 1000:.0f} ms "
          f"median of {args.repeat}   target <= 200 ms "
          f"[class {model.resolve('CR', 'CHEST') or 'procedural'}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
