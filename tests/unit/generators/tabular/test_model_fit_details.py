"""PatientModel: calibration, per-block snapshots, stratified draws, within-bin curves,
older model files, the look-ahead on bounded children, seeded training."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from generators.tabular import PatientModel, rng  # noqa: E402
from generators.tabular.demo import make_health_table  # noqa: E402
from generators.tabular.encoding import ColumnCodec  # noqa: E402

COND = "cond_44054006"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return make_health_table(160, seed=3)


@pytest.fixture(scope="module")
def blocked(table) -> PatientModel:
    # validation split on: early stopping per block of sampling positions
    return PatientModel(hidden=48, blocks=3, patience=3).fit(table, epochs=15, progress=False)


def test_stratified_uniforms_are_latin_hypercube_and_counter_based():
    rows = np.arange(6400, dtype=np.uint64)
    u = rng.stratified_uniforms(5, rows, 3)
    assert ((u > 0) & (u < 1)).all()
    # every block of STRATA rows has exactly one draw per stratum
    strata = np.floor(u * rng.STRATA).astype(int).reshape(-1, rng.STRATA)
    assert (np.sort(strata, 1) == np.arange(rng.STRATA)).all()
    # a row drawn alone, or in another batch, gets the same value
    assert rng.stratified_uniforms(5, np.array([4711], dtype=np.uint64), 3)[0] == u[4711]
    assert np.array_equal(rng.stratified_uniforms(5, rows[100:300], 3), u[100:300])
    # streams and seeds are independent of each other
    for other in (rng.stratified_uniforms(5, rows, 4), rng.stratified_uniforms(6, rows, 3)):
        assert abs(np.corrcoef(u, other)[0, 1]) < 0.05
        assert not np.array_equal(u, other)


def test_calibration_matches_token_marginals(table):
    m = PatientModel(hidden=32, val_share=0.0).fit(table, epochs=4, progress=False)
    raw = PatientModel(hidden=32, val_share=0.0, calibrate=False).fit(table, epochs=4, progress=False)
    assert m.net.calib.abs().sum() > 0 and raw.net.calib.abs().sum() == 0
    n = 4096

    def gap(model):
        s = model.sample(n, seed=1)
        worst = 0.0
        # categorical columns (a numerical value re-encoded may cross a bin edge when
        # rounded, which is not a marginal error)
        for codec in (c for c in model.codecs if c.kind == "categorical"):
            real = np.bincount(codec.encode(table[codec.name]), minlength=codec.n_tokens) / len(table)
            syn = np.bincount(codec.encode(s[codec.name]), minlength=codec.n_tokens) / n
            worst = max(worst, 0.5 * np.abs(real - syn).sum())
        return worst

    # an undertrained network drifts; the calibrated one keeps every column's marginal
    assert gap(m) < 0.03
    assert gap(m) < gap(raw)


def test_blocks_keep_snapshots_and_round_trip(blocked, table, tmp_path):
    stats = blocked.training
    assert isinstance(stats["best_epoch"], list) and len(stats["best_epoch"]) == 3
    assert len(blocked.nets) == len(set(stats["best_epoch"]))
    assert sorted(set(blocked.col_net)) == list(range(len(blocked.nets)))
    path = blocked.save(tmp_path / "m")
    meta = json.loads((path / "model.json").read_text())
    assert meta["format_version"] == 2 and meta["column_nets"] == blocked.col_net
    loaded = PatientModel.load(path)
    pd.testing.assert_frame_equal(loaded.sample(70, seed=2), blocked.sample(70, seed=2))
    cond = {"sex": "female", COND: 1}
    s = loaded.sample(50, seed=2, conditions=cond)
    assert (s["sex"] == "female").all() and (s[COND] == 1).all()
    pd.testing.assert_frame_equal(s, blocked.sample(50, seed=2, conditions=cond))
    # prefix property and single rows still hold with several networks
    a = blocked.sample(40, seed=9)
    pd.testing.assert_frame_equal(a.iloc[33:34], blocked.sample(1, seed=9, start=33))


def test_version_1_files_still_load(tmp_path, table):
    from safetensors.torch import load_file, save_file

    m = PatientModel(hidden=16, val_share=0.0, calibrate=False).fit(table, epochs=2, progress=False)
    with torch.no_grad():
        m.net.ord.zero_()       # what a v1 file means: no ordinal part, no calibration
    path = m.save(tmp_path / "v1")
    state = load_file(str(path / "model.safetensors"))
    del state["calib"], state["ord"]
    save_file(state, str(path / "model.safetensors"))
    meta = json.loads((path / "model.json").read_text())
    meta.update(format_version=1, weights_sha256=None)
    del meta["column_nets"]
    (path / "model.json").write_text(json.dumps(meta))
    old = PatientModel.load(path)
    pd.testing.assert_frame_equal(old.sample(30, seed=1), m.sample(30, seed=1))


def test_within_bin_curve_follows_clusters():
    r = np.random.default_rng(0)
    # one wide bin's worth of values, clustered near its low end
    x = pd.Series(np.r_[r.uniform(10, 12, 40), r.uniform(12, 50, 8)].round(3), name="onset")
    codec = ColumnCodec.fit(x, "numerical", max_bins=1, min_bin_count=5, knots=4)
    assert codec.n_bins == 1 and len(codec.knots[0]) == 5
    assert not set(codec.knots[0][1:-1]) & set(x)     # averages, not training values
    u = (np.arange(2000) + 0.5) / 2000
    v = codec.numeric_values(np.zeros(2000, dtype=np.int64), u)
    assert np.median(v) < 13 and v.min() >= x.min() and v.max() <= x.max()
    # bounds (constraints) still hold inside the curve
    upper = np.full(2000, 11.0)
    assert (codec.numeric_values(np.zeros(2000, dtype=np.int64), u, upper=upper) <= 11.0).all()
    flat = ColumnCodec.fit(x, "numerical", max_bins=1, knots=0)
    assert flat.knots == [] and np.median(flat.numeric_values(np.zeros(2000, dtype=np.int64), u)) > 25


def test_flag_whose_onset_cannot_fit_under_age_is_not_drawn():
    # an adult-onset condition: onset in [18, age]; a barely trained network does not know
    # that children never have it, the look-ahead on the onset's bound does
    r = np.random.default_rng(5)
    n = 200
    age = r.uniform(0, 90, n).round(2)
    flag = ((age >= 18) & (r.random(n) < 0.6)).astype(int)
    onset = np.where(flag == 1, 18 + (age - 18) * r.random(n), np.nan).round(2)
    df = pd.DataFrame({"age": age, "cond_1": flag, "cond_1_onset_age": onset})
    m = PatientModel(hidden=16, val_share=0.0).fit(df, epochs=2, progress=False)
    assert {(c.kind, c.column) for c in m.constraints} >= {("present_if", "cond_1_onset_age"),
                                                           ("upper", "cond_1_onset_age")}
    s = m.sample(2000, seed=2)
    has = s["cond_1"] == 1
    assert has.sum() > 200
    assert (s.loc[has, "age"] >= df["cond_1_onset_age"].min()).all()
    assert (s["cond_1_onset_age"].dropna() >= df["cond_1_onset_age"].min()).all()   # never clipped
    # conditioning on the flag still returns it as given (the onset then clipped to age)
    c = m.sample(50, seed=2, conditions={"cond_1": 1, "age": 5.0})
    assert (c["cond_1"] == 1).all() and (c["cond_1_onset_age"] <= 5.0).all()


def test_fit_does_not_depend_on_the_global_torch_generator(table):
    fits = []
    for draw in (0, 1000):
        torch.rand(draw)              # another state of torch's global generator
        m = PatientModel(hidden=24, dropout=0.3, patience=2).fit(table, epochs=4, progress=False)
        fits.append(m)
    assert fits[0].training["val_loss"] == fits[1].training["val_loss"]
    pd.testing.assert_frame_equal(fits[0].sample(50, seed=1), fits[1].sample(50, seed=1))
