"""Consistency-model training pieces (Song et al. 2023; improved CT, Song & Dhariwal, ICLR 2024).

Everything here is a pure function of arrays so a training loss can be compiled once: the
discretisation size ``N(k)`` may be an ``mx.array`` that changes with the step, and the noise-level
grid is evaluated on a fixed-size index range with the unused tail masked out.

- :func:`boundary_scalings`: ``c_skip, c_out, c_in`` with ``f(x, sigma_min) = x`` exactly.
- :func:`discretization_steps`: iCT's exponential curriculum ``N(k) = min(s0 2^floor(k/K'), s1) + 1``.
- :func:`karras_levels`: the N increasing levels of the Karras grid, ``sigma_1 = sigma_min``.
- :func:`index_probabilities` / :func:`sample_intervals`: lognormal choice of the pair (i, i+1).
- :func:`ct_weight`: ``lambda = 1 / (sigma_{i+1} - sigma_i)``; :func:`pseudo_huber`: the distance.
- :func:`edm_weight`: the EDM denoising weight, for a denoising warm start before CT.
"""

from __future__ import annotations

import math

import mlx.core as mx

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.5, 7.0


def boundary_scalings(sigma: mx.array, sigma_min: float = SIGMA_MIN, sigma_data: float = SIGMA_DATA):
    """CM preconditioning (Song et al. 2023, App. C): ``f = c_skip x + c_out F(c_in x, ...)``.

    ``c_skip = s_d^2 / ((s - s_min)^2 + s_d^2)``, ``c_out = (s - s_min) s_d / sqrt(s^2 + s_d^2)``,
    ``c_in = 1 / sqrt(s^2 + s_d^2)``; at ``s = s_min``, ``c_skip = 1`` and ``c_out = 0`` exactly.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / mx.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / mx.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def noise_conditioning(sigma: mx.array) -> mx.array:
    """EDM's ``c_noise = ln(sigma) / 4`` (embed it sinusoidally, scaled by 1000 as CM code does)."""
    return 0.25 * mx.log(sigma)


def discretization_steps(step, total_steps: int, s0: int = 10, s1: int = 1280) -> mx.array:
    """iCT curriculum: ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1`` with
    ``K' = floor(K / (log2(floor(s1 / s0)) + 1))`` (Song & Dhariwal 2024, eq. 9). Returns an int32 array."""
    k_prime = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    k = mx.array(step, dtype=mx.int32)
    doublings = mx.floor_divide(k, k_prime).astype(mx.float32)
    n = mx.minimum(s0 * mx.power(2.0, doublings), float(s1))
    return (n + 1).astype(mx.int32)


def karras_levels(n_levels, size: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> mx.array:
    """Levels ``sigma_i = (s_min^(1/rho) + (i-1)/(N-1) (s_max^(1/rho) - s_min^(1/rho)))^rho``, i = 1..N,
    computed for indices ``0..size-1`` (entries past N-1 are clipped to ``sigma_max``)."""
    n = mx.array(n_levels).astype(mx.float32)
    i = mx.minimum(mx.arange(size, dtype=mx.float32), n - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i / (n - 1) * (hi - lo)) ** rho


def index_probabilities(n_levels, size: int, p_mean: float = -1.1, p_std: float = 2.0,
                        sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> mx.array:
    """iCT's lognormal pair distribution over the ``N - 1`` intervals (padded to ``size - 1``):
    ``p(i) ∝ erf((ln s_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln s_i - P_mean) / (sqrt2 P_std))``."""
    s = karras_levels(n_levels, size, sigma_min, sigma_max, rho)
    e = mx.erf((mx.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
    w = e[1:] - e[:-1]
    valid = mx.arange(size - 1) < (mx.array(n_levels) - 1)
    w = mx.where(valid, mx.maximum(w, 0.0), 0.0)
    return w / mx.sum(w)


def sample_intervals(n_levels, size: int, shape: tuple, key: mx.array | None = None,
                     p_mean: float = -1.1, p_std: float = 2.0, sigma_min: float = SIGMA_MIN,
                     sigma_max: float = SIGMA_MAX, rho: float = RHO) -> tuple[mx.array, mx.array]:
    """Draw pairs ``(sigma_i, sigma_{i+1})`` of neighbouring levels with :func:`index_probabilities`."""
    p = index_probabilities(n_levels, size, p_mean, p_std, sigma_min, sigma_max, rho)
    logits = mx.where(p > 0, mx.log(mx.maximum(p, 1e-30)), -mx.inf)
    idx = mx.random.categorical(logits, shape=shape, key=key)
    s = karras_levels(n_levels, size, sigma_min, sigma_max, rho)
    return s[idx], s[idx + 1]


def ct_weight(sigma_lo: mx.array, sigma_hi: mx.array) -> mx.array:
    """iCT's ``lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)``."""
    return 1.0 / (sigma_hi - sigma_lo)


def pseudo_huber(x: mx.array, y: mx.array, c: float = 0.03) -> mx.array:
    """Elementwise pseudo-Huber distance ``sqrt((x - y)^2 + c^2) - c`` (iCT; FlashSpeech's code)."""
    return mx.sqrt((x - y) ** 2 + c * c) - c


def edm_weight(sigma: mx.array, sigma_data: float = SIGMA_DATA) -> mx.array:
    """EDM's loss weight ``(sigma^2 + s_d^2) / (sigma s_d)^2`` (unit effective weight per level)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def lognormal_sigmas(shape: tuple, key: mx.array | None = None, p_mean: float = -1.2, p_std: float = 1.2,
                     sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> mx.array:
    """EDM's training noise levels ``ln sigma ~ N(P_mean, P_std^2)``, clipped to the model's range."""
    return mx.clip(mx.exp(p_mean + p_std * mx.random.normal(shape, key=key)), sigma_min, sigma_max)
