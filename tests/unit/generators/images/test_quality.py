"""Image quality proxies and the exact-copy check."""
from __future__ import annotations

import numpy as np

from generators.images.data import resize
from generators.images.procedural import procedural
from generators.images.quality import (histogram_similarity, image_report, nearest_distances,
                                       spectrum_similarity)


def heads(seeds) -> np.ndarray:
    return np.stack([procedural("CT", "HEAD", s, 32) for s in seeds])


def test_histogram_similarity_bounds():
    a = heads(range(4))
    assert histogram_similarity(a, a) == 1.0
    assert histogram_similarity(np.zeros((2, 8, 8)), np.ones((2, 8, 8))) == 0.0
    assert 0.5 < histogram_similarity(a, heads(range(10, 14))) < 1.0


def test_spectrum_similarity_sees_blur():
    a = heads(range(6))
    blurred = np.stack([resize(resize(x, 8), 32) for x in a])
    assert spectrum_similarity(a, a) == 1.0
    assert spectrum_similarity(a, heads(range(20, 26))) > spectrum_similarity(a, blurred)


def test_nearest_distances():
    a = heads(range(3))
    assert np.array_equal(nearest_distances(a, a), np.zeros(3))
    assert (nearest_distances(a, a, exclude_self=True) > 0).all()


class CopyingModel:
    """A 'model' that returns its training images: the report must flag copies."""

    size = 32
    classes = [("CT", "HEAD")]

    def __init__(self, train):
        self.train = train

    def resolve(self, modality, body_part):
        return ("CT", "HEAD") if modality == "CT" else None

    def sample(self, modality, body_part, seed, n):
        return self.train[np.arange(n) % len(self.train)]


def test_report_counts_exact_copies():
    train = heads(range(5))
    images = [(x, "CT", "HEAD") for x in train] + [(procedural("US", "", 1, 32), "US", "")]
    report = image_report(CopyingModel(train), images, n_per_class=8)
    [row] = report["classes"]
    assert row["n_real"] == 5 and row["n_synthetic"] == 8
    assert row["exact_copies"] == 8 and report["exact_copies"] == 8
    assert row["dcr_min"] == 0.0 and row["histogram_similarity"] > 0.9
    assert row["real_nn_median"] > 0


def test_report_on_a_procedural_model_has_no_copies():
    class Procedural(CopyingModel):
        def sample(self, modality, body_part, seed, n):
            return np.stack([procedural("CT", "HEAD", 1000 + seed + i, 32) for i in range(n)])

    train = heads(range(5))
    report = image_report(Procedural(train), [(x, "CT", "HEAD") for x in train], n_per_class=4)
    assert report["exact_copies"] == 0 and report["classes"][0]["dcr_min"] > 0
