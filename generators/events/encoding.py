"""Tables to model inputs: the patient-row condition vector, the event vocabulary and bins.

Everything fitted here is plain JSON (``to_json``/``from_json``), so a saved model
never needs unpickling.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd

from .constraints import KINDS, floats

PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3

SLOT_NONE, SLOT_NUM, SLOT_CAT, SLOT_DUR = 0, 1, 2, 3

# Optional event-table columns whose value is carried per token (its most common value).
CARRIED = ("category", "value_system")

# Time-gap bins (days): bin 0 is "same instant", bin 1 up to a minute, then
# log-spaced bins up to 120 years; a gap is drawn log-uniformly inside its bin.
ZERO_GAP = 1e-6


def gap_edges(n_bins: int = 48) -> np.ndarray:
    """Lower edges of the gap bins plus the final upper edge (``n_bins + 1`` values)."""
    logs = np.linspace(math.log(1.0 / 1440.0), math.log(120 * 365.25), n_bins - 1)
    return np.concatenate([[0.0, ZERO_GAP], np.exp(logs)])


def gap_class(t_prev, t_new, ref, edges: np.ndarray, first=False) -> np.ndarray:
    """Time class of an event: forward gap bin ``k``, or ``G + k`` for "``k`` back from the end".

    An event closer to the reference age (death or the end of the record) than to the
    event before it is placed by its distance to that bound, a gap of years by its
    length: either way the bin is a small share of the time it measures, so a history
    starts about as many years before the reference as the real ones do. The first event
    (``first``, scalar or per element) is always placed back from a known reference.
    """
    g = np.maximum(np.asarray(t_new, float) - t_prev, 0.0)
    ref = np.broadcast_to(np.asarray(ref, float), g.shape)
    with np.errstate(invalid="ignore"):
        x = np.where(np.isfinite(ref), np.maximum(ref - t_new, 0.0), np.inf)
    n = len(edges) - 1
    back = (x < g) | (np.asarray(first) & np.isfinite(x))
    return np.where(back, n + gap_to_bin(np.where(back, x, 0.0), edges), gap_to_bin(g, edges))


def gap_to_bin(gaps: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each gap (days, >= 0)."""
    g = np.maximum(np.asarray(gaps, float), 0.0)
    b = np.searchsorted(edges, g, side="right") - 1
    return np.clip(b, 0, len(edges) - 2)


def _mode(values) -> object:
    vals = [v for v in values if _present(v)]
    if not vals:
        return None
    return Counter(vals).most_common(1)[0][0]


def _present(v) -> bool:
    if v is None or v is pd.NA:
        return False
    if isinstance(v, float) and math.isnan(v):
        return False
    return not (isinstance(v, str) and v == "")


def _jsonable(v):
    if not _present(v):
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


class PatientEncoder:
    """Patient row -> small numeric vector (standardised numbers, one-hot categories)."""

    def __init__(self, spec: list[dict] | None = None):
        self.spec = spec or []

    @property
    def dim(self) -> int:
        """Length of the encoded vector."""
        return sum(self._width(s) for s in self.spec)

    @staticmethod
    def _width(s: dict) -> int:
        if s["type"] == "num":
            return 2 if s["nan"] else 1
        return len(s["cats"]) + 1

    def fit(self, patients: pd.DataFrame, max_categories: int = 20) -> "PatientEncoder":
        """Infers each column's kind from the training table."""
        self.spec = []
        for col in patients.columns:
            if col in ("patient_id", "patient_index", "name", "given", "family"):
                continue
            s = patients[col]
            if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
                x = pd.to_numeric(s, errors="coerce").astype(float)
                if x.notna().sum() == 0:
                    continue
                sd = float(x.std()) if x.notna().sum() > 1 else 1.0
                self.spec.append({"col": str(col), "type": "num", "mean": float(x.mean()),
                                  "std": sd if sd > 1e-9 else 1.0, "nan": bool(x.isna().any())})
            elif pd.api.types.is_datetime64_any_dtype(s):
                continue
            else:
                vc = s.dropna().astype(str).value_counts()
                # High-cardinality text (names, ids, addresses) says nothing useful here.
                if len(vc) == 0 or len(vc) > 5 * max_categories:
                    continue
                cats = [c for c, n in vc.items() if n >= 2][:max_categories]
                if cats:
                    self.spec.append({"col": str(col), "type": "cat", "cats": cats})
        return self

    def transform(self, patients) -> np.ndarray:
        """Encodes rows (a DataFrame or a mapping column -> list); missing columns count as missing."""
        if isinstance(patients, pd.DataFrame):
            arr = patients.to_numpy(dtype=object)
            patients = {c: arr[:, j] for j, c in enumerate(patients.columns)}
        n = len(next(iter(patients.values()))) if patients else 0
        out = np.zeros((n, max(self.dim, 1)))
        j = 0
        for s in self.spec:
            present = s["col"] in patients
            if s["type"] == "num":
                x = floats(patients[s["col"]]) if present else np.full(n, np.nan)
                z = np.clip((x - s["mean"]) / s["std"], -6, 6)
                out[:, j] = np.where(np.isnan(z), 0.0, z)
                j += 1
                if s["nan"]:
                    out[:, j] = np.isnan(x)
                    j += 1
            else:
                idx = s.get("_idx") or s.setdefault("_idx", {c: i for i, c in enumerate(s["cats"])})
                k = len(s["cats"])
                vals = patients[s["col"]] if present else [None] * n
                for r, a in enumerate(vals):
                    out[r, j + idx.get(None if not _present(a) else str(a), k)] = 1.0
                j += k + 1
        return out

    def to_json(self) -> list[dict]:
        return [{k: v for k, v in s.items() if not k.startswith("_")} for s in self.spec]


def event_keys(events: pd.DataFrame) -> pd.Series:
    """Token key of each event: (kind, system, code, value_code, modality, body_site).

    Observations keep their value in the value head, so their key drops ``value_code``.
    """
    def col(name):
        if name not in events.columns:
            return pd.Series([None] * len(events), index=events.index, dtype=object)
        s = events[name].astype(object)
        return s.where(s.notna(), None)

    kind = events["kind"].astype(str)
    vcode = col("value_code").where(kind != "observation", None)
    cols = [kind, col("system"), col("code"), vcode, col("modality"), col("body_site")]
    return pd.Series(list(zip(*[c.map(lambda a: None if not _present(a) else str(a)) for c in cols])),
                     index=events.index)


class Vocabulary:
    """Event tokens: the frequent (kind, code, ...) keys, one "other" token per kind."""

    def __init__(self, tokens: list[dict] | None = None, n_value_bins: int = 16):
        self.tokens = tokens or []
        self.n_value_bins = n_value_bins
        self._index = {tuple(t["key"]): i for i, t in enumerate(self.tokens) if t.get("key")}
        self._other = {t["kind"]: i for i, t in enumerate(self.tokens) if t.get("other")}

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def fit(cls, events: pd.DataFrame, keys: pd.Series, min_patients: int = 2,
            max_per_kind: int = 200, n_value_bins: int = 16) -> "Vocabulary":
        """Builds the vocabulary and per-token value bins from the training events.

        Keys seen in fewer than ``min_patients`` patients never become tokens (nor tail
        codes of an "other" token), so a code unique to one patient is never reproduced.
        """
        tokens: list[dict] = [{"special": "PAD"}, {"special": "BOS"}, {"special": "EOS"}]
        df = pd.DataFrame({"key": keys, "patient_id": events["patient_id"].to_numpy()})
        npat = df.groupby("key", sort=False, observed=True)["patient_id"].nunique()
        nev = df.groupby("key", sort=False, observed=True).size()
        by_kind: dict[str, list] = {}
        for key, n in npat.items():
            if n >= min_patients:
                by_kind.setdefault(key[0], []).append((-int(n), -int(nev[key]), key))
        groups = events.groupby(keys, sort=False, observed=True).indices
        for kind in KINDS + sorted(set(by_kind) - set(KINDS)):
            if kind not in set(events["kind"].astype(str)):
                continue
            ranked = [k for *_, k in sorted(by_kind.get(kind, []), key=lambda a: (a[0], a[1], str(a[2])))]
            for key in ranked[:max_per_kind]:
                tokens.append(_token_info(kind, key, events.iloc[groups[key]], n_value_bins))
            tail = ranked[max_per_kind:]
            tail_rows = []
            for key in tail:
                sub = events.iloc[groups[key]]
                tail_rows.append({"key": list(key), "weight": int(len(sub)),
                                  "display": _jsonable(_mode(sub.get("display", pd.Series(dtype=object)))),
                                  "unit": _jsonable(_mode(sub.get("unit", pd.Series(dtype=object))))})
            tokens.append({"kind": kind, "other": True, "tail": tail_rows, "slot": SLOT_NONE, "nbins": 0})
        return cls(tokens, n_value_bins)

    def encode(self, keys: pd.Series) -> np.ndarray:
        """Token id of each key ("other" of its kind when not in the vocabulary)."""
        out = np.empty(len(keys), dtype=np.int64)
        for i, k in enumerate(keys):
            j = self._index.get(tuple(k))
            out[i] = j if j is not None else self._other.get(k[0], EOS)
        return out

    def value_bins(self, events: pd.DataFrame, tok: np.ndarray) -> np.ndarray:
        """Value-bin index per event: 0 = no value, 1..nbins as fitted for its token."""
        out = np.zeros(len(events), dtype=np.int64)
        vnum = pd.to_numeric(events["value_num"], errors="coerce").to_numpy(float)
        vcode = events["value_code"].astype(object).to_numpy()
        dur = (pd.to_numeric(events["end_t_days"], errors="coerce").to_numpy(float)
               - events["t_days"].to_numpy(float))
        for j in np.unique(tok):
            t = self.tokens[j]
            slot = t.get("slot", SLOT_NONE)
            if slot == SLOT_NONE:
                continue
            idx = np.nonzero(tok == j)[0]
            if slot == SLOT_CAT:
                m = {c: i + 1 for i, c in enumerate(t["cats"])}
                out[idx] = [m.get(str(v), 0) if _present(v) else 0 for v in vcode[idx]]
                continue
            x = vnum[idx] if slot == SLOT_NUM else np.log1p(np.maximum(dur[idx], 0.0))
            ok = ~np.isnan(x)
            if t.get("discrete"):
                vals = np.asarray(t["values"], float)
                if slot == SLOT_DUR:
                    vals = np.log1p(vals)
                b = np.abs(x[:, None] - vals[None, :]).argmin(axis=1) + 1
            else:
                edges = np.asarray(t["edges"], float)
                b = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2) + 1
            out[idx] = np.where(ok, b, 0)
        return out

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "n_value_bins": self.n_value_bins}

    @classmethod
    def from_json(cls, d: dict) -> "Vocabulary":
        return cls(d["tokens"], d["n_value_bins"])


def _decimals(x: np.ndarray) -> int:
    """Most common number of decimals in the values (at most 4)."""
    if len(x) == 0:
        return 2
    s = pd.Series(x[:2000]).map(lambda v: len(repr(float(v)).split(".")[1].rstrip("0"))
                                if "e" not in repr(float(v)) else 4)
    return int(min(4, s.mode().iloc[0]))


def _token_info(kind: str, key: tuple, sub: pd.DataFrame, nb: int) -> dict:
    """Metadata and value bins of one token from its training events."""
    t = {"kind": kind, "key": list(key), "system": key[1], "code": key[2], "value_code": key[3],
         "modality": key[4], "body_site": key[5],
         "display": _jsonable(_mode(sub["display"])) if "display" in sub else None,
         "unit": _jsonable(_mode(sub["unit"])) if "unit" in sub else None,
         "slot": SLOT_NONE, "nbins": 0}
    for extra in CARRIED:
        if extra in sub.columns:
            t[extra] = _jsonable(_mode(sub[extra].astype(object)))
    vnum = pd.to_numeric(sub["value_num"], errors="coerce").dropna().to_numpy(float)
    vcode = sub["value_code"].dropna().astype(str)
    vcode = vcode[vcode != ""]
    end = pd.to_numeric(sub["end_t_days"], errors="coerce")
    dur = (end - sub["t_days"].astype(float)).dropna().clip(lower=0).to_numpy(float)
    n = len(sub)
    if kind == "observation":
        if len(vnum) and len(vnum) >= len(vcode):
            t["slot"] = SLOT_NUM
            _numeric_bins(t, vnum, nb)
            t["decimals"] = _decimals(vnum)
        elif len(vcode):
            t["slot"] = SLOT_CAT
            t["cats"] = [c for c, _ in Counter(vcode).most_common(nb)]
            t["nbins"] = len(t["cats"])
            for extra in ("value_system", "value_display"):
                if extra in sub.columns:
                    m = (sub.assign(_v=sub["value_code"].astype(str))
                         .groupby("_v", observed=True)[extra].agg(_mode))
                    t[extra + "s"] = [_jsonable(m.get(c)) for c in t["cats"]]
    elif kind != "condition_abatement" and len(dur) >= 0.05 * n and len(dur):
        t["slot"] = SLOT_DUR
        _numeric_bins(t, np.log1p(dur), nb)
        if t.get("discrete"):
            t["values"] = [float(np.expm1(v)) for v in t["values"]]
        t["decimals"] = 6
    elif len(vnum) >= 0.05 * n and len(vnum):
        t["slot"] = SLOT_NUM
        _numeric_bins(t, vnum, nb)
        t["decimals"] = _decimals(vnum)
    return t


def _numeric_bins(t: dict, x: np.ndarray, nb: int) -> None:
    uniq = np.unique(x)
    if len(uniq) <= nb:
        t["discrete"] = True
        t["values"] = [float(v) for v in uniq]
        t["nbins"] = len(uniq)
        return
    # Quantile edges; the outer ones at 0.5 % / 99.5 % so no single extreme is copied.
    q = np.quantile(x, np.linspace(0.005, 0.995, nb + 1))
    edges = np.unique(q)
    if len(edges) < 2:
        edges = np.array([uniq[0], uniq[-1]])
    t["edges"] = [float(e) for e in edges]
    t["nbins"] = len(edges) - 1
