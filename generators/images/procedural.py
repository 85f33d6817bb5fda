"""Procedural fallback images for modalities the image model has never seen.

Used when no trained class of the modality (nor of a neighbouring modality) exists.
Each image is a pure function of ``(modality, body_part, seed)`` (numpy Philox,
counter-based, like the rest of synthport's randomness):

* CT / MR (and PT, NM): an axial slice: body ellipse, with a skull ring and brain for
  HEAD, two lungs and a spine for CHEST (the default), organs and a spine elsewhere.
  CT intensities follow Hounsfield units under the CT normalisation of
  :mod:`generators.images.data` (air 0, water ~0.34, bone ~0.6).
* CR / DX / MG / XA / RF / others: a radiograph: dark background, soft tissue, bright
  bones (a chest with lungs, spine and ribs for CHEST; a long bone otherwise).
* US: a fan-shaped sector of speckle on black, with a dark cyst.
* OP: a fundus: a bright disc on black with an optic disc, a darker macula and vessels.

Every image is modulated by a smooth random field so two seeds never look alike.
Series (``volume``) move the structures smoothly along the slice axis.
"""
from __future__ import annotations

import numpy as np

from .data import CT_HU_MAX, CT_HU_MIN, resize

CROSS_SECTIONAL = {"CT", "MR", "PT", "NM"}


def _hu(value: float) -> float:
    return (value - CT_HU_MIN) / (CT_HU_MAX - CT_HU_MIN)


def _rng(seed: int, purpose: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=[seed & (2**64 - 1), purpose]))


def smooth_field(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    """A smooth random field in about [-1, 1]: coarse noise upsampled bicubically."""
    return resize(rng.standard_normal((cells, cells)).astype(np.float32), size) / 2.0


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c, indexing="xy")  # x to the right, y down, both in [-1, 1]


def _ellipse(x, y, cx, cy, rx, ry, soft: float = 0.03) -> np.ndarray:
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - r) / soft + 0.5, 0.0, 1.0)


def _axial(x, y, body_part: str, modality: str, p: np.ndarray, t: float) -> np.ndarray:
    ct = modality == "CT"
    air, soft, fat, bone, lung = ((_hu(-1000), _hu(40), _hu(-100), _hu(700), _hu(-850)) if ct
                                  else (0.0, 0.45, 0.85, 0.1, 0.05))
    img = np.full(x.shape, air, np.float32)
    if body_part in ("HEAD", "BRAIN", "SKULL"):
        r = 0.72 + 0.06 * p[0] - 0.15 * t * t
        outer = _ellipse(x, y, 0, 0, r * 0.85, r)
        inner = _ellipse(x, y, 0, 0, r * 0.85 - 0.07, r - 0.07)
        img = img * (1 - outer) + bone * outer
        brain = _hu(35) if ct else 0.55
        img = img * (1 - inner) + brain * inner
        for s in (-1, 1):  # lateral ventricles
            v = _ellipse(x, y, s * 0.1, -0.05 + 0.03 * p[1], 0.06, 0.2 + 0.05 * p[2])
            img = img * (1 - v) + (_hu(5) if ct else 0.2) * v
        return img
    rx, ry = 0.85 + 0.05 * p[0], 0.62 + 0.05 * p[1]
    body = _ellipse(x, y, 0, 0.05, rx, ry)
    img = img * (1 - body) + fat * body
    inner = _ellipse(x, y, 0, 0.05, rx - 0.07, ry - 0.07)
    img = img * (1 - inner) + soft * inner
    if body_part in ("", "CHEST", "THORAX", "LUNG", "HEART"):
        for s in (-1, 1):
            lu = _ellipse(x, y, s * (0.38 + 0.03 * p[2]), 0.0, 0.3, 0.42 - 0.1 * abs(t))
            img = img * (1 - lu) + lung * lu
        heart = _ellipse(x, y, 0.1, -0.05, 0.22, 0.2)
        img = img * (1 - heart) + (_hu(45) if ct else 0.5) * heart
    else:
        for cx, cy, r, hu, m in ((-0.35, -0.05, 0.25, 60, 0.6), (0.35, 0.1, 0.14, 30, 0.35),
                                 (-0.3, 0.3, 0.08, 30, 0.4), (0.3, 0.3, 0.08, 30, 0.4)):
            o = _ellipse(x, y, cx + 0.03 * p[3], cy, r, r * 0.9)
            img = img * (1 - o) + (_hu(hu) if ct else m) * o
    spine = _ellipse(x, y, 0, 0.45, 0.1, 0.09)
    img = img * (1 - spine) + bone * spine
    return img


def _radiograph(x, y, body_part: str, p: np.ndarray) -> np.ndarray:
    img = np.full(x.shape, 0.05, np.float32)
    if body_part in ("", "CHEST", "THORAX", "RIBS", "LUNG"):
        torso = _ellipse(x, y, 0, 0.1, 0.85 + 0.05 * p[0], 1.1, soft=0.1)
        img = img * (1 - torso) + 0.55 * torso
        for s in (-1, 1):
            lu = _ellipse(x, y, s * 0.38, -0.05 + 0.03 * p[1], 0.3, 0.6 + 0.05 * p[2], soft=0.15)
            img = img * (1 - lu) + 0.25 * lu
        heart = _ellipse(x, y, 0.12, 0.3, 0.28, 0.25, soft=0.15)
        img = img * (1 - heart) + 0.6 * heart
        spine = np.clip(1 - np.abs(x) / 0.07, 0, 1) * (y > -0.9)
        img = np.maximum(img, 0.75 * spine)
        for k in range(9):  # ribs: thin arcs
            yy = -0.65 + k * 0.15 + 0.1 * x ** 2
            rib = np.clip(1 - np.abs(y - yy) / 0.02, 0, 1) * (np.abs(x) < 0.75)
            img = np.maximum(img, 0.65 * rib * (img > 0.2))
        return img
    ang = 0.2 * p[0]
    u = x * np.cos(ang) + y * np.sin(ang)
    limb = np.clip(1 - np.abs(u) / (0.35 + 0.05 * p[1]), 0, 1) ** 0.5
    img = np.maximum(img, 0.45 * limb)
    bone = np.clip(1 - np.abs(u - 0.02 * p[2]) / 0.12, 0, 1) ** 0.3
    return np.maximum(img, 0.85 * bone)


def _ultrasound(x, y, rng, p: np.ndarray) -> np.ndarray:
    r = np.sqrt(x ** 2 + (y + 1.0) ** 2)
    theta = np.arctan2(x, y + 1.0)
    sector = (np.abs(theta) < 0.6) & (r > 0.15) & (r < 1.9)
    speckle = rng.rayleigh(0.3, x.shape).astype(np.float32)
    img = np.clip(speckle * (0.9 - 0.3 * r / 1.9), 0, 1)
    cyst = _ellipse(x, y, 0.1 * p[0], 0.2 + 0.1 * p[1], 0.2, 0.14)
    img = img * (1 - 0.85 * cyst)
    return img * sector


def _fundus(x, y, rng, p: np.ndarray) -> np.ndarray:
    r = np.sqrt(x ** 2 + y ** 2)
    disc = np.clip((0.92 - r) / 0.04, 0, 1)
    img = 0.5 * (1 - 0.5 * r ** 2) * disc
    od = _ellipse(x, y, 0.45 + 0.03 * p[0], 0.0, 0.13, 0.15, soft=0.2)
    img = img * (1 - od) + 0.95 * od
    mac = _ellipse(x, y, -0.15, 0.02, 0.12, 0.12, soft=0.5)
    img = img * (1 - 0.4 * mac)
    for _ in range(6):  # vessels: arcs leaving the optic disc
        a, b = rng.uniform(-1.2, 1.2), rng.uniform(0.5, 1.5)
        curve = 0.0 + a * (x - 0.45) * np.exp(-b * np.abs(x - 0.45))
        vessel = np.clip(1 - np.abs(y - curve) / 0.015, 0, 1) * (x < 0.45)
        img = img * (1 - 0.5 * vessel)
    return img * disc


def procedural(modality: str, body_part: str, seed: int, size: int, t: float = 0.0,
               slice_seed: int | None = None) -> np.ndarray:
    """One procedural image.

    Args:
        modality: DICOM modality code.
        body_part: Body Part Examined keyword ("" when unknown).
        seed: the image's (or series') seed.
        size: output side S.
        t: position in a series, -1 (first slice) to 1 (last); 0 for single images.
        slice_seed: seed of the per-slice noise (defaults to ``seed``).

    Returns:
        float32 [S, S] in [0, 1].
    """
    rng = _rng(seed)
    p = rng.uniform(-1.0, 1.0, 8).astype(np.float32)
    field = smooth_field(rng, size)
    noise_rng = _rng(seed if slice_seed is None else slice_seed, 1)
    x, y = _grid(size)
    if modality == "US":
        img = _ultrasound(x, y, noise_rng, p)
    elif modality in ("OP", "XC"):
        img = _fundus(x, y, noise_rng, p)
    elif modality in CROSS_SECTIONAL:
        img = _axial(x, y, body_part, modality, p, t)
        img = img + 0.01 * noise_rng.standard_normal(x.shape).astype(np.float32)
    else:
        img = _radiograph(x, y, body_part, p)
        img = img + 0.01 * noise_rng.standard_normal(x.shape).astype(np.float32)
    img = img * (1.0 + 0.08 * field)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def procedural_volume(modality: str, body_part: str, seed: int, size: int,
                      n_slices: int) -> np.ndarray:
    """``n_slices`` procedural slices whose anatomy changes smoothly along the series."""
    ts = np.linspace(-1.0, 1.0, n_slices) if n_slices > 1 else np.zeros(1)
    return np.stack([procedural(modality, body_part, seed, size, float(t), slice_seed=seed + 1 + i)
                     for i, t in enumerate(ts)])
