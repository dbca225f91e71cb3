"""An independent NumPy reference of SMoE and MH-MoE, written from the papers' equations and the
official code's semantics (arXiv 2404.15045 Sec. 3; GShard balance loss; tutel capacity), with
plain loops over tokens and experts. It does not import mlx_elm.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu_expert(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """fc2(fc1(x) * silu(fc3(x))) with fc3 = gate, fc1 = up, fc2 = down; weights are (out, in)."""
    return (silu(x @ gate.T) * (x @ up.T)) @ down.T


def router_logits(x: np.ndarray, w: Dict[str, np.ndarray]) -> np.ndarray:
    if "router.weight" in w:
        return x @ w["router.weight"].T
    wg = w["router.wg"]  # X-MoE: low-dimensional projection, cosine against unit expert embeddings
    wg = wg / np.maximum(np.linalg.norm(wg, axis=-1, keepdims=True), 1e-4)
    return (x @ w["router.reduce_weight"].T) @ wg.T


def sparse_moe(x: np.ndarray, w: Dict[str, np.ndarray], k: int, capacity_factor: float = 0.0,
               normalize: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """Rows x (S, d) through a top-k MoE; returns the output and the routing it used.

    ``w``: router.weight (E, d) or X-MoE router weights, experts.{gate,up,down}_proj.weight
    stacked per expert (E, out, in).
    """
    x = x.astype(np.float64)
    S = x.shape[0]
    logits = router_logits(x, w)
    E = logits.shape[-1]
    p = softmax(logits)
    normalize = k > 1 if normalize is None else normalize
    choice = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    g = np.take_along_axis(p, choice, axis=-1)
    if normalize:
        g = g / g.sum(-1, keepdims=True)
    keep = np.ones((S, k))
    if capacity_factor > 0:
        cap = k * math.ceil(capacity_factor * S / E)
        used = np.zeros(E, dtype=int)
        for j in range(k):  # all first choices take slots before any second choice
            for s in range(S):
                e = choice[s, j]
                if used[e] < cap:
                    used[e] += 1
                else:
                    keep[s, j] = 0.0
    y = np.zeros_like(x)
    for s in range(S):
        for j in range(k):
            if keep[s, j]:
                e = choice[s, j]
                y[s] += g[s, j] * swiglu_expert(x[s], w["experts.gate_proj.weight"][e],
                                                w["experts.up_proj.weight"][e], w["experts.down_proj.weight"][e])
    frac = np.bincount(choice[:, 0], minlength=E) / S
    balance = E * float((p.mean(0) * frac).sum())
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return {"y": y, "choice": choice, "scores": g, "keep": keep, "probs": p, "balance": balance,
            "z": float((lse**2).mean())}


def mh_moe(x: np.ndarray, w: Dict[str, np.ndarray], heads: int, k: int, capacity_factor: float = 0.0
           ) -> Dict[str, np.ndarray]:
    """Tokens x (T, d): head projection, split into ``heads`` consecutive sub-tokens, SMoE, merge."""
    x = x.astype(np.float64)
    T, d = x.shape
    s = x @ w["head.weight"].T + w["head.bias"] if "head.weight" in w else x
    sub = s.reshape(T * heads, d // heads)  # token t's chunks are rows t*h .. t*h + h - 1
    inner = {k_[len("moe."):]: v for k_, v in w.items() if k_.startswith("moe.")}
    r = sparse_moe(sub, inner, k, capacity_factor)
    o = r["y"].reshape(T, d)
    y = o @ w["merge.weight"].T + w["merge.bias"] if "merge.weight" in w else o
    return dict(r, y=y)
