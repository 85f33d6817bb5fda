"""Image quality and copy checks of an image model against real images (numpy only).

Per (modality, body part) class of the model, synthetic samples are compared with the
real images of that class:

* ``histogram_similarity``: 1 - total variation distance between the pooled grey-level
  histograms (1: same intensity distribution);
* ``spectrum_similarity``: exp(-mean |log P_real - log P_synthetic|) of the mean
  radially averaged power spectra (1: same mix of coarse and fine structure; blur lowers it);
* distance to closest record (mean absolute pixel difference to the nearest real image)
  of every synthetic image, with the real images' own nearest-neighbour distances beside
  it for scale, and ``exact_copies``: synthetic images equal to a real one at 12 bits
  (must be 0).

No feature network is used (FID/KID need pretrained weights a server cannot download);
these are cheap, deterministic proxies.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .data import norm_body_part, norm_modality

COPY_TOLERANCE = 1.0 / 4095.0


def histogram_similarity(real: np.ndarray, synth: np.ndarray, bins: int = 64) -> float:
    """1 - total variation distance of the pooled [0, 1] grey-level histograms."""
    h_r = np.histogram(real, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    h_s = np.histogram(synth, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    return float(1.0 - 0.5 * np.abs(h_r / h_r.sum() - h_s / h_s.sum()).sum())


def radial_spectrum(images: np.ndarray) -> np.ndarray:
    """Mean radially averaged power spectrum of [n, S, S] images (DC removed)."""
    imgs = np.asarray(images, dtype=np.float64)
    imgs = imgs - imgs.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(imgs), axes=(1, 2))) ** 2
    s = imgs.shape[-1]
    yy, xx = np.indices((s, s)) - s // 2
    radius = np.sqrt(xx ** 2 + yy ** 2).astype(int).ravel()
    mean_power = power.mean(axis=0).ravel()
    counts = np.bincount(radius, minlength=s // 2 + 1)
    sums = np.bincount(radius, weights=mean_power, minlength=s // 2 + 1)
    return (sums / np.maximum(counts, 1))[1:s // 2]


def spectrum_similarity(real: np.ndarray, synth: np.ndarray) -> float:
    """exp(-mean |log P_real - log P_synth|) over spatial frequencies."""
    eps = 1e-12
    diff = np.abs(np.log(radial_spectrum(real) + eps) - np.log(radial_spectrum(synth) + eps))
    return float(np.exp(-diff.mean()))


def nearest_distances(queries: np.ndarray, reference: np.ndarray,
                      exclude_self: bool = False) -> np.ndarray:
    """Mean absolute difference from each query image to its nearest reference image."""
    q = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
    r = np.asarray(reference, dtype=np.float32).reshape(len(reference), -1)
    out = np.empty(len(q), dtype=np.float64)
    for i, row in enumerate(q):
        d = np.abs(r - row).mean(axis=1)
        if exclude_self:
            d[i] = np.inf
        out[i] = d.min() if len(d) else np.inf
    return out


def image_report(model, images: Iterable[tuple[np.ndarray, str, str]], n_per_class: int = 32,
                 seed: int = 0) -> dict[str, Any]:
    """Quality and copy figures per trained class of ``model`` against ``images``.

    Args:
        model: a fitted :class:`generators.images.ImageModel`.
        images: real ``(array, modality, body_part)`` tuples (e.g. the training set or a
            hold-out set), at any size (resized to the model's).
        n_per_class: synthetic images sampled per class.
        seed: base seed of the samples.

    Returns:
        ``{"classes": [{modality, body_part, n_real, n_synthetic, histogram_similarity,
        spectrum_similarity, dcr_min, dcr_median, real_nn_median, exact_copies}, ...],
        "exact_copies": total}``.
    """
    from .data import resize

    by_class: dict[tuple[str, str], list[np.ndarray]] = {}
    for array, modality, body_part in images:
        cls = model.resolve(norm_modality(modality), norm_body_part(body_part))
        if cls is None:
            continue
        a = np.asarray(array, dtype=np.float32)
        if a.shape != (model.size, model.size):
            a = np.clip(resize(a, model.size), 0.0, 1.0)
        by_class.setdefault(cls, []).append(a)
    rows = []
    for i, cls in enumerate(model.classes):
        real = by_class.get(cls)
        if not real:
            continue
        real_arr = np.stack(real)
        synth = model.sample(cls[0], cls[1], seed=seed + i, n=n_per_class)
        dcr = nearest_distances(synth, real_arr)
        real_nn = (nearest_distances(real_arr, real_arr, exclude_self=True)
                   if len(real_arr) > 1 else np.array([np.nan]))
        rows.append({
            "modality": cls[0], "body_part": cls[1], "n_real": len(real_arr),
            "n_synthetic": n_per_class,
            "histogram_similarity": round(histogram_similarity(real_arr, synth), 4),
            "spectrum_similarity": round(spectrum_similarity(real_arr, synth), 4),
            "dcr_min": round(float(dcr.min()), 5), "dcr_median": round(float(np.median(dcr)), 5),
            "real_nn_median": round(float(np.nanmedian(real_nn)), 5)
            if np.isfinite(real_nn).any() else None,
            "exact_copies": int((dcr < COPY_TOLERANCE).sum()),
        })
    return {"classes": rows, "exact_copies": sum(r["exact_copies"] for r in rows)}
