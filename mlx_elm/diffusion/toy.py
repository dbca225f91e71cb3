"""Test problems with a known answer: Gaussian mixtures (exact density and optimal denoiser),
2D shapes written as mixtures, and a small MLP denoiser trained on them with the EDM loss.

With the exact denoiser every sampler error is pure discretisation error, which is what the
AYS bound (KLUB) controls; the MLP shows the same pipeline on a learned model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import DiffusionError

# ------------------------------------------------------------------------------------------
# Gaussian mixtures
# ------------------------------------------------------------------------------------------


@dataclass
class GMM:
    """Mixture of Gaussians with diagonal covariances: means (K, d), variances (K, d), weights (K,)."""

    means: mx.array
    variances: mx.array
    weights: mx.array

    def __post_init__(self) -> None:
        self.means = mx.array(self.means, dtype=mx.float32)
        self.variances = mx.broadcast_to(mx.array(self.variances, dtype=mx.float32), self.means.shape)
        w = mx.array(self.weights, dtype=mx.float32)
        self.weights = w / mx.sum(w)
        self._compiled: dict[str, Callable] = {}

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def sigma_data(self) -> float:
        """RMS standard deviation per dimension (EDM's sigma_data)."""
        w = self.weights[:, None]
        mean = mx.sum(w * self.means, axis=0)
        second = mx.sum(w * (self.variances + self.means**2), axis=0)
        return float(mx.sqrt(mx.mean(second - mean**2)).item())

    def sample(self, n: int, key: mx.array | None = None) -> mx.array:
        """Draw n samples from the mixture."""
        k1, k2 = mx.random.split(key) if key is not None else (None, None)
        comp = mx.random.categorical(mx.log(self.weights), shape=(n,), key=k1)
        z = mx.random.normal((n, self.dim), key=k2)
        return self.means[comp] + mx.sqrt(self.variances[comp]) * z

    def _log_resp(self, x: mx.array, s2: mx.array) -> mx.array:
        # (B, K) log pi_k + log N(x; mu_k, Sigma_k + s2 I), accumulated one dimension at a time
        # to avoid (B, K, d) temporaries
        out = mx.log(self.weights)[None, :]
        for j in range(self.dim):
            v = self.variances[None, :, j] + s2
            diff = x[:, j : j + 1] - self.means[None, :, j]
            out = out - 0.5 * (diff**2 / v + mx.log(2 * math.pi * v))
        return out

    def log_prob(self, x: mx.array, sigma: float | mx.array = 0.0) -> mx.array:
        """Exact log-density of the data convolved with N(0, sigma^2 I)."""
        s2 = mx.reshape(mx.array(sigma, dtype=mx.float32) ** 2, (-1, 1))
        return mx.logsumexp(self._log_resp(x, s2), axis=1)

    def denoise(self, x: mx.array, sigma: mx.array) -> mx.array:
        """Optimal denoiser D*(x; sigma) = E[x0 | x0 + sigma eps = x], in closed form."""
        if "d" not in self._compiled:
            self._compiled["d"] = mx.compile(self._denoise)
        return self._compiled["d"](x, mx.broadcast_to(mx.array(sigma, dtype=mx.float32), (x.shape[0],)))

    def _denoise(self, x: mx.array, sigma: mx.array) -> mx.array:
        s2 = (sigma**2)[:, None]
        r = mx.softmax(self._log_resp(x, s2), axis=1)  # (B, K)
        cols = []
        for j in range(self.dim):
            v = self.variances[None, :, j]
            post = (v * x[:, j : j + 1] + s2 * self.means[None, :, j]) / (v + s2)
            cols.append(mx.sum(r * post, axis=1))
        return mx.stack(cols, axis=1)

    def __call__(self, x: mx.array, sigma: mx.array) -> mx.array:
        return self.denoise(x, sigma)


def gaussian(dim: int, std: float) -> GMM:
    """A single isotropic Gaussian N(0, std^2 I): the case with a known exact sampler solution."""
    return GMM(mx.zeros((1, dim)), mx.full((1, dim), std**2), mx.ones((1,)))


def ring(k: int = 8, radius: float = 1.0, std: float = 0.05) -> GMM:
    """k isotropic Gaussians evenly spaced on a circle (the classic 2D diffusion toy)."""
    a = mx.arange(k) * (2 * math.pi / k)
    means = radius * mx.stack([mx.cos(a), mx.sin(a)], axis=1)
    return GMM(means, mx.full((k, 2), std**2), mx.ones((k,)))


def spiral(k: int = 96, turns: float = 2.0, std: float = 0.03) -> GMM:
    """k Gaussians along an Archimedean spiral of radius <= 1, weighted by arc length."""
    t = (mx.arange(k) + 0.5) / k
    theta = 2 * math.pi * turns * t
    r = 0.1 + 0.9 * t
    means = mx.stack([r * mx.cos(theta), r * mx.sin(theta)], axis=1)
    return GMM(means, mx.full((k, 2), std**2), r)  # denser where the curve is longer


def checkerboard(n: int = 4, per_square: int = 3, size: float = 2.0) -> GMM:
    """An n x n checkerboard (black squares only), each square a per_square^2 grid of Gaussians."""
    cell = size / n
    sub = cell / per_square
    means = []
    for i in range(n):
        for j in range(n):
            if (i + j) % 2:
                continue
            for a in range(per_square):
                for b in range(per_square):
                    means.append(
                        [-size / 2 + i * cell + (a + 0.5) * sub, -size / 2 + j * cell + (b + 0.5) * sub]
                    )
    m = mx.array(means)
    return GMM(m, mx.full(m.shape, (0.5 * sub) ** 2), mx.ones((m.shape[0],)))


DATASETS: dict[str, Callable[[], GMM]] = {
    "ring8": ring,
    "spiral": spiral,
    "checkerboard": checkerboard,
}


def get_dataset(name: str) -> GMM:
    """A named 2D toy dataset as an exact Gaussian mixture."""
    if name not in DATASETS:
        raise DiffusionError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]()


# ------------------------------------------------------------------------------------------
# MLP denoiser
# ------------------------------------------------------------------------------------------


@dataclass
class MLPConfig:
    """Size of the toy denoiser and the data it was trained on."""

    dataset: str = "ring8"
    dim: int = 2
    hidden: int = 256
    depth: int = 4
    sigma_data: float = 0.5
    n_freq: int = 16  # sin/cos features of log sigma
    n_xfreq: int = 64  # random Fourier features of the scaled input (beats MLP spectral bias)
    x_scale: float = 0.5


@dataclass
class TrainConfig:
    """EDM training of the toy denoiser.

    Half of each batch draws sigma from EDM's log-normal (where the denoiser has something to
    learn), half log-uniformly over the whole sampling range (so sigma_max and sigma_min, which
    every sampler visits, are covered too).
    """

    steps: int = 4000
    batch: int = 1024
    lr: float = 3e-3
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    seed: int = 0


class MLPDenoiser(nn.Module):
    """Small MLP with EDM preconditioning, so D(x, sigma) is well scaled at every noise level."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.freqs = mx.exp(mx.linspace(0, math.log(32.0), cfg.n_freq))
        self.proj = cfg.x_scale * mx.random.normal((cfg.dim, cfg.n_xfreq), key=mx.random.key(1234))
        dims = [cfg.dim + 2 * cfg.n_freq + 2 * cfg.n_xfreq] + [cfg.hidden] * cfg.depth
        self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
        self.out = nn.Linear(cfg.hidden, cfg.dim)
        self.freeze(keys=["freqs", "proj"], recurse=False)

    def __call__(self, x: mx.array, sigma: mx.array) -> mx.array:
        sd = self.cfg.sigma_data
        sigma = mx.broadcast_to(mx.array(sigma, dtype=x.dtype), (x.shape[0],))[:, None]
        c_in = 1 / mx.sqrt(sigma**2 + sd**2)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd * c_in
        ang = (mx.log(sigma) / 4) * self.freqs[None, :]
        xin = c_in * x
        xf = (2 * math.pi) * (xin @ self.proj)
        h = mx.concatenate([xin, mx.sin(ang), mx.cos(ang), mx.sin(xf), mx.cos(xf)], axis=1)
        for layer in self.layers:
            h = nn.silu(layer(h))
        return c_skip * x + c_out * self.out(h)


def edm_loss(model: MLPDenoiser, x0: mx.array, sigma: mx.array, eps: mx.array) -> mx.array:
    """EDM-weighted denoising loss (weight (s^2 + sd^2) / (s sd)^2 = unit loss on the raw network)."""
    sd = model.cfg.sigma_data
    s = sigma[:, None]
    w = (s**2 + sd**2) / (s * sd) ** 2
    return mx.mean(w * (model(x0 + s * eps, sigma) - x0) ** 2)


def train_mlp(
    gmm: GMM, mcfg: MLPConfig, tcfg: TrainConfig, progress: Callable[[int, float], None] | None = None
) -> MLPDenoiser:
    """Train the MLP denoiser on fresh mixture samples each step."""
    mx.random.seed(tcfg.seed)
    model = MLPDenoiser(mcfg)
    sched = optim.cosine_decay(tcfg.lr, tcfg.steps, end=tcfg.lr * 0.01)
    opt = optim.Adam(learning_rate=sched)
    state = [model.state, opt.state, mx.random.state]
    loss_grad = nn.value_and_grad(model, edm_loss)
    lo, hi = math.log(tcfg.sigma_min), math.log(tcfg.sigma_max)

    def step(x0: mx.array, u: mx.array, eps: mx.array) -> mx.array:
        n = x0.shape[0]
        log_normal = tcfg.p_mean + tcfg.p_std * mx.random.normal((n,))
        log_uniform = lo + (hi - lo) * u
        sigma = mx.exp(mx.where(mx.arange(n) % 2 == 0, log_normal, log_uniform))
        loss, grads = loss_grad(model, x0, sigma, eps)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    for i in range(tcfg.steps):
        x0 = gmm.sample(tcfg.batch)
        u = mx.random.uniform(shape=(tcfg.batch,))
        eps = mx.random.normal(x0.shape)
        loss = step(x0, u, eps)
        mx.eval(state, loss)
        if progress is not None:
            progress(i, float(loss.item()))
    model.eval()
    return model


def save_mlp(model: MLPDenoiser, path: str | Path) -> Path:
    """Write weights + config to one .safetensors file, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DiffusionError(f"denoiser file must end in .safetensors, got '{path.name}'; rename it")
    weights = dict(tree_flatten(model.parameters()))  # includes the fixed projections
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), weights, metadata={"mlx_elm_toy_mlp": json.dumps(asdict(model.cfg))})
    return path


def load_mlp(path: str | Path) -> MLPDenoiser:
    """Load a denoiser written by :func:`save_mlp`."""
    path = Path(path)
    if not path.is_file():
        raise DiffusionError(f"denoiser file '{path}' not found; train one with `mlx-elm ays train-toy`")
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
        cfg = MLPConfig(**json.loads(meta["mlx_elm_toy_mlp"]))
    except (KeyError, ValueError, RuntimeError) as e:
        raise DiffusionError(
            f"'{path}' is not a toy denoiser written by `mlx-elm ays train-toy` ({e}); retrain it"
        ) from e
    model = MLPDenoiser(cfg)
    model.load_weights(list(weights.items()))
    model.eval()
    return model


def resolve_denoiser(spec: str) -> tuple[Callable[[mx.array, mx.array], mx.array], GMM, str]:
    """Parse a denoiser spec: 'gmm:<dataset>' (exact) or a path to a trained toy MLP.

    Returns (denoiser, data mixture it models, label).
    """
    if spec.startswith("gmm:"):
        g = get_dataset(spec[4:])
        return g.denoise, g, f"exact:{spec[4:]}"
    model = load_mlp(spec)
    g = get_dataset(model.cfg.dataset)
    fn = mx.compile(model)
    return fn, g, f"mlp:{model.cfg.dataset}"
