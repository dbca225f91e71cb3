"""Noise schedules in EDM sigma space (decreasing arrays, sigma_max first).

A schedule with N steps has N+1 levels; the samplers take one step between neighbours.
Hand-crafted schedules are built here; KLUB-optimised ones come from :mod:`mlx_elm.diffusion.ays`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from mlx_elm.errors import DiffusionError

SIGMA_MIN = 0.002  # EDM defaults, used by the toy experiments
SIGMA_MAX = 80.0


@dataclass(frozen=True)
class PublishedSchedule:
    """One of NVIDIA's published 10-step AYS schedules, carried exactly with its source."""

    model: str
    sigmas: tuple[float, ...]  # 11 levels in EDM units, sigma_max first
    timesteps: tuple[int, ...] | None  # discrete indices for VP models (rounded optimum)
    source: str


_SRC_TABLE = (
    "NVIDIA Align Your Steps (Sabour, Fidler, Kreis, arXiv 2404.14507): 10-step table "
    "as posted by the maintainers in huggingface/diffusers issue #7760"
)

# Exact values as published; sigma column = continuous optimum to 3 d.p., timesteps = its rounding.
PUBLISHED_AYS: dict[str, PublishedSchedule] = {
    "sd15": PublishedSchedule(
        "Stable Diffusion 1.5",
        (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
        (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
        _SRC_TABLE,
    ),
    "sdxl": PublishedSchedule(
        "Stable Diffusion XL",
        (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
        (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0),
        _SRC_TABLE,
    ),
    "deepfloyd-if": PublishedSchedule(
        "DeepFloyd-IF stage I",
        (160.41, 8.081, 3.315, 1.885, 1.207, 0.785, 0.553, 0.293, 0.186, 0.030, 0.006),
        (995, 920, 811, 686, 555, 418, 315, 174, 109, 12, 0),
        _SRC_TABLE,
    ),
    "svd": PublishedSchedule(
        "Stable Video Diffusion",
        (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
        None,  # continuous EDM model: no discrete timesteps
        _SRC_TABLE,
    ),
}


MAX_STEPS = 10_000  # more is a typo (and would allocate without bound), not a schedule


def _check(n: int, sigma_min: float, sigma_max: float) -> None:
    if not 1 <= n <= MAX_STEPS:
        raise DiffusionError(f"steps must be in [1, {MAX_STEPS}], got {n}; pass a sensible step count")
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max)):
        raise DiffusionError(f"sigma_min and sigma_max must be finite, got {sigma_min}, {sigma_max}; fix the noise range")
    if not 0 < sigma_min < sigma_max:
        raise DiffusionError(
            f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}; fix the noise range"
        )


def _pin(s: mx.array, sigma_min: float, sigma_max: float) -> mx.array:
    """Set the endpoints exactly (float32 pow/exp round trips drift by an ulp or two)."""
    return mx.concatenate([mx.array([sigma_max]), s[1:-1], mx.array([sigma_min])])


def karras(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> mx.array:
    """EDM/Karras schedule: uniform in sigma^(1/rho); the usual hand-crafted baseline."""
    _check(n, sigma_min, sigma_max)
    r = mx.linspace(0, 1, n + 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _pin((hi + r * (lo - hi)) ** rho, sigma_min, sigma_max)


def logsnr_uniform(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> mx.array:
    """Uniform in log-SNR = -2 log sigma, i.e. geometric sigmas."""
    _check(n, sigma_min, sigma_max)
    return _pin(mx.exp(mx.linspace(math.log(sigma_max), math.log(sigma_min), n + 1)), sigma_min, sigma_max)


def sigma_uniform(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> mx.array:
    """Uniform in sigma (= time-uniform for the EDM SDE sigma(t) = t)."""
    _check(n, sigma_min, sigma_max)
    return mx.linspace(sigma_max, sigma_min, n + 1)


def _vp_sigma(t: mx.array, beta_d: float, beta_min: float) -> mx.array:
    return mx.sqrt(mx.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)


def _vp_t(sigma: float, beta_d: float, beta_min: float) -> float:
    # inverse of _vp_sigma: solve 0.5 b_d t^2 + b_min t = log(1 + sigma^2)
    c = math.log1p(sigma**2)
    return (-beta_min + math.sqrt(beta_min**2 + 2 * beta_d * c)) / beta_d


def time_uniform(
    n: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
) -> mx.array:
    """VP time-uniform (the DDPM/DDIM default): uniform in VP time t, mapped to sigma.

    The t range is chosen so the endpoints are exactly sigma_max and sigma_min, which keeps
    every schedule in a comparison on the same noise range.
    """
    _check(n, sigma_min, sigma_max)
    t0, t1 = _vp_t(sigma_max, beta_d, beta_min), _vp_t(sigma_min, beta_d, beta_min)
    s = _vp_sigma(mx.linspace(t0, t1, n + 1), beta_d, beta_min)
    return _pin(s, sigma_min, sigma_max)


def kl_optimal(
    n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, c: float = 1.0
) -> mx.array:
    """Uniform in arctan(sigma / c): the deterministic-DDIM optimum for N(0, c^2 I) data."""
    _check(n, sigma_min, sigma_max)
    r = mx.linspace(0, 1, n + 1)
    a_hi, a_lo = math.atan(sigma_max / c), math.atan(sigma_min / c)
    return _pin(c * mx.tan((1 - r) * a_hi + r * a_lo), sigma_min, sigma_max)


HAND_CRAFTED = {
    "karras": karras,
    "logsnr": logsnr_uniform,
    "time-uniform": time_uniform,
    "sigma-uniform": sigma_uniform,
    "kl-optimal": kl_optimal,
}


def get_schedule(name: str, n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> mx.array:
    """Build a hand-crafted schedule by name, or a published AYS one (interpolated to n steps)."""
    if name in HAND_CRAFTED:
        return HAND_CRAFTED[name](n, sigma_min, sigma_max)
    if name.startswith("ays-") and name[4:] in PUBLISHED_AYS:
        return published(name[4:], n)
    known = ", ".join(list(HAND_CRAFTED) + [f"ays-{k}" for k in PUBLISHED_AYS])
    raise DiffusionError(f"unknown schedule '{name}'; choose one of: {known}")


def published(model: str, n: int = 10) -> mx.array:
    """A published AYS schedule as sigmas, log-linearly interpolated when n != 10 (NVIDIA's recipe)."""
    if model not in PUBLISHED_AYS:
        raise DiffusionError(
            f"no published AYS schedule for '{model}'; choose one of: {', '.join(PUBLISHED_AYS)}"
        )
    s = mx.array(PUBLISHED_AYS[model].sigmas)
    return s if n == 10 else loglinear_interp(s, n)


def loglinear_interp(sigmas: mx.array, n: int) -> mx.array:
    """Resample a decreasing schedule to n steps (n+1 levels) by linear interpolation of log sigma.

    Levels are placed on a uniform grid of [0, 1] before and after, so the original step count
    returns the original schedule and 10 -> 20 inserts geometric midpoints.
    """
    if n < 1:
        raise DiffusionError(f"steps must be >= 1, got {n}; pass a positive step count")
    ls = mx.log(sigmas)
    m = ls.shape[0]
    if m < 2:
        raise DiffusionError("a schedule needs at least 2 levels; pass sigma_max and sigma_min at least")
    pos = mx.linspace(0, m - 1, n + 1)
    lo = mx.clip(mx.floor(pos).astype(mx.int32), 0, m - 2)
    frac = pos - lo.astype(pos.dtype)
    return mx.exp(ls[lo] * (1 - frac) + ls[lo + 1] * frac)


def validate(sigmas: mx.array) -> mx.array:
    """Check a schedule is strictly decreasing and non-negative; return it as float32."""
    s = mx.array(sigmas, dtype=mx.float32)
    if s.ndim != 1 or s.shape[0] < 2:
        raise DiffusionError("a schedule must be a 1-D array of at least 2 sigmas, sigma_max first")
    if not bool(mx.all(s[1:] < s[:-1]).item()) or float(s[-1].item()) < 0:
        raise DiffusionError("a schedule must be strictly decreasing and >= 0; sort it, sigma_max first")
    return s


# --- discrete VP models (SD-style alphas_cumprod) ----------------------------------------


def sd_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> mx.array:
    """The Stable Diffusion "scaled_linear" schedule: sqrt(beta) linear, then cumprod(1 - beta)."""
    betas = mx.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    return mx.cumprod(1 - betas)


def timesteps_to_sigmas(timesteps: mx.array, alphas_cumprod: mx.array) -> mx.array:
    """sigma_k = sqrt((1 - abar_k) / abar_k) at (possibly fractional) timesteps, log-sigma interpolated."""
    all_log = 0.5 * mx.log((1 - alphas_cumprod) / alphas_cumprod)
    t = mx.array(timesteps, dtype=mx.float32)
    lo = mx.clip(mx.floor(t).astype(mx.int32), 0, all_log.shape[0] - 2)
    w = t - lo.astype(mx.float32)
    return mx.exp(all_log[lo] * (1 - w) + all_log[lo + 1] * w)


def sigmas_to_timesteps(sigmas: mx.array, alphas_cumprod: mx.array, round_to_int: bool = True) -> mx.array:
    """Invert :func:`timesteps_to_sigmas` by interpolating in log sigma (diffusers' convention)."""
    all_log = 0.5 * mx.log((1 - alphas_cumprod) / alphas_cumprod)  # increasing in t
    ls = mx.log(mx.array(sigmas, dtype=mx.float32))
    T = all_log.shape[0]
    idx = mx.sum(ls[:, None] >= all_log[None, :], axis=1)  # number of grid points below
    lo = mx.clip(idx - 1, 0, T - 2)
    a, b = all_log[lo], all_log[lo + 1]
    w = mx.clip((ls - a) / (b - a), 0, 1)
    t = lo.astype(mx.float32) + w
    return mx.round(t).astype(mx.int32) if round_to_int else t
