"""An evaluation report (``synthport evaluate``) as one self-contained HTML page.

The page is a pure function of the report JSON: the plots are inline SVG drawn here from
the small ``plot`` entries the report carries (no matplotlib, no script, no external
file), so the admin API can render a stored report on request.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Sequence

A_COLOUR = "#1f77b4"     # real / training
B_COLOUR = "#ff7f0e"     # synthetic
BAD = "#c62828"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right;font-variant-numeric:tabular-nums}th{background:#f5f5f5}td.l,th.l{text-align:left}
.bad{color:#c62828;font-weight:bold}.ok{color:#2e7d32;font-weight:bold}.note{color:#555;font-size:.9em}
.plots{display:flex;flex-wrap:wrap;gap:1em}svg{background:#fff;border:1px solid #eee}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:.{digits}f}"
    return _e(x)


def _get(d: Any, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    h = "".join(f'<th class="{"l" if i < left else ""}">{_e(c)}</th>' for i, c in enumerate(head))
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = "l" if i < left else ""
            if isinstance(c, tuple):          # (html, class)
                cells.append(f'<td class="{cls} {c[1]}">{c[0]}</td>')
            else:
                cells.append(f'<td class="{cls}">{_f(c)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def _must_be_zero(v) -> tuple[str, str]:
    if v is None:
        return "–", ""
    return _f(v), ("ok" if v == 0 else "bad")


# ------------------------------------------------------------------------------ SVG
W, H, PAD, TOP = 420, 250, 40, 44


def _axes(title: str, xlabel: str, x0: float, x1: float, y1: float, ylabel: str = "") -> list[str]:
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" role="img"><title>{_e(title)}</title>',
           f'<text x="{W / 2}" y="16" font-size="13" text-anchor="middle">{_e(title)}</text>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#444"/>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{PAD}" y2="{TOP}" stroke="#444"/>',
           f'<text x="{PAD}" y="{H - PAD + 14}" font-size="10" text-anchor="middle">{_e(_tick(x0))}</text>',
           f'<text x="{W - 10}" y="{H - PAD + 14}" font-size="10" text-anchor="end">{_e(_tick(x1))}</text>',
           f'<text x="{(W + PAD) / 2}" y="{H - 8}" font-size="11" text-anchor="middle">{_e(xlabel)}</text>',
           f'<text x="{PAD - 4}" y="{TOP + 4}" font-size="10" text-anchor="end">{_e(_tick(y1))}</text>',
           f'<text x="{PAD - 4}" y="{H - PAD}" font-size="10" text-anchor="end">0</text>']
    if ylabel:
        out.append(f'<text x="12" y="{H / 2}" font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 12 {H / 2})">{_e(ylabel)}</text>')
    return out


def _tick(v: float) -> str:
    return f"{v:.3g}"


def _legend(items: Sequence[tuple[str, str]]) -> str:
    out = []
    for i, (label, colour) in enumerate(items):    # one row under the title
        x = PAD + 10 + 170 * i
        out.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{colour}" '
                   f'fill-opacity="0.6"/><text x="{x + 14}" y="33" font-size="11">{_e(label)}</text>')
    return "".join(out)


def svg_histogram(hist: dict | None, title: str, xlabel: str,
                  labels: tuple[str, str] = ("real", "synthetic"), single: bool = False) -> str:
    """Two overlaid histograms (shares) with shared edges, as ``report.histogram`` makes
    (``single``: only the first)."""
    if not hist or not hist.get("edges"):
        return ""
    edges, a, b = hist["edges"], hist["a"], hist["b"]
    x0, x1 = edges[0], edges[-1]
    if hist.get("log"):
        x0, x1 = 10 ** x0 - 1, 10 ** x1 - 1
        xlabel += " (log scale)"
    top = max(max(a, default=0), max(b, default=0)) or 1.0
    out = _axes(title, xlabel, x0, x1, top, "share")
    pw, ph = W - 10 - PAD, H - PAD - TOP
    span = (edges[-1] - edges[0]) or 1.0
    for series, colour in ((a, A_COLOUR),) + (() if single else ((b, B_COLOUR),)):
        for i, v in enumerate(series):
            x = PAD + (edges[i] - edges[0]) / span * pw
            w = max((edges[i + 1] - edges[i]) / span * pw, 1.0)
            h = v / top * ph
            out.append(f'<rect x="{x:.1f}" y="{H - PAD - h:.1f}" width="{w:.1f}" height="{h:.1f}" '
                       f'fill="{colour}" fill-opacity="0.5"/>')
    if not single:
        out.append(_legend([(labels[0], A_COLOUR), (labels[1], B_COLOUR)]))
    out.append("</svg>")
    return "".join(out)


def svg_scatter(xs: Sequence[float], ys: Sequence[float], title: str, xlabel: str,
                ylabel: str) -> str:
    """Scatter of two shares in [0, 1] with the diagonal."""
    if not xs:
        return ""
    out = _axes(title, xlabel, 0.0, 1.0, 1.0, ylabel)
    pw, ph = W - 10 - PAD, H - PAD - TOP
    out.append(f'<line x1="{PAD}" y1="{H - PAD}" x2="{PAD + pw}" y2="{H - PAD - ph}" '
               f'stroke="#999" stroke-dasharray="4 3"/>')
    for x, y in zip(xs, ys):
        out.append(f'<circle cx="{PAD + x * pw:.1f}" cy="{H - PAD - y * ph:.1f}" r="2.5" '
                   f'fill="{A_COLOUR}" fill-opacity="0.6"/>')
    out.append("</svg>")
    return "".join(out)


def svg_intervals(items: Sequence[tuple[str, float | None, Sequence[float | None] | None]],
                  title: str) -> str:
    """Horizontal bars in [0, 1] with confidence whiskers (privacy risks)."""
    items = [(label, v, ci) for label, v, ci in items if v is not None]
    if not items:
        return ""
    row = 18
    height = 40 + row * len(items)
    left = 190
    pw = W - left - 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
           f'viewBox="0 0 {W} {height}" role="img"><title>{_e(title)}</title>',
           f'<text x="{W / 2}" y="16" font-size="13" text-anchor="middle">{_e(title)}</text>']
    for i, (label, v, ci) in enumerate(items):
        y = 28 + i * row
        out.append(f'<text x="{left - 6}" y="{y + 11}" font-size="11" text-anchor="end">{_e(label)}</text>')
        out.append(f'<rect x="{left}" y="{y + 2}" width="{max(v, 0) * pw:.1f}" height="{row - 6}" '
                   f'fill="{BAD if v > 0.1 else A_COLOUR}" fill-opacity="0.6"/>')
        if ci and ci[0] is not None and ci[1] is not None:
            lo, hi = (min(max(c, 0.0), 1.0) for c in ci)
            yc = y + row / 2 - 1
            out.append(f'<line x1="{left + lo * pw:.1f}" y1="{yc}" x2="{left + hi * pw:.1f}" '
                       f'y2="{yc}" stroke="#222"/>')
    out.append(f'<line x1="{left}" y1="{height - 10}" x2="{left + pw}" y2="{height - 10}" stroke="#444"/>'
               f'<text x="{left}" y="{height - 1}" font-size="9">0</text>'
               f'<text x="{left + pw}" y="{height - 1}" font-size="9" text-anchor="end">1</text></svg>')
    return "".join(out)


def svg_column_scores(details: Sequence[dict], title: str) -> str:
    """Histogram of the per-column shape scores."""
    scores = [d["score"] for d in details if isinstance(d.get("score"), (int, float))]
    if not scores:
        return ""
    bins = 20
    counts = [0] * bins
    for s in scores:
        counts[min(int(s * bins), bins - 1)] += 1
    n = len(scores)
    hist = {"edges": [i / bins for i in range(bins + 1)], "a": [c / n for c in counts],
            "b": [0.0] * bins}
    return svg_histogram(hist, title, "column score (1 = same distribution)", single=True)


# ------------------------------------------------------------------------------ page
def _summary_rows(report: dict) -> list[list]:
    s = report.get("summary") or {}
    rows = []
    named = [("synthport", s.get("model") or {})] + list((s.get("baselines") or {}).items())
    for name, r in named:
        if r.get("status") != "ok":
            rows.append([name, (_e(r.get("status") or "–"), "")] + ["–"] * 9)
            continue
        rows.append([name, r.get("quality"), r.get("column_shapes"), r.get("column_pair_trends"),
                     _must_be_zero(r.get("exact_copies")), r.get("dcr_share_closer_than_holdout_p5"),
                     r.get("singling_out_risk"), r.get("linkability_risk"),
                     r.get("inference_risk_max"), r.get("tstr_auc"), r.get("tstr_trtr_ratio")])
    return rows


def _fidelity(sec: dict) -> str:
    fid = sec.get("fidelity") or {}
    parts = [f"<p>Quality (SDMetrics Quality Report, synthport's implementation): "
             f"<b>{_f(fid.get('quality'))}</b> = mean of column shapes {_f(fid.get('column_shapes'))} "
             f"and column pair trends {_f(fid.get('column_pair_trends'))} "
             f"({_f(fid.get('pairs_counted'))} pairs associated in the real data). "
             f"The real hold-out scores {_f(fid.get('holdout_vs_train_quality'))} against the "
             f"training rows: the ceiling that sampling noise leaves at this size.</p>"]
    details = fid.get("column_shapes_details") or []
    parts.append('<div class="plots">' + svg_column_scores(details, "Column shapes") + "</div>")
    worst = sorted((d for d in details if isinstance(d.get("score"), (int, float))),
                   key=lambda d: d["score"])[:15]
    if worst:
        parts.append("<h3>Worst column shapes</h3>" + _table(
            ["column", "metric", "score"], [[d["column"], d["metric"], d["score"]] for d in worst], 2))
    pairs = fid.get("worst_pairs") or []
    if pairs:
        parts.append("<h3>Worst column pair trends</h3>" + _table(
            ["column 1", "column 2", "metric", "score", "real r / V"],
            [[p["column_1"], p["column_2"], p["metric"], p["score"],
              p.get("real_correlation") if p.get("real_correlation") is not None
              else p.get("real_association")] for p in pairs[:15]], 3))
    return "".join(parts)


def _events(ev: dict) -> str:
    if not ev:
        return "<p>no event statistics</p>"
    epp, gaps = ev.get("events_per_patient") or {}, ev.get("time_gaps") or {}
    rows = [["events per patient, mean", epp.get("real_mean"), epp.get("synthetic_mean"),
             epp.get("ks_complement")],
            ["events per patient, median", epp.get("real_median"), epp.get("synthetic_median"), None],
            ["time gap, median days", gaps.get("real_median_days"), gaps.get("synthetic_median_days"),
             gaps.get("ks_complement")],
            ["same-instant share", gaps.get("real_same_instant_share"),
             gaps.get("synthetic_same_instant_share"), None],
            ["observation values (mean KS compl.)", None, None,
             _get(ev, "observation_values", "mean_ks_complement")]]
    out = [_table(["", "real (training)", "synthetic", "KS complement"], rows)]
    viol = ev.get("order_constraints_violated") or {}
    total = ev.get("order_violations_total")
    out.append(f"<p>Order constraints violated by the synthetic events (must be 0): "
               f'<span class="{"ok" if total == 0 else "bad"}">{_f(total)}</span> '
               f"({_e(', '.join(f'{k} {v}' for k, v in viol.items()))}; "
               f"{_f(ev.get('dependencies_checked'))} learned dependency rules checked).</p>")
    plot = ev.get("plot") or {}
    out.append('<div class="plots">'
               + svg_histogram(plot.get("events_per_patient"), "Events per patient", "events")
               + svg_histogram(plot.get("time_gaps_days"), "Time between consecutive events",
                               "days") + "</div>")
    prev = ev.get("prevalence") or {}
    out.append(f"<h3>Code prevalence (share of patients with the code)</h3><p>{_f(prev.get('codes'))} "
               f"codes; correlation real vs synthetic {_f(prev.get('correlation'))}, mean absolute "
               f"difference {_f(prev.get('mean_abs_diff'))}.</p>")
    pl = prev.get("plot") or {}
    out.append('<div class="plots">' + svg_scatter(pl.get("real") or [], pl.get("synthetic") or [],
                                                   "Code prevalence", "real (training)", "synthetic")
               + "</div>")
    top = prev.get("top") or []
    if top:
        out.append(_table(["kind", "code", "display", "real", "held out", "synthetic"],
                          [[t["kind"], t["code"], t.get("display") or "", t["real"], t.get("holdout"),
                            t["synthetic"]] for t in top], 3))
    per_kind = ev.get("code_prevalence") or {}
    if per_kind:
        out.append(_table(["kind", "codes", "mean |diff|", "max |diff|", "correlation"],
                          [[k, v.get("codes"), v.get("mean_abs_diff"), v.get("max_abs_diff"),
                            v.get("correlation")] for k, v in per_kind.items()]))
    return "".join(out)


def _privacy(report: dict) -> str:
    sec = report.get("patients") or {}
    priv = sec.get("privacy") or {}
    out = [f"<p>Exact copies of a training row (must be 0): "
           f"<span class=\"{_must_be_zero(priv.get('exact_copies'))[1]}\">"
           f"{_f(priv.get('exact_copies'))}</span>"
           f" (the real hold-out has {_f(priv.get('holdout_exact_copies'))}).</p>"]
    if priv.get("note"):
        out.append(f'<p class="note">{_e(priv["note"])}</p>')
    d = priv.get("dcr") or {}
    if d:
        out.append(_table(["distance to the closest training row", "median", "5th percentile"],
                          [["synthetic", d.get("synthetic_to_train_median"), d.get("synthetic_to_train_p5")],
                           ["real hold-out", d.get("holdout_to_train_median"), d.get("holdout_to_train_p5")]]))
        out.append(f"<p>Synthetic rows closer than the hold-out's 5th percentile: "
                   f"{_f(d.get('share_synthetic_closer_than_holdout_p5'))} (about 0.05 when private); "
                   f"nearer to a training row than to a hold-out row: "
                   f"{_f(d.get('share_closer_to_train_than_holdout'))} (about "
                   f"{_f(d.get('expected_share_closer_to_train'))} when private).</p>")
        out.append('<div class="plots">' + svg_histogram(
            d.get("plot"), "Distance to closest training row", "distance",
            ("synthetic", "real hold-out")) + "</div>")
    items = []
    for name, s in [("synthport", sec)] + list((report.get("baselines") or {}).items()):
        r = _get(s, "privacy", "risks")
        if not isinstance(r, dict) or r.get("status") != "ok":
            continue
        items.append((f"{name}: singling out", _get(r, "singling_out", "value"),
                      _get(r, "singling_out", "ci")))
        items.append((f"{name}: linkability", _get(r, "linkability", "value"),
                      _get(r, "linkability", "ci")))
        inf = r.get("inference") or {}
        if inf:
            worst = max(inf.items(), key=lambda kv: kv[1].get("value") or 0.0)
            items.append((f"{name}: inference (max)", worst[1].get("value"), worst[1].get("ci")))
    if items:
        out.append('<div class="plots">' + svg_intervals(items, "Attack risks (95 % CI)") + "</div>")
    r = priv.get("risks") or {}
    if r.get("status") == "ok":
        rows = [["singling out", _get(r, "singling_out", "value"), _get(r, "singling_out", "ci"),
                 _get(r, "singling_out", "attack_rate"), _get(r, "singling_out", "control_rate"),
                 _get(r, "singling_out", "baseline_rate")],
                ["linkability", _get(r, "linkability", "value"), _get(r, "linkability", "ci"),
                 _get(r, "linkability", "attack_rate"), _get(r, "linkability", "control_rate"),
                 _get(r, "linkability", "baseline_rate")]]
        for s, v in (r.get("inference") or {}).items():
            rows.append([f"inference of {s}", v.get("value"), v.get("ci"), v.get("attack_rate"),
                         v.get("control_rate"), v.get("baseline_rate")])
        rows = [[a, b, ("[" + ", ".join(_f(x) for x in c) + "]" if c else "–", ""), d, e, f]
                for a, b, c, d, e, f in rows]
        out.append(_table(["attack", "risk", "95 % CI", "success on training", "on control",
                           "baseline"], rows))
        out.append(f'<p class="note">Attacker knowledge: {_e(", ".join(r.get("aux_columns") or []))}. '
                   f"Method: {_e(r.get('method'))}; risk = (training success - control success) / "
                   f"(1 - control success), the control set being the real hold-out.</p>")
    cf = priv.get("crossfit") or {}
    if cf.get("status") == "ok":
        pr = cf.get("paired") or {}

        def ci(c):
            return ("[" + ", ".join(_f(x) for x in c) + "]" if c else "–", "")

        rows = [["singling out", _get(cf, "singling_out", "value"), ci(_get(cf, "singling_out", "ci")),
                 ("–", ""), ("–", "")],
                ["linkability", _get(cf, "linkability", "value"), ci(_get(cf, "linkability", "ci")),
                 _get(pr, "linkability", "value"), ci(_get(pr, "linkability", "ci"))]]
        for s, v in (cf.get("inference") or {}).items():
            p = (pr.get("inference") or {}).get(s) or {}
            rows.append([f"inference of {s}", v.get("value"), ci(v.get("ci")), p.get("value"),
                         ci(p.get("ci"))])
        rep = (f" x {cf.get('repeats')} repeated splits" if (cf.get("repeats") or 1) > 1 else "")
        out.append(f"<h3>Cross-fitted risks ({cf.get('folds')} folds{rep}, {cf.get('rows')} real "
                   "patients)</h3>")
        out.append(_table(["attack", "pooled risk", "95 % CI", "paired risk", "95 % CI (bootstrap)"],
                          rows))
        out.append('<p class="note">The patient model was refitted on each fold\'s other parts with '
                   "the stored settings; every real patient was a control once per pass. Pooled: "
                   "the folds' successes summed, then the risk as above (with repeated splits, the "
                   "interval of one pass's counts). Paired: each patient's success as a "
                   "training target against its success as a control (generators/evaluation/"
                   "crossfit.py).</p>")
    a = priv.get("anonymeter") or {}
    if a:
        out.append(f'<p class="note">anonymeter package: {_e(a.get("status"))}.</p>')
    return "".join(out)


def _utility(report: dict) -> str:
    rows = []
    for name, s in [("synthport", report.get("patients") or {})] + list((report.get("baselines") or {}).items()):
        u = (s or {}).get("utility") or {}
        if u.get("status") != "ok":
            continue
        for kind in ("logistic", "gbm"):
            v = u.get(kind) or {}
            rows.append([name, kind, v.get("target"), v.get("trtr_auc"), v.get("tstr_auc"), v.get("ratio")])
    if not rows:
        u = _get(report, "patients", "utility") or {}
        return f"<p>skipped: {_e(u.get('reason'))}</p>"
    return ("<p>ROC AUC on the real hold-out of a classifier trained on real training rows "
            "(TRTR) and on synthetic rows (TSTR).</p>"
            + _table(["generator", "classifier", "target", "TRTR AUC", "TSTR AUC", "TSTR / TRTR"], rows, 3))


def _images(im: dict) -> str:
    if not im or im.get("status") != "ok":
        return f"<p>skipped: {_e((im or {}).get('reason') or (im or {}).get('status'))}</p>"
    rows = [[f"{c['modality']}/{c['body_part'] or '*'}", c["n_real"], c["n_synthetic"],
             c["histogram_similarity"], c["spectrum_similarity"], c["dcr_median"], c["real_nn_median"],
             _must_be_zero(c["exact_copies"])] for c in im.get("classes", [])]
    return (f"<p>Against {_e(im.get('against'))} ({_f(im.get('n_real'))} images). Exact copies "
            f"(must be 0): {_f(im.get('exact_copies'))}.</p>"
            + _table(["class", "real", "synthetic", "histogram sim.", "spectrum sim.", "DCR median",
                      "real NN median", "exact copies"], rows))


def render_html(report: dict) -> str:
    """The page for one report (escaped, self-contained)."""
    data = report.get("data") or {}
    title = f"Evaluation of {report.get('model')} v{report.get('version')}"
    base = report.get("baselines") or {}
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in report.get("notes") or [])
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p>{_f(data.get('patients'))} real patients: {_f(data.get('train'))} used for training, "
        f"{_f(data.get('holdout'))} held out (never seen by the model; fraction "
        f"{_f(_get(data, 'holdout_split', 'fraction'), 2)}, seed {_f(_get(data, 'holdout_split', 'seed'))}); "
        f"{_f(_get(report, 'settings', 'n'))} synthetic patients (seed "
        f"{_f(_get(report, 'settings', 'seed'))}). Store unchanged since training: "
        f"{_f(data.get('store_unchanged'))}.</p>", notes,
        "<h2>Summary</h2>",
        _table(["generator", "quality", "shapes", "pair trends", "exact copies", "DCR < hold-out p5",
                "singling out", "linkability", "inference max", "TSTR AUC", "TSTR/TRTR"],
               _summary_rows(report)),
        f"<p>Event order violations (must be 0): "
        f"<span class=\"{_must_be_zero(_get(report, 'summary', 'order_violations'))[1]}\">"
        f"{_f(_get(report, 'summary', 'order_violations'))}</span>.</p>",
        "<h2>Fidelity: patient table</h2>", _fidelity(report.get("patients") or {}),
        "<h2>Fidelity: event sequences</h2>", _events(report.get("events") or {}),
        "<h2>Fidelity: images</h2>", _images(report.get("images") or {}),
        "<h2>Privacy</h2>", _privacy(report),
        "<h2>Utility</h2>", _utility(report),
        "<h2>Baselines</h2>",
        _table(["baseline", "status", "fit s", "quality"],
               [[k, (_e(v.get("status")) + (f" ({_e(v.get('reason'))})" if v.get("reason") else ""), ""),
                 v.get("fit_seconds"), _get(v, "fidelity", "quality")] for k, v in base.items()]),
        f'<p class="note">Timings (s): {_e(", ".join(f"{k} {v}" for k, v in (report.get("timings") or {}).items()))}.</p>',
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")


__all__ = ["render_html", "svg_histogram", "svg_scatter", "svg_intervals"]
