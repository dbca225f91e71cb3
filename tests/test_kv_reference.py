"""Independent references for the KV-policy tests, and the tiny models they run on.

``np_snapkv_select`` is a NumPy port of the published selection rule (SnapKV ``update_kv``,
with kvpress-style group-mean for GQA), written without looking at ``mlx_elm.kv``;
``np_layer0_qk`` recomputes layer 0's post-RoPE queries and keys from the weights alone.
The tests at the bottom check the references themselves on hand-made cases.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# --------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------


def tiny_llama(n_heads: int = 8, n_kv: int = 2, layers: int = 2, seed: int = 0):
    """A random mlx-lm llama (GQA 8/2, head_dim 32) in float32."""
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=layers, intermediate_size=256,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, rms_norm_eps=1e-5, vocab_size=256,
        head_dim=32, rope_theta=10000.0, tie_word_embeddings=True,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def tiny_openelm(seed: int = 0):
    """A random 2-layer OpenELM with per-layer head counts, GQA and q/k norms."""
    from mlx_elm.models.openelm import Model, ModelArgs

    mx.random.seed(seed)
    model = Model(ModelArgs(num_transformer_layers=2, model_dim=128, head_dim=32, vocab_size=256,
                            num_gqa_groups=2, ffn_dim_divisor=32, max_context_length=4096))
    mx.eval(model.parameters())
    return model


# --------------------------------------------------------------------------------------------
# the published selection rule in NumPy
# --------------------------------------------------------------------------------------------


def np_pool(x: np.ndarray, kernel: int, pool: str) -> np.ndarray:
    """torch max_pool1d / avg_pool1d(count_include_pad=True), stride 1, padding kernel // 2."""
    if kernel == 1:
        return x.copy()
    pad = kernel // 2
    out = np.empty_like(x)
    n = x.shape[-1]
    for i in range(n):
        lo, hi = i - pad, i + pad + 1
        seg = x[..., max(lo, 0): min(hi, n)]
        out[..., i] = seg.max(-1) if pool == "max" else seg.sum(-1) / kernel
    return out


def np_votes(q: np.ndarray, k: np.ndarray, scale: float, kernel: int, pool: str,
             per_query_head: bool) -> np.ndarray:
    """Pooled votes of each prefix position: (B, Hkv or Hq, L - W)."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    B, Hq, W, _ = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    k_rep = np.repeat(k, rep, axis=1)  # the original code's repeat_kv
    logits = np.einsum("bhwd,bhld->bhwl", q, k_rep) * scale
    for i in range(W):  # window query i sits at position L - W + i
        logits[:, :, i, L - W + i + 1:] = -np.inf
    logits -= logits.max(-1, keepdims=True)
    attn = np.exp(logits)
    attn /= attn.sum(-1, keepdims=True)
    votes = np_pool(attn[..., : L - W].sum(axis=2), kernel, pool)
    if not per_query_head:
        votes = votes.reshape(B, Hkv, rep, L - W).mean(axis=2)
    return votes


def np_snapkv_select(q, k, capacity, scale, kernel=7, pool="max", per_query_head=False):
    """(kept positions sorted per head, votes) or (None, None) when the prompt is shorter."""
    W, L = q.shape[2], k.shape[2]
    if L < capacity:
        return None, None
    votes = np_votes(q, k, scale, kernel, pool, per_query_head)
    top = np.argsort(-votes, axis=-1, kind="stable")[..., : capacity - W]
    window = np.broadcast_to(np.arange(L - W, L), top.shape[:-1] + (W,))
    return np.concatenate([np.sort(top, -1), window], -1), votes


def assert_same_selection(kept: np.ndarray, ref: np.ndarray, votes: np.ndarray, window: int,
                          rtol: float = 1e-5) -> float:
    """Equal kept sets, except where the votes tie at the top-k boundary; returns exact overlap."""
    assert kept.shape == ref.shape
    n_keep = kept.shape[-1] - window
    np.testing.assert_array_equal(kept[..., n_keep:], ref[..., n_keep:])  # the window, last
    same = 0
    for idx in np.ndindex(*kept.shape[:-1]):
        mine, theirs, v = kept[idx][:n_keep], ref[idx][:n_keep], votes[idx]
        assert len(set(mine.tolist())) == n_keep and np.all(np.diff(mine) > 0)
        kth = np.sort(v)[-n_keep]
        tol = rtol * max(abs(kth), 1e-12) + 1e-9
        assert v[mine].min() >= kth - tol, "a kept position is below the top-k threshold"
        rest = np.setdiff1d(np.arange(v.shape[0]), mine)
        assert rest.size == 0 or v[rest].max() <= kth + tol, "a dropped position beats the threshold"
        same += len(np.intersect1d(mine, theirs))
    return same / (n_keep * int(np.prod(kept.shape[:-1])))


# --------------------------------------------------------------------------------------------
# layer-0 queries and keys from the weights alone
# --------------------------------------------------------------------------------------------


def _np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, base):  # rotate-half (traditional=False), positions 0..n-1 along axis -2
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = np.arange(x.shape[-2])[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def np_layer0_qk(model, tokens: np.ndarray):
    """Post-RoPE (q, k) of layer 0, shapes (1, Hq, L, d) and (1, Hkv, L, d), and the scale."""
    from mlx_elm.models.openelm import Model as OpenELM

    if isinstance(model, OpenELM):
        a = model.args
        h = _np(model.transformer.token_embeddings.weight)[tokens]
        blk = model.layers[0]
        x = _rms(h, _np(blk.attn_norm.weight), a.rms_norm_eps)
        hq, hk, d = a.num_query_heads[0], a.num_kv_heads[0], a.head_dim
        qkv = (x @ _np(blk.attn.qkv_proj.weight).T).reshape(len(tokens), hq + 2 * hk, d)
        q, k = qkv[:, :hq], qkv[:, hq: hq + hk]
        q = _rms(q, _np(blk.attn.q_norm.weight), a.rms_norm_eps)
        k = _rms(k, _np(blk.attn.k_norm.weight), a.rms_norm_eps)
        base = a.rope_freq_constant
    else:
        a = model.args
        h = _np(model.model.embed_tokens.weight)[tokens]
        blk = model.model.layers[0]
        x = _rms(h, _np(blk.input_layernorm.weight), a.rms_norm_eps)
        d = a.head_dim
        q = (x @ _np(blk.self_attn.q_proj.weight).T).reshape(len(tokens), -1, d)
        k = (x @ _np(blk.self_attn.k_proj.weight).T).reshape(len(tokens), -1, d)
        base = a.rope_theta
    q = _rope(q.transpose(1, 0, 2), base)[None]
    k = _rope(k.transpose(1, 0, 2), base)[None]
    return q, k, d ** -0.5


# --------------------------------------------------------------------------------------------
# checks of the references themselves
# --------------------------------------------------------------------------------------------


def test_np_pool_matches_hand_computed():
    x = np.array([[1.0, 5.0, 2.0, 0.0, 3.0]])
    np.testing.assert_allclose(np_pool(x, 3, "max"), [[5, 5, 5, 3, 3]])
    np.testing.assert_allclose(np_pool(x, 3, "avg"), [[6 / 3, 8 / 3, 7 / 3, 5 / 3, 3 / 3]])


def test_np_select_prefers_the_attended_position():
    rng = np.random.default_rng(0)
    L, W, d = 40, 4, 8
    k = rng.normal(size=(1, 1, L, d)) * 0.1
    q = rng.normal(size=(1, 1, W, d)) * 0.1
    k[0, 0, 7] = q[0, 0].sum(0) * 20  # every window query attends to position 7
    kept, _ = np_snapkv_select(q, k, capacity=W + 1, scale=1.0, kernel=1)
    assert kept[0, 0].tolist() == [7, 36, 37, 38, 39]
