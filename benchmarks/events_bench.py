"""Event model benchmark: training time, sampling time per patient, event statistics.

Usage::

    python benchmarks/events_bench.py                       # built-in made-up tables
    python benchmarks/events_bench.py --patients P.parquet --events E.parquet
    python benchmarks/events_bench.py --n 200 --epochs 30 --device cuda --json out.json

Patients are split into train and held-out sets; the model is fitted on the training
patients, then generates events for the held-out patients' rows, which are compared
with their real events (``generators.evaluation.events``). Prints figures; never fails
on time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", help="patient table (parquet or csv)")
    ap.add_argument("--events", help="event table (parquet or csv)")
    ap.add_argument("--n", type=int, default=200, help="made-up patients when no tables are given")
    ap.add_argument("--holdout", type=float, default=0.2, help="share of patients held out")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--single", type=int, default=30, help="patients timed one at a time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--save", help="save the fitted model to this folder")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from generators.evaluation.events import event_statistics
    from generators.events import EventModel
    from generators.events.constraints import patient_ids

    if args.patients:
        patients, events = _read(args.patients), _read(args.events)
        source = f"{args.patients} + {args.events}"
    else:
        from generators.events.synthetic import make_synthetic_tables

        patients, events = make_synthetic_tables(args.n, seed=args.seed)
        source = f"made-up tables, {args.n} patients"
    if "patient_id" not in patients.columns:
        patients = patients.reset_index()
    pids = patient_ids(patients)
    rng = np.random.default_rng(args.seed)
    hold = rng.random(len(patients)) < args.holdout
    train_p, test_p = patients[~hold].reset_index(drop=True), patients[hold].reset_index(drop=True)
    ev_pid = events["patient_id"].astype(str)
    train_e = events[ev_pid.isin(set(pids[~hold]))]
    test_e = events[ev_pid.isin(set(pids[hold]))]
    print(f"data: {source}; train {len(train_p)} patients / {len(train_e)} events, "
          f"held out {len(test_p)} patients / {len(test_e)} events")

    model = EventModel(hidden=args.hidden, d_in=args.d_in)
    t0 = time.perf_counter()
    model.fit(train_p, train_e, epochs=args.epochs, device=args.device, progress=True,
              batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    fit_s = time.perf_counter() - t0
    loss = model.meta["training"]["loss"]
    print(f"training: {fit_s:.1f} s ({args.epochs} epochs, device {args.device}, "
          f"{args.threads} threads, vocabulary {len(model.meta['vocab']['tokens'])} tokens, "
          f"{len(model.meta['dependencies'])} dependencies); loss {loss[0]:.3f} -> {loss[-1]:.3f}")
    if args.save:
        model.save(args.save)

    rows = test_p if len(test_p) else train_p
    model.sample(rows.iloc[:1], seed=0)  # warm-up (builds the float64 sampler)
    t0 = time.perf_counter()
    synth = model.sample(rows, seed=args.seed)
    batch_s = time.perf_counter() - t0
    per = []
    cpu = []
    sizes = []
    for i in range(min(args.single, len(rows))):
        t1, c1 = time.perf_counter(), time.process_time()
        one = model.sample(rows.iloc[[i]], seed=args.seed)
        per.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
        sizes.append(len(one))
    per_ms = [p * 1e3 for p in per]
    ev_per_ms = [p / max(s, 1) for p, s in zip(per_ms, sizes)]
    print(f"sampling, batched: {batch_s / max(len(rows), 1) * 1e3:.2f} ms per patient "
          f"({len(synth) / max(len(rows), 1):.0f} events per patient)")
    if per_ms:
        big = [p for p, s in zip(per_ms, sizes) if s >= 200]
        print(f"sampling, one patient at a time: median {statistics.median(per_ms):.1f} ms, "
              f"max {max(per_ms):.1f} ms, median events {statistics.median(sizes):.0f}, "
              f"{statistics.median(ev_per_ms):.3f} ms per event (CPU "
              f"{statistics.median([c * 1e3 / max(n, 1) for c, n in zip(cpu, sizes)]):.3f} ms per event)"
              + (f"; patients with >= 200 events: median {statistics.median(big):.1f} ms" if big else ""))

    ref_e = test_e if len(test_p) else train_e
    report = event_statistics(ref_e, synth, rows, rows, dependencies=model.meta["dependencies"])
    _print_report(report)
    if args.json:
        full = {"source": source, "fit_seconds": fit_s, "batch_ms_per_patient": batch_s / max(len(rows), 1) * 1e3,
                "single_ms": per_ms, "single_events": sizes, "statistics": report,
                "training": model.meta["training"]}
        Path(args.json).write_text(json.dumps(full, indent=1, default=float))
    return 0


def _read(path: str) -> pd.DataFrame:
    return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)


def _print_report(r: dict) -> None:
    e = r["events_per_patient"]
    print(f"events per patient: real mean {e['real_mean']:.1f} / synthetic {e['synthetic_mean']:.1f}, "
          f"KS complement {e['ks_complement']:.3f}")
    g = r["time_gaps"]
    print(f"time gaps: KS complement {g['ks_complement']:.3f}, median real {g['real_median_days']:.3g} d / "
          f"synthetic {g['synthetic_median_days']:.3g} d, same-instant share real "
          f"{g['real_same_instant_share']:.2f} / synthetic {g['synthetic_same_instant_share']:.2f}")
    for kind, v in sorted(r["code_prevalence"].items()):
        k = r["events_per_patient_by_kind"].get(kind, {})
        print(f"  {kind:20s} codes {v['codes']:4d}  prevalence |diff| mean {v['mean_abs_diff']:.3f} "
              f"max {v['max_abs_diff']:.3f} corr {v['correlation']:.3f}  freq TV compl "
              f"{v['frequency_tv_complement']:.3f}  per-patient count KS compl {k.get('ks_complement', float('nan')):.3f}")
    ov = r["observation_values"]
    print(f"observation values: {ov['codes']} codes, mean KS complement {ov['mean_ks_complement']:.3f}")
    print(f"order constraints violated (synthetic): {r['order_constraints_violated']['total']} "
          f"{r['order_constraints_violated']}; real (held out): "
          f"{r['order_constraints_violated_real']['total']} {r['order_constraints_violated_real']}; "
          f"training-data dependency rules checked {r['dependencies_checked']}")
    if "real_rules_broken" in r:
        print(f"rules learned from the held-out real events: {r['real_rules_broken']['rules']}, "
              f"broken by the synthetic events: {r['real_rules_broken']['broken']} (not required to be 0)")
    if "patient_consistency" in r:
        print(f"patient-row consistency: {r['patient_consistency']}")


if __name__ == "__main__":
    raise SystemExit(main())
