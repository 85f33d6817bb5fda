"""PatientModel: an any-order autoregressive network over tokenised columns.

The idea is MOSTLY AI's TabularARGN (Tiwald et al., 2025) and the order-agnostic
training of Uria et al. (2014) / Hoogeboom et al. (ARDM, 2022): one network learns
p(x_j | x_S) for every column j and *every* subset S of the other columns, by
training on random subsets. Sampling then fills columns one at a time in any
order, so fixing some columns first is exact conditional sampling, with no
rejection.

Network: the first layer is a sum of per-(column, token) vectors (a one-hot
linear layer; a hidden column uses its own learned "mask" vector), then residual
GELU layers and one linear head whose slice j gives column j's logits. Because
the first layer is a sum, filling in column j while sampling is one vector add
per row, so sampling costs C small forward passes with no re-encoding.

Randomness of sampling is counter-based (``generators.tabular.rng``): row i's
draws depend only on (seed, i, column), so ``sample(n, seed)`` equals the first
n rows of ``sample(2n, seed)`` and any row can be regenerated alone
(``start=i``).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from generators.tabular import rng
from generators.tabular.encoding import (ID_COLUMNS, ColumnCodec, Constraint, check_constraints,
                                         infer_constraints, infer_kind, parse_constraints)
from generators.tabular.errors import ModelFileError, TabularModelError

FORMAT = "synthport-tabular-argn"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SKIP_KINDS = ("key", "id", "text", "ignore")
META_FILE = "model.json"

DEFAULTS: dict[str, Any] = {
    "hidden": 256,
    "depth": 1,               # 1: one hidden layer (fastest sampling; best on 200-patient tables)
    "dropout": 0.1,
    "lr": 2e-3,
    "weight_decay": 1e-5,
    "batch_size": None,       # None: n_train // 4 clipped to [32, 512]
    "patience": 20,           # epochs without a better validation loss
    "val_share": 0.1,         # held out for early stopping (0 when < 50 rows)
    "rare_min_count": 5,      # string categories seen fewer times become _RARE_
    "max_bins": 24,
    "min_bin_count": 5,
    "order_share": 0.5,       # share of training rows that see a prefix of the sampling order
    "seed": 0,                # training seed (weights init, masks, split)
    "infer_constraints": True,
}


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(df: pd.DataFrame) -> str:
    """SHA-256 of the training table as CSV (columns, index and values)."""
    return hashlib.sha256(df.to_csv(index=True).encode("utf-8")).hexdigest()


class _Net(nn.Module):
    def __init__(self, n_tokens: list[int], hidden: int, depth: int, dropout: float):
        super().__init__()
        sizes = [v + 1 for v in n_tokens]  # + the column's mask token (local index V_j)
        self.n_tokens = list(n_tokens)
        self.register_buffer("in_off", torch.tensor(np.r_[0, np.cumsum(sizes)[:-1]], dtype=torch.long),
                             persistent=False)
        self.register_buffer("mask_tok", torch.tensor(n_tokens, dtype=torch.long), persistent=False)
        self.out_off = [int(x) for x in np.r_[0, np.cumsum(n_tokens)]]
        self.in_off_py = [int(x) for x in np.r_[0, np.cumsum(sizes)[:-1]]]
        self.in_off_py_np = np.asarray(self.in_off_py, dtype=np.int64)
        vmax = max(n_tokens)
        pad = sum(n_tokens)  # index of a constant -inf column appended to the logits
        idx = torch.full((len(n_tokens), vmax), pad, dtype=torch.long)
        for j, v in enumerate(n_tokens):
            idx[j, :v] = torch.arange(self.out_off[j], self.out_off[j] + v)
        self.register_buffer("pad_idx", idx, persistent=False)
        self.emb = nn.Embedding(sum(sizes), hidden)
        nn.init.normal_(self.emb.weight, std=1.0 / math.sqrt(len(n_tokens)))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, sum(n_tokens))

    def pre(self, x_in: torch.Tensor) -> torch.Tensor:
        return self.emb(x_in + self.in_off).sum(1) + self.bias

    def trunk(self, pre: torch.Tensor) -> torch.Tensor:
        h = F.gelu(pre)
        for lin in self.blocks:
            h = h + F.gelu(lin(self.drop(h)))
        return self.drop(h)

    def nll(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Per-row order-agnostic loss: mean NLL of the hidden columns given the visible."""
        x_in = torch.where(visible, x, self.mask_tok)
        logits = self.head(self.trunk(self.pre(x_in)))
        logits = torch.cat([logits, logits.new_full((len(x), 1), -1e9)], 1)[:, self.pad_idx]
        lp = logits.log_softmax(-1).gather(2, x.unsqueeze(2)).squeeze(2)
        hidden = (~visible).float()
        return -(lp * hidden).sum(1) / hidden.sum(1).clamp_min(1)


def _random_visible(n: int, c: int, gen: torch.Generator, device: str,
                    order_rank: torch.Tensor | None = None, order_share: float = 0.0) -> torch.Tensor:
    """Random visible sets: size t ~ U{0..C-1}, then a uniform subset of that size.

    With ``order_share`` > 0, that share of the rows sees a prefix of the sampling order
    instead (``order_rank[j]`` = position of column j), the sets unconditional sampling uses.
    """
    t = torch.randint(0, c, (n, 1), generator=gen)
    ranks = torch.rand(n, c, generator=gen).argsort(1).argsort(1)
    if order_rank is not None and order_share > 0:
        use = torch.rand(n, 1, generator=gen) < order_share
        ranks = torch.where(use, order_rank.unsqueeze(0).expand(n, c), ranks)
    return (ranks < t).to(device)


class PatientModel:
    """Patient-level generator: ``fit`` / ``sample`` / ``save`` / ``load``.

    Example::

        m = PatientModel().fit(df, epochs=100)
        m.sample(1000, seed=7, conditions={"sex": "female", "cond_44054006": 1})
    """

    def __init__(self, **hyper: Any):
        unknown = set(hyper) - set(DEFAULTS)
        if unknown:
            raise TabularModelError(f"unknown hyper-parameters: {sorted(unknown)}")
        self.hyper: dict[str, Any] = {**DEFAULTS, **hyper}
        self.codecs: list[ColumnCodec] = []
        self.constraints: list[Constraint] = []
        self.order: list[int] = []
        self.training: dict[str, Any] = {}
        self.net: _Net | None = None

    # ------------------------------------------------------------------ public API
    @property
    def columns(self) -> list[str]:
        return [c.name for c in self.codecs]

    def fit(self, df: pd.DataFrame, metadata: Mapping[str, Mapping] | None = None, *,
            epochs: int = 200, device: str = "cpu", progress: bool = True) -> "PatientModel":
        """Learn the encoders and train the network.

        Args:
            df: one row per patient; ``patient_id`` (column or index) is not modelled.
            metadata: optional ``{column: {"kind": ..., "present_if": ..., "upper": ...,
                "lower": ..., "derived": ...}}`` (see docs/generators.md); kinds ``"key"``,
                ``"id"``, ``"text"`` and ``"ignore"`` are not modelled.
            epochs: maximum passes over the data (early stopping may end sooner).
            device: ``"cpu"`` or ``"cuda"``.
            progress: show a tqdm progress bar.

        Returns:
            self.
        """
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TabularModelError("device='cuda' asked for but torch sees no CUDA device")
        t0 = time.perf_counter()
        metadata = dict(metadata or {})
        if isinstance(metadata.get("columns"), Mapping):  # mappings' {"table", "columns"}
            metadata = dict(metadata["columns"])
        metadata = {k: dict(v) for k, v in metadata.items() if isinstance(v, Mapping)}
        data = df.drop(columns=[c for c in df.columns if c in ID_COLUMNS])
        for col, meta in metadata.items():
            if col not in data.columns and col not in ID_COLUMNS and meta.get("kind") not in SKIP_KINDS:
                raise TabularModelError(f"metadata names a column not in the table: {col!r}")
        keep = [c for c in data.columns if metadata.get(c, {}).get("kind") not in SKIP_KINDS]
        if not keep or len(data) < 2:
            raise TabularModelError("need at least one column and two rows to train")
        data = data[keep]
        h = self.hyper
        self.codecs = []
        for col in keep:
            kind = metadata.get(col, {}).get("kind") or infer_kind(data[col])
            self.codecs.append(ColumnCodec.fit(data[col].rename(col), kind,
                                               rare_min_count=h["rare_min_count"],
                                               max_bins=h["max_bins"],
                                               min_bin_count=h["min_bin_count"]))
        by_name = {c.name: c for c in self.codecs}
        self.constraints = parse_constraints(metadata, by_name)
        check_constraints(data, self.constraints)
        if h["infer_constraints"]:
            self.constraints += infer_constraints(data, by_name, self.constraints)
        self.order = self._topological_order()
        tokens = np.stack([c.encode(data[c.name]) for c in self.codecs], 1)
        stats = self._train(tokens, epochs=epochs, device=device, progress=progress)
        self.training = {
            "fingerprint": fingerprint(df),
            "n_rows": int(len(df)),
            "device": device,
            "seconds": round(time.perf_counter() - t0, 3),
            **stats,
        }
        return self

    def sample(self, n: int | None = None, seed: int = 0,
               conditions: Mapping[str, Any] | pd.DataFrame | None = None, *,
               start: int = 0, batch_size: int = 32768) -> pd.DataFrame:
        """Draw synthetic rows; row i depends only on (model, seed, start + i, its conditions).

        Args:
            n: number of rows (defaults to ``len(conditions)`` for a DataFrame).
            seed: any integer.
            conditions: ``{column: value}`` (a scalar for every row or an array of n
                values) or a DataFrame of seed rows; NaN/None means "not conditioned".
                Conditioned cells are returned exactly as given.
            start: absolute index of the first row (patient index in a cohort).
            batch_size: rows per forward pass (memory only; results do not depend on it).

        Returns:
            DataFrame indexed ``start .. start+n-1`` with the training columns and dtypes.
        """
        if self.net is None:
            raise TabularModelError("model is not trained")
        if isinstance(conditions, pd.DataFrame):
            if n is None:
                n = len(conditions)
            elif n != len(conditions):
                raise TabularModelError(f"n={n} but the seed DataFrame has {len(conditions)} rows")
        if n is None or n < 0:
            raise TabularModelError("n must be a non-negative row count")
        c = len(self.codecs)
        cond_tok = np.full((n, c), -1, dtype=np.int64)
        cond_val = np.full((n, c), np.nan)
        given: dict[int, dict[int, Any]] = {}
        if conditions is not None:
            self._encode_conditions(conditions, n, cond_tok, cond_val, given)
        tok = np.empty((n, c), dtype=np.int64)
        val = np.full((n, c), np.nan)
        rows = np.arange(start, start + n, dtype=np.uint64)
        self.net.eval()
        with torch.inference_mode():
            for a in range(0, n, batch_size):
                b = min(n, a + batch_size)
                tok[a:b], val[a:b] = self._sample_block(seed, rows[a:b], cond_tok[a:b], cond_val[a:b])
        index = pd.RangeIndex(start, start + n)
        cols = {}
        for j, codec in enumerate(self.codecs):
            values = None if codec.kind == "categorical" else val[:, j]
            cols[codec.name] = codec.to_series(tok[:, j], values, index, given.get(j))
        return pd.DataFrame(cols, index=index)

    def save(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` (state_dict) and ``model.json`` into a folder."""
        from safetensors.torch import save_file

        if self.net is None:
            raise TabularModelError("model is not trained")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "synthport_version": _version("synthport"),
            "torch_version": torch.__version__,
            "hyper": self.hyper,
            "columns": [c.to_json() for c in self.codecs],
            "constraints": [c.to_json() for c in self.constraints],
            "order": [self.codecs[j].name for j in self.order],
            "training": self.training,
            "weights_sha256": hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest(),
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=1, allow_nan=True), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PatientModel":
        """Read a folder written by ``save`` (weights via safetensors: nothing unpickled)."""
        from safetensors.torch import load_file

        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            weights = path / WEIGHTS_FILE
            blob = weights.read_bytes()
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot read model folder {path}: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} model")
        if meta.get("weights_sha256") and hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
            raise ModelFileError(f"{path}: weights do not match model.json (sha256)")
        m = cls(**meta["hyper"])
        m.codecs = [ColumnCodec.from_json(d) for d in meta["columns"]]
        m.constraints = [Constraint.from_json(d) for d in meta["constraints"]]
        names = m.columns
        m.order = [names.index(n) for n in meta["order"]]
        m.training = meta.get("training", {})
        m.net = _Net([c.n_tokens for c in m.codecs], m.hyper["hidden"], m.hyper["depth"],
                     m.hyper["dropout"])
        m.net.load_state_dict(load_file(str(weights)), strict=True)
        m.net.eval()
        return m

    # ------------------------------------------------------------------ training
    def _topological_order(self) -> list[int]:
        """Table order, moved so that a constraint's reference column comes first."""
        names = self.columns
        deps: dict[int, set[int]] = {j: set() for j in range(len(names))}
        for c in self.constraints:
            deps[names.index(c.column)].add(names.index(c.other))
        order: list[int] = []
        done: set[int] = set()
        while len(order) < len(names):
            ready = [j for j in range(len(names)) if j not in done and deps[j] <= done]
            if not ready:  # a cycle: keep table order for the rest
                ready = [j for j in range(len(names)) if j not in done]
            order.append(ready[0])
            done.add(ready[0])
        return order

    def _train(self, tokens: np.ndarray, *, epochs: int, device: str, progress: bool) -> dict:
        from tqdm.auto import tqdm

        h = self.hyper
        n, c = tokens.shape
        gen = torch.Generator().manual_seed(int(h["seed"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(h["seed"]))
            net = _Net([cd.n_tokens for cd in self.codecs], h["hidden"], h["depth"], h["dropout"])
        net.to(device)
        x_all = torch.as_tensor(tokens, dtype=torch.long)
        perm = torch.randperm(n, generator=gen)
        n_val = int(round(n * h["val_share"])) if n >= 50 else 0
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        x_tr = x_all[tr_idx].to(device)
        x_val = x_all[val_idx].to(device)
        # A fixed set of masks (4 per validation row) makes the validation loss comparable.
        vis_val = _random_visible(4 * n_val, c, gen, device) if n_val else None
        x_val4 = x_val.repeat(4, 1) if n_val else None
        order_rank = torch.empty(c, dtype=torch.long)
        order_rank[torch.as_tensor(self.order)] = torch.arange(c)
        bs = h["batch_size"] or int(np.clip(len(tr_idx) // 4, 32, 512))
        opt = torch.optim.AdamW(net.parameters(), lr=h["lr"], weight_decay=h["weight_decay"])
        best, best_state, best_epoch, bad = math.inf, None, 0, 0
        bar = tqdm(range(epochs), disable=not progress, desc="patient model", unit="epoch")
        train_loss = math.nan
        epoch = -1
        for epoch in bar:
            net.train()
            order = torch.randperm(len(tr_idx), generator=gen)
            tot = 0.0
            for a in range(0, len(order), bs):
                xb = x_tr[order[a:a + bs].to(device)]
                vis = _random_visible(len(xb), c, gen, device, order_rank, h["order_share"])
                loss = net.nll(xb, vis).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(xb)
            train_loss = tot / max(len(order), 1)
            if n_val:
                net.eval()
                with torch.no_grad():
                    v = float(net.nll(x_val4, vis_val).mean())
                if v < best - 1e-4:
                    best, best_epoch, bad = v, epoch, 0
                    best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
                else:
                    bad += 1
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{v:.3f}")
                if bad >= h["patience"]:
                    break
            else:
                bar.set_postfix(loss=f"{train_loss:.3f}")
        bar.close()
        if best_state is not None:
            net.load_state_dict(best_state)
        self.net = net.cpu().eval()
        return {"epochs_run": epoch + 1, "best_epoch": best_epoch + 1 if n_val else epoch + 1,
                "train_loss": round(train_loss, 5),
                "val_loss": round(best, 5) if n_val else None, "n_val": n_val}

    # ------------------------------------------------------------------ sampling
    def _encode_conditions(self, conditions, n, cond_tok, cond_val, given) -> None:
        names = {nm: j for j, nm in enumerate(self.columns)}
        items = conditions.items() if not isinstance(conditions, pd.DataFrame) else \
            ((k, conditions[k].to_numpy()) for k in conditions.columns)
        for col, value in items:
            if col in ID_COLUMNS:
                continue
            if col not in names:
                raise TabularModelError(f"unknown column in conditions: {col!r}")
            j = names[col]
            codec = self.codecs[j]
            if np.ndim(value) == 0:
                value = [value] * n
            s = pd.Series(list(value) if not isinstance(value, np.ndarray) else value)
            if len(s) != n:
                raise TabularModelError(f"conditions[{col!r}] has {len(s)} values for {n} rows")
            set_ = ~s.isna().to_numpy()
            if not set_.any():
                continue
            s_set = s[set_].reset_index(drop=True)
            toks = codec.encode(s_set, strict=True)
            cond_tok[set_, j] = toks
            if codec.kind != "categorical":
                cond_val[set_, j] = codec._to_float(s_set)
            elif codec.has_rare:
                pos = np.flatnonzero(set_)
                rare = np.flatnonzero(toks == codec.rare_token)
                if len(rare):
                    given[j] = {int(pos[r]): s_set.iat[r] for r in rare}

    def _constraints_of(self, j: int) -> list[tuple[Constraint, int, int]]:
        """Constraints touching column j as (constraint, column index, other index), cached."""
        key = (id(self.constraints), len(self.constraints), len(self.codecs))
        if getattr(self, "_cidx_key", None) != key:
            names = {c.name: i for i, c in enumerate(self.codecs)}
            idx: dict[int, list] = {}
            for c in self.constraints:
                ci, oi = names[c.column], names[c.other]
                idx.setdefault(ci, []).append((c, ci, oi))
                idx.setdefault(oi, []).append((c, ci, oi))
            self._cidx, self._cidx_key = idx, key
        return self._cidx.get(j, [])

    def _constraint_masks(self, j: int, sel, tok: np.ndarray, val: np.ndarray, known: np.ndarray):
        """Allowed tokens (selected rows x V_j) and value bounds for column j given what is known."""
        codec = self.codecs[j]
        m = len(tok) if isinstance(sel, slice) else len(sel)
        v = codec.n_tokens
        allowed = None
        lower = upper = None
        lo_t, hi_t = codec.token_bounds()

        structural = None  # present_if only: kept when bounds leave no token at all

        def restrict(rows: np.ndarray, ok_tokens: np.ndarray, is_structural: bool = False) -> None:
            nonlocal allowed, structural
            if not rows.any():
                return
            if allowed is None:
                allowed = np.ones((m, v), dtype=bool)
            ok = ok_tokens[None, :] if ok_tokens.ndim == 1 else ok_tokens[rows]
            allowed[rows] &= ok
            if is_structural:
                if structural is None:
                    structural = np.ones((m, v), dtype=bool)
                structural[rows] &= ok

        for c, ci, oi in self._constraints_of(j):
            o = oi if ci == j else ci
            kn = known[sel, o]
            to = tok[sel, o]
            if c.kind == "derived":
                continue
            if c.kind == "present_if":
                child = ci == j
                if child:
                    if codec.na_token < 0:
                        continue
                    on = np.isin(to, c.present_tokens) & kn
                    off = ~np.isin(to, c.present_tokens) & kn
                    not_na = np.ones(v, bool)
                    not_na[codec.na_token] = False
                    only_na = ~not_na
                    restrict(on, not_na, True)
                    restrict(off, only_na, True)
                else:
                    child_codec = self.codecs[o]
                    is_na = (to == child_codec.na_token) & kn
                    present = np.zeros(v, bool)
                    present[c.present_tokens] = True
                    restrict(kn & ~is_na, present, True)
                    restrict(is_na, ~present, True)
                continue
            ov = val[sel, o]
            have = kn & ~np.isnan(ov)
            if not have.any():
                continue
            # Column j must be <= ov ("at most") or >= ov ("at least").
            at_most = (c.kind == "upper") == (ci == j)
            ovf = np.where(have, ov, np.nan)
            if at_most:
                ok = ~(lo_t[None, :] > ovf[:, None])
                upper = ovf if upper is None else np.fmin(upper, ovf)
            else:
                ok = ~(hi_t[None, :] < ovf[:, None])
                lower = ovf if lower is None else np.fmax(lower, ovf)
            restrict(have, ok)
        if allowed is not None:
            # Bounds that exclude every token (an onset bin above a young age): keep the
            # structural rule and let the value be clipped to the bound instead.
            dead = ~allowed.any(1)
            if dead.any():
                allowed[dead] = True if structural is None else structural[dead]
                dead = ~allowed.any(1)
                allowed[dead] = True
        return allowed, lower, upper

    def _derived(self, j: int, t: np.ndarray, v: np.ndarray, sel, val: np.ndarray,
                 known: np.ndarray) -> bool:
        """Apply ``derived`` constraints to column j's fresh draws (in place); True if any."""
        codec = self.codecs[j]
        changed = False
        for c, ci, oi in self._constraints_of(j):
            if c.kind != "derived":
                continue
            if ci == j:  # this column follows its source
                o = oi
                vo = val[sel, o]
                rows = known[sel, o] & ~np.isnan(vo) & (t != codec.na_token)
                new = c.scale * vo[rows] + c.offset
            else:  # the derived column was given: invert
                o = ci
                vo = val[sel, o]
                rows = known[sel, o] & ~np.isnan(vo)
                new = (vo[rows] - c.offset) / c.scale
            if rows.any():
                v[rows] = new
                t[rows] = codec.encode_float(new)
                changed = True
        return changed

    def _sample_block(self, seed: int, rows: np.ndarray, cond_tok: np.ndarray,
                      cond_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        net = self.net
        m, c = cond_tok.shape
        known = cond_tok >= 0
        tok = np.where(known, cond_tok, 0)
        val = cond_val.copy()
        emb = net.emb.weight
        # First layer = bias + sum of every column's mask vector, plus (token - mask) for the
        # conditioned cells: no (rows x columns x hidden) gather.
        mask_rows = emb[net.in_off + net.mask_tok]
        pre = (net.bias + mask_rows.sum(0)).expand(m, -1).clone()
        ri, ci = np.nonzero(known)
        if len(ri):
            ti = torch.as_tensor(net.in_off_py_np[ci] + tok[ri, ci])
            pre.index_add_(0, torch.as_tensor(ri), emb[ti] - mask_rows[torch.as_tensor(ci)])
        rkeys = rng.keys(seed, 2 * c)
        w, bias = net.head.weight, net.head.bias
        for j in self.order:
            free = ~known[:, j]
            all_free = bool(free.all())
            if not all_free and not free.any():
                continue
            codec = self.codecs[j]
            sel = slice(None) if all_free else np.flatnonzero(free)
            fidx = None if all_free else torch.as_tensor(sel)
            p = pre if all_free else pre[fidx]
            a, b = net.out_off[j], net.out_off[j + 1]
            logits = F.linear(net.trunk(p), w[a:b], bias[a:b])
            allowed = lower = upper = None
            if self._constraints_of(j):
                allowed, lower, upper = self._constraint_masks(j, sel, tok, val, known)
            if allowed is not None:
                al = torch.as_tensor(allowed)
                logits = logits.masked_fill(~al, -math.inf)
            cdf = torch.softmax(logits, 1).cumsum(1)
            fr_rows = rows[sel]
            u = torch.as_tensor(rng.uniforms(seed, fr_rows, 2 * j, rkeys[2 * j]), dtype=cdf.dtype)
            t = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
            t = t.clamp_max(codec.n_tokens - 1)
            if allowed is not None:  # float round-off at the top of the cdf: stay allowed
                bad = ~al.gather(1, t.unsqueeze(1)).squeeze(1)
                if bad.any():
                    t[bad] = al[bad].to(torch.int8).argmax(1)
            t_np = t.numpy().copy()
            if codec.kind != "categorical":
                u2 = rng.uniforms(seed, fr_rows, 2 * j + 1, rkeys[2 * j + 1])
                v = codec.numeric_values(t_np, u2, lower, upper)
                if self._derived(j, t_np, v, sel, val, known):
                    t = torch.as_tensor(t_np)
                val[sel, j] = v
            tok[sel, j] = t_np
            ej = emb[net.in_off_py[j]: net.in_off_py[j] + codec.n_tokens + 1]
            delta = ej[t] - ej[codec.n_tokens]
            if all_free:
                pre += delta
            else:
                pre.index_add_(0, fidx, delta)
            known[:, j] = True
        return tok, val
