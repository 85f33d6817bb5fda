"""Batched, deterministic sampling of event sequences on numpy (float64).

Randomness is counter-based: patient key k and seed s give a Philox stream keyed by
BLAKE2b(s, k); step j of that patient always reads row j of its stream, so a patient's
events never depend on which other patients share the batch. The network runs in
float64 so that batched and single-row matrix products (which sum in different orders)
agree far below the resolution at which a draw could flip.

Coherence is enforced by masking before each draw (see docs/generators.md, "Event model").
"""
from __future__ import annotations

import bisect
import hashlib
import math

import numpy as np
import pandas as pd

from .constraints import code_matches, floats, reference_days
from .encoding import (
    BOS, CARRIED, EOS, PAD, SLOT_CAT, SLOT_DUR, SLOT_NONE, SLOT_NUM, PatientEncoder,
)

N_DRAWS = 6  # token, gap bin, position in gap bin, value bin, position in value bin, tail code
NEG = -1e30


def patient_stream(seed: int, key: str, steps: int) -> np.ndarray:
    """The uniforms [steps, N_DRAWS] of one patient: a pure function of (seed, key)."""
    h = hashlib.blake2b(f"synthport-events\x00{int(seed)}\x00{key}".encode(), digest_size=16).digest()
    rng = np.random.Generator(np.random.Philox(key=int.from_bytes(h, "little")))
    return rng.random((steps, N_DRAWS))


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
        # One product per step: the new state feeds the three heads and the next step's
        # recurrent term, so their weights are stacked [tok | gap | val | hh].
        V = self.tok_W.shape[1]
        dh = self.gap_W.shape[1]
        self.W_cat = np.ascontiguousarray(np.concatenate([self.tok_W, self.gap_W, self.val_W, self.W_hh_T], 1))
        self.b_cat = np.concatenate([self.tok_b, self.gap_b, self.val_b, self.b_hh])
        self.s_tok, self.s_gap, self.s_val, self.s_hh = (
            slice(0, V), slice(V, V + dh), slice(V + dh, V + 2 * dh), slice(V + 2 * dh, V + 2 * dh + 3 * H))
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
        # A condition that never began again while active in training stays so.
        recurring = {tuple(k) for k in meta.get("recurring_conditions", [])}
        self.no_reonset = np.array([(ci["system"], ci["code"]) not in recurring for ci in self.c_info] or [True])
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
        self._val_range = np.arange(self.val_b2.shape[0])
        self._n_gap = len(self.edges) - 1
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
        # One object array for all columns: far cheaper than per-column access on a wide
        # patient table (hundreds of columns) when sampling one patient.
        arr = rows.to_numpy(dtype=object)
        cols = {c: arr[:, j] for j, c in enumerate(rows.columns)}
        x = self.encoder.transform(cols)
        h = np.tanh(x @ self.h0_W + self.h0_b)
        Z = h @ self.W_cat + self.b_cat
        ref = ref_all = reference_days(cols).astype(float)
        finite = np.isfinite(ref)
        gi_const = x @ self.cond_W.T + self.cond_b + finite[:, None].astype(float) * self.cont_W[2]
        W_age, W_left, W_has, W_next, W_before = (self.cont_W[0] / 36525.0, self.cont_W[1], self.cont_W[3],
                                                  self.cont_W[4], self.cont_W[5])

        # Patient-table condition flags: 1 = must begin near T, 0 = must not begin.
        flag = np.full((B, C), -1.0)
        T = np.full((B, C), np.nan)
        for j, cd in enumerate(self.meta["conditions"]):
            c = self.col_c[j]
            f = floats(cols[cd["column"]]) if cd["column"] in cols else np.full(B, np.nan)
            known = ~np.isnan(f)
            flag[known, c] = (f[known] >= 0.5).astype(float)
            if cd["onset_age"] and cd["onset_age"] in cols:
                a = floats(cols[cd["onset_age"]]) * 365.25
                T[:, c] = np.where(known & (f >= 0.5), np.clip(a, 0.0, ref), np.nan)
        allowed0 = np.broadcast_to(self.base_mask, (B, V)).copy()
        if len(self.on_tok):
            allowed0[:, self.on_tok] &= flag[:, self.tok_c[self.on_tok]] != 0.0
        has_flags = bool((flag == 1.0).any())
        T_lo = np.where(np.isnan(T), -np.inf, T - self.before)
        T_dead = np.where(np.isnan(T), np.inf, T + self.after)
        T_key = np.where(np.isnan(T), 1e18, T)
        pend_any = (flag == 1.0)
        T_known = np.where(np.isnan(T), np.inf, T)
        has_known = bool(np.isfinite(np.where(pend_any, T_known, np.inf)).any())

        steps = self.max_events + C + 2
        if B == 1:
            # One patient (a cold record of a cohort): the same draws without the batch's
            # per-row arrays (tested equal to the batch in test_event_model).
            seq = self._run_one(patient_stream(seed, keys[0], steps), h[0], Z[0], ref[0], bool(finite[0]),
                                gi_const[0], allowed0[0], T[0], T_lo[0], T_dead[0], T_key[0],
                                pend_any[0], T_known[0], has_flags, has_known)
            return self._frame([seq], pids, ref_all)
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
        edges_lo, edges_hi = edges[:n_gap], edges[1:]
        ab_tok, ab_c = self.ab_tok, self.abate_c[self.ab_tok]
        dep_tok, req_T = self.dep_tok, self.req_T
        on_tok, on_c = self.on_tok, self.tok_c[self.on_tok]
        no_reonset_on = self.no_reonset[on_c]
        tok_c, abate_c, nbins, c_tok = self.tok_c, self.abate_c, self.nbins, self.c_tok
        s_tok, s_gap, s_val, s_hh = self.s_tok, self.s_gap, self.s_val, self.s_hh
        max_events = self.max_events
        rows_idx = np.arange(B)
        dirty = True
        # log(0) in bin 0 is replaced by a linear draw; keep numpy quiet about it.
        with np.errstate(divide="ignore", invalid="ignore"):
            while len(live):
                n_live = len(live)
                # GRU step (PyTorch gate order r, z, n); the cont features enter linearly.
                left = np.where(finite, np.minimum(np.maximum((ref - t) / 36525.0, -0.1), 1.5), 1.5)
                gi = self.EI[tok] + self.GI[gb] + self.VI[vb] + gi_const
                gi += t[:, None] * W_age + left[:, None] * W_left
                if dirty:
                    # Masks that change only with the set of begun/active conditions.
                    state_ok = allowed0.copy()
                    if len(ab_tok):
                        state_ok[:, ab_tok] &= active[:, ab_c]
                    if len(dep_tok):
                        state_ok[:, dep_tok] &= ((~seen) @ req_T) < 0.5
                    if len(on_tok):
                        state_ok[:, on_tok] &= ~(active[:, on_c] & no_reonset_on)
                    pending = pend_any & ~seen if has_flags else None
                    any_pending = has_flags and bool(pending.any())
                    dirty = False
                if any_pending and has_known:
                    # Same features as training (model.pending_features), inlined for speed.
                    t_next = np.where(pending, T_known, np.inf).min(axis=1)
                    has = np.isfinite(t_next)
                    d = np.where(has, np.minimum(np.maximum((t_next - t) / 365.25, -2.0), 10.0) / 10.0, 0.0)
                    e = np.where(has & finite, (ref - t_next) / 36525.0, 0.0)
                    gi += has[:, None] * W_has + d[:, None] * W_next + e[:, None] * W_before
                gh = Z[:, s_hh]
                rz = 0.5 + 0.5 * np.tanh(0.5 * (gi[:, :2 * H] + gh[:, :2 * H]))  # sigmoid
                n = np.tanh(gi[:, 2 * H:] + rz[:, :H] * gh[:, 2 * H:])
                h = n + rz[:, H:] * (h - n)
                Z = h @ self.W_cat + self.b_cat
                u = U[:, min(step, steps - 1)]

                # Next token, masked by the coherence rules.
                if step >= max_events:
                    allowed = np.zeros((n_live, V), bool)
                else:
                    allowed = state_ok.copy()
                    if any_pending and len(on_tok):
                        allowed[:, on_tok] &= ~pending[:, on_c] | (t[:, None] >= T_lo[:, on_c])
                allowed[:, EOS] = True
                new_tok = _draw(Z[:, s_tok], allowed, u[:, 0])
                is_eos = new_tok == EOS

                # Time of that token (see encoding.gap_class): a forward gap, or a distance back
                # from the reference; never past the bound nor a pending onset's window.
                t_max = ref
                if any_pending:
                    c_new = np.maximum(tok_c[new_tok], 0)
                    r_ = rows_idx[:n_live]
                    pend_new = (tok_c[new_tok] >= 0) & pending[r_, c_new]
                    if pend_new.any():
                        t_max = np.minimum(ref, np.where(pend_new, T_dead[r_, c_new], np.inf))
                gmax = np.maximum(t_max - t, 0.0)
                xmax = np.where(finite, np.maximum(ref - t, 0.0), 0.0)
                xmin = np.where(finite, np.maximum(ref - t_max, 0.0), 0.0)
                gl = np.maximum(Z[:, s_gap] + self.gap_U[new_tok], 0.0) @ self.gap_W2 + self.gap_b2
                fwd_ok = edges_lo <= gmax[:, None]
                if step == 0:
                    fwd_ok &= ~finite[:, None]  # the first event is placed back from the reference
                ok = np.concatenate([fwd_ok,
                                     (edges_lo <= xmax[:, None]) & (edges_hi >= xmin[:, None])
                                     & finite[:, None]], axis=1)
                cls = _draw(gl, ok, u[:, 1])
                is_b = cls >= n_gap
                k = cls - n_gap * is_b
                lo = np.where(is_b, np.maximum(edges[k], xmin), edges[k])
                hi = np.maximum(np.minimum(edges[k + 1], np.where(is_b, xmax, gmax)), lo)
                # Log-uniform inside a log-spaced bin; linear in the sub-minute bin and bin 0.
                lo_l = np.log(lo)  # -inf in bin 0, replaced below
                v = np.exp(lo_l + u[:, 2] * (np.log(hi) - lo_l))
                small = k <= 1
                if small.any():
                    v = np.where(small, lo + u[:, 2] * (hi - lo), v)
                    # Forward bin 0 is "the same instant": exactly no gap.
                    v = np.where((k == 0) & ~is_b, 0.0, v)
                t_new = np.where(is_b, ref - v, t + v)
                t_new = np.where(is_eos, np.inf, np.minimum(np.maximum(t_new, t), t_max))

                # A flagged condition whose window is about to pass (or the end) is inserted now.
                forced = np.full(n_live, -1)
                if any_pending:
                    dl = np.where(pending, T_dead, np.inf).min(axis=1)
                    trig = pending.any(axis=1) & ((t_new > dl) | is_eos)
                    for r in np.nonzero(trig)[0]:
                        c = int(np.argmin(np.where(pending[r], T_key[r], np.inf)))
                        forced[r] = c
                        new_tok[r] = c_tok[c]
                        t_new[r] = t[r] if np.isnan(T[r, c]) else max(t[r], T[r, c])
                    is_eos = new_tok == EOS

                # Value of the event.
                nbv = np.where(forced >= 0, 0, nbins[new_tok])
                if nbv.any():
                    vl = np.maximum(Z[:, s_val] + self.val_U[new_tok], 0.0) @ self.val_W2 + self.val_b2
                    vbin = np.where(nbv > 0, _draw(vl, self._val_range[None, :] <= nbv[:, None], u[:, 3]), 0)
                else:
                    vbin = nbv

                for r in np.nonzero(~is_eos)[0]:
                    out[live[r]].append((int(new_tok[r]), float(t_new[r]), int(vbin[r]),
                                         float(u[r, 4]), float(u[r, 5]), int(forced[r])))
                # State for the next step.
                c_all = np.where(forced >= 0, forced, tok_c[new_tok])
                r_on = np.nonzero(c_all >= 0)[0]
                if len(r_on):
                    seen[r_on, c_all[r_on]] = True
                    active[r_on, c_all[r_on]] = True
                    dirty = True
                r_ab = np.nonzero(abate_c[new_tok] >= 0)[0]
                if len(r_ab):
                    active[r_ab, abate_c[new_tok[r_ab]]] = False
                    dirty = True
                step += 1
                if is_eos.any():
                    k = ~is_eos
                    dirty = True
                    t_new = t_new[k]
                    gb = self._input_bin(t_new, t[k], ref[k], step == 1)
                    t, tok, vb, h, Z, live, U = t_new, new_tok[k], vbin[k], h[k], Z[k], live[k], U[k]
                    seen, active, ref, finite, gi_const = seen[k], active[k], ref[k], finite[k], gi_const[k]
                    allowed0, flag, T, T_lo, T_dead, T_key, pend_any, T_known = (
                        allowed0[k], flag[k], T[k], T_lo[k], T_dead[k], T_key[k], pend_any[k], T_known[k])
                else:
                    gb = self._input_bin(t_new, t, ref, step == 1)
                    t, tok, vb = t_new, new_tok, vbin
        return self._frame(out, pids, ref_all)

    def _run_one(self, U, h, Z, ref, finite, gi_const, allowed0, T, T_lo, T_dead, T_key, pend_any,
                 T_known, has_flags, has_known) -> list[tuple]:
        """:meth:`sample`'s loop for one patient: scalars for its per-row values, 1-D arrays
        for its vectors, and what depends only on the set of pending conditions computed
        when that set changes. Its floats agree with the batch's to rounding (the time
        features enter through one small matrix product; float64 keeps that far below a
        draw's resolution) and the times are computed exactly as there, so a patient's
        events do not depend on the path (tested on every draw of the test model and of
        60 EHDS patients)."""
        H, C = self.H, self.C
        steps = len(U)
        U = U.tolist()
        edges = self.edges
        n_gap = self._n_gap
        edge_list = edges.tolist()
        ab_tok, ab_c = self.ab_tok, self.abate_c[self.ab_tok]
        dep_tok, req_T = self.dep_tok, self.req_T
        on_tok, on_c = self.on_tok, self.tok_c[self.on_tok]
        no_reonset_on = self.no_reonset[on_c]
        tok_c, abate_c, nbins, c_tok = (self.tok_c.tolist(), self.abate_c.tolist(), self.nbins.tolist(),
                                        self.c_tok.tolist())
        T_list = T.tolist()
        T_lo_on = T_lo[on_c]
        W_cat, b_cat = self.W_cat, self.b_cat
        EI, GI, VI = self.EI, self.GI, self.VI
        # [t, left, has, d, e] @ W_cont: the batch's five time-feature terms in one product
        W_cont = np.stack([self.cont_W[0] / 36525.0, self.cont_W[1], self.cont_W[3], self.cont_W[4],
                           self.cont_W[5]])
        edges_hi_list = edge_list[1:]
        edges_lo_list = edge_list[:n_gap]
        tok_end, gap_lo, gap_hi = self.s_tok.stop, self.s_gap.start, self.s_gap.stop
        val_lo, val_hi, hh_lo = self.s_val.start, self.s_val.stop, self.s_hh.start
        gap_U, gap_W2, gap_b2 = self.gap_U, self.gap_W2, self.gap_b2
        val_U, val_W2, val_b2, val_range = self.val_U, self.val_W2, self.val_b2, self._val_range
        max_events = self.max_events
        H2 = 2 * H
        log, exp = np.log, np.exp
        tok, gb, vb, t = BOS, 0, 0, 0.0
        seen = np.zeros(C, bool)
        active = np.zeros(C, bool)
        out: list[tuple] = []
        step = 0
        dirty = True
        with np.errstate(divide="ignore", invalid="ignore"):
            while True:
                left = min(max((ref - t) / 36525.0, -0.1), 1.5) if finite else 1.5
                gi = EI[tok] + GI[gb] + VI[vb] + gi_const
                if dirty:
                    state_ok = allowed0.copy()
                    if len(ab_tok):
                        state_ok[ab_tok] &= active[ab_c]
                    if len(dep_tok):
                        state_ok[dep_tok] &= ((~seen) @ req_T) < 0.5
                    if len(on_tok):
                        state_ok[on_tok] &= ~(active[on_c] & no_reonset_on)
                    pending = pend_any & ~seen if has_flags else None
                    any_pending = has_flags and bool(pending.any())
                    if any_pending:
                        # functions of the pending set alone
                        t_next = float(np.where(pending, T_known, np.inf).min())
                        dl = float(np.where(pending, T_dead, np.inf).min())
                        first_c = int(np.argmin(np.where(pending, T_key, np.inf)))
                        not_pending_on = ~pending[on_c]
                        pending_l = pending.tolist()
                    dirty = False
                if any_pending and has_known and t_next != math.inf:
                    d = min(max((t_next - t) / 365.25, -2.0), 10.0) / 10.0
                    e = (ref - t_next) / 36525.0 if finite else 0.0
                    gi += np.array([t, left, 1.0, d, e]) @ W_cont
                else:
                    gi += np.array([t, left, 0.0, 0.0, 0.0]) @ W_cont
                gh = Z[hh_lo:]
                rz = 0.5 + 0.5 * np.tanh(0.5 * (gi[:H2] + gh[:H2]))  # sigmoid
                n = np.tanh(gi[H2:] + rz[:H] * gh[H2:])
                h = n + rz[H:] * (h - n)
                Z = h @ W_cat + b_cat
                u0, u1, u2, u3, u4, u5 = U[min(step, steps - 1)]

                if step >= max_events:
                    new_tok = EOS
                else:
                    allowed = state_ok.copy()
                    if any_pending and len(on_tok):
                        allowed[on_tok] &= not_pending_on | (t >= T_lo_on)
                    allowed[EOS] = True
                    new_tok = _draw_one(Z[:tok_end], allowed, u0)
                is_eos = new_tok == EOS

                t_max = ref
                if any_pending:
                    c = tok_c[new_tok]
                    if c >= 0 and pending_l[c]:
                        t_max = min(ref, float(T_dead[c]))
                gmax = max(t_max - t, 0.0)
                xmax = max(ref - t, 0.0) if finite else 0.0
                xmin = max(ref - t_max, 0.0) if finite else 0.0
                gl = np.maximum(Z[gap_lo:gap_hi] + gap_U[new_tok], 0.0) @ gap_W2 + gap_b2
                # The allowed gap classes are two runs of the sorted edges: forward bins
                # [0, n_fwd) and backward bins [b_lo, b_hi) (the batch's masks).
                n_fwd = 0 if step == 0 and finite else bisect.bisect_right(edges_lo_list, gmax)
                if finite:
                    b_lo = bisect.bisect_left(edges_hi_list, xmin)
                    b_hi = max(bisect.bisect_right(edges_lo_list, xmax), b_lo)
                else:
                    b_lo = b_hi = 0
                cls = _draw_runs(gl, n_fwd, n_gap + b_lo, n_gap + b_hi, u1)
                is_b = cls >= n_gap
                k = cls - n_gap if is_b else cls
                lo = max(edge_list[k], xmin) if is_b else edge_list[k]
                hi = max(min(edge_list[k + 1], xmax if is_b else gmax), lo)
                if k <= 1:
                    v = 0.0 if k == 0 and not is_b else lo + u2 * (hi - lo)
                else:
                    lo_l = log(lo)
                    v = float(exp(lo_l + u2 * (log(hi) - lo_l)))
                t_new = ref - v if is_b else t + v
                t_new = math.inf if is_eos else min(max(t_new, t), t_max)

                forced = -1
                if any_pending and (t_new > dl or is_eos):
                    forced = first_c
                    new_tok = c_tok[first_c]
                    tc = T_list[first_c]
                    t_new = t if tc != tc else max(t, tc)
                    is_eos = new_tok == EOS

                nbv = 0 if forced >= 0 else nbins[new_tok]
                if nbv > 0:
                    vl = np.maximum(Z[val_lo:val_hi] + val_U[new_tok], 0.0) @ val_W2 + val_b2
                    vbin = _draw_one(vl, val_range <= nbv, u3)
                else:
                    vbin = 0
                if not is_eos:
                    out.append((int(new_tok), float(t_new), int(vbin), u4, u5, int(forced)))
                c_new = forced if forced >= 0 else tok_c[new_tok]
                if c_new >= 0:
                    seen[c_new] = active[c_new] = True
                    dirty = True
                a = abate_c[new_tok]
                if a >= 0:
                    active[a] = False
                    dirty = True
                step += 1
                if is_eos:
                    return out
                # the time class fed back (_input_bin for one row)
                g, x = t_new - t, ref - t_new
                back = (x < g or step == 1) and x != math.inf if step == 1 else x < g
                b = min(bisect.bisect_right(edge_list, x if back else g) - 1, n_gap - 1)
                gb = b + n_gap if back else b
                t, tok, vb = t_new, new_tok, vbin

    def _input_bin(self, t_new, t, ref, first):
        """Time class fed back as the next input: ``encoding.gap_class``, inlined for speed."""
        g = t_new - t
        x = ref - t_new
        back = (x < g) | first if first else x < g  # x is inf (never < g) when ref is unknown
        if first:
            back &= np.isfinite(x)
        b = np.searchsorted(self.edges, np.where(back, x, g), side="right") - 1
        return np.minimum(b, self._n_gap - 1) + self._n_gap * back

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
                for extra in CARRIED:
                    if extra in info:
                        rec[extra] = info[extra]
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
        n = len(recs)
        data = {}
        for c in self.columns:
            if c in ("t_days", "value_num", "end_t_days"):
                data[c] = np.fromiter((r[c] for r in recs), dtype=float, count=n)
            else:
                col = np.empty(n, dtype=object)
                col[:] = [r.get(c) for r in recs]
                data[c] = pd.Series(col, dtype=object, copy=False)
        return pd.DataFrame(data, copy=False)

    @staticmethod
    def _decode_value(rec: dict, info: dict, vbin: int, u: float, bound: float) -> None:
        slot = info["slot"]
        if slot == SLOT_CAT:
            rec["value_code"] = info["cats"][vbin - 1]
            for extra in ("value_system", "value_display"):
                if extra + "s" in info:
                    rec[extra] = info[extra + "s"][vbin - 1]
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


_max = np.maximum.reduce


def _draw_one(logits: np.ndarray, allowed: np.ndarray, u: float) -> int:
    """:func:`_draw` for one row: the same operations on 1-D arrays."""
    lg = np.where(allowed, logits, NEG)
    lg -= _max(lg)
    cdf = np.exp(lg, out=lg).cumsum()
    k = int(cdf.searchsorted(max(u, 1e-12) * cdf[-1]))
    return min(k, len(logits) - 1)


def _draw_runs(logits: np.ndarray, a: int, b0: int, b1: int, u: float) -> int:
    """:func:`_draw_one` where the allowed entries are the runs [0, a) and [b0, b1).

    The masked entries' exp is exactly 0, so the cumulative sums at the allowed entries
    are those of the allowed entries alone: the same draw, computed on them only.
    """
    if a == 0 and b0 == b1:                 # nothing allowed: the batch draws from all
        return _draw_one(logits, np.zeros(len(logits), bool), u)
    lg = np.concatenate((logits[:a], logits[b0:b1]))
    lg -= _max(lg)
    cdf = np.exp(lg, out=lg).cumsum()
    k = int(cdf.searchsorted(max(u, 1e-12) * cdf[-1]))
    if k >= len(cdf):                       # the batch's last index (never reached: u < 1)
        return len(logits) - 1
    return k if k < a else b0 + k - a


def _draw(logits: np.ndarray, allowed: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw of one category per row from logits restricted to ``allowed``."""
    lg = np.where(allowed, logits, NEG)
    p = np.exp(lg - lg.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    # u may be exactly 0: aim just above 0 so a masked (zero-mass) first entry is never hit.
    target = np.maximum(u, 1e-12) * cdf[:, -1]
    if len(cdf) <= 4:
        # First index with cdf >= target, row by row (the same index as the count below).
        k = np.array([np.searchsorted(cdf[i], target[i], side="left") for i in range(len(cdf))])
    else:
        k = (cdf < target[:, None]).sum(axis=1)
    return np.minimum(k, logits.shape[1] - 1)
