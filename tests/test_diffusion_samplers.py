"""Samplers on a single Gaussian, where the exact solution is known in closed form."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_elm.diffusion import sampling as SM
from mlx_elm.diffusion import schedules as S
from mlx_elm.diffusion import toy
from mlx_elm.errors import DiffusionError

C = 0.5
SMIN, SMAX = 0.01, 20.0


def _gauss_denoiser(x, sigma):
    return (C**2 / (C**2 + sigma**2))[:, None] * x


def _order(errors, ns):
    return -np.polyfit(np.log(ns), np.log(errors), 1)[0]


@pytest.mark.parametrize("name,order", [("euler", 1.0), ("heun", 2.0), ("dpmpp-2m", 2.0)])
def test_ode_solver_order_on_gaussian(name, order):
    # PF-ODE of N(0, C^2) data is linear: x(s) = sqrt(C^2 + s^2) / sqrt(C^2 + SMAX^2) x(SMAX)
    exact = math.sqrt(C**2 + SMIN**2) / math.sqrt(C**2 + SMAX**2)
    x0 = mx.ones((1, 1))
    ns = [8, 16, 32, 64]
    errs = []
    for n in ns:
        out, nfe = SM.sample(name, _gauss_denoiser, x0, S.logsnr_uniform(n, SMIN, SMAX))
        errs.append(abs(float(out.item()) - exact) / exact)
        assert nfe == (2 * n if name == "heun" else n)
    assert errs[-1] < errs[0]
    assert _order(errs, ns) == pytest.approx(order, abs=0.3)


def _ancestral_variance_numpy(sigmas):
    """NumPy reference: the variance after stochastic DDIM is a linear recursion for Gaussian data."""
    v = sigmas[0] ** 2
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        k = C**2 / (C**2 + s**2)
        s_up = min(s_next, math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        s_down = math.sqrt(s_next**2 - s_up**2)
        m = k + (s_down / s) * (1 - k)
        v = m**2 * v + s_up**2
    return v


def test_stochastic_ddim_matches_reference_and_converges_first_order():
    target = C**2 + SMIN**2
    ns = [4, 8, 16, 32, 64]
    kl = []
    for n in ns:
        sig = S.logsnr_uniform(n, SMIN, SMAX)
        v_ref = _ancestral_variance_numpy([float(s) for s in sig.tolist()])
        r = v_ref / target
        kl.append(0.5 * (r - 1 - math.log(r)))  # KL(N(0, v) || N(0, target)), exact
        if n in (4, 16):
            x = SMAX * mx.random.normal((200_000, 1), key=mx.random.key(n))
            out = SM.sample_euler_ancestral(_gauss_denoiser, x, sig, key=mx.random.key(100 + n))
            v_mc = float(mx.var(out).item())
            assert v_mc == pytest.approx(v_ref, rel=0.015)
    errs = np.sqrt(kl)  # ~ |v - target|, first order in the step size
    assert np.all(np.diff(errs) < 0)
    assert _order(errs, ns) == pytest.approx(1.0, abs=0.3)


def _np_denoise(x, sigma):
    return C**2 / (C**2 + sigma**2) * x


def _np_heun(x, sigmas):
    """k-diffusion's Heun (no churn), written out in NumPy; the step to sigma 0 is plain Euler."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - _np_denoise(x, s)) / s
        x_next = x + d * (s_next - s)
        if s_next > 0:
            d2 = (x_next - _np_denoise(x_next, s_next)) / s_next
            x_next = x + 0.5 * (d + d2) * (s_next - s)
        x = x_next
    return x


def _np_dpmpp_2m(x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022; k-diffusion's form) in NumPy; the step to 0 returns the
    denoised prediction."""
    old, h_last = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        den = _np_denoise(x, s)
        if s_next == 0:
            x = den
        else:
            h = math.log(s) - math.log(s_next)
            d = den if old is None else (1 + 1 / (2 * h_last / h)) * den - (1 / (2 * h_last / h)) * old
            x = (s_next / s) * x - math.expm1(-h) * d
            h_last = h
        old = den
    return x


def test_heun_and_dpm_final_zero_level():
    sig = mx.concatenate([S.karras(6, 0.01, 20.0), mx.array([0.0])])
    levels = [float(v) for v in sig.tolist()]
    x = 20.0 * mx.random.normal((8, 2), key=mx.random.key(0))
    exact = np.array(x) * C / math.sqrt(C**2 + 20.0**2)  # the PF-ODE's solution at sigma 0
    c = SM.CountNFE(_gauss_denoiser)
    heun = SM.sample_heun(c, x, sig)
    assert c.nfe == 2 * 7 - 1  # last step to 0 is plain Euler
    np.testing.assert_allclose(np.array(heun), _np_heun(np.array(x, dtype=np.float64), levels), rtol=1e-5, atol=1e-6)
    dpm, nfe = SM.sample("dpmpp-2m", _gauss_denoiser, x, sig)
    assert nfe == 7
    np.testing.assert_allclose(np.array(dpm), _np_dpmpp_2m(np.array(x, dtype=np.float64), levels), rtol=1e-5, atol=1e-6)
    for out in (heun, dpm):  # same direction as the exact solution (7 coarse levels: ~25% off in size)
        assert np.sign(np.array(out)).tolist() == np.sign(exact).tolist()


def test_consistency_sampler_boundary_and_multistep():
    g = toy.ring()
    f = SM.consistency_function(g.denoise, sigma_min=0.002, sigma_data=g.sigma_data)
    x = mx.random.normal((64, 2), key=mx.random.key(1))
    np.testing.assert_array_equal(np.array(f(x, mx.full((64,), 0.002))), np.array(x))  # f(x, s_min) = x
    # one level above sigma_min: a single evaluation f(x_T, sigma_max)
    c = SM.CountNFE(f)
    xT = 80 * x
    one = SM.sample_consistency(c, xT, mx.array([80.0, 0.002]), key=mx.random.key(2))
    assert c.nfe == 1
    np.testing.assert_allclose(np.array(one), np.array(f(xT, mx.full((64,), 80.0))), rtol=1e-6)
    c = SM.CountNFE(f)
    out = SM.sample_consistency(c, xT, mx.array([80.0, 1.0, 0.3, 0.002]), key=mx.random.key(3))
    assert c.nfe == 3
    # with the exact denoiser the samples land near the ring of radius 1
    r = np.linalg.norm(np.array(out), axis=1)
    assert abs(np.median(r) - 1.0) < 0.1


def test_unknown_solver():
    with pytest.raises(DiffusionError, match="unknown solver"):
        SM.sample("rk45", _gauss_denoiser, mx.ones((1, 1)), S.karras(4))
