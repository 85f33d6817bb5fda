"""Batched, deterministic sampling of event sequences on numpy (float64).

Randomness is counter-based: patient key k and seed s give a Philox stream keyed by
BLAKE2b(s, k); step j of that patient always reads row j of its stream, so a patient's
events never depend on which other patients share the batch. The network runs in
float64 so that batched and single-row matrix products (which sum in different orders)
agree far below the resolution at which a draw could flip.

Coherence is enforced by masking before each draw (see docs/generators.md, "Event model").
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

from .constraints import code_matches, reference_days
from .encoding import (
    BOS, EOS, PAD, SLOT_CAT, SLOT_DUR, SLOT_NONE, SLOT_NUM, PatientEncoder, gap_to_bin,
)

N_DRAWS = 6  # token, gap bin, position in gap bin, value bin, position in value bin, tail code
NEG = -1e30


def patient_stream(seed: int, key: str, steps: int) -> np.ndarray:
    """The uniforms [steps, N_DRAWS] of one patient: a pure function of (seed, key)."""
    h = hashlib.blake2b(f"synthport-events\x00{int(seed)}\x00{key}".encode(), digest_size=16).digest()
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(h, "little")))
    return rng.random((steps, N_DRAWS))


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class Sampler:
    """Float64 copy of a fitted event model, ready to sample."""

    def __init__(self, params: dict[str, np.ndarray], meta: dict):
        p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        self.meta = meta
        self.H = H = p["gru.weight_hh_l0"].shape[1]
        W_ih = p["gru.weight_ih_l0"]
        # The step input is a sum of embeddings, so each is projected through W_ih once here.
        self.EI = p["tok_emb.weight"] @ W_ih.T
        self.GI = p["gap_emb.weight"] @ W_ih.T
        self.VI = p["val_emb.weight"] @ W_ih.T
        self.cond_W = W_ih @ p["cond.weight"]
        self.cond_b = W_ih @ p["cond.bias"] + p["gru.bias_ih_l0"]
        self.cont_W = (W_ih @ p["cont.weight"]).T
        self.W_hh_T = p["gru.weight_hh_l0"].T.copy()
        self.b_hh = p["gru.bias_hh_l0"]
        self.h0_W, self.h0_b = p["h0.weight"].T.copy(), p["h0.bias"]
        self.tok_W, self.tok_b = p["tok_head.weight"].T.copy(), p["tok_head.bias"]
        self.gap_W, self.gap_b, self.gap_U = p["gap_h.weight"].T.copy(), p["gap_h.bias"], p["gap_tok.weight"]
        self.gap_W2, self.gap_b2 = p["gap_out.weight"].T.copy(), p["gap_out.bias"]
        self.val_W, self.val_b, self.val_U = p["val_h.weight"].T.copy(), p["val_h.bias"], p["val_tok.weight"]
        self.val_W2, self.val_b2 = p["val_out.weight"].T.copy(), p["val_out.bias"]
        del H

        self.encoder = PatientEncoder(meta["encoder"])
        self.edges = np.asarray(meta["gap_edges"], float)
        self.tokens = toks = meta["vocab"]["tokens"]
        V = len(toks)
        self.V = V
        self.slot = np.array([t.get("slot", SLOT_NONE) for t in toks])
        self.nbins = np.array([t.get("nbins", 0) for t in toks])
        self.kind = [t.get("kind") for t in toks]
        self.before, self.after = (float(x) for x in meta["onset_window"])
        self.max_events = int(meta["max_events"])
        self.columns = meta["columns"]
        self.enc_kinds = set(meta["encounter_kinds"])

        base = np.ones(V, bool)
        base[[PAD, BOS]] = False
        for i, t in enumerate(toks):
            if t.get("other") and (not t.get("tail") or t["kind"] == "condition_abatement"):
                base[i] = False
        self.base_mask = base
        self.other_cdf = {i: np.cumsum([r["weight"] for r in t["tail"]], dtype=float)
                          for i, t in enumerate(toks) if t.get("other") and t.get("tail")}

        # Condition index C: every onset code of the vocabulary plus the table's flags.
        cidx: dict[tuple, int] = {}
        self.c_info: list[dict] = []

        def c_of(system, code, display=None, add=True):
            k = (system, code)
            if k not in cidx:
                if not add:
                    return -1
                cidx[k] = len(self.c_info)
                self.c_info.append({"system": system, "code": code, "display": display, "token": -1})
            return cidx[k]

        self.tok_c = np.full(V, -1)
        self.abate_c = np.full(V, -1)
        for i, t in enumerate(toks):
            if t.get("kind") == "condition_onset" and not t.get("other"):
                c = c_of(t["system"], t["code"], t.get("display"))
                self.tok_c[i] = c
                if self.c_info[c]["token"] < 0:
                    self.c_info[c]["token"] = i
        self.col_c = []
        for cd in meta["conditions"]:
            found = -1
            for (s, code), c in cidx.items():
                if code_matches(cd["code"], s, code):
                    found = c
                    break
            if found < 0:
                found = c_of(cd["system"], cd["code"], cd.get("display"))
            self.col_c.append(found)
        for i, t in enumerate(toks):
            if t.get("kind") == "condition_abatement" and not t.get("other"):
                self.abate_c[i] = c_of(t["system"], t["code"], t.get("display"))
        onset_other = next((i for i, t in enumerate(toks)
                            if t.get("other") and t["kind"] == "condition_onset"), BOS)
        self.c_tok = np.array([ci["token"] if ci["token"] >= 0 else onset_other for ci in self.c_info]
                              or [BOS])
        self.C = C = max(len(self.c_info), 1)
        self.on_tok = np.nonzero(self.tok_c >= 0)[0]
        self.ab_tok = np.nonzero(self.abate_c >= 0)[0]

        # Dependencies: token v may appear only once every condition in req[v] has begun.
        req = np.zeros((V, C))
        for d in meta["dependencies"]:
            c = cidx.get((d["cond_system"], d["cond_code"]))
            if c is None:
                continue
            for i, t in enumerate(toks):
                if (t.get("key") and t["kind"] == d["kind"] and t["system"] == d["system"]
                        and t["code"] == d["code"]):
                    req[i, c] = 1.0
        self.dep_tok = np.nonzero(req.any(axis=1))[0]
        self.req_T = req[self.dep_tok].T.copy()  # [C, n_dep]
        self.has_abatement = any(t.get("kind") == "condition_abatement" for t in toks)

    # ---------------------------------------------------------------- one batch

    def empty(self) -> pd.DataFrame:
        return pd.DataFrame({c: pd.Series(dtype=float if c in ("t_days", "value_num", "end_t_days")
                                          else object) for c in self.columns})

    def sample(self, rows: pd.DataFrame, pids: list[str], keys: list[str], seed: int) -> pd.DataFrame:
        B = len(rows)
        if B == 0:
            return self.empty()
        H, C, V = self.H, self.C, self.V
        x = self.encoder.transform(rows)
        ci = x @ self.cond_W.T + self.cond_b
        h = np.tanh(x @ self.h0_W + self.h0_b)
        ref = reference_days(rows).astype(float)
        finite = np.isfinite(ref)

        # Patient-table condition flags: 1 = must begin near T, 0 = must not begin.
        flag = np.full((B, C), -1.0)
        T = np.full((B, C), np.nan)
        for j, cd in enumerate(self.meta["conditions"]):
            c = self.col_c[j]
            f = pd.to_numeric(rows[cd["column"]], errors="coerce").to_numpy(float) \
                if cd["column"] in rows.columns else np.full(B, np.nan)
            known = ~np.isnan(f)
            flag[known, c] = (f[known] >= 0.5).astype(float)
            if cd["onset_age"] and cd["onset_age"] in rows.columns:
                a = pd.to_numeric(rows[cd["onset_age"]], errors="coerce").to_numpy(float) * 365.25
                T[:, c] = np.where(known & (f >= 0.5), np.clip(a, 0.0, ref), np.nan)
        static = np.broadcast_to(self.base_mask, (B, V)).copy()
        if len(self.on_tok):
            static[:, self.on_tok] &= flag[:, self.tok_c[self.on_tok]] != 0.0
        T_lo = np.where(np.isnan(T), -np.inf, T - self.before)
        T_dead = np.where(np.isnan(T), np.inf, T + self.after)
        T_key = np.where(np.isnan(T), 1e18, T)

        steps = self.max_events + C + 2
        U = np.stack([patient_stream(seed, k, steps) for k in keys])  # [B, steps, N_DRAWS]

        tok = np.full(B, BOS)
        gb = np.zeros(B, np.int64)
        vb = np.zeros(B, np.int64)
        t = np.zeros(B)
        seen = np.zeros((B, C), bool)
        active = np.zeros((B, C), bool)
        live = np.arange(B)
        out: list[list] = [[] for _ in range(B)]
        step = 0
        edges = self.edges
        n_gap = len(edges) - 1
        while len(live):
            L = live
            # GRU step (PyTorch gate order r, z, n).
            left = np.where(finite[L], np.clip((ref[L] - t) / 36525.0, -0.1, 1.5), 1.5)
            cont = np.stack([t / 36525.0, left, finite[L].astype(float)], axis=1)
            gi = self.EI[tok] + self.GI[gb] + self.VI[vb] + ci[L] + cont @ self.cont_W
            gh = h @ self.W_hh_T + self.b_hh
            r = _sigmoid(gi[:, :H] + gh[:, :H])
            z = _sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
            n = np.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
            h = (1.0 - z) * n + z * h
            u = U[L, min(step, steps - 1)]

            # Next token, masked by the coherence rules.
            allowed = static[L].copy()
            if len(self.ab_tok):
                allowed[:, self.ab_tok] &= active[:, self.abate_c[self.ab_tok]]
            if len(self.dep_tok):
                allowed[:, self.dep_tok] &= ((~seen).astype(float) @ self.req_T) < 0.5
            if len(self.on_tok):
                oc = self.tok_c[self.on_tok]
                pend = (flag[L][:, oc] == 1.0) & ~seen[:, oc]
                allowed[:, self.on_tok] &= ~pend | (t[:, None] >= T_lo[L][:, oc])
            if step >= self.max_events:
                allowed[:] = False
            allowed[:, EOS] = True
            logits = np.where(allowed, h @ self.tok_W + self.tok_b, NEG)
            new_tok = _draw(logits, u[:, 0])

            # Gap of that token, never past the bound (or a pending onset's window).
            maxgap = np.where(finite[L], ref[L] - t, np.inf)
            c_new = self.tok_c[new_tok]
            pend_new = (c_new >= 0) & (flag[L, np.maximum(c_new, 0)] == 1.0) & ~seen[np.arange(len(L)), np.maximum(c_new, 0)]
            lim = np.where(pend_new, T_dead[L, np.maximum(c_new, 0)] - t, np.inf)
            maxgap = np.maximum(np.minimum(maxgap, lim), 0.0)
            gl = np.maximum(h @ self.gap_W + self.gap_b + self.gap_U[new_tok], 0.0) @ self.gap_W2 + self.gap_b2
            gl = np.where(edges[None, :n_gap] <= maxgap[:, None], gl, NEG)
            gbin = _draw(gl, u[:, 1])
            lo = edges[gbin]
            hi = np.minimum(edges[gbin + 1], maxgap)
            with np.errstate(divide="ignore", invalid="ignore"):
                # Log-uniform inside a log-spaced bin; linear in the sub-minute bin.
                gap = np.where(gbin == 0, 0.0,
                               np.where(gbin == 1, lo + u[:, 2] * (hi - lo),
                                        np.exp(np.log(lo) + u[:, 2] * (np.log(np.maximum(hi, lo)) - np.log(lo)))))
            t_new = np.where(new_tok == EOS, np.inf, t + gap)

            # A flagged condition whose window is about to pass (or the end) is inserted now.
            pending = (flag[L] == 1.0) & ~seen
            forced = np.full(len(L), -1)
            if pending.any():
                dl = np.where(pending, T_dead[L], np.inf).min(axis=1)
                trig = pending.any(axis=1) & ((t_new > dl) | (new_tok == EOS))
                for r_ in np.nonzero(trig)[0]:
                    keyv = np.where(pending[r_], T_key[L[r_]], np.inf)
                    c = int(np.argmin(keyv))
                    Tc = T[L[r_], c]
                    forced[r_] = c
                    new_tok[r_] = self.c_tok[c]
                    t_new[r_] = t[r_] if np.isnan(Tc) else max(t[r_], Tc)

            # Value of the event.
            vl = np.maximum(h @ self.val_W + self.val_b + self.val_U[new_tok], 0.0) @ self.val_W2 + self.val_b2
            nbv = np.where(forced >= 0, 0, self.nbins[new_tok])
            vl = np.where(np.arange(vl.shape[1])[None, :] <= nbv[:, None], vl, NEG)
            vbin = np.where(nbv > 0, _draw(vl, u[:, 3]), 0)

            done = (new_tok == EOS) & (forced < 0)
            for r_ in np.nonzero(~done)[0]:
                out[L[r_]].append((int(new_tok[r_]), float(t_new[r_]), int(vbin[r_]),
                                   float(u[r_, 4]), float(u[r_, 5]), int(forced[r_])))
            # State for the next step.
            c_all = np.where(forced >= 0, forced, self.tok_c[new_tok])
            rows_on = np.nonzero((c_all >= 0) & ~done)[0]
            seen[rows_on, c_all[rows_on]] = True
            active[rows_on, c_all[rows_on]] = True
            rows_ab = np.nonzero(self.abate_c[new_tok] >= 0)[0]
            active[rows_ab, self.abate_c[new_tok[rows_ab]]] = False
            keep = ~done
            t_fin = np.where(done, t, t_new)
            gb = gap_to_bin(t_fin - t, edges)[keep]
            t = t_fin[keep]
            tok, vb, h = new_tok[keep], vbin[keep], h[keep]
            seen, active = seen[keep], active[keep]
            live = live[keep]
            step += 1
        return self._frame(out, pids, ref)

    # ---------------------------------------------------------------- decoding

    def _frame(self, out: list[list], pids: list[str], ref: np.ndarray) -> pd.DataFrame:
        recs = []
        toks = self.tokens
        for p, seq, bound in zip(pids, out, ref):
            enc = None  # [record, open-until]
            open_onsets: dict[tuple, dict] = {}
            for j, (tk, t, vbin, uv, ut, forced) in enumerate(seq):
                info = toks[tk]
                kind = info.get("kind")
                rec = {"patient_id": p, "event_id": f"{p}-e{j}", "kind": kind, "t_days": t,
                       "system": info.get("system"), "code": info.get("code"),
                       "display": info.get("display"), "value_num": np.nan,
                       "value_code": info.get("value_code"), "unit": info.get("unit"),
                       "encounter_id": None, "end_t_days": np.nan,
                       "modality": info.get("modality"), "body_site": info.get("body_site")}
                if forced >= 0:
                    ci = self.c_info[forced]
                    kind = rec["kind"] = "condition_onset"
                    rec.update(system=ci["system"], code=ci["code"], display=ci["display"],
                               value_code=None, unit=None, modality=None, body_site=None)
                elif info.get("other"):
                    cdf = self.other_cdf[tk]
                    row = info["tail"][int(np.searchsorted(cdf, ut * cdf[-1], side="right").clip(0, len(cdf) - 1))]
                    k = row["key"]
                    rec.update(system=k[1], code=k[2], value_code=k[3], modality=k[4], body_site=k[5],
                               display=row.get("display"), unit=row.get("unit"))
                elif vbin > 0:
                    self._decode_value(rec, info, vbin, uv, bound)
                if kind == "encounter":
                    end = rec["end_t_days"]
                    enc = [rec, t if np.isnan(end) else end]
                elif enc is not None and kind in self.enc_kinds and t <= enc[1] + 1.0:
                    rec["encounter_id"] = enc[0]["event_id"]
                    if not np.isnan(enc[0]["end_t_days"]) and t > enc[0]["end_t_days"]:
                        enc[0]["end_t_days"] = t
                if kind == "condition_onset" and self.has_abatement:
                    rec["end_t_days"] = np.nan
                    open_onsets[(rec["system"], rec["code"])] = rec
                elif kind == "condition_abatement":
                    o = open_onsets.pop((rec["system"], rec["code"]), None)
                    if o is not None:
                        o["end_t_days"] = t
                recs.append(rec)
        if not recs:
            return self.empty()
        df = pd.DataFrame.from_records(recs)
        for c in self.columns:
            if c not in df.columns:
                df[c] = None
        return df[self.columns]

    @staticmethod
    def _decode_value(rec: dict, info: dict, vbin: int, u: float, bound: float) -> None:
        slot = info["slot"]
        if slot == SLOT_CAT:
            rec["value_code"] = info["cats"][vbin - 1]
            return
        if info.get("discrete"):
            v = float(info["values"][vbin - 1])
        else:
            lo, hi = info["edges"][vbin - 1], info["edges"][vbin]
            v = lo + u * (hi - lo)
            if slot == SLOT_DUR:
                v = math.expm1(v)
        if slot == SLOT_NUM:
            rec["value_num"] = round(v, int(info.get("decimals", 2)))
        elif slot == SLOT_DUR:
            end = rec["t_days"] + max(v, 0.0)
            rec["end_t_days"] = min(end, bound) if math.isfinite(bound) else end


def _draw(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw of one category per row from (masked) logits."""
    m = logits.max(axis=1, keepdims=True)
    p = np.exp(logits - m)
    cdf = np.cumsum(p, axis=1)
    # u may be exactly 0: aim just above 0 so a masked (zero-mass) first entry is never hit.
    k = (cdf < (np.maximum(u, 1e-12) * cdf[:, -1])[:, None]).sum(axis=1)
    return np.minimum(k, logits.shape[1] - 1)
