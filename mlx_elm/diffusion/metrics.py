"""Sample-quality metrics that are exact or consistent on toy data with a known density.

- ``kl_qp``: precision-type KL(q || p) = E_q[-log p] - H(q), the entropy of the samples from the
  Kozachenko-Leonenko k-NN estimator. Penalises samples off the data (blur, outliers).
- ``kl_pq``: coverage-type KL(p || q) = E_p[log p] - E_p[log q_hat], q_hat the k-NN density of the
  samples evaluated at fresh data points. Penalises missed modes and over-sharpening, which NLL
  alone rewards (an over-sharpened sampler scores an NLL below the data entropy).
- ``sliced_wasserstein`` (SW2) and ``mmd2`` (unbiased, RBF kernels).

NumPy lives here on purpose: k-NN search is an edge computation on a few thousand points.
"""

from __future__ import annotations

import math

import numpy as np

from mlx_elm.errors import DiffusionError


def _digamma_int(n: int) -> float:
    """psi(n) for a positive integer: -gamma + sum_{j<n} 1/j."""
    return -0.5772156649015329 + float(np.sum(1.0 / np.arange(1, n))) if n > 1 else -0.5772156649015329


def _log_unit_ball(d: int) -> float:
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)


def knn_dist(query: np.ndarray, ref: np.ndarray, k: int, exclude_self: bool = False, chunk: int = 1024) -> np.ndarray:
    """Distance from each query point to its k-th nearest reference point (brute force, chunked)."""
    q, r = np.asarray(query, np.float64), np.asarray(ref, np.float64)
    kk = k + 1 if exclude_self else k
    rn = np.sum(r**2, axis=1)
    out = np.empty(len(q))
    for s in range(0, len(q), chunk):
        qb = q[s : s + chunk]
        d2 = np.maximum(np.sum(qb**2, axis=1)[:, None] + rn[None, :] - 2 * qb @ r.T, 0.0)
        out[s : s + chunk] = np.sqrt(np.partition(d2, kk - 1, axis=1)[:, kk - 1])
    return np.maximum(out, 1e-300)


def knn_entropy(x: np.ndarray, k: int = 3) -> float:
    """Kozachenko-Leonenko differential entropy estimate (nats)."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    r = knn_dist(x, x, k, exclude_self=True)
    return _digamma_int(n) - _digamma_int(k) + _log_unit_ball(d) + d * float(np.mean(np.log(r)))


def knn_log_density(query: np.ndarray, samples: np.ndarray, k: int = 3) -> np.ndarray:
    """Bias-corrected k-NN log-density of `samples` at `query` points."""
    n, d = np.asarray(samples).shape
    r = knn_dist(query, samples, k)
    return _digamma_int(k) - _digamma_int(n) - _log_unit_ball(d) - d * np.log(r)


def kl_qp(samples: np.ndarray, log_p_samples: np.ndarray, k: int = 3) -> float:
    """KL(q || p) from samples of q and the exact log p at those samples."""
    return float(-np.mean(log_p_samples)) - knn_entropy(samples, k)


def kl_pq(data: np.ndarray, log_p_data: np.ndarray, samples: np.ndarray, k: int = 3) -> float:
    """KL(p || q) from fresh data points (with exact log p) and samples of q."""
    return float(np.mean(log_p_data) - np.mean(knn_log_density(data, samples, k)))


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance (root mean squared over random directions)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = min(len(x), len(y))
    rng = np.random.default_rng(seed)
    x, y = x[rng.permutation(len(x))[:n]], y[rng.permutation(len(y))[:n]]
    v = rng.normal(size=(x.shape[1], n_proj))
    v /= np.linalg.norm(v, axis=0, keepdims=True)
    px, py = np.sort(x @ v, axis=0), np.sort(y @ v, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))


def mmd2(x: np.ndarray, y: np.ndarray, bandwidths: tuple[float, ...] = (0.02, 0.1, 0.5), n_max: int = 2000, seed: int = 0) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels, on at most n_max points from each side."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)[rng.permutation(len(x))[:n_max]]
    y = np.asarray(y, np.float64)[rng.permutation(len(y))[:n_max]]

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = np.maximum(np.sum(a**2, 1)[:, None] + np.sum(b**2, 1)[None, :] - 2 * a @ b.T, 0)
        return sum(np.exp(-d2 / (2 * h**2)) for h in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def all_metrics(samples: np.ndarray, log_p_samples: np.ndarray, data: np.ndarray, log_p_data: np.ndarray) -> dict[str, float]:
    """KL(q||p), KL(p||q), SW2 and MMD^2 in one dict; NaN/inf samples raise."""
    samples = np.asarray(samples, np.float64)
    if not np.all(np.isfinite(samples)):
        raise DiffusionError("samples contain NaN/inf; the sampler diverged (try more steps or another schedule)")
    return {
        "kl_qp": kl_qp(samples, log_p_samples),
        "kl_pq": kl_pq(data, log_p_data, samples),
        "sw2": sliced_wasserstein(samples, data),
        "mmd2": mmd2(samples, data),
        "nll": float(-np.mean(log_p_samples)),
    }
