"""KV-cache policies for generation: full, SnapKV, StreamingLLM-style, optionally 4/8-bit.

``make_cache(model, policy=...)`` returns a per-layer cache list for ``mlx_lm`` generation (or
``mlx_elm.generate``). Compressing policies keep the whole prompt while it is read, then keep
``capacity`` rows per head (window included) once it is complete; decoding appends.

Modules: ``registry`` (the policies by name and their options), ``caches`` (building them,
declaring the prompt), ``base`` / ``snapkv`` / ``streaming`` (the cache classes), ``taps`` (queries
from mlx-lm attention), ``prefill`` (one prefill, many policies), ``report`` (bytes, ``--verbose``),
``bench`` (``mlx-elm bench kv``).
"""

from __future__ import annotations

from mlx_elm.kv.base import CompressingKVCache, CompressionStats, KeepAllCache
from mlx_elm.kv.caches import (
    compress,
    expect_prompt,
    make_cache,
    validate,
    wants_queries,
)
from mlx_elm.kv.prefill import Prefill, prefill
from mlx_elm.kv.registry import POLICIES, KVOptions, PolicySpec
from mlx_elm.kv.report import cache_nbytes, compression_stats, describe
from mlx_elm.kv.snapkv import SnapKVCache, pool1d, snapkv_select, window_votes
from mlx_elm.kv.streaming import StreamingCache, streaming_positions
from mlx_elm.kv.taps import install_query_taps, query_taps, remove_query_taps

__all__ = [
    "POLICIES", "KVOptions", "PolicySpec", "make_cache", "validate", "cache_nbytes", "compress",
    "expect_prompt", "compression_stats", "wants_queries", "query_taps", "install_query_taps",
    "remove_query_taps", "prefill", "Prefill", "CompressingKVCache", "SnapKVCache", "StreamingCache",
    "KeepAllCache", "CompressionStats", "snapkv_select", "window_votes", "pool1d", "streaming_positions",
    "describe",
]
