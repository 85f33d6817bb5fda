"""Conditional VAE over (modality, body part) classes of DICOM pixel arrays.

``ImageModel.fit`` trains a small convolutional conditional VAE (Kingma & Welling
2014; Sohn et al. 2015) at 64 px (or 128 px) on arrays from
:func:`generators.images.data.collect_images`. ``sample`` decodes latent codes drawn
from a ``torch.Generator`` seeded by the caller (``seed_from_uid(SOPInstanceUID)``), so
the same (model, modality, body part, seed, n) always gives the identical array, in any
process: the decoder runs on the CPU and outputs are rounded to 12-bit steps.

Classes and fallback (:meth:`ImageModel.resolve`):

1. A class is a (modality, body part) pair with at least ``min_class_images`` training
   images. Images of rarer pairs are pooled into (modality, "") - "any body part" -
   which is a class when the pool is large enough; images of a modality with too few
   images in all are left out (counted in ``model.json``).
2. ``sample(M, B)`` uses, in order: the class (M, B); (M, ""); the largest class of M;
   then the same three for each neighbouring modality in :data:`NEIGHBOURS` (CR <-> DX,
   MG/XA/RF -> DX/CR, CT <-> MR, PT <-> NM).
3. With no class found, the procedural fallback of
   :mod:`generators.images.procedural` (a phantom shaped like the modality).

Latent codes are drawn from each class's own Gaussian (mean and spread of the training
images' codes, fitted after training) rather than from the VAE prior.

Weights are saved as a torch ``state_dict`` (``weights.pt``, read back with
``torch.load(weights_only=True)``: nothing is unpickled) next to ``model.json``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .data import fingerprint, norm_body_part, norm_modality
from .procedural import procedural, procedural_volume

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
META_FILE = "model.json"
# Output values are rounded to 12-bit steps (what the renderer stores), so that
# last-bit floating-point differences between machines cannot change a pixel.
QUANT = 4095.0
TEMPERATURE = 0.8
CODE_STD_MIN = 0.05
NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "CR": ("DX",), "DX": ("CR",), "MG": ("DX", "CR"), "XA": ("RF", "DX", "CR"),
    "RF": ("XA", "DX", "CR"), "CT": ("MR",), "MR": ("CT",), "PT": ("NM",), "NM": ("PT",),
}


class ImageModelError(Exception):
    """Invalid input to the image model or an unreadable saved model."""


def seed_from_uid(uid: str) -> int:
    """A 63-bit seed from a DICOM UID (SHA-256), stable across processes and versions."""
    return int.from_bytes(hashlib.sha256(uid.strip().encode("ascii")).digest()[:8], "big") >> 1


def _build_network(size: int, n_classes: int, latent_dim: int, width: int, emb_dim: int):
    import torch
    from torch import nn

    stages = int(math.log2(size // 8))
    if 8 * 2 ** stages != size or stages < 1:
        raise ImageModelError(f"size must be 8 x a power of two (64, 128), got {size}")
    chans = [min(width * 2 ** i, width * 4) for i in range(stages)]

    class CVAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(max(n_classes, 1), emb_dim)
            # Per-class mean and spread of the training codes (ex-post density estimation,
            # Ghosh et al. 2020): sampling from them instead of N(0, I) keeps the codes
            # where the decoder was trained, which matters with few images per class.
            self.register_buffer("code_mean", torch.zeros(max(n_classes, 1), latent_dim))
            self.register_buffer("code_std", torch.ones(max(n_classes, 1), latent_dim))
            enc: list[nn.Module] = []
            c_in = 1
            for c in chans:
                enc += [nn.Conv2d(c_in, c, 4, 2, 1), nn.LeakyReLU(0.2)]
                c_in = c
            self.encoder = nn.Sequential(*enc, nn.Flatten())
            feat = chans[-1] * 8 * 8
            self.mu = nn.Linear(feat + emb_dim, latent_dim)
            self.logvar = nn.Linear(feat + emb_dim, latent_dim)
            self.fc = nn.Linear(latent_dim + emb_dim, feat)
            dec: list[nn.Module] = []
            rev = chans[::-1]
            for i, c in enumerate(rev):
                c_out = rev[i + 1] if i + 1 < len(rev) else width // 2
                dec += [nn.ConvTranspose2d(c, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
            self.decoder = nn.Sequential(*dec, nn.Conv2d(width // 2, 1, 3, 1, 1))
            self.top = chans[-1]

        def encode(self, x, y):
            h = torch.cat([self.encoder(x), self.embed(y)], 1)
            return self.mu(h), self.logvar(h).clamp(-10, 10)

        def decode(self, z, y):
            h = self.fc(torch.cat([z, self.embed(y)], 1)).view(-1, self.top, 8, 8)
            return torch.sigmoid(self.decoder(torch.relu(h)))

        def forward(self, x, y):
            mu, logvar = self.encode(x, y)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            return self.decode(z, y), mu, logvar

    return CVAE()


def _augment(x, gen):
    """Small random affine jitter (scale 0.9-1.1, shift 5 %, rotation 5 degrees)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    r = torch.rand(n, 4, generator=gen, device="cpu").to(x.device)
    s = 0.9 + 0.2 * r[:, 0]
    a = (r[:, 1] - 0.5) * math.radians(10)
    tx, ty = (r[:, 2] - 0.5) * 0.1, (r[:, 3] - 0.5) * 0.1
    theta = torch.stack([torch.stack([s * torch.cos(a), -s * torch.sin(a), tx], 1),
                         torch.stack([s * torch.sin(a), s * torch.cos(a), ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


class ImageModel:
    """Conditional image generator with a procedural fallback.

    An unfitted ``ImageModel()`` is valid: it samples the procedural fallback for every
    modality.

    Attributes:
        size: side S of the generated arrays.
        classes: trained ``(modality, body_part)`` classes, index = embedding row.
        meta: what ``model.json`` stores (settings, counts, timings, fingerprint).
    """

    def __init__(self, size: int = 64, latent_dim: int = 32, width: int = 16,
                 emb_dim: int = 16) -> None:
        self.size = size
        self.latent_dim = latent_dim
        self.width = width
        self.emb_dim = emb_dim
        self.classes: list[tuple[str, str]] = []
        self.class_counts: list[int] = []
        self.net = None
        self._sampler = None  # float64 copy of the network, made on first sample
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ training

    def fit(self, images: Iterable[tuple[np.ndarray, str, str]], size: int | None = None,
            epochs: int = 100, device: str = "cpu", progress: bool = True,
            min_class_images: int = 4, batch_size: int = 32, lr: float = 2e-3,
            beta: float = 1.0, seed: int = 0) -> "ImageModel":
        """Train on ``(array [S, S] in [0, 1], modality, body_part)`` tuples.

        Args:
            images: training images; arrays of another size are resized.
            size: 64 or 128 (defaults to the model's size).
            epochs: passes over the training set.
            device: ``"cpu"`` or ``"cuda"``; sampling always runs on the CPU.
            progress: show a tqdm progress bar.
            min_class_images: smallest (modality, body part) group that gets a class.
            batch_size: minibatch size.
            lr: Adam learning rate.
            beta: weight of the KL term.
            seed: seed of weight initialisation, batching and augmentation.

        Returns:
            self.
        """
        import torch
        from tqdm.auto import tqdm

        from .data import resize

        t0 = time.perf_counter()
        self._sampler = None
        if size is not None:
            self.size = size
        items = [(a, norm_modality(m), norm_body_part(b)) for a, m, b in images]
        pair_n: dict[tuple[str, str], int] = {}
        for _, m, b in items:
            pair_n[(m, b)] = pair_n.get((m, b), 0) + 1
        label_of: dict[tuple[str, str], tuple[str, str]] = {}
        pooled: dict[str, int] = {}
        for (m, b), n in pair_n.items():
            if b and n >= min_class_images:
                label_of[(m, b)] = (m, b)
            else:
                pooled[m] = pooled.get(m, 0) + n
        for (m, b) in pair_n:
            if (m, b) not in label_of and pooled[m] >= min_class_images:
                label_of[(m, b)] = (m, "")
        self.classes = sorted(set(label_of.values()))
        index = {c: i for i, c in enumerate(self.classes)}
        xs, ys, unused = [], [], 0
        for a, m, b in items:
            c = label_of.get((m, b))
            if c is None:
                unused += 1
                continue
            a = np.asarray(a, dtype=np.float32)
            a = a if a.shape == (self.size, self.size) else resize(a, self.size)
            xs.append(np.clip(np.nan_to_num(a), 0.0, 1.0))
            ys.append(index[c])
        self.class_counts = [ys.count(i) for i in range(len(self.classes))]
        self.meta = {
            "format_version": FORMAT_VERSION, "kind": "conditional-vae",
            "size": self.size, "latent_dim": self.latent_dim, "width": self.width,
            "emb_dim": self.emb_dim,
            "classes": [{"modality": m, "body_part": b, "n_images": n}
                        for (m, b), n in zip(self.classes, self.class_counts)],
            "n_images": len(items), "unused_images": unused,
            "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "beta": beta,
                         "seed": seed, "min_class_images": min_class_images, "device": device},
            "fingerprint": fingerprint(items), "torch_version": torch.__version__,
        }
        if not xs:
            self.net = None
            self.meta["training"]["seconds"] = round(time.perf_counter() - t0, 3)
            return self
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.net = _build_network(self.size, len(self.classes), self.latent_dim, self.width,
                                  self.emb_dim).to(device)
        x_all = torch.from_numpy(np.stack(xs)[:, None]).to(device)
        y_all = torch.tensor(ys, dtype=torch.long, device=device)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs, 1))
        n = len(xs)
        pixels = self.size * self.size
        self.net.train()
        bar = tqdm(range(epochs), desc="image model", disable=not progress, leave=False)
        last = float("nan")
        for _ in bar:
            perm = torch.randperm(n, generator=gen).to(device)
            total = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                x = _augment(x_all[idx], gen)
                recon, mu, logvar = self.net(x, y_all[idx])
                rec = torch.nn.functional.binary_cross_entropy(recon, x, reduction="sum")
                kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
                loss = (rec + beta * kl) / len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            sched.step()
            last = total / n / pixels
            bar.set_postfix(loss=f"{last:.4f}")
        self.net.eval().to("cpu")
        self._fit_code_stats(x_all.cpu(), y_all.cpu())
        self.meta["training"]["final_loss_per_pixel"] = round(last, 6)
        self.meta["training"]["seconds"] = round(time.perf_counter() - t0, 3)
        return self

    # ------------------------------------------------------------------ sampling

    def resolve(self, modality: str, body_part: str = "") -> tuple[str, str] | None:
        """The trained class used for (modality, body_part), or None for the fallback."""
        m, b = norm_modality(modality), norm_body_part(body_part)
        if self.net is None:
            return None
        known = set(self.classes)
        for mod in (m, *NEIGHBOURS.get(m, ())):
            for cand in ((mod, b), (mod, "")):
                if cand in known:
                    return cand
            of_mod = [(n, c) for c, n in zip(self.classes, self.class_counts) if c[0] == mod]
            if of_mod:
                return max(of_mod, key=lambda t: (t[0], t[1][1]))[1]
        return None

    def _fit_code_stats(self, x, y) -> None:
        import torch

        with torch.no_grad():
            mu = torch.cat([self.net.encode(x[i:i + 256], y[i:i + 256])[0]
                            for i in range(0, len(x), 256)])
            for c in range(len(self.classes)):
                codes = mu[y == c]
                self.net.code_mean[c] = codes.mean(0)
                spread = codes.std(0, unbiased=False) if len(codes) > 1 else torch.ones_like(codes[0])
                self.net.code_std[c] = spread.clamp(min=CODE_STD_MIN)

    def _codes(self, eps, cls: tuple[str, str]):
        """Standard normal draws to latent codes of the class (float64)."""
        c = self.classes.index(cls)
        return self.net.code_mean[c].double() + self.net.code_std[c].double() * eps.double()

    def _decode(self, z, cls: tuple[str, str]) -> np.ndarray:
        import torch

        # Decoded in float64: float32 results depend on the number of intra-op threads
        # (reduction order), float64 ones differ only far below the 12-bit rounding, so
        # every worker gives the same pixels whatever its thread settings.
        if self._sampler is None:
            self._sampler = copy.deepcopy(self.net).double().eval()
        y = torch.full((z.shape[0],), self.classes.index(cls), dtype=torch.long)
        with torch.no_grad():
            out = self._sampler.decode(z.double(), y)[:, 0].numpy()
        return (np.round(out * QUANT) / QUANT).astype(np.float32)

    def sample(self, modality: str, body_part: str = "", seed: int = 0, n: int = 1,
               temperature: float = TEMPERATURE) -> np.ndarray:
        """``n`` images of (modality, body part), a pure function of the arguments.

        Args:
            modality: DICOM modality code.
            body_part: Body Part Examined ("" when unknown).
            seed: e.g. ``seed_from_uid(SOPInstanceUID)``.
            n: number of images.
            temperature: scale of the latent codes (below 1: typical rather than varied).

        Returns:
            float32 array [n, S, S] in [0, 1].
        """
        import torch

        cls = self.resolve(modality, body_part)
        m, b = norm_modality(modality), norm_body_part(body_part)
        if cls is None:
            seeds = [seed] + [_child_seed(seed, i) for i in range(1, n)]
            return np.stack([procedural(m, b, s, self.size) for s in seeds])
        gen = torch.Generator().manual_seed(seed & (2**63 - 1))
        z = torch.randn(n, self.latent_dim, generator=gen) * temperature
        return self._decode(self._codes(z, cls), cls)

    def sample_series(self, modality: str, body_part: str = "", seed: int = 0,
                      n_slices: int = 1, slices_per_anchor: int = 12,
                      temperature: float = TEMPERATURE) -> np.ndarray:
        """A coherent stack of slices: latent codes interpolated along the slice axis.

        Anchor codes are drawn every ``slices_per_anchor`` slices and joined by spherical
        interpolation, so neighbouring slices differ a little and the series as a whole
        varies like a volume does.

        Returns:
            float32 array [n_slices, S, S] in [0, 1].
        """
        import torch

        cls = self.resolve(modality, body_part)
        m, b = norm_modality(modality), norm_body_part(body_part)
        if cls is None:
            return procedural_volume(m, b, seed, self.size, n_slices)
        n_anchor = max(2, math.ceil((n_slices - 1) / slices_per_anchor) + 1)
        gen = torch.Generator().manual_seed(seed & (2**63 - 1))
        anchors = (torch.randn(n_anchor, self.latent_dim, generator=gen) * temperature).double()
        pos = (torch.linspace(0, n_anchor - 1, n_slices, dtype=torch.float64) if n_slices > 1
               else torch.zeros(1, dtype=torch.float64))
        lo = pos.floor().long().clamp(max=n_anchor - 2)
        z = _slerp(anchors[lo], anchors[lo + 1], (pos - lo).unsqueeze(1))
        return self._decode(self._codes(z, cls), cls)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Write ``model.json`` (+ ``weights.pt`` when trained) into ``directory``."""
        import torch

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta) or {"format_version": FORMAT_VERSION, "kind": "procedural-only",
                                   "size": self.size, "classes": []}
        meta.update(size=self.size, latent_dim=self.latent_dim, width=self.width,
                    emb_dim=self.emb_dim, has_weights=self.net is not None)
        # Each file is written under a temporary name and renamed, model.json last: an
        # interrupted save leaves the previous model (or none), never a mix.
        if self.net is not None:
            torch.save(self.net.state_dict(), d / (WEIGHTS_FILE + ".tmp"))
            os.replace(d / (WEIGHTS_FILE + ".tmp"), d / WEIGHTS_FILE)
        (d / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(d / (META_FILE + ".tmp"), d / META_FILE)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "ImageModel":
        """Read a model written by :meth:`save` (weights with ``weights_only=True``)."""
        import torch

        d = Path(directory)
        try:
            meta = json.loads((d / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ImageModelError(f"cannot read {d / META_FILE}: {exc}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ImageModelError(f"unsupported image model format {meta.get('format_version')}")
        model = cls(size=int(meta["size"]), latent_dim=int(meta.get("latent_dim", 32)),
                    width=int(meta.get("width", 16)), emb_dim=int(meta.get("emb_dim", 16)))
        model.meta = meta
        model.classes = [(c["modality"], c["body_part"]) for c in meta.get("classes", [])]
        model.class_counts = [int(c["n_images"]) for c in meta.get("classes", [])]
        if meta.get("has_weights"):
            state = torch.load(d / WEIGHTS_FILE, map_location="cpu", weights_only=True)
            model.net = _build_network(model.size, len(model.classes), model.latent_dim,
                                       model.width, model.emb_dim)
            model.net.load_state_dict(state)
            model.net.eval()
        return model


def _child_seed(seed: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") >> 1


def _slerp(a, b, t):
    import torch

    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    omega = torch.arccos((an * bn).sum(1, keepdim=True).clamp(-0.9999, 0.9999))
    so = torch.sin(omega)
    return torch.sin((1 - t) * omega) / so * a + torch.sin(t * omega) / so * b
