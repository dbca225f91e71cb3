"""k-NN KL estimators, sliced Wasserstein and MMD against closed forms."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_elm.diffusion import metrics as M
from mlx_elm.diffusion import toy


def _kl_gauss(s_q, s_p, d=2):
    """KL(N(0, s_q^2 I) || N(0, s_p^2 I))."""
    r = (s_q / s_p) ** 2
    return 0.5 * d * (r - 1 - math.log(r))


def test_knn_entropy_of_standard_normal():
    x = np.random.default_rng(0).normal(size=(4000, 2))
    assert M.knn_entropy(x) == pytest.approx(1 + math.log(2 * math.pi), abs=0.05)


def test_both_kl_directions_match_closed_form():
    rng = np.random.default_rng(1)
    p = toy.gaussian(2, 1.0)
    q = 1.5 * rng.normal(size=(4000, 2))
    data = rng.normal(size=(4000, 2))
    lp_q = np.array(p.log_prob(mx.array(q, dtype=mx.float32)))
    lp_d = np.array(p.log_prob(mx.array(data, dtype=mx.float32)))
    assert M.kl_qp(q, lp_q) == pytest.approx(_kl_gauss(1.5, 1.0), abs=0.06)
    assert M.kl_pq(data, lp_d, q) == pytest.approx(_kl_gauss(1.0, 1.5), abs=0.06)


@pytest.mark.slow
def test_over_sharpened_samples_fool_nll_but_not_coverage_kl():
    g = toy.ring(std=0.05)
    sharp = toy.ring(std=0.01).sample(4000, key=mx.random.key(0))
    good = g.sample(4000, key=mx.random.key(1))
    data = g.sample(4000, key=mx.random.key(2))
    lp_d = np.array(g.log_prob(data))
    h_data = -float(np.mean(lp_d))
    m_sharp = M.all_metrics(np.array(sharp), np.array(g.log_prob(sharp)), np.array(data), lp_d)
    m_good = M.all_metrics(np.array(good), np.array(g.log_prob(good)), np.array(data), lp_d)
    assert m_sharp["nll"] < h_data - 0.5  # NLL says "better than the data itself"
    assert m_sharp["kl_pq"] > m_good["kl_pq"] + 1.0 and m_sharp["kl_qp"] > m_good["kl_qp"] + 0.5
    assert abs(m_good["kl_qp"]) < 0.1 and abs(m_good["kl_pq"]) < 0.15


@pytest.mark.slow
def test_sliced_wasserstein_and_mmd():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(3000, 2)), rng.normal(size=(3000, 2))
    shift = y + np.array([1.0, 0.0])
    assert M.sliced_wasserstein(x, y) < 0.06
    # for a pure shift mu, SW2^2 = E_v (mu.v)^2 = |mu|^2 / d
    assert M.sliced_wasserstein(x, shift, n_proj=2000) == pytest.approx(math.sqrt(0.5), abs=0.05)
    assert abs(M.mmd2(x, y)) < 0.01 and M.mmd2(x, shift) > 0.02
