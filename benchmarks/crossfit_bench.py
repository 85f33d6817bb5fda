"""Cross-fitted privacy risks of patient-model settings and of reference generators.

Reads the patient table of a trained model's data folder as ``synthport evaluate`` does
(same mapping, same training / hold-out split), then for each ``--set`` (hyper-parameters
of the stored patient model, one change per run) fits a model on the training part,
reports its quality and TSTR against the hold-out, and runs the cross-fitted attacks
(generators/evaluation/crossfit.py) with ``--folds`` x ``--repeats`` refits. ``--reference``
runs the same cross-fit with generators that have no model of an individual patient:

* ``marginals``: each column resampled independently from the training part (no
  association between columns can leak; it does copy rare exact values, which the
  singling-out attack finds);
* ``copula``: synthport's own Gaussian copula baseline (generators/baselines.py).

Prints one JSON line per run. Never pass/fail.

Usage::

    python benchmarks/crossfit_bench.py --data-dir /tmp/ev-ehds --model ehdsdrop \\
        [--set dropout=0.45] [--set val_share=0.2] [--reference marginals --reference copula] \\
        [--folds 5] [--repeats 3] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _summary(cf: dict) -> dict:
    def r(v):
        return round(float(v), 3)

    return {"singling_out": r(cf["singling_out"]["value"]),
            "linkability": r(cf["linkability"]["value"]),
            "linkability_paired": r(cf["paired"]["linkability"]["value"]),
            "inference": {s: r(v["value"]) for s, v in cf["inference"].items()},
            "inference_paired": {s: r(v["value"]) for s, v in cf["paired"]["inference"].items()},
            "largest_lower_bound": r(max(v["ci"][0] for v in cf["inference"].values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", required=True, help="a trained model (its split and settings)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="patient-model hyper-parameters changed for one run (repeatable)")
    ap.add_argument("--reference", action="append", default=[], choices=["marginals", "copula"])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", default="0", help="comma-separated cross-fit seeds")
    args = ap.parse_args()

    import numpy as np
    import pandas as pd
    import torch

    from generators.baselines import GaussianCopula
    from generators.evaluation.crossfit import crossfit_risks
    from generators.evaluation.report import table_section
    from generators.tabular import load_patient_model
    from server.cli import _synthetic_env
    from server.synthetic.evaluation import _patient_table, _refit_sampler, real_tables, split_keys
    from server.synthetic.training import read_holdout, subset_tables

    _cfg, store, _dicom, reg = _synthetic_env(args.data_dir, None)
    info = reg.model(args.model, None)
    path = Path(info.path)
    tables = real_tables(store, info)
    train_keys, hold_keys, notes = split_keys(tables, read_holdout(path))
    if not hold_keys:
        raise SystemExit(f"model {args.model}: no held-out patients ({'; '.join(notes)})")
    train_df, meta = _patient_table(subset_tables(tables, train_keys))
    hold_df = _patient_table(subset_tables(tables, hold_keys))[0]
    real = pd.concat([train_df, hold_df])
    stored = load_patient_model(path / "patients")
    seeds = [int(s) for s in args.seeds.split(",")]

    def crossfit(fit_sample, seed):
        return crossfit_risks(real, fit_sample, meta, folds=args.folds, repeats=args.repeats,
                              seed=seed)

    for spec in args.set:
        hyper = dict(stored.hyper)
        for kv in spec.split(","):
            k, v = kv.split("=", 1)
            if k not in hyper:
                raise SystemExit(f"unknown hyper-parameter {k}")
            old = hyper[k]
            if isinstance(old, bool):
                hyper[k] = v.lower() in ("1", "true", "yes")
            else:
                hyper[k] = type(old)(v) if old is not None else float(v)
        t = time.perf_counter()
        torch.manual_seed(0)
        model = type(stored)(**hyper)
        model.fit(train_df, meta, epochs=int(info.settings.get("epochs", 200)), progress=False)
        sec = table_section(train_df, hold_df, model.sample(len(train_df), seed=0), meta, seed=0,
                            risks=False, run_anonymeter=False, reference_quality=False)
        util = sec.get("utility") or {}
        for seed in seeds:
            cf = crossfit(_refit_sampler(model, info.settings, meta), seed)
            tstr = {m: round(util[m]["ratio"], 3) for m in ("gbm", "logistic")
                    if isinstance(util.get(m), dict) and "ratio" in util[m]}
            print(json.dumps({"run": spec, "seed": seed,
                              "quality": round(sec["fidelity"]["quality"], 4), "tstr_trtr": tstr,
                              **_summary(cf), "seconds": round(time.perf_counter() - t)}),
                  flush=True)

    def marginals(train, n, seed):
        rs = np.random.default_rng(seed)
        return pd.DataFrame({c: train[c].to_numpy()[rs.integers(len(train), size=n)]
                             for c in train.columns})

    def copula(train, n, seed):
        return GaussianCopula().fit(train, meta).sample(n, seed=seed)

    for ref in args.reference:
        for seed in seeds:
            t = time.perf_counter()
            cf = crossfit({"marginals": marginals, "copula": copula}[ref], seed)
            print(json.dumps({"run": f"reference {ref}", "seed": seed, **_summary(cf),
                              "seconds": round(time.perf_counter() - t)}), flush=True)


if __name__ == "__main__":
    main()
