"""generators.dp: the RDP accountant and the DP-SGD gradient."""
from __future__ import annotations

import math

import numpy as np
import pytest

from generators import dp


def test_full_batch_is_the_gaussian_mechanism():
    # q = 1: RDP(alpha) = alpha / (2 sigma^2) exactly (Mironov 2017, Prop. 7)
    orders = [2, 3, 10, 64]
    assert np.allclose(dp.rdp_sampled_gaussian(1.0, 2.0, orders), [a / 8 for a in orders])
    assert np.allclose(dp.rdp_gaussian(3.0, 6.0, orders), [a / 8 for a in orders])
    # the binomial expansion at q < 1 agrees with the closed form for alpha = 2:
    # A_2 = (1 - q)^2 + 2 q (1 - q) + q^2 exp(1 / sigma^2)
    q, s = 0.3, 1.5
    a2 = (1 - q) ** 2 + 2 * q * (1 - q) + q * q * math.exp(1 / s ** 2)
    assert math.isclose(dp.rdp_sampled_gaussian(q, s, [2])[0], math.log(a2), rel_tol=1e-12)
    assert dp.rdp_sampled_gaussian(0.0, 1.0, [2, 5]).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("q, sigma, steps, expected", [
    # epsilon at delta = 1e-5 over the integer orders 2..256, cross-checked against the RDP
    # analysis shipped with opacus 1.6.0 (opacus.accountants.analysis.rdp, same orders,
    # same conversion); the second row is the usual MNIST setting (batch 256 of 60,000,
    # sigma 1.1, 60 epochs)
    (0.01, 1.1, 1000, 1.7253),
    (256 / 60000, 1.1, 60000 // 256 * 60, 2.5948),
    (0.2, 1.0, 100, 16.7739),
    (0.05, 2.0, 500, 2.7749),
    (1.0, 5.0, 10, 2.8141),
])
def test_epsilon_matches_reference_values(q, sigma, steps, expected):
    assert dp.epsilon(q, sigma, steps, 1e-5) == pytest.approx(expected, abs=1e-4)


def test_epsilon_is_monotonic():
    base = dp.epsilon(0.05, 1.2, 200, 1e-5)
    assert dp.epsilon(0.05, 1.2, 400, 1e-5) > base          # more steps
    assert dp.epsilon(0.05, 2.4, 200, 1e-5) < base          # more noise
    assert dp.epsilon(0.10, 1.2, 200, 1e-5) > base          # larger batches
    assert dp.epsilon(0.05, 1.2, 200, 1e-3) < base          # larger delta
    # composition with another mechanism only adds
    extra = dp.rdp_gaussian(1.0, 10.0)
    assert dp.epsilon(0.05, 1.2, 200, 1e-5, extra_rdp=extra) > base
    # the improved conversion is never worse than RDP + log(1/delta) / (alpha - 1)
    rdp = 200 * dp.rdp_sampled_gaussian(0.05, 1.2)
    a = np.asarray(dp.ORDERS, dtype=float)
    assert base <= float(np.min(rdp + math.log(1e5) / (a - 1))) + 1e-12


def test_noise_for_epsilon_reaches_the_target_tightly():
    extra = dp.rdp_gaussian(20.0, 200.0)
    for target in (0.5, 3.0, 10.0):
        s = dp.noise_for_epsilon(target, 1e-5, 0.1, 300, extra_rdp=extra)
        assert dp.epsilon(0.1, s, 300, 1e-5, extra_rdp=extra) <= target
        assert dp.epsilon(0.1, s * 0.99, 300, 1e-5, extra_rdp=extra) > target
    with pytest.raises(ValueError):
        dp.noise_for_epsilon(0.01, 1e-5, 0.1, 300, extra_rdp=dp.rdp_gaussian(1.0, 0.1))
    s = dp.gaussian_noise_for_epsilon(1.0, 1e-5, 4.0)
    assert dp.rdp_to_dp(dp.rdp_gaussian(4.0, s), 1e-5)[0] <= 1.0
    with pytest.raises(ValueError):
        dp.rdp_sampled_gaussian(1.5, 1.0)
    with pytest.raises(ValueError):
        dp.rdp_to_dp(np.zeros(len(dp.ORDERS)), 0.0)


def test_dp_sgd_clips_each_example_and_adds_calibrated_noise():
    torch = pytest.importorskip("torch")

    w = torch.zeros(3)

    def loss(p, x):            # gradient of one example = x
        return (p["w"] * x).sum()

    x = torch.tensor([[30.0, 40.0, 0.0], [0.3, 0.4, 0.0]])
    g = torch.Generator().manual_seed(0)
    out = dp.dp_sgd_grads(loss, {"w": w}, {}, (x,), clip_norm=1.0, noise_multiplier=0.0,
                          expected_batch_size=2.0, generator=g)
    # the first example (norm 50) is scaled to norm 1, the second (norm 0.5) is kept
    assert torch.allclose(out["w"], torch.tensor([(0.6 + 0.3) / 2, (0.8 + 0.4) / 2, 0.0]))
    # noise: std sigma * C / expected batch, also when nobody was sampled
    many = torch.stack([dp.dp_sgd_grads(loss, {"w": w}, {}, (x[:0],), clip_norm=2.0,
                                        noise_multiplier=1.5, expected_batch_size=4.0,
                                        generator=g)["w"] for _ in range(2000)])
    assert float(many.std()) == pytest.approx(1.5 * 2.0 / 4.0, rel=0.05)
    assert abs(float(many.mean())) < 0.03
