"""An independent NumPy OpenELM forward pass (float64), written from the architecture notes.

It shares no code with ``mlx_elm.models.openelm``: geometry comes from the weight shapes.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, base: float) -> np.ndarray:
    """Rotate-half RoPE over the full head dim; x is [heads, T, d]."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)
    angles = np.arange(x.shape[1])[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + np.concatenate([-x2, x1], axis=-1) * sin


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def forward(w: dict, tokens: np.ndarray, head_dim: int, eps: float = 1e-6, base: float = 10000.0,
            qk_norm: bool = True) -> np.ndarray:
    """Logits [T, V] for a 1-D token array; ``w`` maps HF names to float arrays."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    emb = w["transformer.token_embeddings.weight"]
    h = emb[tokens]
    T = len(tokens)
    causal = np.triu(np.full((T, T), -np.inf), k=1)
    i = 0
    while f"transformer.layers.{i}.attn.qkv_proj.weight" in w:
        p = f"transformer.layers.{i}."
        x = rms_norm(h, w[p + "attn_norm.weight"], eps)
        qkv = x @ w[p + "attn.qkv_proj.weight"].T
        n_q = w[p + "attn.out_proj.weight"].shape[1] // head_dim
        n_kv = (qkv.shape[1] // head_dim - n_q) // 2
        qkv = qkv.reshape(T, n_q + 2 * n_kv, head_dim).transpose(1, 0, 2)
        q, k, v = qkv[:n_q], qkv[n_q:n_q + n_kv], qkv[n_q + n_kv:]
        if qk_norm:
            q = rms_norm(q, w[p + "attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "attn.k_norm.weight"], eps)
        q, k = rope(q, base), rope(k, base)
        group = n_q // n_kv
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(head_dim) + causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        o = (probs @ v).transpose(1, 0, 2).reshape(T, n_q * head_dim)
        h = h + o @ w[p + "attn.out_proj.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gate, up = np.split(x @ w[p + "ffn.proj_1.weight"].T, 2, axis=-1)
        h = h + (silu(gate) * up) @ w[p + "ffn.proj_2.weight"].T
        i += 1
    h = rms_norm(h, w["transformer.norm.weight"], eps)
    head = w.get("lm_head.weight", emb)
    return h @ head.T
