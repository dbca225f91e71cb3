"""SnapKV (arXiv 2404.14469): keep, per head, the prompt rows the observation window votes for.

The last W prompt queries attend (softmax over all L prompt keys, causal inside the window); their
attention to the L - W prefix positions is summed, smoothed by 1-D pooling (kernel k, stride 1,
padding k // 2; max, or avg counting the padding), and the top C - W positions are kept together
with the window itself. With GQA the votes of the query heads sharing a KV head are averaged
after pooling, so one row set is kept per KV head and the cache stays GQA-sized; per-query-head
selection (the original code, which repeats K/V per query head) is available for comparison.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from mlx_elm.errors import KVCacheError
from mlx_elm.kv.base import CompressingKVCache


def pool1d(x: mx.array, kernel: int, pool: str) -> mx.array:
    """1-D pooling along the last axis, stride 1, same length (odd ``kernel``)."""
    if kernel == 1:
        return x
    pad = kernel // 2
    fill = -mx.inf if pool == "max" else 0.0
    widths = [(0, 0)] * (x.ndim - 1) + [(pad, pad)]
    padded = mx.pad(x, widths, constant_values=fill)
    n = x.shape[-1]
    out = padded[..., 0:n]
    for j in range(1, kernel):
        view = padded[..., j : j + n]
        out = mx.maximum(out, view) if pool == "max" else out + view
    return out if pool == "max" else out / kernel


def window_votes(queries: mx.array, keys: mx.array, scale: float) -> mx.array:
    """Summed attention of the window queries to each prefix position, per query head.

    queries: (B, Hq, W, d) post-RoPE, the last W prompt positions; keys: (B, Hkv, L, d).
    Returns (B, Hq, L - W) in float32.
    """
    B, Hq, W, d = queries.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    rep = Hq // Hkv
    q = queries.astype(mx.float32).reshape(B, Hkv, rep, W, d)
    k = keys.astype(mx.float32)[:, :, None]  # (B, Hkv, 1, L, d)
    scores = (q * scale) @ k.swapaxes(-1, -2)  # (B, Hkv, rep, W, L)
    qpos = mx.arange(L - W, L)[:, None]
    allowed = mx.arange(L)[None] <= qpos  # causal: window query i sees keys up to its position
    scores = mx.where(allowed, scores, -mx.inf)
    attn = mx.softmax(scores, axis=-1)
    return attn[..., : L - W].sum(axis=-2).reshape(B, Hq, L - W)


def snapkv_select(
    queries: mx.array,
    keys: mx.array,
    capacity: int,
    scale: float,
    kernel: int = 7,
    pool: str = "max",
    per_query_head: bool = False,
) -> Optional[mx.array]:
    """Kept positions (B, H', capacity) ascending, window last; None when L < capacity.

    H' is the number of KV heads, or of query heads with ``per_query_head``.
    """
    B, Hq, W, _ = queries.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    if L < capacity:
        return None
    n_keep = capacity - W
    votes = pool1d(window_votes(queries, keys, scale), kernel, pool)  # (B, Hq, L - W)
    if not per_query_head:
        votes = votes.reshape(B, Hkv, Hq // Hkv, L - W).mean(axis=2)
    heads = votes.shape[1]
    top = mx.argpartition(-votes, kth=n_keep - 1, axis=-1)[..., :n_keep]
    top = mx.sort(top.astype(mx.int32), axis=-1)
    window = mx.broadcast_to(mx.arange(L - W, L, dtype=mx.int32), (B, heads, W))
    return mx.concatenate([top, window], axis=-1)


class SnapKVCache(CompressingKVCache):
    """Per-layer SnapKV cache; the attention (or a query tap) hands it the window's queries."""

    policy = "snapkv"

    def __init__(self, capacity: int, window: int = 32, kernel: int = 7, pool: str = "max",
                 per_query_head: bool = False, bits: Optional[int] = None, group_size: int = 64):
        super().__init__(capacity, window, bits, group_size)
        self.kernel, self.pool, self.per_query_head = kernel, pool, per_query_head
        self._queries: Optional[mx.array] = None
        self._query_scale: Optional[float] = None

    # --- the queries --------------------------------------------------------------------------
    @property
    def wants_queries(self) -> bool:
        return not self.compressed

    def query_span(self, n: int) -> Optional[tuple]:
        """Which of the next ``n`` tokens' queries are needed: (start, stop) within the chunk, so a
        tap recomputes only those."""
        if self.compressed or self.prompt_end is None:
            return None
        lo = max(self.prompt_end - self.window, self.offset) - self.offset
        hi = min(self.prompt_end, self.offset + n) - self.offset
        return (lo, hi) if lo < hi else None

    def observe_queries(self, queries: mx.array, scale: float, start: Optional[int] = None) -> None:
        """Keep the post-RoPE queries (B, Hq, n, d) of positions ``start..`` that fall in the
        observation window (the last W prompt positions)."""
        if self.compressed:
            return
        self._prompt_complete(0)  # one-line error when the prompt length was never declared
        start = self.offset if start is None else start
        lo = max(start, self.prompt_end - self.window)
        hi = min(start + queries.shape[2], self.prompt_end)
        if lo >= hi:
            return
        q = queries[:, :, lo - start: hi - start]
        q = q if self._queries is None else mx.concatenate([self._queries, q], axis=2)
        self._queries = q[:, :, -self.window:]
        self._query_scale = scale

    def load_queries(self, queries: mx.array, scale: float) -> "SnapKVCache":
        """The window's queries of a prefill made elsewhere (see ``mlx_elm.kv.Prefill``)."""
        self._queries, self._query_scale = queries[:, :, -self.window:], scale
        return self

    # --- selection --------------------------------------------------------------------------
    def select(self, keys: mx.array) -> Optional[mx.array]:
        if keys.shape[2] < self.capacity:
            return None
        if self._queries is None:
            raise KVCacheError(
                "SnapKV saw no queries: this model's attention neither hands them to the cache nor has "
                "a query tap; wrap the prefill in `with mlx_elm.kv.query_taps(model):` (mlx_elm.generate does)")
        q = self._queries
        if q.shape[2] != self.window:
            raise KVCacheError(f"SnapKV collected {q.shape[2]} window queries, expected {self.window}; "
                               "feed the whole prompt after expect_prompt")
        self._repeat_factor = q.shape[1] // keys.shape[1]
        return snapkv_select(q, keys, self.capacity, self._query_scale, self.kernel, self.pool,
                             self.per_query_head)

    def expand_heads(self, keys, values):
        if not self.per_query_head or self._repeat_factor == 1:
            return keys, values
        self._repeat = self._repeat_factor
        return mx.repeat(keys, self._repeat, axis=1), mx.repeat(values, self._repeat, axis=1)
