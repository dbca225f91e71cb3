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


def test_heun_and_dpm_final_zero_level():
    sig = mx.concatenate([S.karras(6, 0.01, 20.0), mx.array([0.0])])
    x = 20.0 * mx.random.normal((8, 2), key=mx.random.key(0))
    c = SM.CountNFE(_gauss_denoiser)
    SM.sample_heun(c, x, sig)
    assert c.nfe == 2 * 7 - 1  # last step to 0 is plain Euler
    out, nfe = SM.sample("dpmpp-2m", _gauss_denoiser, x, sig)
    assert nfe == 7
    # final step to 0 returns the denoised prediction, finite everywhere
    assert bool(mx.all(mx.isfinite(out)).item())


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
