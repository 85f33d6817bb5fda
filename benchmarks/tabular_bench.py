"""Patient-level generator benchmark: fit, quality, privacy, utility, sampling speed.

Prints figures, never fails on them (targets from issue 5 are printed beside them).

    python benchmarks/tabular_bench.py                         # built-in made-up table (200 rows)
    python benchmarks/tabular_bench.py --rows 10000 --extra-conditions 15
    python benchmarks/tabular_bench.py --table /tmp/tables     # mappings output folder
    python benchmarks/tabular_bench.py --table patients.parquet
    python benchmarks/tabular_bench.py --ehds                  # map ../shared/data/ehds-es-200-seed1001
    python benchmarks/tabular_bench.py --json out.json --save /tmp/model

The table is split into train and a hold-out (``--holdout``, default 20 %): the model
trains on the first, the hold-out is the "real, never seen" reference for DCR,
Anonymeter's control set and TSTR's test set. Quality compares a synthetic sample of
the training size with the training table (SDMetrics' convention).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "ehds-es-200-seed1001.tar.xz"


def _load(args):
    import pandas as pd

    if args.ehds:
        from mappings.records import iter_ehds_archive
        from mappings.tables import map_records

        t = time.perf_counter()
        mt = map_records(list(iter_ehds_archive(args.archive)))
        print(f"mapped {args.archive.name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        return mt.patients, mt.patient_meta, args.archive.name
    if args.table:
        p = Path(args.table)
        if p.is_dir():
            from mappings.io import read_table

            df, meta = read_table(p, "patients")
            return df, meta, str(p)
        df = pd.read_parquet(p)
        meta_path = p.with_name(p.name.replace(".parquet", ".meta.json"))
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        return df, meta, str(p)
    from generators.tabular.demo import make_health_table

    df = make_health_table(args.rows, seed=args.seed, extra_conditions=args.extra_conditions)
    return df, None, f"built-in health-like table ({args.rows} rows)"


def _target(df, meta, wanted):
    if wanted:
        return wanted
    best, score = None, math.inf
    for c in df.columns:
        if c.startswith("cond_") and not c.endswith("_age"):
            p = float((df[c].astype(float) == 1).mean())
            if 0.1 <= p <= 0.9 and abs(p - 0.4) < score:
                best, score = c, abs(p - 0.4)
    return best


def _timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", help="parquet file or mappings output folder (patients.parquet)")
    ap.add_argument("--ehds", action="store_true", help="map the EHDS sample archive first")
    ap.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    ap.add_argument("--rows", type=int, default=200, help="built-in table rows")
    ap.add_argument("--extra-conditions", type=int, default=0, help="built-in table: more conditions")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=None, help="default: the model's")
    ap.add_argument("--hyper", default="{}", help='JSON hyper-parameters, e.g. \'{"hidden": 128}\'')
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", help="binary column for TSTR (default: a condition near 40 %%)")
    ap.add_argument("--sample-rows", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 cores are shared)")
    ap.add_argument("--no-anonymeter", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--save", type=Path, help="save the model here")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from generators.evaluation.fidelity import quality_report, sdtypes_from_metadata, to_sdmetrics_metadata
    from generators.evaluation.privacy import anonymeter_risks, distance_to_closest_record, exact_copies
    from generators.tabular import PatientModel

    df, meta, name = _load(args)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(df))
    n_ho = int(round(len(df) * args.holdout))
    train, holdout = df.iloc[np.sort(perm[n_ho:])], df.iloc[np.sort(perm[:n_ho])]
    n_cols = len([c for c in df.columns if c != "patient_id"])
    fig: dict = {"table": name, "rows": len(df), "columns": n_cols, "train_rows": len(train),
                 "holdout_rows": len(holdout), "threads": args.threads, "device": args.device}
    print(f"table: {name}: {len(df)} rows x {n_cols} columns; train {len(train)}, hold-out {len(holdout)}")

    hyper = json.loads(args.hyper)
    fit_kw = {"epochs": args.epochs} if args.epochs else {}
    t = time.perf_counter()
    model = PatientModel(**hyper).fit(train, meta, device=args.device, progress=sys.stderr.isatty(), **fit_kw)
    fig["fit_s"] = time.perf_counter() - t
    fig["training"] = model.training
    fig["constraints"] = len(model.constraints)
    print(f"fit                          {fig['fit_s']:8.2f} s   ({model.training['epochs_run']} epochs, "
          f"best {model.training['best_epoch']}, {len(model.constraints)} constraints; target: all models "
          f"<= 15 min for 200 patients)")
    if args.save:
        model.save(args.save)

    syn = model.sample(len(train), seed=args.seed + 1)
    cols_meta = (meta or {}).get("columns", meta)
    q = quality_report(train, syn, cols_meta)
    fig["quality"] = {k: q[k] if k == "score" else q[k]["score"] for k in ("score", "column_shapes", "column_pair_trends")}
    fig["quality"]["pairs_counted"] = q["column_pair_trends"]["pairs_counted"]
    print(f"quality (own)                {q['score']:8.4f}     shapes {q['column_shapes']['score']:.4f}, "
          f"pair trends {q['column_pair_trends']['score']:.4f} over {q['column_pair_trends']['pairs_counted']} "
          f"pairs (target >= 0.90)")
    q0 = quality_report(train, syn, cols_meta, real_correlation_threshold=0, real_association_threshold=0)
    fig["quality_all_pairs"] = q0["score"]
    print(f"quality (own, every pair)    {q0['score']:8.4f}     pair trends {q0['column_pair_trends']['score']:.4f} "
          f"(older sdmetrics: no association threshold)")
    try:
        from sdmetrics.reports.single_table import QualityReport

        rep = QualityReport()
        rep.generate(train, syn, to_sdmetrics_metadata(sdtypes_from_metadata(train, cols_meta)), verbose=False)
        fig["quality_sdmetrics"] = float(rep.get_score())
        print(f"quality (sdmetrics)          {fig['quality_sdmetrics']:8.4f}")
    except ImportError:
        print("quality (sdmetrics)          not installed (pip install 'synthport[eval]')")

    fig["exact_copies"] = exact_copies(train, syn)
    d = distance_to_closest_record(train, syn, holdout, cols_meta)
    fig["dcr"] = d
    print(f"exact copies                 {fig['exact_copies']:8d}     (target 0)")
    print(f"DCR synthetic->train         median {d['synthetic_to_train_median']:.3f}, p5 {d['synthetic_to_train_p5']:.3f}")
    print(f"DCR hold-out->train          median {d['holdout_to_train_median']:.3f}, p5 {d['holdout_to_train_p5']:.3f}")
    print(f"  synthetic closer than hold-out p5  {d['share_synthetic_closer_than_holdout_p5']:.3f} (private: ~0.05)")
    print(f"  synthetic closer to train than to hold-out  {d['share_closer_to_train_than_holdout']:.3f} "
          f"(private: ~{d['expected_share_closer_to_train']:.2f})")
    if not args.no_anonymeter:
        a = anonymeter_risks(train, syn, holdout)
        fig["anonymeter"] = a
        if a["status"] == "ok":
            inf = max((v["value"] for v in a["inference"].values()), default=math.nan)
            print(f"anonymeter                   singling-out {a['singling_out']['value']:.3f} "
                  f"{a['singling_out']['ci']}, linkability {a['linkability']['value']:.3f}, inference max {inf:.3f}")
        else:
            print(f"anonymeter                   {a['status']}")

    target = _target(train, meta, args.target)
    if target:
        try:
            from generators.evaluation.utility import tstr

            for kind in ("logistic", "gbm"):
                u = tstr(train, syn, holdout, target, model=kind, metadata=cols_meta)
                fig[f"utility_{kind}"] = u
                print(f"TSTR/TRTR {kind:9s} {target}  TRTR {u['trtr_auc']:.3f}, TSTR {u['tstr_auc']:.3f}, "
                      f"ratio {u['ratio']:.3f} (target >= 0.95)")
        except ImportError:
            print("TSTR                         scikit-learn not installed")

    cond = {target: 1} if target else {}
    first_cat = next((c for c in model.codecs if c.kind == "categorical" and c.categories and c.name != target), None)
    if first_cat is not None:
        cond[first_cat.name] = first_cat.categories[0]
    fig["conditional_500_s"] = _timeit(lambda: model.sample(500, seed=3, conditions=cond), 5)
    print(f"conditional sample 500 rows  {fig['conditional_500_s']:8.3f} s   {cond} (bar: 0.17 s)")
    fig["sample_rows"] = args.sample_rows
    t = time.perf_counter()
    model.sample(args.sample_rows, seed=4)
    fig["sample_s"] = time.perf_counter() - t
    print(f"sample {args.sample_rows:,} rows          {fig['sample_s']:8.2f} s   "
          f"({args.sample_rows / fig['sample_s']:,.0f} rows/s, {args.threads} thread(s))")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
