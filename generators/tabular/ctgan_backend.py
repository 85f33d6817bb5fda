"""CTGAN (the ``ctgan`` package) as an optional patient-level backend.

LICENCE CONDITION: ctgan (and rdt, which it uses) are licensed under the Business Source
License 1.1, whose use grant excludes offering "a Synthetic Data Creation Service" (see
:data:`generators.tabular.CTGAN_LICENCE`). They are not dependencies of synthport: this
module is used only when ``synthport train --backend ctgan`` is asked for, and training
needs the extra ``pip install 'synthport[ctgan]'``. The licence text is stored in every
saved model (``model.json`` ``licence``) and in the registry row of the model.

:class:`CtganPatientModel` has the shape of :class:`generators.tabular.PatientModel`:
``fit(df, metadata, epochs=, device=, progress=)``, ``sample(n, seed, conditions=, *,
start=, batch_size=)``, ``save(dir)``, ``load(dir)``, ``columns``, ``codecs``,
``constraints``, ``training``, ``hyper``. What differs (docs/generators.md, "CTGAN
backend"):

* **Columns.** Every column is first put through synthport's own ``ColumnCodec`` (the
  argn encoders): categories become token labels (string categories seen in fewer than
  ``rare_min_count`` patients share ``_RARE_``, so a rare value is never reproduced), and
  numbers/dates become floats (dates as days) plus, when the column has missing values, a
  discrete "missing" column; a missing number is filled, for CTGAN's sake, with a
  (seeded) draw from the column's observed values. Columns with a single value are
  constants and are not shown to CTGAN. CTGAN then learns its own per-column encoding (a
  Bayesian GMM per number, one-hot per discrete column).
* **Sampling** is synthport's own: the generator (same layers and ``state_dict`` as
  ``ctgan.synthesizers.ctgan.Generator``) runs in float64, in fixed blocks of
  ``block_size`` rows; block k of a sample with seed s draws its noise, its conditional
  vectors and its Gumbel draws from a ``torch.Generator`` seeded with
  BLAKE2b(s, try, k), never from a global RNG. As in ``CTGAN.sample``, batch-norm layers
  use the statistics of the block (ctgan samples in training mode), so row i is a pure
  function of (model, seed, i): ``sample(n, seed, start=i)`` gives rows i..i+n-1 of the
  cohort, in any process. The activated output is decoded with numpy: a categorical span
  by its argmax (Gumbel-max, the argmax of ctgan's Gumbel-softmax), a number as
  ``clip(tanh, -1, 1) * 4 * std_c + mean_c`` of the chosen GMM component (tested equal to
  ``ctgan``'s ``DataTransformer.inverse_transform``). Numbers are then clipped to the
  training range (the codec's points and bin edges) and rounded like the training values
  (integers stay integers, floats keep their decimals).
* **Constraints** (``present_if``, ``upper``/``lower``, ``derived``; declared or inferred
  as for the argn model) are repaired after decoding, not learned: a value is set
  missing / given a value when its flag says so, recomputed from its source, and clipped
  to its bound.
* **Conditional sampling** is by rejection: try t of a row draws that row from the
  sample with stream t (try 0 is the unconditional sample), and the row is the first
  try whose categorical tokens (for a number: the codec's point or quantile bin) match
  the conditions; conditioned cells are then set to the given values and the
  constraints repaired around them. When every row has the same value of one
  categorical column, CTGAN's own conditional vector for that value is used for all
  tries (what ``CTGAN.sample(condition_column=...)`` does, with the offset of the
  column's categories computed right: ctgan 0.12's ``generate_cond_from_condition_column_info``
  uses an offset that is always 0, sdv-dev/CTGAN#169). After ``max_tries`` (100) tries a
  :class:`TabularModelError` says how many rows found no match.
* **Saving**: ``model.safetensors`` (the generator's ``state_dict``) and ``model.json``
  (codecs, constraints, the CTGAN spans with their GMM means/stds of the kept components
  and their one-hot labels, the conditional-vector probabilities, hyper-parameters,
  training figures, package versions, the licence). ``load`` reads JSON and safetensors:
  nothing is unpickled, and ``ctgan`` is not imported (sampling is torch + numpy).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from generators.tabular import CTGAN_LICENCE
from generators.tabular.encoding import (ID_COLUMNS, ColumnCodec, Constraint, check_constraints,
                                         infer_constraints, infer_kind, parse_constraints)
from generators.tabular.errors import ModelFileError, TabularModelError
from generators.tabular.model import fingerprint, package_version  # shared by both backends

FORMAT = "synthport-tabular-ctgan"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
SKIP_KINDS = ("key", "id", "text", "ignore")
STD_MULTIPLIER = 4          # rdt ClusterBasedNormalizer: value = normalised * 4 * std + mean
EXTRA_HINT = "pip install 'synthport[ctgan]'"

DEFAULTS: dict[str, Any] = {
    # CTGAN's own defaults (ctgan 0.12), except where noted.
    "embedding_dim": 128,
    "generator_dim": [256, 256],
    "discriminator_dim": [256, 256],
    "generator_lr": 2e-4,
    "generator_decay": 1e-6,
    "discriminator_lr": 2e-4,
    "discriminator_decay": 1e-6,
    "batch_size": 500,
    "discriminator_steps": 1,
    "log_frequency": True,
    "pac": 10,
    "seed": 0,                 # training seed (ctgan's random state, fill draws)
    "rare_min_count": 5,       # synthport: rare string categories -> _RARE_
    "infer_constraints": True,
    "block_size": None,        # rows per sampling block (batch-norm statistics); None: batch_size
    "max_tries": 100,          # rejection tries of conditional sampling
}


def _stream_seed(seed: int, attempt: int, block: int) -> int:
    h = hashlib.blake2b(f"ctgan|{int(seed)}|{int(attempt)}|{int(block)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") >> 1          # 63 bits: torch.Generator.manual_seed


class _Residual(nn.Module):
    """``ctgan.synthesizers.ctgan.Residual`` (same parameter names)."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.fc = nn.Linear(i, o)
        self.bn = nn.BatchNorm1d(o)


class _Generator(nn.Module):
    """``ctgan.synthesizers.ctgan.Generator``: the same layers and ``state_dict`` keys."""

    def __init__(self, d_in: int, dims: list[int], d_out: int):
        super().__init__()
        seq: list[nn.Module] = []
        dim = d_in
        for h in dims:
            seq.append(_Residual(dim, h))
            dim += h
        seq.append(nn.Linear(dim, d_out))
        self.seq = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch-norm with the statistics of ``x`` (as ctgan samples: training mode), without
        touching the running statistics."""
        for layer in self.seq[:-1]:
            h = layer.fc(x)
            h = F.batch_norm(h, None, None, layer.bn.weight, layer.bn.bias, training=True,
                             eps=layer.bn.eps)
            x = torch.cat([F.relu(h), x], dim=1)
        return self.seq[-1](x)


def _label(tok: int) -> str:
    return f"t{int(tok)}"


class CtganPatientModel:
    """CTGAN over the patient table with synthport's interface (module docstring)."""

    backend = "ctgan"

    def __init__(self, **hyper: Any):
        unknown = set(hyper) - set(DEFAULTS)
        if unknown:
            raise TabularModelError(f"unknown CTGAN hyper-parameters: {sorted(unknown)}")
        h = {**DEFAULTS, **hyper}
        h["generator_dim"] = [int(x) for x in h["generator_dim"]]
        h["discriminator_dim"] = [int(x) for x in h["discriminator_dim"]]
        if int(h["batch_size"]) % 2 or int(h["batch_size"]) % int(h["pac"]):
            raise TabularModelError("batch_size must be even and a multiple of pac")
        self.hyper: dict[str, Any] = h
        self.codecs: list[ColumnCodec] = []
        self.constraints: list[Constraint] = []
        self.spans: list[dict] = []          # CTGAN's columns, in its order
        self.constants: dict[int, Any] = {}  # codec index -> token (categorical) / value
        self.cond_probs: np.ndarray = np.zeros(0)
        self.training: dict[str, Any] = {}
        self.licence = CTGAN_LICENCE
        self.net: _Generator | None = None
        self.ctgan = None
        self._net64: _Generator | None = None

    # ------------------------------------------------------------------ public API
    @property
    def columns(self) -> list[str]:
        return [c.name for c in self.codecs]

    @property
    def block_size(self) -> int:
        return int(self.hyper["block_size"] or self.hyper["batch_size"])

    def fit(self, df: pd.DataFrame, metadata: Mapping[str, Mapping] | None = None, *,
            epochs: int = 300, device: str = "cpu", progress: bool = True) -> "CtganPatientModel":
        """Encode the table, train CTGAN on it and keep what sampling needs.

        Raises:
            TabularModelError: ctgan is not installed, bad metadata, too little data.
        """
        try:
            from ctgan import CTGAN
        except ImportError:
            raise TabularModelError("the ctgan backend needs the optional extra: "
                                    f"{EXTRA_HINT} (BUSL-1.1, see docs/generators.md)") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TabularModelError("device='cuda' asked for but torch sees no CUDA device")
        t0 = time.perf_counter()
        h = self.hyper
        metadata = dict(metadata or {})
        if isinstance(metadata.get("columns"), Mapping):
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
        self.codecs = [ColumnCodec.fit(data[c].rename(c), metadata.get(c, {}).get("kind") or infer_kind(data[c]),
                                       rare_min_count=h["rare_min_count"], knots=0)
                       for c in keep]
        by_name = {c.name: c for c in self.codecs}
        self.constraints = parse_constraints(metadata, by_name)
        check_constraints(data, self.constraints)
        if h["infer_constraints"]:
            self.constraints += infer_constraints(data, by_name, self.constraints)

        frame, discrete = self._plain_training_frame(data)
        if not self.spans:
            raise TabularModelError("every column is constant: nothing for CTGAN to learn")
        # ctgan >= 0.11.1 says enable_gpu=, older releases cuda= (now deprecated)
        gpu_arg = "enable_gpu" if "enable_gpu" in inspect.signature(CTGAN.__init__).parameters else "cuda"
        gpu = {gpu_arg: device.startswith("cuda")}
        model = CTGAN(embedding_dim=h["embedding_dim"], generator_dim=tuple(h["generator_dim"]),
                      discriminator_dim=tuple(h["discriminator_dim"]),
                      generator_lr=h["generator_lr"], generator_decay=h["generator_decay"],
                      discriminator_lr=h["discriminator_lr"],
                      discriminator_decay=h["discriminator_decay"], batch_size=h["batch_size"],
                      discriminator_steps=h["discriminator_steps"],
                      log_frequency=h["log_frequency"], verbose=bool(progress), epochs=int(epochs),
                      pac=h["pac"], **gpu)
        model.set_random_state(int(h["seed"]))
        rdt_log = logging.getLogger("rdt")
        level = rdt_log.level
        rdt_log.setLevel(logging.WARNING)     # one INFO line per column without missing values
        try:
            model.fit(frame, discrete_columns=discrete)
        finally:
            rdt_log.setLevel(level)
        self._take_fitted(model)
        self.ctgan = model          # the fitted ctgan object: this process only, never saved
        losses = getattr(model, "loss_values", None)
        last = losses.iloc[-1].to_dict() if losses is not None and len(losses) else {}
        self.training = {
            "backend": "ctgan",
            "fingerprint": fingerprint(df),
            "n_rows": int(len(df)),
            "device": device,
            "epochs": int(epochs),
            "seconds": round(time.perf_counter() - t0, 3),
            "last_losses": {str(k): float(v) for k, v in last.items() if k != "Epoch"},
            "packages": {p: package_version(p) for p in ("ctgan", "rdt", "torch", "scikit-learn")},
            "licence": CTGAN_LICENCE,
        }
        return self

    def sample(self, n: int | None = None, seed: int = 0,
               conditions: Mapping[str, Any] | pd.DataFrame | None = None, *,
               start: int = 0, batch_size: int = 32768) -> pd.DataFrame:
        """Draw rows ``start .. start+n-1``; row i depends only on (model, seed, i, conditions).

        Args:
            n: number of rows (defaults to ``len(conditions)`` for a DataFrame).
            seed: any integer.
            conditions: ``{column: value}`` (a scalar for every row or n values) or a
                DataFrame of seed rows; NaN/None means "not conditioned". Met by rejection
                (module docstring); conditioned cells are returned as given.
            start: absolute index of the first row (patient index in a cohort).
            batch_size: accepted for the PatientModel interface; rows are always drawn in
                blocks of ``block_size`` (results never depend on it).

        Raises:
            TabularModelError: untrained, unknown column or value, or conditions that no
                try met for some rows.
        """
        del batch_size
        if self.net is None:
            raise TabularModelError("model is not trained")
        if isinstance(conditions, pd.DataFrame):
            if n is None:
                n = len(conditions)
            elif n != len(conditions):
                raise TabularModelError(f"n={n} but the seed DataFrame has {len(conditions)} rows")
        if n is None or n < 0:
            raise TabularModelError("n must be a non-negative row count")
        if start < 0:
            raise TabularModelError("start must be non-negative")
        rows = np.arange(start, start + n, dtype=np.int64)
        cond = self._encode_conditions(conditions, n) if conditions is not None else {}
        if not cond:
            tok, val, raw = self._rows(seed, 0, rows)
            self._repair(tok, val, {}, raw)
        else:
            tok, val = self._sample_conditional(seed, rows, cond)
        return self._frame(tok, val, pd.RangeIndex(start, start + n), cond)

    def save(self, path: str | Path) -> Path:
        """Write ``model.safetensors`` (generator state_dict) and ``model.json``."""
        from safetensors.torch import save_file

        if self.net is None:
            raise TabularModelError("model is not trained")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tmp = path / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(path / WEIGHTS_FILE)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backend": "ctgan",
            "licence": self.licence,
            "synthport_version": package_version("synthport"),
            "torch_version": torch.__version__,
            "hyper": self.hyper,
            "columns": [c.to_json() for c in self.codecs],
            "constraints": [c.to_json() for c in self.constraints],
            "spans": self.spans,
            "constants": [[int(j), v] for j, v in sorted(self.constants.items())],
            "cond_probs": [float(p) for p in self.cond_probs],
            "generator": {"d_in": int(self.hyper["embedding_dim"]) + len(self.cond_probs),
                          "dims": list(self.hyper["generator_dim"]), "d_out": self._d_out()},
            "training": self.training,
            "weights_sha256": hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest(),
        }
        tmp = path / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, allow_nan=True), encoding="utf-8")
        tmp.replace(path / META_FILE)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CtganPatientModel":
        """Read a folder written by ``save``: JSON and safetensors only, nothing unpickled,
        ctgan not needed."""
        from safetensors.torch import load

        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            blob = (path / WEIGHTS_FILE).read_bytes()
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot read model folder {path}: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} model")
        if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
            raise ModelFileError(f"{path}: weights do not match model.json (sha256)")
        m = cls(**meta["hyper"])
        m.licence = meta.get("licence") or CTGAN_LICENCE
        m.codecs = [ColumnCodec.from_json(d) for d in meta["columns"]]
        m.constraints = [Constraint.from_json(d) for d in meta["constraints"]]
        m.spans = meta["spans"]
        m.constants = {int(j): v for j, v in meta["constants"]}
        m.cond_probs = np.asarray(meta["cond_probs"], dtype=np.float64)
        m.training = meta.get("training", {})
        g = meta["generator"]
        net = _Generator(int(g["d_in"]), [int(x) for x in g["dims"]], int(g["d_out"]))
        if g["d_out"] != m._d_out() or g["d_in"] != m.hyper["embedding_dim"] + len(m.cond_probs):
            raise ModelFileError(f"{path}: generator sizes do not fit the spans in model.json")
        try:
            net.load_state_dict(load(blob), strict=True)
        except RuntimeError as exc:
            raise ModelFileError(f"{path}: weights do not fit model.json: {exc}") from exc
        m._set_net(net)
        return m

    # ------------------------------------------------------------------ fitting
    def _plain_training_frame(self, data: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
        """The table CTGAN sees: token labels, floats, missing flags; fills ``self.spans``
        (without CTGAN's parameters yet) and ``self.constants``."""
        rng = np.random.default_rng(int(self.hyper["seed"]))
        cols: dict[str, Any] = {}
        self.spans, self.constants = [], {}
        discrete: list[str] = []
        for j, codec in enumerate(self.codecs):
            s = data[codec.name]
            if codec.kind == "categorical":
                tok = codec.encode(s)
                uniq = np.unique(tok)
                if len(uniq) == 1:
                    self.constants[j] = int(uniq[0])
                    continue
                name = f"x{j}"
                cols[name] = pd.Series([_label(t) for t in tok], dtype=object)
                self.spans.append({"name": name, "codec": j, "role": "cat", "type": "discrete"})
                discrete.append(name)
                continue
            x = codec._to_float(s)
            na = np.isnan(x)
            present = x[~na]
            if not len(present):
                self.constants[j] = None
                continue
            if np.unique(present).size == 1:
                self.constants[j] = float(present[0])
            else:
                filled = x.copy()
                filled[na] = rng.choice(present, size=int(na.sum()))
                name = f"x{j}"
                cols[name] = filled
                self.spans.append({"name": name, "codec": j, "role": "value", "type": "continuous"})
            if na.any():
                name = f"x{j}_na"
                cols[name] = pd.Series([_label(int(a)) for a in na], dtype=object)
                self.spans.append({"name": name, "codec": j, "role": "na", "type": "discrete"})
                discrete.append(name)
        return pd.DataFrame(cols), discrete

    def _take_fitted(self, model) -> None:
        """CTGAN's fitted encoders, conditional-vector probabilities and generator."""
        infos = model._transformer._column_transform_info_list
        if [i.column_name for i in infos] != [s["name"] for s in self.spans]:
            raise TabularModelError("ctgan's transformer columns differ from synthport's")
        for span, info in zip(self.spans, infos):
            if span["type"] == "continuous":
                if info.column_type != "continuous":
                    raise TabularModelError(f"ctgan treated {span['name']} as {info.column_type}")
                gm = info.transform
                valid = np.asarray(gm.valid_component_indicator, dtype=bool)
                means = np.asarray(gm._bgm_transformer.means_, dtype=float).reshape(-1)[valid]
                stds = np.sqrt(np.asarray(gm._bgm_transformer.covariances_, dtype=float)).reshape(-1)[valid]
                if [(s.dim, s.activation_fn) for s in info.output_info] != [(1, "tanh"), (len(means), "softmax")]:
                    raise TabularModelError(f"unexpected ctgan output layout for {span['name']}")
                span["means"] = [float(v) for v in means]
                span["stds"] = [float(v) for v in stds]
            else:
                ohe = info.transform
                labels = list(ohe.dummies)
                if any(not isinstance(v, str) for v in labels):
                    raise TabularModelError(f"unexpected one-hot labels for {span['name']}")
                span["labels"] = [int(v[1:]) for v in labels]
        sampler = model._data_sampler
        probs = []
        for k in range(sampler._n_discrete_columns):
            probs.extend(sampler._discrete_column_category_prob[k, :sampler._discrete_column_n_category[k]])
        self.cond_probs = np.asarray(probs, dtype=np.float64)
        d_in = int(self.hyper["embedding_dim"]) + len(self.cond_probs)
        net = _Generator(d_in, self.hyper["generator_dim"], self._d_out())
        state = {k: v.detach().cpu() for k, v in model._generator.state_dict().items()}
        net.load_state_dict(state, strict=True)
        self._set_net(net)

    def _set_net(self, net: _Generator) -> None:
        self.net = net.eval()
        net64 = _Generator(int(self.hyper["embedding_dim"]) + len(self.cond_probs),
                           self.hyper["generator_dim"], self._d_out())
        net64.load_state_dict(net.state_dict())
        self._net64 = net64.double().eval()
        # Layout of the activated output: (start, dims) per span.
        self._layout = []
        st = 0
        for span in self.spans:
            d = 1 + len(span["means"]) if span["type"] == "continuous" else len(span["labels"])
            self._layout.append((st, d))
            st += d
        self._cond_cdf = np.cumsum(self.cond_probs / self.cond_probs.sum()) if len(self.cond_probs) else None
        offs, st = {}, 0
        for i, span in enumerate(self.spans):
            if span["type"] == "discrete":
                offs[i] = st
                st += len(span["labels"])
        self._cond_offset = offs

    def _d_out(self) -> int:
        return sum(1 + len(s["means"]) if s["type"] == "continuous" else len(s["labels"])
                   for s in self.spans)

    # ------------------------------------------------------------------ sampling
    def activated_block(self, seed: int, block: int, attempt: int = 0,
                        cond_index: int | None = None) -> np.ndarray:
        """Block ``block`` of the sample with stream ``attempt``: the generator's output
        in ctgan's activated layout (tanh for a number's value, one-hot of the Gumbel-max
        choice for each categorical span and GMM component), float64 [block_size, d_out].

        ``cond_index``: position in the conditional vector to set for every row (CTGAN's
        conditional generation); None draws the vectors as ``CTGAN.sample`` does (the
        training frequencies, log-scaled when ``log_frequency``)."""
        b = self.block_size
        g = torch.Generator().manual_seed(_stream_seed(seed, attempt, block))
        z = torch.randn(b, int(self.hyper["embedding_dim"]), generator=g, dtype=torch.float64)
        u_cond = torch.rand(b, generator=g, dtype=torch.float64).numpy()
        gumbel = -torch.empty(b, self._d_out(), dtype=torch.float64).exponential_(generator=g).log()
        if self._cond_cdf is not None:
            c = np.zeros((b, len(self.cond_probs)))
            if cond_index is None:
                idx = np.minimum(np.searchsorted(self._cond_cdf, u_cond, side="right"), len(c[0]) - 1)
            else:
                idx = np.full(b, int(cond_index))
            c[np.arange(b), idx] = 1.0
            z = torch.cat([z, torch.from_numpy(c)], dim=1)
        with torch.inference_mode():
            out = self._net64(z).numpy()
        gumbel = gumbel.numpy()
        act = np.zeros_like(out)
        rows = np.arange(b)
        for span, (st, d) in zip(self.spans, self._layout):
            if span["type"] == "continuous":
                act[:, st] = np.tanh(out[:, st])
                st, d = st + 1, d - 1
            k = np.argmax(out[:, st:st + d] + gumbel[:, st:st + d], axis=1)
            act[rows, st + k] = 1.0
        return act

    def decode(self, act: np.ndarray) -> dict[str, np.ndarray]:
        """ctgan's inverse transform in numpy: span name -> token ids (discrete) or floats."""
        out: dict[str, np.ndarray] = {}
        for span, (st, d) in zip(self.spans, self._layout):
            if span["type"] == "continuous":
                comp = np.argmax(act[:, st + 1:st + d], axis=1)
                means = np.asarray(span["means"])
                stds = np.asarray(span["stds"])
                v = np.clip(act[:, st], -1, 1)
                out[span["name"]] = v * STD_MULTIPLIER * stds[comp] + means[comp]
            else:
                labels = np.asarray(span["labels"], dtype=np.int64)
                out[span["name"]] = labels[np.argmax(act[:, st:st + d], axis=1)]
        return out

    def plain_frame(self, decoded: dict[str, np.ndarray]) -> pd.DataFrame:
        """Decoded spans as the frame CTGAN was trained on (labels ``t<k>``; for tests)."""
        return pd.DataFrame({s["name"]: ([_label(t) for t in decoded[s["name"]]]
                                         if s["type"] == "discrete" else decoded[s["name"]])
                             for s in self.spans})

    def _rows(self, seed: int, attempt: int, rows: np.ndarray, cond_index: int | None = None):
        """Tokens, values and raw values (before missingness) of absolute rows ``rows``."""
        c = len(self.codecs)
        m = len(rows)
        tok = np.zeros((m, c), dtype=np.int64)
        val = np.full((m, c), np.nan)
        raw = np.full((m, c), np.nan)
        for j, v in self.constants.items():
            if self.codecs[j].kind == "categorical":
                tok[:, j] = v
            else:
                raw[:, j] = np.nan if v is None else v
        blocks = rows // self.block_size
        dec: dict[str, np.ndarray] = {s["name"]: np.empty(m, dtype=np.float64 if s["type"] == "continuous"
                                                          else np.int64) for s in self.spans}
        for k in np.unique(blocks):
            sel = np.flatnonzero(blocks == k)
            d = self.decode(self.activated_block(seed, int(k), attempt, cond_index))
            pos = rows[sel] - int(k) * self.block_size
            for name, arr in d.items():
                dec[name][sel] = arr[pos]
        na = np.zeros((m, c), dtype=bool)
        for span in self.spans:
            j = span["codec"]
            if span["role"] == "cat":
                tok[:, j] = dec[span["name"]]
            elif span["role"] == "value":
                raw[:, j] = dec[span["name"]]
            else:
                na[:, j] = dec[span["name"]] == 1
        for j, codec in enumerate(self.codecs):
            if codec.kind == "categorical":
                continue
            raw[:, j] = self._shape_numbers(codec, raw[:, j])
            val[:, j] = np.where(na[:, j], np.nan, raw[:, j])
            tok[:, j] = codec.encode_float(val[:, j])
        return tok, val, raw

    @staticmethod
    def _range(codec: ColumnCodec) -> tuple[float, float]:
        vals = list(codec.points) + list(codec.edges)
        return (min(vals), max(vals)) if vals else (np.nan, np.nan)

    def _shape_numbers(self, codec: ColumnCodec, x: np.ndarray) -> np.ndarray:
        """Clip to the training range and round like the training values."""
        lo, hi = self._range(codec)
        if not np.isnan(lo):
            x = np.clip(x, lo, hi)
        if codec.integer:
            x = np.round(x)
        elif codec.decimals is not None:
            x = np.round(x, codec.decimals)
        return x

    # -------------------------------------------------------------- constraints
    def _repair(self, tok: np.ndarray, val: np.ndarray, fixed: dict[int, np.ndarray],
                raw: np.ndarray | None = None) -> None:
        """Make every row meet the constraints (in place); cells in ``fixed`` (column ->
        row mask) are left as they are."""
        names = {c.name: j for j, c in enumerate(self.codecs)}
        m = len(tok)
        none = np.zeros(m, dtype=bool)

        def free(j: int) -> np.ndarray:
            return ~fixed.get(j, none)

        def set_val(j: int, rows: np.ndarray, v: np.ndarray) -> None:
            val[rows, j] = v
            tok[rows, j] = self.codecs[j].encode_float(v)

        derived = [c for c in self.constraints if c.kind == "derived"]
        for _ in range(max(1, len(derived))):          # chains: a few passes reach the fix point
            for c in derived:
                j, o = names[c.column], names[c.other]
                vo, vj = val[:, o], val[:, j]
                fwd = free(j) & ~np.isnan(vo) & ~np.isnan(vj)
                if fwd.any():
                    set_val(j, fwd, c.scale * vo[fwd] + c.offset)
                back = ~free(j) & free(o) & ~np.isnan(vj) & ~np.isnan(vo)
                if back.any() and c.scale:
                    set_val(o, back, (vj[back] - c.offset) / c.scale)
        for c in self.constraints:
            if c.kind != "present_if":
                continue
            j, o = names[c.column], names[c.other]
            codec = self.codecs[j]
            on = np.isin(tok[:, o], c.present_tokens)
            off = ~on & free(j)
            val[off, j] = np.nan
            tok[off, j] = codec.na_token if codec.has_na else tok[off, j]
            need = on & free(j) & np.isnan(val[:, j])
            if need.any():
                src = raw[:, j] if raw is not None else np.full(m, np.nan)
                fill = src[need]
                if np.isnan(fill).any():
                    fill = np.where(np.isnan(fill), self._typical(codec), fill)
                if not np.isnan(fill).all():
                    set_val(j, need, fill)
        for c in self.constraints:
            if c.kind not in ("upper", "lower"):
                continue
            j, o = names[c.column], names[c.other]
            vj, vo = val[:, j], val[:, o]
            both = ~np.isnan(vj) & ~np.isnan(vo)
            integer = self.codecs[j].integer
            if c.kind == "upper":
                bad = both & (vj > vo)
                fix_j = bad & free(j)
                fix_o = bad & ~free(j) & free(o)
                if fix_j.any():
                    set_val(j, fix_j, np.floor(vo[fix_j]) if integer else vo[fix_j])
                if fix_o.any():
                    set_val(o, fix_o, vj[fix_o])
            else:
                bad = both & (vj < vo)
                fix_j = bad & free(j)
                fix_o = bad & ~free(j) & free(o)
                if fix_j.any():
                    set_val(j, fix_j, np.ceil(vo[fix_j]) if integer else vo[fix_j])
                if fix_o.any():
                    set_val(o, fix_o, vj[fix_o])

    @staticmethod
    def _typical(codec: ColumnCodec) -> float:
        vals = list(codec.points) + list(codec.edges)
        return float(np.median(vals)) if vals else np.nan

    # -------------------------------------------------------------- conditions
    def _encode_conditions(self, conditions, n: int) -> dict[int, dict]:
        """column index -> {"set": row mask, "tok": tokens, "val": floats, "given": values}."""
        names = {nm: j for j, nm in enumerate(self.columns)}
        items = conditions.items() if not isinstance(conditions, pd.DataFrame) else \
            ((k, conditions[k].to_numpy()) for k in conditions.columns)
        out: dict[int, dict] = {}
        for col, value in items:
            if col in ID_COLUMNS:
                continue
            if col not in names:
                raise TabularModelError(f"unknown column in conditions: {col!r}")
            j = names[col]
            codec = self.codecs[j]
            scalar = np.ndim(value) == 0
            if scalar:
                value = [value] * n
            s = pd.Series(list(value) if not isinstance(value, np.ndarray) else value)
            if len(s) != n:
                raise TabularModelError(f"conditions[{col!r}] has {len(s)} values for {n} rows")
            set_ = ~s.isna().to_numpy()
            if not set_.any():
                continue
            toks = np.full(n, -1, dtype=np.int64)
            toks[set_] = codec.encode(s[set_].reset_index(drop=True), strict=True)
            vals = np.full(n, np.nan)
            if codec.kind != "categorical":
                vals[set_] = codec._to_float(s[set_].reset_index(drop=True))
            out[j] = {"set": set_, "tok": toks, "val": vals, "given": s.to_numpy(dtype=object),
                      "scalar": scalar and bool(set_.all())}
        return out

    def _boost(self, cond: dict[int, dict]) -> int | None:
        """The conditional-vector position of the rarest scalar categorical condition."""
        best = None
        for i, span in enumerate(self.spans):
            if span["role"] != "cat" or span["codec"] not in cond or not cond[span["codec"]]["scalar"]:
                continue
            t = int(cond[span["codec"]]["tok"][0])
            if t not in span["labels"]:
                continue
            pos = self._cond_offset[i] + span["labels"].index(t)
            if best is None or self.cond_probs[pos] < self.cond_probs[best]:
                best = pos
        return best

    def _sample_conditional(self, seed: int, rows: np.ndarray, cond: dict[int, dict]):
        n = len(rows)
        c = len(self.codecs)
        tok = np.zeros((n, c), dtype=np.int64)
        val = np.full((n, c), np.nan)
        raw = np.full((n, c), np.nan)
        pending = np.ones(n, dtype=bool)
        boost = self._boost(cond)
        tries = int(self.hyper["max_tries"])
        for attempt in range(tries):
            idx = np.flatnonzero(pending)
            t_, v_, r_ = self._rows(seed, attempt, rows[idx], boost)
            self._repair(t_, v_, {}, r_)
            ok = np.ones(len(idx), dtype=bool)
            for j, spec in cond.items():
                want = spec["tok"][idx]
                ok &= ~spec["set"][idx] | (t_[:, j] == want)
            take = idx[ok]
            tok[take], val[take], raw[take] = t_[ok], v_[ok], r_[ok]
            pending[take] = False
            if not pending.any():
                break
        if pending.any():
            what = ", ".join(f"{self.codecs[j].name}" for j in cond)
            raise TabularModelError(
                f"{int(pending.sum())} of {n} rows met no sample with the conditions on {what} "
                f"in {tries} tries: the ctgan backend samples conditions by rejection, so a rare "
                "combination may not be found; condition on fewer or more common values, or use "
                "the default (argn) backend, which samples conditions exactly")
        fixed = {}
        for j, spec in cond.items():
            s = spec["set"]
            fixed[j] = s
            tok[s, j] = spec["tok"][s]
            if self.codecs[j].kind != "categorical":
                val[s, j] = spec["val"][s]
        self._repair(tok, val, fixed, raw)
        return tok, val

    # ------------------------------------------------------------------ output
    def _frame(self, tok: np.ndarray, val: np.ndarray, index: pd.Index,
               cond: dict[int, dict]) -> pd.DataFrame:
        cols = {}
        for j, codec in enumerate(self.codecs):
            given = None
            spec = cond.get(j)
            if spec is not None:
                if codec.kind == "categorical":
                    keep = spec["set"] & (spec["tok"] == codec.rare_token) if codec.has_rare else None
                    if keep is not None and keep.any():
                        given = {int(i): spec["given"][i] for i in np.flatnonzero(keep)}
                elif codec.kind == "datetime":
                    given = {int(i): spec["given"][i] for i in np.flatnonzero(spec["set"])}
            values = None if codec.kind == "categorical" else val[:, j]
            cols[codec.name] = codec.to_series(tok[:, j], values, index, given)
        return pd.DataFrame(cols, index=index)


__all__ = ["CtganPatientModel", "FORMAT", "FORMAT_VERSION", "EXTRA_HINT"]
