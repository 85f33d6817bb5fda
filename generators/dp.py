"""Differential privacy: a Rényi-DP accountant and DP-SGD steps in plain torch.

What is here (docs/generators.md, "Differentially private mode"):

* the RDP of the **sampled Gaussian mechanism** (Poisson sampling with rate q, L2
  sensitivity 1, noise N(0, sigma^2)) at integer orders alpha >= 2, from Mironov, Talwar
  and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism" (2019),
  Section 3.3: for the add/remove-one neighbouring relation,

      A_alpha = sum_{k=0..alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))
      RDP(alpha) = log(A_alpha) / (alpha - 1)

  computed in log space (a log-sum-exp over k); q = 1 gives the Gaussian mechanism's
  alpha / (2 sigma^2) exactly;
* the RDP of the plain **Gaussian mechanism** with L2 sensitivity Delta and noise s:
  alpha Delta^2 / (2 s^2) (Mironov 2017, Proposition 7);
* composition: RDP adds up order by order (Mironov 2017, Proposition 1);
* conversion to (epsilon, delta)-DP, minimised over the orders (Balle, Barthe, Gaboardi,
  Hsu and Sato, "Hypothesis testing interpretations and Rényi differential privacy",
  AISTATS 2020, Theorem 21):

      epsilon = RDP(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)

  which is never larger than Mironov's RDP(alpha) + log(1/delta) / (alpha - 1);
* :func:`dp_sgd_grads`: per-example gradients with ``torch.func`` (``vmap`` over
  ``grad`` of ``functional_call``), each clipped to L2 norm C over all parameters, summed,
  plus Gaussian noise N(0, sigma^2 C^2), divided by the *expected* batch size q n (the
  estimator whose sensitivity the accountant assumes; Abadi et al., "Deep learning with
  differential privacy", CCS 2016, Algorithm 1, with Poisson sampling as in the
  accountant).

Only integer orders are used (2..256): fractional orders can give slightly smaller
epsilons at large noise; the bound here is valid, only sometimes a little loose.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np

#: Rényi orders the accountant minimises over.
ORDERS: tuple[int, ...] = tuple(range(2, 257))


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m)))) if math.isfinite(m) else m


def rdp_sampled_gaussian(q: float, sigma: float, orders: Iterable[int] = ORDERS) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each (integer) order.

    Args:
        q: Poisson sampling rate in [0, 1].
        sigma: noise multiplier (noise std / L2 sensitivity), > 0.
        orders: integer orders >= 2.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling rate must be in [0, 1], not {q}")
    if sigma <= 0:
        raise ValueError("the noise multiplier must be positive")
    orders = [int(a) for a in orders]
    if any(a < 2 for a in orders):
        raise ValueError("orders must be integers >= 2")
    out = np.empty(len(orders))
    for i, a in enumerate(orders):
        if q == 0:
            out[i] = 0.0
            continue
        if q == 1:
            out[i] = a / (2.0 * sigma ** 2)
            continue
        k = np.arange(a + 1, dtype=float)
        log_binom = (math.lgamma(a + 1) - np.array([math.lgamma(x + 1) for x in k])
                     - np.array([math.lgamma(a - x + 1) for x in k]))
        terms = (log_binom + (a - k) * math.log1p(-q) + k * math.log(q)
                 + (k * k - k) / (2.0 * sigma ** 2))
        out[i] = max(_logsumexp(terms), 0.0) / (a - 1)
    return out


def rdp_gaussian(sensitivity: float, noise_std: float, orders: Iterable[int] = ORDERS) -> np.ndarray:
    """RDP of the Gaussian mechanism (L2 sensitivity, noise standard deviation)."""
    if noise_std <= 0:
        raise ValueError("the noise standard deviation must be positive")
    a = np.asarray(list(orders), dtype=float)
    return a * sensitivity ** 2 / (2.0 * noise_std ** 2)


def rdp_to_dp(rdp: np.ndarray, delta: float, orders: Iterable[int] = ORDERS) -> tuple[float, int]:
    """(epsilon, best order) from an RDP curve (Balle et al. 2020, Theorem 21)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    a = np.asarray(list(orders), dtype=float)
    eps = rdp + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    i = int(np.nanargmin(eps))
    return max(float(eps[i]), 0.0), int(a[i])


def epsilon(q: float, sigma: float, steps: int, delta: float, *,
            extra_rdp: np.ndarray | None = None, orders: Iterable[int] = ORDERS) -> float:
    """epsilon of ``steps`` sampled Gaussian steps (plus ``extra_rdp``, composed) at delta."""
    orders = list(orders)
    rdp = steps * rdp_sampled_gaussian(q, sigma, orders)
    if extra_rdp is not None:
        rdp = rdp + extra_rdp
    return rdp_to_dp(rdp, delta, orders)[0]


def noise_for_epsilon(target: float, delta: float, q: float, steps: int, *,
                      extra_rdp: np.ndarray | None = None, orders: Iterable[int] = ORDERS,
                      tol: float = 1e-3) -> float:
    """Smallest noise multiplier (to ``tol`` relative) whose epsilon is <= ``target``.

    Raises:
        ValueError: ``extra_rdp`` alone already spends more than the target.
    """
    orders = list(orders)
    if extra_rdp is not None and rdp_to_dp(extra_rdp, delta, orders)[0] >= target:
        raise ValueError("the rest of the budget leaves nothing for training")
    lo, hi = 1e-2, 1.0
    while epsilon(q, hi, steps, delta, extra_rdp=extra_rdp, orders=orders) > target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError("no noise multiplier reaches that epsilon")
    while (hi - lo) / hi > tol:
        mid = (lo + hi) / 2
        if epsilon(q, mid, steps, delta, extra_rdp=extra_rdp, orders=orders) > target:
            lo = mid
        else:
            hi = mid
    return hi


def gaussian_noise_for_epsilon(target: float, delta: float, sensitivity: float, *,
                               orders: Iterable[int] = ORDERS, tol: float = 1e-3) -> float:
    """Smallest noise std for which the Gaussian mechanism alone has epsilon <= target."""
    orders = list(orders)
    lo, hi = 1e-3 * sensitivity, sensitivity
    while rdp_to_dp(rdp_gaussian(sensitivity, hi, orders), delta, orders)[0] > target:
        lo, hi = hi, hi * 2
    while (hi - lo) / hi > tol:
        mid = (lo + hi) / 2
        if rdp_to_dp(rdp_gaussian(sensitivity, mid, orders), delta, orders)[0] > target:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class DPGuarantee:
    """What a differentially private fit spent (stored in model metadata and registry)."""

    epsilon: float
    delta: float
    epsilon_target: float
    noise_multiplier: float
    clip_norm: float
    steps: int
    sample_rate: float
    expected_batch_size: float
    histogram_noise_std: float | None
    histogram_epsilon: float | None
    threshold_delta: float
    order: int
    accountant: str = ("RDP, sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), integer "
                       "orders 2-256, composed with the preprocessing histogram's Gaussian "
                       "mechanism; conversion Balle et al. 2020 Thm 21")
    neighbouring: str = "add/remove one patient (one row of the patient table)"
    mechanism: str = "DP-SGD (Abadi et al. 2016), Poisson sampling, per-patient clipping"

    def to_json(self) -> dict:
        return asdict(self)


def dp_sgd_grads(loss_fn: Callable, params: dict, buffers: dict, batch: tuple, *,
                 clip_norm: float, noise_multiplier: float, expected_batch_size: float,
                 generator) -> dict:
    """One DP-SGD gradient: clipped per-example gradients, summed, noised, averaged.

    Args:
        loss_fn: ``loss_fn(params_and_buffers, *example) -> scalar`` for ONE example
            (its tensors without the batch dimension), e.g. built on
            ``torch.func.functional_call``.
        params: trainable parameters by name (the gradient is taken for these).
        buffers: the other tensors ``loss_fn`` needs, by name.
        batch: tensors whose first dimension is the (Poisson-sampled) batch; may be empty
            (then the gradient is noise only, as the accountant assumes).
        clip_norm: C, the per-example L2 bound over all parameters.
        noise_multiplier: sigma; the noise std is sigma * C.
        expected_batch_size: q * n (not the realised batch size, which depends on who
            was sampled).
        generator: torch.Generator for the noise.

    Returns:
        name -> noisy mean gradient (same shapes as ``params``).
    """
    import torch
    from torch.func import grad, vmap

    names = list(params)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    if len(batch[0]):
        def one(p, *ex):
            return loss_fn({**p, **buffers}, *ex)

        per = vmap(grad(one), in_dims=(None,) + (0,) * len(batch))(params, *batch)
        norms = torch.sqrt(sum(per[k].flatten(1).pow(2).sum(1) for k in names))
        scale = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
        for k in names:
            total[k] = (per[k] * scale.view(-1, *([1] * (per[k].dim() - 1)))).sum(0)
    out = {}
    for k in names:
        noise = torch.randn(total[k].shape, generator=generator, dtype=total[k].dtype)
        out[k] = (total[k] + noise.to(total[k].device) * noise_multiplier * clip_norm) \
            / expected_batch_size
    return out


__all__ = ["ORDERS", "rdp_sampled_gaussian", "rdp_gaussian", "rdp_to_dp", "epsilon",
           "noise_for_epsilon", "gaussian_noise_for_epsilon", "DPGuarantee", "dp_sgd_grads"]
