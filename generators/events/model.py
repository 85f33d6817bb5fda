"""``EventModel``: fit / sample / save / load of the event-sequence generator.

Training uses torch (:mod:`.net`); sampling runs on float64 numpy copies of the weights
(:mod:`.sampler`), so serving needs neither torch nor a GPU, and the per-patient result
does not depend on the batch it was sampled in.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import sampler as _sampler
from .constraints import (
    EVENT_COLUMNS, code_matches, condition_columns, learn_dependencies, onset_window,
    patient_ids, recurring_conditions, reference_days, sort_events,
)
from .encoding import (
    BOS, EOS, N_SPECIAL, PAD, SLOT_NONE, PatientEncoder, Vocabulary, event_keys, gap_class,
    gap_edges,
)

FORMAT = "synthport-event-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "model.json"


class EventModelError(Exception):
    """Bad input tables, an unfitted model or an unreadable saved model."""


class EventModel:
    """Autoregressive generator of a patient's event table, conditioned on the patient row.

    Args:
        hidden: GRU state size.
        d_in: embedding size of a step's input.
        max_per_kind: most codes per event kind kept as tokens (the rest share "other").
        min_patients: least number of patients a code needs to become a token.
        n_value_bins: value bins per observation code (quantiles) or categories.
        n_gap_bins: time-gap bins.
        min_dependency_support: patients needed before "A always follows condition C" is
            enforced.
        max_train_len: longer histories are cut to their first events for training.
        chunk_len: steps per truncated-backpropagation chunk.
    """

    def __init__(self, hidden: int = 192, d_in: int = 96, max_per_kind: int = 200,
                 min_patients: int = 2, n_value_bins: int = 16, n_gap_bins: int = 96,
                 min_dependency_support: int = 3, max_train_len: int = 20000,
                 chunk_len: int = 512):
        self.config = {
            "hidden": hidden, "d_in": d_in, "d_head": 64, "max_per_kind": max_per_kind,
            "min_patients": min_patients, "n_value_bins": n_value_bins, "n_gap_bins": n_gap_bins,
            "min_dependency_support": min_dependency_support, "max_train_len": max_train_len,
            "chunk_len": chunk_len,
        }
        self.params: dict[str, np.ndarray] | None = None
        self.meta: dict = {}
        self._sampler: _sampler.Sampler | None = None

    # ------------------------------------------------------------------ fit

    def fit(self, patients_df: pd.DataFrame, events_df: pd.DataFrame, epochs: int = 20,
            device: str = "cpu", progress: bool = True, batch_size: int = 16, lr: float = 3e-3,
            seed: int = 0) -> "EventModel":
        """Trains on a patient table and its event table.

        Args:
            patients_df: one row per patient (``patient_id`` column or index).
            events_df: events of those patients (see ``constraints.EVENT_COLUMNS``).
            epochs: passes over the patients.
            device: ``"cpu"`` or ``"cuda"``.
            progress: show a progress bar.
            batch_size: patients per step.
            lr: Adam learning rate.
            seed: torch seed for initialisation and batch order.
        """
        import torch

        from .net import N_CONT, EventNet

        t_start = time.perf_counter()
        patients = patients_df.reset_index() if "patient_id" not in patients_df.columns \
            and patients_df.index.name == "patient_id" else patients_df.reset_index(drop=True)
        pids = patient_ids(patients)
        if pids.duplicated().any():
            raise EventModelError("patient table has duplicate patient_id values")
        events = _normalise_events(events_df)
        events = events[events["patient_id"].isin(set(pids))]
        if events.empty:
            raise EventModelError("no events belong to the patients of the patient table")
        events = sort_events(events)
        cfg = self.config
        keys = event_keys(events)
        vocab = Vocabulary.fit(events, keys, cfg["min_patients"], cfg["max_per_kind"],
                               cfg["n_value_bins"])
        conds = self._condition_meta(patients, events)
        _exclude_controlled_tails(vocab, conds)
        tok = vocab.encode(keys)
        vb = vocab.value_bins(events, tok)
        enc = PatientEncoder().fit(patients)
        cond_x = enc.transform(patients)
        ref = reference_days(patients)
        edges = gap_edges(cfg["n_gap_bins"])

        t = events["t_days"].to_numpy(float)
        grp = events.groupby("patient_id", sort=False, observed=True).indices
        seqs = []
        for i, p in enumerate(pids):
            idx = grp.get(p)
            idx = np.array([], dtype=np.int64) if idx is None else idx[: cfg["max_train_len"]]
            seqs.append((i, idx))
        lengths = np.array([len(ix) for _, ix in seqs])
        T_pend = _flagged_onsets(patients, events, conds, ref)
        slot = np.array([tk.get("slot", SLOT_NONE) for tk in vocab.tokens])
        n_val = cfg["n_value_bins"] + 1

        def build(batch):
            L = max(len(ix) for _, ix in batch) + 1
            B = len(batch)
            tin = np.full((B, L), PAD); gin = np.zeros((B, L), np.int64); vin = np.zeros((B, L), np.int64)
            cont = np.zeros((B, L, N_CONT), np.float32)
            tout = np.full((B, L), -100); gout = np.full((B, L), -100); vout = np.full((B, L), -100)
            cx = np.zeros((B, cond_x.shape[1]), np.float32)
            for r, (i, ix) in enumerate(batch):
                n = len(ix)
                tt = np.concatenate([[0.0], t[ix]])
                gb = gap_class(tt[:-1], tt[1:], ref[i], edges, first=np.arange(n) == 0)
                tin[r, : n + 1] = np.concatenate([[BOS], tok[ix]])
                gin[r, 1: n + 1] = gb
                vin[r, 1: n + 1] = vb[ix]
                # Onset time of the next flagged condition not yet begun before step s.
                t_next = np.full(n + 1, np.inf)
                for T_c, pos in T_pend.get(pids[i], ()):
                    s_idx = np.arange(n + 1)
                    t_next = np.where(s_idx <= pos, np.minimum(t_next, T_c), t_next)
                cont[r, : n + 1] = _cont_features(tt, ref[i], t_next)
                truncated = len(grp.get(pids[i], ())) > n
                tout[r, :n] = tok[ix]
                if not truncated:
                    tout[r, n] = EOS
                gout[r, :n] = gb
                vout[r, :n] = np.where(slot[tok[ix]] == SLOT_NONE, -100, vb[ix])
                cx[r] = cond_x[i]
            as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
            return [as_t(a) for a in (tin, gin, vin, cont, cx, tout, gout, vout)]

        torch.manual_seed(seed)
        net = EventNet(len(vocab), 2 * (len(edges) - 1), n_val, cond_x.shape[1], cfg["d_in"],
                       cfg["hidden"], cfg["d_head"]).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        order = np.argsort(lengths, kind="stable")
        batches = [[seqs[j] for j in order[k: k + batch_size]] for k in range(0, len(order), batch_size)]
        built = [build(b) for b in batches]
        gen = np.random.default_rng(seed)
        chunk = int(cfg["chunk_len"])
        total_steps = max(20, epochs * sum(-(-b[0].shape[1] // chunk) for b in built))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                    pct_start=0.1)
        ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
        history = []
        bar = _progress(range(epochs), progress)
        for _ in bar:
            net.train()
            tot, cnt = 0.0, 0
            for bi in gen.permutation(len(built)):
                tin, gin, vin, cont, cx, tout, gout, vout = built[bi]
                tok_next = torch.clamp(tout, min=0)
                h = None
                # Truncated backpropagation through time: long histories are trained in
                # chunks, the state carried over (detached) from one chunk to the next.
                for a in range(0, tin.shape[1], chunk):
                    sl = slice(a, a + chunk)
                    lt, lg, lv, h = net(tin[:, sl], gin[:, sl], vin[:, sl], cont[:, sl], cx,
                                        tok_next[:, sl], h)
                    h = h.detach()
                    loss = 0.0
                    # A chunk may hold no target of a head (padding, only the end): skip it
                    # rather than average over nothing (NaN).
                    for logits, target in ((lt, tout[:, sl]), (lg, gout[:, sl]), (lv, vout[:, sl])):
                        if bool((target >= 0).any()):
                            loss = loss + ce(logits.flatten(0, 1), target.flatten())
                    if not torch.is_tensor(loss):
                        continue
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    tot += float(loss.detach())
                    cnt += 1
            history.append(tot / max(cnt, 1))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{history[-1]:.3f}")

        self.params = {k: v.detach().cpu().float().numpy() for k, v in net.state_dict().items()}
        enc_share = (events.assign(_m=events["encounter_id"].notna())
                     .groupby("kind", observed=True)["_m"].mean().to_dict())
        self.meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "config": cfg,
            "n_cond": int(cond_x.shape[1]), "n_val": n_val,
            "vocab": vocab.to_json(), "encoder": enc.to_json(),
            "gap_edges": [float(e) for e in edges],
            "dependencies": learn_dependencies(events, cfg["min_dependency_support"]),
            "recurring_conditions": [list(k) for k in recurring_conditions(events)],
            "conditions": conds,
            "onset_window": list(onset_window(_onset_values(patients, conds))),
            "encounter_kinds": sorted(k for k, v in enc_share.items() if v >= 0.5 and k != "encounter"),
            "columns": _output_columns(events_df),
            "max_events": int(min(1.25 * lengths.max() + 8, 1.25 * cfg["max_train_len"])),
            "training": {"patients": int(len(pids)), "events": int(len(events)), "epochs": epochs,
                         "device": device, "loss": history,
                         "seconds": round(time.perf_counter() - t_start, 3)},
        }
        self._sampler = None
        return self

    @staticmethod
    def _condition_meta(patients: pd.DataFrame, events: pd.DataFrame) -> list[dict]:
        """The patient table's condition flags with the system/display their events use."""
        on = events[events["kind"] == "condition_onset"]
        codes = on[["system", "code", "display"]].drop_duplicates(["system", "code"])
        out = []
        for c in condition_columns(patients):
            sys_, disp, code = None, None, c.code
            for r in codes.itertuples(index=False):
                if code_matches(c.code, r.system, r.code):
                    sys_, code = _plain(r.system), str(r.code)
                    disp = _plain(r.display)
                    break
            out.append({"column": c.flag, "onset_age": c.onset_age, "system": sys_, "code": code,
                        "display": disp})
        return out

    # ------------------------------------------------------------------ sample

    def sample(self, patient_rows: pd.DataFrame, seed: int = 0, keys=None,
               batch_size: int = 256) -> pd.DataFrame:
        """Events for each patient row, ordered by patient (row order) then ``t_days``.

        Patient i's events are a pure function of (model, seed, key_i, row_i), where
        key_i is ``keys[i]`` if given, else the row's ``patient_id``; batching does not
        change them.
        """
        self._require_fitted()
        rows = patient_rows.reset_index() if "patient_id" not in patient_rows.columns \
            and patient_rows.index.name == "patient_id" else patient_rows.reset_index(drop=True)
        pids = patient_ids(rows).tolist()
        keys = pids if keys is None else [str(k) for k in keys]
        if len(keys) != len(rows):
            raise EventModelError("keys must have one entry per patient row")
        s = self._get_sampler()
        frames = []
        for k in range(0, len(rows), batch_size):
            part = rows.iloc[k: k + batch_size]
            frames.append(s.sample(part, pids[k: k + batch_size], keys[k: k + batch_size], seed))
        if not frames:
            return s.empty()
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]

    def _get_sampler(self) -> "_sampler.Sampler":
        if self._sampler is None:
            self._sampler = _sampler.Sampler(self.params, self.meta)
        return self._sampler

    def _require_fitted(self) -> None:
        if self.params is None:
            raise EventModelError("the event model is not fitted")

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Writes ``weights.safetensors`` (the state_dict) and ``model.json``."""
        from safetensors.numpy import save_file

        self._require_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.params.items()}, str(d / WEIGHTS_FILE))
        (d / META_FILE).write_text(json.dumps(self.meta, indent=1, default=_json_default))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "EventModel":
        """Reads a model written by :meth:`save` (safetensors + JSON; nothing is unpickled)."""
        from safetensors.numpy import load_file

        d = Path(directory)
        try:
            meta = json.loads((d / META_FILE).read_text())
            params = load_file(str(d / WEIGHTS_FILE))
        except (OSError, ValueError) as exc:
            raise EventModelError(f"cannot read event model in {d}: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise EventModelError(f"{d} does not hold a synthport event model")
        if meta.get("version", 0) > FORMAT_VERSION:
            raise EventModelError(f"event model format {meta['version']} is newer than this synthport")
        m = cls(**{k: v for k, v in meta["config"].items() if k != "d_head"})
        m.config = meta["config"]
        m.params, m.meta = params, meta
        return m

    def to_torch(self, device: str = "cpu"):
        """The network as a torch module with the fitted weights (for further training)."""
        import torch

        from .net import EventNet

        self._require_fitted()
        c, mt = self.config, self.meta
        net = EventNet(len(mt["vocab"]["tokens"]), 2 * (len(mt["gap_edges"]) - 1), mt["n_val"], mt["n_cond"],
                       c["d_in"], c["hidden"], c["d_head"])
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.params.items()})
        return net.to(device)


def _cont_features(t: np.ndarray, ref: float, t_next: np.ndarray) -> np.ndarray:
    """Continuous step features (see ``net.N_CONT``); the sampler computes the same."""
    t = np.asarray(t, float)
    finite = math.isfinite(ref)
    left = np.clip((ref - t) / 36525.0, -0.1, 1.5) if finite else np.full_like(t, 1.5)
    has, d, e = pending_features(t, t_next, ref)
    return np.stack([t / 36525.0, left, np.full_like(t, float(finite)), has, d, e], axis=-1)


def pending_features(t: np.ndarray, t_next: np.ndarray, ref) -> tuple[np.ndarray, ...]:
    """(a flagged onset is pending, years until it / 10 (clipped), its distance before the
    reference in centuries) for times ``t``."""
    has = np.isfinite(t_next)
    with np.errstate(invalid="ignore"):
        d = np.where(has, np.clip((t_next - t) / 365.25, -2.0, 10.0) / 10.0, 0.0)
        e = np.where(has & np.isfinite(ref), (ref - t_next) / 36525.0, 0.0)
    return has.astype(float), d, e


def _flagged_onsets(patients: pd.DataFrame, events: pd.DataFrame, conds: list[dict],
                    ref: np.ndarray) -> dict[str, list[tuple[float, float]]]:
    """Per patient: (onset day from the row, position of that first onset in the sequence).

    Only flags set to 1 with a known onset age count; the position is ``inf`` when the
    sequence lacks the onset. Onset days are clipped to [0, reference] as when sampling.
    """
    out: dict[str, list] = {}
    if not conds:
        return out
    pids = patient_ids(patients)
    pos = events.groupby("patient_id", sort=False, observed=True).cumcount().to_numpy()
    on = events[events["kind"] == "condition_onset"]
    # First position of each (patient, system, code) onset, then matched to the flags.
    fp = pd.DataFrame({"p": on["patient_id"].to_numpy(), "s": on["system"].astype(object).to_numpy(),
                       "c": on["code"].astype(object).to_numpy(), "pos": pos[on.index]})
    fp = (fp.groupby(["p", "s", "c"], sort=False, dropna=False, observed=True)["pos"].min()
          .reset_index())
    for cd in conds:
        if not cd["onset_age"] or cd["column"] not in patients.columns:
            continue
        flag = pd.to_numeric(patients[cd["column"]], errors="coerce").to_numpy(float)
        age = pd.to_numeric(patients[cd["onset_age"]], errors="coerce").to_numpy(float)
        pairs = fp[["s", "c"]].drop_duplicates()
        ok = {(a, b) for a, b in zip(pairs["s"], pairs["c"]) if code_matches(cd["code"], a, b)}
        sel = fp[[(a, b) in ok for a, b in zip(fp["s"], fp["c"])]] if ok else fp.iloc[:0]
        first = sel.groupby("p", observed=True)["pos"].min()
        for i, p in enumerate(pids):
            if flag[i] >= 0.5 and not np.isnan(age[i]):
                T = float(np.clip(age[i] * 365.25, 0.0, ref[i]))
                out.setdefault(p, []).append((T, float(first.get(p, np.inf))))
    return out


def _normalise_events(events: pd.DataFrame) -> pd.DataFrame:
    missing = {"patient_id", "kind", "t_days"} - set(events.columns)
    if missing:
        raise EventModelError(f"event table lacks columns {sorted(missing)}")
    ev = events.copy()
    for c in EVENT_COLUMNS:
        if c not in ev.columns:
            ev[c] = None
    ev["patient_id"] = ev["patient_id"].astype(str)
    ev["kind"] = ev["kind"].astype(str)
    ev["t_days"] = pd.to_numeric(ev["t_days"], errors="coerce")
    ev = ev[ev["t_days"].notna()]
    for c in ("system", "code", "display", "value_code", "unit", "modality", "body_site", "encounter_id"):
        ev[c] = ev[c].astype(object).where(ev[c].notna(), None)
    return ev.reset_index(drop=True)


def _output_columns(events_df: pd.DataFrame) -> list[str]:
    cols = [str(c) for c in events_df.columns]
    return cols + [c for c in EVENT_COLUMNS if c not in cols]


def _onset_values(patients: pd.DataFrame, conds: list[dict]) -> np.ndarray:
    cols = [c["onset_age"] for c in conds if c["onset_age"]]
    if not cols:
        return np.array([])
    return pd.to_numeric(patients[cols].stack(), errors="coerce").dropna().to_numpy(float)


def _exclude_controlled_tails(vocab: Vocabulary, conds: list[dict]) -> None:
    """Condition codes the patient table controls are never drawn through "other"."""
    for tk in vocab.tokens:
        if tk.get("other") and tk["kind"] in ("condition_onset", "condition_abatement"):
            tk["tail"] = [r for r in tk["tail"]
                          if not any(code_matches(c["code"], r["key"][1], r["key"][2]) for c in conds)]


def _plain(v):
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    return str(v)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _progress(it, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, desc="event model", unit="epoch")


__all__ = ["EventModel", "EventModelError", "N_SPECIAL"]
