"""Own SDMetrics-style quality report: sanity, hand-checked metrics, and sdmetrics itself."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from generators.evaluation.fidelity import (_cramers_v, ks_complement, quality_report,
                                            sdtypes_from_metadata, to_sdmetrics_metadata,
                                            tv_complement)
from generators.tabular.demo import make_health_table


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    return make_health_table(300, seed=1)


def _perturbed(seed: int = 2) -> pd.DataFrame:
    syn = make_health_table(300, seed=seed)
    syn["obs_8480-6_mean"] = syn["obs_8480-6_mean"].sample(frac=1, random_state=0).to_numpy()
    syn["sex"] = syn["sex"].sample(frac=1, random_state=1).to_numpy()
    syn["country"] = np.where(np.arange(len(syn)) % 7 == 0, "XX", syn["country"])
    return syn


def _with_extra_kinds(real: pd.DataFrame, syn: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    real, syn = real.copy(), syn.copy()
    real["when"] = pd.to_datetime("2020-01-01") + pd.to_timedelta(real["age"] * 30, unit="D")
    syn["when"] = pd.to_datetime("2020-01-01") + pd.to_timedelta(syn["age"] * 31, unit="D")
    real.loc[::9, "when"] = pd.NaT
    real["flag"] = real["age"] > 40
    syn["flag"] = syn["age"] > 45
    return real, syn


def test_identical_data_scores_one(real):
    q = quality_report(real, real.copy())
    assert q["score"] == pytest.approx(1.0)
    assert q["column_shapes"]["score"] == pytest.approx(1.0)
    assert q["column_pair_trends"]["score"] == pytest.approx(1.0)
    assert q["column_pair_trends"]["pairs_counted"] > 10


def test_independent_columns_lower_pair_trends_only(real):
    shuffled = real.copy()
    r = np.random.default_rng(0)
    for c in shuffled.columns:
        shuffled[c] = shuffled[c].to_numpy()[r.permutation(len(shuffled))]
    q = quality_report(real, shuffled)
    assert q["column_shapes"]["score"] == pytest.approx(1.0)  # same marginals
    assert q["column_pair_trends"]["score"] < 0.85
    q0 = quality_report(real, shuffled, real_correlation_threshold=0, real_association_threshold=0)
    assert q0["column_pair_trends"]["score"] < 1.0
    assert q0["column_pair_trends"]["pairs_counted"] > q["column_pair_trends"]["pairs_counted"]


def test_ks_and_tv_by_hand():
    assert ks_complement(pd.Series([1.0, 2.0, 3.0, np.nan]), pd.Series([1.0, 2.0, 3.0])) == 1.0
    # D = max |F1 - F2| = 0.5 at x = 2
    assert ks_complement(pd.Series([1.0, 2.0]), pd.Series([3.0, 4.0])) == pytest.approx(0.0)
    assert ks_complement(pd.Series([1.0, 2.0, 3.0, 4.0]), pd.Series([3.0, 4.0, 3.0, 4.0])) == pytest.approx(0.5)
    assert tv_complement(pd.Series(["a", "a", "b", None]), pd.Series(["a", "b"])) == pytest.approx(1 - 0.5 * (1 / 6 + 1 / 6))
    assert math.isnan(ks_complement(pd.Series([np.nan]), pd.Series([1.0])))


def test_metrics_agree_with_scipy(real):
    stats = pytest.importorskip("scipy.stats", reason="scipy (with scikit-learn) not installed")
    from scipy.stats.contingency import association

    a, b = real["obs_8480-6_mean"], make_health_table(300, seed=5)["obs_8480-6_mean"]
    assert ks_complement(a, b) == pytest.approx(1 - stats.ks_2samp(a, b).statistic, abs=1e-12)
    x, y = real["marital_status"].to_numpy(), real["cond_38341003"].to_numpy()
    table = pd.crosstab(x, y).to_numpy()
    assert _cramers_v(x, y) == pytest.approx(association(table, method="cramer"), abs=1e-12)


def test_metadata_styles_and_ids(real):
    st = sdtypes_from_metadata(real)
    assert st["patient_id"] == "id" and st["sex"] == "categorical" and st["age"] == "numerical"
    assert st["cond_44054006"] == "categorical"
    st2 = sdtypes_from_metadata(real, {"age": {"kind": "categorical"}, "sex": {"kind": "key"}})
    assert st2["age"] == "categorical" and st2["sex"] == "id"
    st3 = sdtypes_from_metadata(real, to_sdmetrics_metadata({"age": "categorical"}))
    assert st3["age"] == "categorical"
    q = quality_report(real, real, {"sex": {"kind": "key"}})
    assert "sex" not in {d["column"] for d in q["column_shapes"]["details"]}


@pytest.mark.parametrize("thresholds", [(0.5, 0.3), (0.0, 0.0)])
def test_matches_sdmetrics_quality_report(real, thresholds):
    pytest.importorskip("sdmetrics", reason="sdmetrics not installed (pip install 'synthport[eval]'; "
                        "it pins pandas<3, so it is not in the test extra)")
    from sdmetrics.reports.single_table import QualityReport

    r, s = _with_extra_kinds(real, _perturbed())
    meta = to_sdmetrics_metadata(sdtypes_from_metadata(r))
    mine = quality_report(r, s, meta, real_correlation_threshold=thresholds[0],
                          real_association_threshold=thresholds[1])
    rep = QualityReport()
    rep.real_correlation_threshold, rep.real_association_threshold = thresholds
    rep.generate(r, s, meta, verbose=False)
    props = rep.get_properties().set_index("Property")["Score"]
    assert mine["score"] == pytest.approx(rep.get_score(), abs=1e-9)
    assert mine["column_shapes"]["score"] == pytest.approx(props["Column Shapes"], abs=1e-9)
    assert mine["column_pair_trends"]["score"] == pytest.approx(props["Column Pair Trends"], abs=1e-9)
    theirs = rep.get_details("Column Pair Trends")
    ours = pd.DataFrame(mine["column_pair_trends"]["details"])
    np.testing.assert_allclose(ours["score"].to_numpy(float), theirs["Score"].to_numpy(float),
                               atol=1e-9, equal_nan=True)
