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

Training adds a fixed-order loss over every prefix of the sampling order (what
unconditional sampling uses), early-stops each block of sampling positions on its own
(one weight snapshot per block), and calibrates per-token logit offsets so that the
sampled marginals match training (docs/generators.md, "Patient model").
``dp={...}`` fits the model with differential privacy (``generators.tabular.dpfit``).

Randomness of sampling is counter-based (``generators.tabular.rng``, Latin-hypercube
within blocks of 32 rows): row i's draws depend only on (seed, i, column), so
``sample(n, seed)`` equals the first n rows of ``sample(2n, seed)`` and any row can be
regenerated alone (``start=i``).
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
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # v1: one network, no calibration or ordinal inputs
WEIGHTS_FILE = "model.safetensors"
SKIP_KINDS = ("key", "id", "text", "ignore")
META_FILE = "model.json"

DEFAULTS: dict[str, Any] = {
    "hidden": 256,
    "depth": 1,               # 1: one hidden layer (fastest sampling; best on 200-patient tables)
    "dropout": 0.3,           # 0.1 left one inference secret leaking on the EHDS sample
                              # (cross-fitted risk 0.17 [0.04, 0.30]); 0.3: 0.06 [-0.10, ..]
    "lr": 2e-3,
    "weight_decay": 1.0,      # AdamW (decoupled); strong: 160-row tables memorise quickly
    "batch_size": None,       # None: n_train // 4 clipped to [32, 512]
    "patience": 20,           # epochs without a better validation loss
    "val_share": 0.1,         # held out for early stopping (0 when < 50 rows)
    "rare_min_count": 5,      # string categories seen fewer times become _RARE_
    "max_bins": 24,
    "min_bin_count": 5,
    "knots": 4,               # segments of the within-bin quantile curve (0/1: uniform in bin)
    "order_share": 0.0,       # share of any-order rows that see a prefix of the sampling order
    "prefix_weight": 0.8,     # weight of the fixed-order (all prefixes) loss vs the any-order loss
    "position_decay": 1.0,    # prefix position t weighs (t + 1)^-decay in the fixed-order loss
    "blocks": 4,              # blocks of sampling positions, each early-stopped on its own
    "seed": 0,                # training seed (weights init, masks, split)
    "infer_constraints": True,
    "calibrate": True,        # match every column's token marginal after training
    "calib_rows": 4096,       # rows sampled for that calibration
    "dp": None,               # {"epsilon": E, ...}: differentially private fit (generators/tabular/dpfit.py)
}


def package_version(dist: str) -> str:
    """Installed version of a distribution, or "unknown" (recorded in model metadata)."""
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(df: pd.DataFrame) -> str:
    """SHA-256 of the training table as CSV (columns, index and values)."""
    return hashlib.sha256(df.to_csv(index=True).encode("utf-8")).hexdigest()


def _ordinal(codec: ColumnCodec) -> np.ndarray:
    """Each token's position in its column's value order, in [-1, 1] (0: categorical, NA).

    Points and bins of a numerical/datetime column are ranked by value (a bin by its
    midpoint); the network gets ``position x (a learned vector per column)`` beside the
    token's own vector, so neighbouring values start out with neighbouring inputs.
    """
    z = np.zeros(codec.n_tokens)
    if codec.kind == "categorical":
        return z
    e = np.asarray(codec.edges, dtype=float)
    rep = np.r_[np.asarray(codec.points, dtype=float), (e[:-1] + e[1:]) / 2 if len(e) > 1 else []]
    if len(rep) > 1:
        rank = np.argsort(np.argsort(rep, kind="stable"), kind="stable")
        z[:len(rep)] = 2.0 * rank / (len(rep) - 1) - 1.0
    return z


class _Net(nn.Module):
    def __init__(self, n_tokens: list[int], hidden: int, depth: int, dropout: float,
                 ordinal: list[np.ndarray] | None = None):
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
        zval = np.zeros(sum(sizes))
        for j, z in enumerate(ordinal or []):
            zval[self.in_off_py[j]: self.in_off_py[j] + n_tokens[j]] = z
        self.register_buffer("zval", torch.tensor(zval, dtype=torch.float32), persistent=False)
        self.register_buffer("col_of", torch.tensor(np.repeat(np.arange(len(sizes)), sizes)),
                             persistent=False)
        # ordinal part of numerical tokens: position in [-1, 1] x a vector per column
        self.ord = nn.Parameter(torch.randn(len(n_tokens), hidden) / math.sqrt(len(n_tokens)))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, sum(n_tokens))
        # Per-token logit offsets set after training by ``PatientModel._calibrate`` (zero
        # while training); part of the state_dict.
        self.register_buffer("calib", torch.zeros(sum(n_tokens)))

    def forward(self, x: torch.Tensor, visible: torch.Tensor, order: torch.Tensor,
                prefix_weight: float, pos_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of one row (``x``, ``visible`` without batch dimension);
        what DP-SGD differentiates per patient."""
        return _loss(self, x[None], visible[None], order, prefix_weight, pos_weights)

    def table(self) -> torch.Tensor:
        """First-layer vector of every (column, token): its own vector + ordinal part."""
        return self.emb.weight + self.zval[:, None] * self.ord[self.col_of]

    def pre(self, x_in: torch.Tensor) -> torch.Tensor:
        return F.embedding(x_in + self.in_off, self.table()).sum(1) + self.bias

    def trunk(self, pre: torch.Tensor) -> torch.Tensor:
        h = F.gelu(pre)
        for lin in self.blocks:
            h = h + F.gelu(lin(self.drop(h)))
        return self.drop(h)

    def prefix_nll(self, x: torch.Tensor, order: torch.Tensor,
                   weights: torch.Tensor | None = None, per_position: bool = False) -> torch.Tensor:
        """Per-row NLL of the fixed sampling order: (weighted) mean over positions t of
        -log p(x_order[t] | x_order[:t]), every position of every row in one pass
        (``per_position``: the B x C matrix instead).

        The first layer is a sum, so the pre-activations of all C prefixes of a row are an
        exclusive cumulative sum of (token vector - mask vector) in sampling order; each
        position then reads only its own column's slice of the head.
        """
        tab = self.table()
        emb_mask = tab[self.in_off + self.mask_tok]                       # C x H
        delta = (tab[x + self.in_off] - emb_mask)[:, order]               # B x C x H
        pre = self.bias + emb_mask.sum(0) + torch.cumsum(delta, 1) - delta
        h = self.trunk(pre)                                               # B x C x H
        w = torch.cat([self.head.weight, self.head.weight.new_zeros(1, h.shape[-1])])
        b = torch.cat([self.head.bias, self.head.bias.new_full((1,), -1e9)])
        idx = self.pad_idx[order]                                         # C x Vmax
        logits = torch.einsum("bch,cvh->bcv", h, w[idx]) + b[idx]
        lp = logits.log_softmax(-1).gather(2, x[:, order].unsqueeze(2)).squeeze(2)
        if per_position:
            return -lp
        return -(lp * weights).mean(1) if weights is not None else -lp.mean(1)

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


def _match_marginal(logits: torch.Tensor, target: np.ndarray, iters: int = 50,
                    tol: float = 1e-3, bound: float = 8.0) -> torch.Tensor:
    """Logit offsets b with mean_i softmax(logits_i + b) = target (tokens with p > 0).

    Tokens never seen in training (target 0) and tokens no row may take keep b = 0 /
    are left to the network; b is bounded to +-``bound`` so that an unreachable target
    (a constraint fixing the token) cannot run away.
    """
    p = torch.as_tensor(target, dtype=logits.dtype)
    b = torch.zeros_like(p)
    live = p > 0
    for _ in range(iters):
        q = torch.softmax(logits + b, 1).mean(0)
        ok = live & (q > 0)
        step = torch.where(ok, p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log(), torch.zeros_like(p))
        b = (b + step).clamp(-bound, bound)
        if float(step.abs().max()) < tol:
            break
    return b


def _loss(net: "_Net", x: torch.Tensor, visible: torch.Tensor, order: torch.Tensor,
          prefix_weight: float, pos_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Training objective: (1 - w) x any-order loss (random visible sets; what conditional
    sampling uses) + w x fixed-order loss (every prefix of the sampling order; what
    unconditional sampling uses)."""
    loss = net.nll(x, visible).mean() if prefix_weight < 1 else x.new_zeros((), dtype=torch.float)
    if prefix_weight > 0:
        loss = (1 - prefix_weight) * loss + prefix_weight * net.prefix_nll(
            x, order, pos_weights).mean()
    return loss


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
        self.nets: list[_Net] = []       # one per early-stopped snapshot
        self.col_net: list[int] = []     # column j is sampled with nets[col_net[j]]

    # ------------------------------------------------------------------ public API
    @property
    def net(self) -> _Net | None:
        """The network of the first sampling positions (None before training)."""
        return self.nets[self.col_net[self.order[0]]] if self.nets else None

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
        self.__dict__.pop("_first_layer", None)
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
        if h["dp"] is not None:
            return self._fit_dp(df, data, metadata, epochs=epochs, device=device,
                                progress=progress, t0=t0)
        self.codecs = []
        for col in keep:
            kind = metadata.get(col, {}).get("kind") or infer_kind(data[col])
            self.codecs.append(ColumnCodec.fit(data[col].rename(col), kind,
                                               rare_min_count=h["rare_min_count"],
                                               max_bins=h["max_bins"],
                                               min_bin_count=h["min_bin_count"],
                                               knots=h["knots"]))
        by_name = {c.name: c for c in self.codecs}
        self.constraints = parse_constraints(metadata, by_name)
        check_constraints(data, self.constraints)
        if h["infer_constraints"]:
            self.constraints += infer_constraints(data, by_name, self.constraints)
        self.order = self._topological_order()
        tokens = np.stack([c.encode(data[c.name]) for c in self.codecs], 1)
        # Dropout draws from torch's global generator: seed it (and restore it after), so
        # that a fit depends on the training seed only, not on what the process drew before.
        devs = [torch.device(device).index or 0] if device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devs):
            torch.manual_seed(int(h["seed"]) + 1)
            stats = self._train(tokens, epochs=epochs, device=device, progress=progress)
        if h["calibrate"]:
            stats.update(self._calibrate(tokens))
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
        for net in self.nets:
            net.eval()
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
        state = {}
        for k, net in enumerate(self.nets):
            prefix = f"net{k}." if len(self.nets) > 1 else ""
            state.update({prefix + key: v.detach().cpu().contiguous()
                          for key, v in net.state_dict().items()})
        save_file(state, str(path / WEIGHTS_FILE))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "synthport_version": package_version("synthport"),
            "torch_version": torch.__version__,
            "hyper": self.hyper,
            "columns": [c.to_json() for c in self.codecs],
            "constraints": [c.to_json() for c in self.constraints],
            "order": [self.codecs[j].name for j in self.order],
            "column_nets": list(self.col_net),
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
        if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
            raise ModelFileError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} model")
        if meta.get("weights_sha256") and hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
            raise ModelFileError(f"{path}: weights do not match model.json (sha256)")
        m = cls(**meta["hyper"])
        m.codecs = [ColumnCodec.from_json(d) for d in meta["columns"]]
        m.constraints = [Constraint.from_json(d) for d in meta["constraints"]]
        names = m.columns
        m.order = [names.index(n) for n in meta["order"]]
        m.training = meta.get("training", {})
        m.col_net = [int(k) for k in meta.get("column_nets") or [0] * len(names)]
        state = load_file(str(weights))
        n_nets = max(m.col_net) + 1
        m.nets = []
        for k in range(n_nets):
            prefix = f"net{k}." if n_nets > 1 else ""
            sub = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
            # Models saved before calibration / ordinal inputs existed: those parts are zero.
            sub.setdefault("calib", torch.zeros(sum(c.n_tokens for c in m.codecs)))
            sub.setdefault("ord", torch.zeros(len(m.codecs), m.hyper["hidden"]))
            net = m._new_net()
            try:
                net.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                raise ModelFileError(f"{path}: weights do not fit model.json: {exc}") from exc
            m.nets.append(net.eval())
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

    def _new_net(self) -> _Net:
        h = self.hyper
        return _Net([cd.n_tokens for cd in self.codecs], h["hidden"], h["depth"], h["dropout"],
                    [_ordinal(cd) for cd in self.codecs])

    def _position_blocks(self, c: int) -> np.ndarray:
        """Block of each sampling position: geometric, [0, C/2^(B-1)), ..., [C/2, C)."""
        b = max(1, int(self.hyper["blocks"]))
        cuts = [int(round(c / 2 ** (b - k))) for k in range(1, b)]
        return np.searchsorted(np.asarray(cuts, dtype=np.int64), np.arange(c), side="right")

    def _train(self, tokens: np.ndarray, *, epochs: int, device: str, progress: bool) -> dict:
        from tqdm.auto import tqdm

        h = self.hyper
        n, c = tokens.shape
        gen = torch.Generator().manual_seed(int(h["seed"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(h["seed"]))
            net = self._new_net()
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
        order_t = torch.as_tensor(self.order, dtype=torch.long, device=device)
        pw = float(h["prefix_weight"])
        # Position t of the sampling order weighs (t + 1)^-decay (mean 1): the first columns
        # have small contexts and learn slowly; the last ones have large contexts and
        # memorise rows quickly.
        pos_w = (torch.arange(c, dtype=torch.float32) + 1) ** -float(h["position_decay"])
        pos_w = (pos_w / pos_w.mean()).to(device)
        blocks = self._position_blocks(c)
        n_blocks = int(blocks.max()) + 1
        blocks_t = torch.as_tensor(blocks, device=device)
        opt = torch.optim.AdamW(net.parameters(), lr=h["lr"], weight_decay=h["weight_decay"])
        # Early stopping per block of sampling positions: each block keeps the weights of
        # the epoch where its own validation NLL was lowest.
        best = [math.inf] * n_blocks
        best_epoch = [0] * n_blocks
        bad = [0] * n_blocks
        snapshots: dict[int, dict] = {}
        bar = tqdm(range(epochs), disable=not progress, desc="patient model", unit="epoch")
        train_loss = val_loss = math.nan
        epoch = -1
        for epoch in bar:
            net.train()
            order = torch.randperm(len(tr_idx), generator=gen)
            tot = 0.0
            for a in range(0, len(order), bs):
                xb = x_tr[order[a:a + bs].to(device)]
                vis = _random_visible(len(xb), c, gen, device, order_rank, h["order_share"])
                loss = _loss(net, xb, vis, order_t, pw, pos_w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(xb)
            train_loss = tot / max(len(order), 1)
            if not n_val:
                bar.set_postfix(loss=f"{train_loss:.3f}")
                continue
            net.eval()
            with torch.no_grad():
                val_loss = float(_loss(net, x_val4, vis_val, order_t, pw))
                per_pos = net.prefix_nll(x_val, order_t, per_position=True).mean(0)
                any_pos = net.nll(x_val4, vis_val).mean() if pw == 0 else None
            improved = False
            for k in range(n_blocks):
                # the block's own sampling positions; the any-order loss when untrained
                v = float(per_pos[blocks_t == k].mean() if pw > 0 else any_pos)
                if v < best[k] - 1e-4:
                    best[k], best_epoch[k], bad[k] = v, epoch, 0
                    improved = True
                else:
                    bad[k] += 1
            if improved:
                snapshots[epoch] = {k: t.detach().clone() for k, t in net.state_dict().items()}
                snapshots = {e: st for e, st in snapshots.items() if e in best_epoch}
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if min(bad) >= h["patience"]:
                break
        bar.close()
        if n_val and snapshots:
            epochs_kept = sorted(set(best_epoch))
            nets = []
            for e in epochs_kept:
                m = self._new_net()
                m.load_state_dict(snapshots[e])
                nets.append(m.cpu().eval())
            self.nets = nets
            pos_net = [epochs_kept.index(best_epoch[k]) for k in blocks]
        else:
            self.nets = [net.cpu().eval()]
            pos_net = [0] * c
        self.col_net = [0] * c
        for t, j in enumerate(self.order):
            self.col_net[j] = pos_net[t]
        return {"epochs_run": epoch + 1,
                "best_epoch": [e + 1 for e in best_epoch] if n_val else epoch + 1,
                "train_loss": round(train_loss, 5),
                "val_loss": [round(v, 5) for v in best] if n_val else None, "n_val": n_val}

    def _fit_dp(self, df: pd.DataFrame, data: pd.DataFrame, metadata: dict, *, epochs: int,
                device: str, progress: bool, t0: float) -> "PatientModel":
        """Differentially private fit: noisy-histogram encoders, DP-SGD, one RDP account
        (module docstring of ``generators.tabular.dpfit``)."""
        from generators import dp as dpa
        from generators.tabular import dpfit

        h = self.hyper
        n, c = len(data), data.shape[1]
        st = dpfit.dp_settings(dict(h["dp"]), n)
        h["dp"] = st
        eps, delta = float(st["epsilon"]), float(st["delta"])
        kinds = [dpfit.dp_kind(data[col], metadata.get(col, {})) for col in data.columns]
        # columns whose categories are not all public get a data-derived key threshold
        k_thr = sum(1 for col, kind in zip(data.columns, kinds) if kind == "categorical"
                    and not (pd.api.types.is_bool_dtype(data[col])
                             or metadata.get(col, {}).get("binary")
                             and pd.api.types.is_numeric_dtype(data[col])))
        delta_thr = delta / 2 if k_thr else 0.0
        delta_rdp = delta - delta_thr
        sens = math.sqrt(c)       # one count per column per patient
        s_hist = dpa.gaussian_noise_for_epsilon(st["preprocess_share"] * eps, delta_rdp, sens)
        tau = dpfit.threshold(s_hist, delta_thr, k_thr) if k_thr else math.inf
        hist = dpfit.NoisyHistograms(s_hist, h["seed"])
        self.codecs, masses = [], []
        for col, kind in zip(data.columns, kinds):
            codec, mass = dpfit.dp_codec(data[col].rename(col), kind, metadata.get(col, {}), hist,
                                         tau, rare_min_count=h["rare_min_count"],
                                         max_bins=h["max_bins"], min_bin_count=h["min_bin_count"])
            self.codecs.append(codec)
            masses.append(mass)
        by_name = {cd.name: cd for cd in self.codecs}
        self.constraints = parse_constraints(metadata, by_name)
        self.constraints += dpfit.name_constraints(self.codecs, self.constraints)
        self.order = self._topological_order()
        tokens = np.stack([cd.encode(data[cd.name]) for cd in self.codecs], 1)
        q = st["expected_batch"] / n
        steps = max(1, int(round(epochs / q)))
        extra = dpa.rdp_gaussian(sens, s_hist)
        sigma = dpa.noise_for_epsilon(eps, delta_rdp, q, steps, extra_rdp=extra)
        spent, order = dpa.rdp_to_dp(steps * dpa.rdp_sampled_gaussian(q, sigma) + extra, delta_rdp)
        stats = self._train_dp(tokens, q=q, steps=steps, sigma=sigma, clip=float(st["clip"]),
                               lr=float(st["lr"]), device=device, progress=progress)
        if h["calibrate"]:
            stats.update(self._calibrate(tokens, targets=[m / m.sum() if m.sum() > 0 else
                                                          np.full(len(m), 1.0 / len(m))
                                                          for m in masses]))
        guarantee = dpa.DPGuarantee(
            epsilon=round(spent + 1e-9, 6), delta=delta, epsilon_target=eps,
            noise_multiplier=sigma, clip_norm=float(st["clip"]), steps=steps, sample_rate=q,
            expected_batch_size=float(st["expected_batch"]), histogram_noise_std=s_hist,
            histogram_epsilon=dpa.rdp_to_dp(extra, delta_rdp)[0], threshold_delta=delta_thr,
            order=order)
        # No fingerprint of the rows in a DP model's file (a hash of the table would let
        # anyone holding a candidate table check it); n is public (see dpfit).
        self.training = {"n_rows": int(n), "device": device,
                         "seconds": round(time.perf_counter() - t0, 3), **stats,
                         "dp": {**guarantee.to_json(),
                                "covers": "patient model: encoders (noisy histograms), "
                                          "constraints (naming rules), network weights "
                                          "(DP-SGD), calibration (noisy histograms)"}}
        return self

    def _train_dp(self, tokens: np.ndarray, *, q: float, steps: int, sigma: float, clip: float,
                  lr: float, device: str, progress: bool) -> dict:
        """DP-SGD: Poisson batches, per-patient clipped gradients, Gaussian noise."""
        from torch.func import functional_call
        from tqdm.auto import tqdm

        from generators.dp import dp_sgd_grads

        h = self.hyper
        n, c = tokens.shape
        gen = torch.Generator().manual_seed(int(h["seed"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(h["seed"]))
            net = _Net([cd.n_tokens for cd in self.codecs], h["hidden"], h["depth"], 0.0,
                       [_ordinal(cd) for cd in self.codecs])   # no dropout under vmap
        net.to(device)
        x_all = torch.as_tensor(tokens, dtype=torch.long, device=device)
        order_t = torch.as_tensor(self.order, dtype=torch.long, device=device)
        order_rank = torch.empty(c, dtype=torch.long)
        order_rank[torch.as_tensor(self.order)] = torch.arange(c)
        pw = float(h["prefix_weight"])
        pos_w = (torch.arange(c, dtype=torch.float32) + 1) ** -float(h["position_decay"])
        pos_w = (pos_w / pos_w.mean()).to(device)
        params = {k: p for k, p in net.named_parameters()}
        opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=h["weight_decay"])

        def loss_fn(p, x, vis):
            return functional_call(net, p, (x, vis, order_t, pw, pos_w))

        bar = tqdm(range(steps), disable=not progress, desc="patient model (DP-SGD)", unit="step")
        net.train()
        for _ in bar:
            take = torch.rand(n, generator=gen) < q          # Poisson sampling
            xb = x_all[take.to(device)]
            vis = _random_visible(len(xb), c, gen, device, order_rank, h["order_share"])
            grads = dp_sgd_grads(loss_fn, {k: p.detach() for k, p in params.items()}, {},
                                 (xb, vis), clip_norm=clip, noise_multiplier=sigma,
                                 expected_batch_size=q * n, generator=gen)
            for k, p in params.items():
                p.grad = grads[k]
            opt.step()
        bar.close()
        self.nets = [net.cpu().eval()]
        self.col_net = [0] * c
        return {"epochs_run": round(steps * q, 3), "steps": steps, "best_epoch": None,
                "train_loss": None, "val_loss": None, "n_val": 0}

    def _calibrate(self, tokens: np.ndarray, targets: list[np.ndarray] | None = None) -> dict:
        """Set ``net.calib`` so that unconditional samples have the training token marginals.

        Columns are filled in the sampling order for ``calib_rows`` rows (seed derived from
        the training seed); before column j is drawn, per-token logit offsets b_j are
        solved so that the mean predicted distribution over those rows equals column j's
        token frequencies in training (iterative proportional fitting, Deming and Stephan
        1940: b += log p - log q). Small tables leave the conditionals over-confident and
        sampled rows drift towards each column's mode as the row fills up; the offsets
        undo that drift while keeping what the network learnt about each column given the
        others. Returns the largest |log p - log q| left over the columns.
        """
        m = int(self.hyper["calib_rows"])
        c = tokens.shape[1]
        if targets is None:
            targets = []
            for j, codec in enumerate(self.codecs):
                cnt = np.bincount(tokens[:, j], minlength=codec.n_tokens).astype(float)
                targets.append(cnt / cnt.sum())
        self.__dict__.pop("_first_layer", None)
        for net in self.nets:
            net.calib.zero_()
        cond_tok = np.full((m, c), -1, dtype=np.int64)
        cond_val = np.full((m, c), np.nan)
        rows = np.arange(m, dtype=np.uint64)
        with torch.inference_mode():
            self._sample_block(int(self.hyper["seed"]) ^ 0x5EED, rows, cond_tok, cond_val,
                               targets=targets)
        return {"calib_rows": m}

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
                    # Look ahead: a child that is still to be drawn and whose bounds leave
                    # it no value (an adult-onset condition of a 4-year-old) rules out the
                    # "present" tokens now, instead of clipping the child's value later.
                    if not kn.all():
                        dead = ~kn & ~self._child_feasible(o, sel, val, known)
                        restrict(dead, ~present)
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

    def _child_feasible(self, o: int, sel, val: np.ndarray, known: np.ndarray) -> np.ndarray:
        """Rows (of ``sel``) where column o's ``upper`` / ``lower`` bounds, given the columns
        known so far, leave it at least one non-missing token."""
        codec = self.codecs[o]
        lo_t, hi_t = codec.token_bounds()
        live = np.ones(codec.n_tokens, bool)
        if codec.na_token >= 0:
            live[codec.na_token] = False
        m = len(known) if isinstance(sel, slice) else len(sel)
        ok = np.ones(m, bool)
        if codec.kind == "categorical" or np.isnan(lo_t[live]).all():
            return ok
        lo_min = float(np.nanmin(lo_t[live]))
        hi_max = float(np.nanmax(hi_t[live]))
        for c, ci, oi in self._constraints_of(o):
            if c.kind not in ("upper", "lower"):
                continue
            b = oi if ci == o else ci
            ov = val[sel, b]
            have = known[sel, b] & ~np.isnan(ov)
            if not have.any():
                continue
            at_most = (c.kind == "upper") == (ci == o)
            if at_most:
                ok &= ~(have & (lo_min > np.where(have, ov, np.inf)))
            else:
                ok &= ~(have & (hi_max < np.where(have, ov, -np.inf)))
        return ok

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
                      cond_val: np.ndarray, targets: list[np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        m, c = cond_tok.shape
        known = cond_tok >= 0
        tok = np.where(known, cond_tok, 0)
        val = cond_val.copy()
        ri, ci = np.nonzero(known)
        # One first-layer state per network (snapshot); each = bias + sum of every column's
        # mask vector, plus (token - mask) for the conditioned cells: no (rows x columns x
        # hidden) gather.
        cache = None if targets is not None else self.__dict__.get("_first_layer")
        if cache is None:
            cache = []
            for net in self.nets:
                emb = net.table()
                # (token - its column's mask) vectors: filling a cell is one gather and one add
                cache.append((emb - emb[net.in_off[net.col_of] + net.mask_tok[net.col_of]],
                              net.bias + emb[net.in_off + net.mask_tok].sum(0)))
            if targets is None:     # weights are fixed once trained: keep for later calls
                self.__dict__["_first_layer"] = cache
        tables, pres = [], []
        for net, (dtab, base) in zip(self.nets, cache):
            pre = base.expand(m, -1).clone()
            if len(ri):
                ti = torch.as_tensor(net.in_off_py_np[ci] + tok[ri, ci])
                pre.index_add_(0, torch.as_tensor(ri), dtab[ti])
            tables.append(dtab)
            pres.append(pre)
        # A network whose columns are all sampled needs no more updates.
        last_use = {k: max(t for t, j in enumerate(self.order) if self.col_net[j] == k)
                    for k in set(self.col_net)}
        rkeys = rng.keys(seed, 2 * c)
        for pos, j in enumerate(self.order):
            free = ~known[:, j]
            all_free = bool(free.all())
            if not all_free and not free.any():
                continue
            codec = self.codecs[j]
            net = self.nets[self.col_net[j]]
            pre = pres[self.col_net[j]]
            sel = slice(None) if all_free else np.flatnonzero(free)
            fidx = None if all_free else torch.as_tensor(sel)
            p = pre if all_free else pre[fidx]
            a, b = net.out_off[j], net.out_off[j + 1]
            logits = F.linear(net.trunk(p), net.head.weight[a:b], net.head.bias[a:b]) + net.calib[a:b]
            allowed = lower = upper = None
            if self._constraints_of(j):
                allowed, lower, upper = self._constraint_masks(j, sel, tok, val, known)
            if allowed is not None:
                al = torch.as_tensor(allowed)
                logits = logits.masked_fill(~al, -math.inf)
            if targets is not None:
                off = _match_marginal(logits, targets[j])
                net.calib[a:b] += off
                logits = logits + off
            cdf = torch.softmax(logits, 1).cumsum(1)
            fr_rows = rows[sel]
            u = torch.as_tensor(rng.stratified_uniforms(seed, fr_rows, 2 * j, rkeys[2 * j]),
                                dtype=cdf.dtype)
            t = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
            t = t.clamp_max(codec.n_tokens - 1)
            if allowed is not None:  # float round-off at the top of the cdf: stay allowed
                bad = ~al.gather(1, t.unsqueeze(1)).squeeze(1)
                if bad.any():
                    t[bad] = al[bad].to(torch.int8).argmax(1)
            t_np = t.numpy().copy()
            if codec.kind != "categorical":
                u2 = rng.stratified_uniforms(seed, fr_rows, 2 * j + 1, rkeys[2 * j + 1])
                v = codec.numeric_values(t_np, u2, lower, upper)
                if self._derived(j, t_np, v, sel, val, known):
                    t = torch.as_tensor(t_np)
                val[sel, j] = v
            tok[sel, j] = t_np
            for k, (nk, dtab) in enumerate(zip(self.nets, tables)):
                if last_use.get(k, -1) <= pos:
                    continue
                delta = dtab.index_select(0, t + nk.in_off_py[j])
                if all_free:
                    pres[k].add_(delta)
                else:
                    pres[k].index_add_(0, fidx, delta)
            known[:, j] = True
        return tok, val
