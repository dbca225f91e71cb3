"""Exact GMM denoiser/density against independent references, and the trained MLP denoiser."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_elm.diffusion import toy
from mlx_elm.errors import DiffusionError


def test_single_gaussian_denoiser_is_shrinkage():
    g = toy.gaussian(3, 0.7)
    x = mx.random.normal((16, 3), key=mx.random.key(0))
    sig = mx.linspace(0.01, 10, 16)
    ref = (0.49 / (0.49 + sig**2))[:, None] * x
    np.testing.assert_allclose(np.array(g.denoise(x, sig)), np.array(ref), rtol=1e-5, atol=1e-7)
    assert g.sigma_data == pytest.approx(0.7, rel=1e-6)


def test_gmm_denoiser_equals_tweedie_of_exact_density():
    # independent route: D(x) = x + sigma^2 grad log p(x; sigma), differentiating log_prob
    key = mx.random.key(3)
    k1, k2, k3 = mx.random.split(key, 3)
    g = toy.GMM(mx.random.normal((5, 3), key=k1), 0.05 + mx.random.uniform(shape=(5, 3), key=k2), mx.arange(1, 6))
    x = 1.5 * mx.random.normal((32, 3), key=k3)
    for s in (0.05, 0.5, 3.0):
        sig = mx.full((32,), s)
        grad = mx.grad(lambda z: mx.sum(g.log_prob(z, sig)))(x)
        np.testing.assert_allclose(np.array(g.denoise(x, sig)), np.array(x + s**2 * grad), rtol=2e-4, atol=2e-5)


def test_gmm_log_prob_matches_numpy():
    g = toy.ring(4, std=0.1)
    x = np.array([[1.0, 0.0], [0.3, -0.2], [0.0, 0.95]])
    s = 0.2
    mu = np.array(g.means)
    var = 0.1**2 + s**2
    dens = np.mean(np.exp(-np.sum((x[:, None] - mu[None]) ** 2, -1) / (2 * var)) / (2 * math.pi * var), axis=1)
    np.testing.assert_allclose(np.array(g.log_prob(mx.array(x, dtype=mx.float32), s)), np.log(dens), rtol=1e-5)


def test_datasets_sample_where_density_is():
    for name in toy.DATASETS:
        g = toy.get_dataset(name)
        x = g.sample(2000, key=mx.random.key(1))
        assert x.shape == (2000, 2)
        # samples of the data have higher density than a broad Gaussian's samples
        far = 2 * mx.random.normal((2000, 2), key=mx.random.key(2))
        assert float(mx.mean(g.log_prob(x)).item()) > float(mx.mean(g.log_prob(far)).item()) + 1
    with pytest.raises(DiffusionError, match="unknown dataset"):
        toy.get_dataset("moons3d")


def test_mlp_training_learns_and_roundtrips(tmp_path):
    g = toy.ring()
    mcfg = toy.MLPConfig(dataset="ring8", hidden=64, depth=2, sigma_data=g.sigma_data)
    losses = []
    mx.random.seed(0)
    untrained = toy.MLPDenoiser(mcfg)
    model = toy.train_mlp(g, mcfg, toy.TrainConfig(steps=300, batch=256, lr=3e-3), progress=lambda i, l: losses.append(l))
    assert len(losses) == 300 and all(math.isfinite(v) for v in losses)
    # at moderate noise the learned denoiser moves towards the exact one
    x = g.sample(512, key=mx.random.key(5)) + 0.3 * mx.random.normal((512, 2), key=mx.random.key(6))
    sig = mx.full((512,), 0.3)
    exact = g.denoise(x, sig)
    err_mlp = float(mx.mean((model(x, sig) - exact) ** 2).item())
    err_init = float(mx.mean((untrained(x, sig) - exact) ** 2).item())
    err_id = float(mx.mean((x - exact) ** 2).item())
    assert err_mlp < 0.3 * min(err_init, err_id)
    path = toy.save_mlp(model, tmp_path / "den.safetensors")
    back = toy.load_mlp(path)
    np.testing.assert_allclose(np.array(back(x, sig)), np.array(model(x, sig)), rtol=1e-6, atol=1e-6)
    den, gmm, label = toy.resolve_denoiser(str(path))
    assert label == "mlp:ring8" and gmm.means.shape == (8, 2)
    with pytest.raises(DiffusionError, match="not found"):
        toy.load_mlp(tmp_path / "missing.safetensors")
    with pytest.raises(DiffusionError, match="safetensors"):
        toy.save_mlp(model, tmp_path / "den.npz")
