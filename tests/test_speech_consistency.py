"""Consistency-training pieces against NumPy references written from the iCT and CM papers."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_elm.diffusion import consistency as C
from mlx_elm.diffusion import sampling, schedules
from mlx_elm.speech.model import ConsistencyHead, WaveNet

erf = np.vectorize(math.erf)  # independent of mx.erf


def _ref_levels(n, smin=0.002, smax=80.0, rho=7.0):
    i = np.arange(1, n + 1)
    return (smin ** (1 / rho) + (i - 1) / (n - 1) * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho


@pytest.mark.parametrize("total,s0,s1", [(600_000, 10, 1280), (1000, 10, 1280), (450, 10, 160), (37, 2, 150)])
def test_curriculum_equals_the_ict_formula(total, s0, s1):
    k_prime = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
    for k in [0, 1, k_prime - 1, k_prime, 2 * k_prime + 3, total // 2, total - 1, total]:
        expected = min(s0 * 2 ** math.floor(k / k_prime), s1) + 1
        assert int(C.discretization_steps(k, total, s0, s1).item()) == expected


def test_karras_levels_and_index_probabilities_equal_their_formulas():
    n, size = 21, 41
    levels = np.array(C.karras_levels(n, size))
    np.testing.assert_allclose(levels[:n], _ref_levels(n), rtol=1e-5)
    assert np.all(levels[n:] == pytest.approx(80.0))
    ref = _ref_levels(n)
    e = erf((np.log(ref) + 1.1) / (math.sqrt(2) * 2.0))
    p_ref = (e[1:] - e[:-1]) / (e[1:] - e[:-1]).sum()
    p = np.array(C.index_probabilities(n, size))
    np.testing.assert_allclose(p[: n - 1], p_ref, rtol=1e-4, atol=1e-7)
    assert np.all(p[n - 1:] == 0)


def test_sampled_pairs_are_neighbours_with_the_right_frequencies():
    n, size = 11, 1281
    lo, hi = C.sample_intervals(n, size, (20000,), key=mx.random.key(0))
    levels = _ref_levels(n)
    idx = np.searchsorted(levels, np.array(lo) * (1 + 1e-5)) - 1
    np.testing.assert_allclose(np.array(hi), levels[idx + 1], rtol=1e-4)
    e = erf((np.log(levels) + 1.1) / (math.sqrt(2) * 2.0))
    p_ref = (e[1:] - e[:-1]) / (e[1:] - e[:-1]).sum()
    freq = np.bincount(idx, minlength=n - 1) / len(idx)
    np.testing.assert_allclose(freq, p_ref, atol=0.015)


def test_lambda_pseudo_huber_and_edm_weight_equal_their_formulas():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 7)).astype(np.float32), rng.normal(size=(4, 7)).astype(np.float32)
    for c in (0.03, 0.00054 * math.sqrt(80 * 128)):
        np.testing.assert_allclose(np.array(C.pseudo_huber(mx.array(x), mx.array(y), c)),
                                   np.sqrt((x - y) ** 2 + c * c) - c, rtol=1e-5, atol=1e-7)
    lo, hi = np.array([0.002, 0.5, 10.0], np.float32), np.array([0.01, 0.7, 14.0], np.float32)
    np.testing.assert_allclose(np.array(C.ct_weight(mx.array(lo), mx.array(hi))), 1 / (hi - lo), rtol=1e-5)
    s = np.array([0.01, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(np.array(C.edm_weight(mx.array(s))), (s**2 + 0.25) / (s * 0.5) ** 2, rtol=1e-5)


def test_boundary_scalings_give_identity_at_sigma_min_exactly():
    s = mx.array([0.002, 0.1, 80.0])
    c_skip, c_out, c_in = C.boundary_scalings(s)
    np.testing.assert_allclose(np.array(c_skip), 0.25 / ((np.array(s) - 0.002) ** 2 + 0.25), rtol=1e-6)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    mx.random.seed(0)
    net = WaveNet(5, 16, 8, [1, 2], 0, 1, 8)
    net.out.weight = mx.random.normal(net.out.weight.shape)  # a non-trivial network output
    head = ConsistencyHead(net, 0.002, 0.5)
    x = mx.random.normal((2, 9, 5))
    cond = mx.random.normal((2, 9, 8))
    mask = mx.ones((2, 9))
    out = head(x, mx.full((2,), 0.002), cond, None, mask)
    assert np.array_equal(np.array(out), np.array(x))  # f(x, sigma_min) = x, bit for bit
    assert not np.allclose(np.array(head(x, mx.full((2,), 1.0), cond, None, mask)), np.array(x))


def test_one_and_two_step_consistency_sampling_run_and_count_evaluations():
    mx.random.seed(1)
    head = ConsistencyHead(WaveNet(3, 16, 4, [1], 0, 1, 4), 0.002, 0.5)
    cond, mask = mx.random.normal((1, 6, 4)), mx.ones((1, 6))
    f = sampling.CountNFE(lambda x, s: head(x, s, cond, None, mask))
    x = 80.0 * mx.random.normal((1, 6, 3))
    one = sampling.sample_consistency(f, x, mx.array([80.0, 0.002]), key=mx.random.key(0))
    assert f.nfe == 1 and one.shape == x.shape
    f.nfe = 0
    two = sampling.sample_consistency(f, x, schedules.karras(2, 0.002, 80.0), key=mx.random.key(0))
    assert f.nfe == 2 and np.isfinite(np.array(two)).all()
    assert float(schedules.karras(2, 0.002, 80.0)[1]) == pytest.approx(2.515, abs=2e-3)  # FlashSpeech code's level
