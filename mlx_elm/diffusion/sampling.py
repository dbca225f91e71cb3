"""Few-step diffusion samplers in EDM sigma space, one short function per method.

Every sampler takes a denoiser ``D(x, sigma) -> E[x0 | x]`` (``x``: (B, ...), ``sigma``: (B,)),
a starting point ``x`` already scaled to ``sigmas[0]`` and a decreasing schedule, and returns the
sample at ``sigmas[-1]``. A final level of 0 means "denoise fully" and is handled by every method.
Wrap the denoiser in :class:`CountNFE` to count network evaluations.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

from mlx_elm.errors import DiffusionError

Denoiser = Callable[[mx.array, mx.array], mx.array]


class CountNFE:
    """Counts calls of a denoiser (one call on a batch = one NFE)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: mx.array, sigma: mx.array) -> mx.array:
        self.nfe += 1
        return self.denoiser(x, sigma)


def _call(denoiser: Denoiser, x: mx.array, sigma: float) -> mx.array:
    return denoiser(x, mx.full((x.shape[0],), sigma, dtype=x.dtype))


def _floats(sigmas: mx.array) -> list[float]:
    return [float(s) for s in mx.array(sigmas).tolist()]


def _keys(key: mx.array | None, n: int) -> list[mx.array | None]:
    if key is None:
        return [None] * n
    return list(mx.random.split(key, n)) if n > 1 else [key]


def sample_euler(denoiser: Denoiser, x: mx.array, sigmas: mx.array) -> mx.array:
    """Euler on the probability-flow ODE (= deterministic DDIM). N steps, N NFE."""
    s = _floats(sigmas)
    for s_cur, s_next in zip(s[:-1], s[1:]):
        d = _call(denoiser, x, s_cur)
        x = d + (s_next / s_cur) * (x - d)
    return x


def sample_heun(denoiser: Denoiser, x: mx.array, sigmas: mx.array) -> mx.array:
    """Heun (EDM Alg. 1): Euler predictor plus trapezoidal corrector. 2N - 1 NFE when ending at 0."""
    s = _floats(sigmas)
    for s_cur, s_next in zip(s[:-1], s[1:]):
        d_cur = (x - _call(denoiser, x, s_cur)) / s_cur
        x_pred = x + (s_next - s_cur) * d_cur
        if s_next == 0:
            x = x_pred
            continue
        d_next = (x_pred - _call(denoiser, x_pred, s_next)) / s_next
        x = x + (s_next - s_cur) * 0.5 * (d_cur + d_next)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: mx.array, sigmas: mx.array) -> mx.array:
    """DPM-Solver++(2M): second-order multistep in log-sigma, one NFE per step."""
    s = _floats(sigmas)
    d_prev, h_prev = None, None
    for s_cur, s_next in zip(s[:-1], s[1:]):
        d = _call(denoiser, x, s_cur)
        if s_next == 0:
            x = d
            break
        h = math.log(s_cur / s_next)
        if d_prev is None:
            d_hat = d
        else:
            r = h_prev / h
            d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        x = (s_next / s_cur) * x - math.expm1(-h) * d_hat
        d_prev, h_prev = d, h
    return x


def sample_euler_ancestral(
    denoiser: Denoiser, x: mx.array, sigmas: mx.array, key: mx.array | None = None, eta: float = 1.0
) -> mx.array:
    """Stochastic DDIM / Euler-ancestral. With eta = 1 each step solves the linearised reverse SDE
    exactly (the process whose KL divergence the AYS bound controls)."""
    s = _floats(sigmas)
    keys = _keys(key, len(s) - 1)
    for i, (s_cur, s_next) in enumerate(zip(s[:-1], s[1:])):
        d = _call(denoiser, x, s_cur)
        s_up = min(s_next, eta * math.sqrt(max(s_next**2 * (s_cur**2 - s_next**2) / s_cur**2, 0.0)))
        s_down = math.sqrt(max(s_next**2 - s_up**2, 0.0))
        x = d + (s_down / s_cur) * (x - d)
        if s_next > 0 and s_up > 0:
            x = x + s_up * mx.random.normal(x.shape, dtype=x.dtype, key=keys[i])
    return x


def consistency_function(denoiser: Denoiser, sigma_min: float, sigma_data: float = 0.5) -> Denoiser:
    """Turn a denoiser into a consistency function f with the boundary condition f(x, sigma_min) = x.

    Uses the consistency-model skip weights c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2),
    f = c_skip x + (1 - c_skip) D(x, sigma); a trained consistency model can be passed directly instead.
    """

    def f(x: mx.array, sigma: mx.array) -> mx.array:
        c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
        c_skip = c_skip.reshape((-1,) + (1,) * (x.ndim - 1))
        return c_skip * x + (1 - c_skip) * denoiser(x, sigma)

    return f


def sample_consistency(
    f: Denoiser, x: mx.array, sigmas: mx.array, key: mx.array | None = None, sigma_min: float | None = None
) -> mx.array:
    """Consistency-model multistep sampling: jump to the data with f, re-noise to the next level, repeat.

    sigma_min (default: the last level when > 0, else 0.002) is where f maps to; levels at or below
    it are skipped because f(x, sigma_min) = x makes them no-ops.
    """
    s = _floats(sigmas)
    s_min = sigma_min if sigma_min is not None else (s[-1] if s[-1] > 0 else 0.002)
    keys = _keys(key, len(s))
    x = _call(f, x, s[0])
    for i, s_next in enumerate(s[1:]):
        if s_next <= s_min:
            break
        x_noisy = x + math.sqrt(s_next**2 - s_min**2) * mx.random.normal(x.shape, dtype=x.dtype, key=keys[i])
        x = _call(f, x_noisy, s_next)
    return x


SAMPLERS: dict[str, Callable[..., mx.array]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp-2m": sample_dpmpp_2m,
    "ddim-stochastic": sample_euler_ancestral,
}
STOCHASTIC = {"ddim-stochastic"}


def sample(
    name: str, denoiser: Denoiser, x: mx.array, sigmas: mx.array, key: mx.array | None = None
) -> tuple[mx.array, int]:
    """Run a sampler by name; returns (sample, NFE)."""
    if name not in SAMPLERS:
        raise DiffusionError(f"unknown solver '{name}'; choose one of: {', '.join(SAMPLERS)}")
    counted = CountNFE(denoiser)
    fn = SAMPLERS[name]
    out = fn(counted, x, sigmas, key=key) if name in STOCHASTIC else fn(counted, x, sigmas)
    return out, counted.nfe
