"""ImageModel: fit/sample/save/load, class fallback, determinism, series coherence."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from generators.images.model import (NEIGHBOURS, ImageModel, ImageModelError,  # noqa: E402
                                     seed_from_uid)
from generators.images.procedural import procedural, procedural_volume  # noqa: E402

REPO = Path(__file__).resolve().parents[4]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def training_set(size: int = 64) -> list[tuple[np.ndarray, str, str]]:
    """Procedural stand-ins: 6 CT HEAD, 2 CT CHEST, 5 CR CHEST, 1 NM (too few for a class)."""
    out = [(procedural("CT", "HEAD", s, size), "CT", "HEAD") for s in range(6)]
    out += [(procedural("CT", "CHEST", 100 + s, size), "ct", "chest") for s in range(2)]
    out += [(procedural("CR", "CHEST", 200 + s, size), "CR", "CHEST") for s in range(5)]
    out += [(procedural("NM", "", 300, size), "NM", "")]
    return out


@pytest.fixture(scope="module")
def fitted():
    torch.set_num_threads(1)
    return ImageModel().fit(training_set(), epochs=3, progress=False, min_class_images=4)


def test_classes_pool_rare_body_parts_and_leave_out_rare_modalities(fitted):
    assert fitted.classes == [("CR", "CHEST"), ("CT", "HEAD")]
    assert fitted.class_counts == [5, 6]
    assert fitted.meta["unused_images"] == 3  # 2 CT CHEST (pool of 2 < 4) and the NM image
    assert len(fitted.meta["fingerprint"]) == 64
    # Per-class code statistics are fitted after training (ex-post density estimation).
    assert fitted.net.code_mean.abs().sum() > 0 and (fitted.net.code_std >= 0.05).all()


def test_sample_shape_range_and_determinism(fitted):
    a = fitted.sample("CT", "HEAD", seed=42, n=3)
    assert a.shape == (3, 64, 64) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.array_equal(a, fitted.sample("CT", "HEAD", seed=42, n=3))
    assert not np.array_equal(a[0], fitted.sample("CT", "HEAD", seed=43)[0])
    assert not np.array_equal(a[0], a[1])
    # The class embedding matters: same seed, other class, other image.
    assert not np.array_equal(a[0], fitted.sample("CR", "CHEST", seed=42)[0])


def test_resolution_order(fitted):
    assert fitted.resolve("CT", "HEAD") == ("CT", "HEAD")
    assert fitted.resolve("ct", "Chest") == ("CT", "HEAD")       # largest class of the modality
    assert fitted.resolve("DX", "CHEST") == ("CR", "CHEST")      # neighbouring modality
    assert "DX" in NEIGHBOURS["CR"] and "CR" in NEIGHBOURS["DX"]
    assert fitted.resolve("MR", "KNEE") == ("CT", "HEAD")        # MR -> CT
    assert fitted.resolve("US", "") is None
    assert fitted.resolve("OP", "EYE") is None
    dx = fitted.sample("DX", "CHEST", seed=5)
    assert np.array_equal(dx, fitted.sample("CR", "CHEST", seed=5))


def test_unknown_modality_uses_the_procedural_fallback(fitted):
    got = fitted.sample("US", "ABDOMEN", seed=9, n=2)
    assert got.shape == (2, 64, 64)
    assert np.array_equal(got[0], procedural("US", "ABDOMEN", 9, 64))
    vol = fitted.sample_series("PT", "", seed=9, n_slices=4)  # PT -> NM: no NM class either
    assert np.array_equal(vol, procedural_volume("PT", "", 9, 64, 4))


@pytest.mark.parametrize("modality,body_part", [("CT", "HEAD"), ("CT", "CHEST"), ("MR", ""),
                                                ("CR", "CHEST"), ("DX", "HAND"), ("US", ""),
                                                ("OP", ""), ("MG", "BREAST")])
def test_procedural_images_look_like_their_modality(modality, body_part):
    img = procedural(modality, body_part, 3, 64)
    assert img.shape == (64, 64) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    assert np.array_equal(img, procedural(modality, body_part, 3, 64))
    assert not np.array_equal(img, procedural(modality, body_part, 4, 64))
    if modality == "US":  # fan-shaped sector: the top corners are black
        assert img[:8, :8].max() == 0.0 and img[:8, -8:].max() == 0.0
    if modality == "CT":  # air around the body is about -1000 HU
        assert img[0, 0] < 0.02


def test_unfitted_model_is_procedural_and_saves_without_weights(tmp_path):
    m = ImageModel(size=32)
    assert m.resolve("CT", "HEAD") is None
    assert np.array_equal(m.sample("CT", "HEAD", 1), procedural("CT", "HEAD", 1, 32)[None])
    m.save(tmp_path)
    assert not (tmp_path / "weights.pt").exists()
    back = ImageModel.load(tmp_path)
    assert back.size == 32 and np.array_equal(back.sample("CT", "HEAD", 1), m.sample("CT", "HEAD", 1))


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["classes"][1] == {"modality": "CT", "body_part": "HEAD", "n_images": 6}
    assert meta["training"]["epochs"] == 3 and meta["has_weights"] is True
    back = ImageModel.load(tmp_path / "m")
    for mod, bp in (("CT", "HEAD"), ("CR", "CHEST"), ("US", "")):
        assert np.array_equal(back.sample(mod, bp, 77, n=2), fitted.sample(mod, bp, 77, n=2))
    assert np.array_equal(back.sample_series("CT", "HEAD", 5, 7), fitted.sample_series("CT", "HEAD", 5, 7))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_load_never_unpickles_objects(fitted, tmp_path):
    fitted.save(tmp_path)
    torch.save({"x": _Evil()}, tmp_path / "weights.pt")  # a pickle that runs code on load
    with pytest.raises(Exception) as err:
        ImageModel.load(tmp_path)
    assert "weights_only" in str(err.value) or "Unsupported" in str(err.value)


def test_load_rejects_unknown_format(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"format_version": 99, "size": 64}))
    with pytest.raises(ImageModelError):
        ImageModel.load(tmp_path)
    with pytest.raises(ImageModelError):
        ImageModel.load(tmp_path / "missing")


def test_same_image_in_another_process(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    uid = "1.2.826.0.1.3680043.8.498.12345"
    script = (
        "import sys, numpy as np, torch; torch.set_num_threads(2);"
        "from generators.images.model import ImageModel, seed_from_uid;"
        "m = ImageModel.load(sys.argv[1]);"
        "np.save(sys.argv[2], np.concatenate([m.sample('CT', 'HEAD', seed_from_uid(sys.argv[3])),"
        " m.sample('CR', 'CHEST', 5, n=3),"
        " m.sample_series('CR', 'CHEST', 11, 5)]))"
    )
    out = tmp_path / "other.npy"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "m"), str(out), uid],
                   check=True, cwd=REPO, timeout=120, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin"})
    # This process runs one thread, the other two: float32 convolutions of a small batch
    # differ between the two; the float64 decoder makes the pixels agree.
    here = np.concatenate([fitted.sample("CT", "HEAD", seed_from_uid(uid)),
                           fitted.sample("CR", "CHEST", 5, n=3),
                           fitted.sample_series("CR", "CHEST", 11, 5)])
    assert np.array_equal(np.load(out), here)


def test_seed_from_uid_is_stable():
    assert seed_from_uid("1.2.3") == seed_from_uid(" 1.2.3 ")
    assert seed_from_uid("1.2.3") != seed_from_uid("1.2.4")
    assert 0 <= seed_from_uid("1.2.3") < 2 ** 63
    # Pinned: a change here changes every synthetic image ever served.
    assert seed_from_uid("1.2.3") == int.from_bytes(
        __import__("hashlib").sha256(b"1.2.3").digest()[:8], "big") >> 1


def test_series_is_smooth_along_the_slice_axis(fitted):
    vol = fitted.sample_series("CT", "HEAD", seed=3, n_slices=25)
    assert vol.shape == (25, 64, 64)
    step = np.mean([np.abs(vol[i + 1] - vol[i]).mean() for i in range(24)])
    independent = fitted.sample("CT", "HEAD", seed=3, n=8)
    apart = np.mean([np.abs(independent[i + 1] - independent[i]).mean() for i in range(7)])
    assert step < apart / 2


def test_size_128_and_bad_size():
    m = ImageModel(size=128).fit(training_set(128)[:6], epochs=1, progress=False)
    assert m.sample("CT", "HEAD", 1).shape == (1, 128, 128)
    with pytest.raises(ImageModelError):
        ImageModel(size=100).fit(training_set(100)[:6], epochs=1, progress=False)
