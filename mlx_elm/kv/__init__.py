"""KV-cache policies for generation: full, SnapKV, StreamingLLM-style, optionally 4/8-bit.

``make_cache(model, policy=...)`` returns a per-layer cache list for ``mlx_lm`` generation (or
``mlx_elm.generate.stream_tokens``). Compressing policies keep the whole prompt while it is read,
then keep ``capacity`` rows per head (window included) once it is complete; decoding appends.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_elm.errors import KVCacheError
from mlx_elm.kv.base import CompressingKVCache, CompressionStats, KeepAllCache, used_nbytes
from mlx_elm.kv.snapkv import SnapKVCache, pool1d, snapkv_select, window_votes
from mlx_elm.kv.streaming import StreamingCache, streaming_positions
from mlx_elm.kv.taps import install_query_taps, remove_query_taps

POLICIES = ("full", "snapkv", "streaming")
POOLS = ("max", "avg")

__all__ = [
    "POLICIES", "make_cache", "validate", "cache_nbytes", "compress", "expect_prompt",
    "compression_stats", "CompressingKVCache", "SnapKVCache", "StreamingCache", "KeepAllCache",
    "CompressionStats", "snapkv_select", "window_votes", "pool1d", "streaming_positions",
    "install_query_taps", "remove_query_taps", "describe",
]


def validate(policy: str = "full", capacity: Optional[int] = None, window: int = 32, kernel: int = 7,
             pool: str = "max", bits: Optional[int] = None, sinks: int = 4) -> None:
    """Raise ``KVCacheError`` (one line: problem and fix) for inconsistent options."""
    if policy not in POLICIES:
        raise KVCacheError(f"unknown KV policy {policy!r}; use one of {', '.join(POLICIES)}")
    if bits is not None and bits not in (4, 8):
        raise KVCacheError(f"--kv-bits must be 4 or 8 (got {bits}); omit it for a float cache")
    if policy == "full":
        return
    if capacity is None or capacity <= 0:
        raise KVCacheError(f"--kv-capacity must be a positive number of rows per head for policy {policy!r}")
    if policy == "snapkv":
        if window <= 0:
            raise KVCacheError(f"--kv-window must be >= 1 (got {window})")
        if capacity <= window:
            raise KVCacheError(
                f"--kv-capacity ({capacity}) must exceed --kv-window ({window}): capacity counts the "
                "window; raise the capacity or shrink the window")
        if kernel <= 0 or kernel % 2 == 0:
            raise KVCacheError(f"--kv-kernel must be odd and >= 1 (got {kernel}); 1 means no pooling")
        if pool not in POOLS:
            raise KVCacheError(f"--kv-pool must be max or avg (got {pool!r})")
    if policy == "streaming" and not 0 <= sinks < capacity:
        raise KVCacheError(f"sink count ({sinks}) must be in [0, --kv-capacity={capacity})")


def make_cache(
    model: nn.Module,
    policy: str = "full",
    capacity: Optional[int] = None,
    window: int = 32,
    kernel: int = 7,
    pool: str = "max",
    bits: Optional[int] = None,
    per_query_head: bool = False,
    sinks: int = 4,
    group_size: int = 64,
) -> List[Any]:
    """Per-layer caches for ``policy``; plain ``KVCache`` layers are replaced, others kept.

    Layers that are not plain full-attention KV caches in the model's own ``make_cache``
    (sliding-window, SSM, ...) are left as they are. SnapKV also installs query taps.
    """
    validate(policy, capacity, window, kernel, pool, bits, sinks)
    base = make_prompt_cache(model)
    if policy == "full" and bits is None:
        return base
    if policy == "snapkv":
        tapped = install_query_taps(model)
        if len(tapped) != len(base) or not all(t for t, c in zip(tapped, base) if type(c) is KVCache):
            raise KVCacheError(
                f"SnapKV needs a query tap for {type(model).__name__} ({getattr(model, 'model_type', '?')}) "
                "and has none (llama-family and OpenELM are supported); use --kv-policy streaming or full")

    def one() -> CompressingKVCache:
        if policy == "snapkv":
            return SnapKVCache(capacity, window, kernel, pool, per_query_head, bits, group_size)
        if policy == "streaming":
            return StreamingCache(capacity, sinks, bits, group_size)
        return KeepAllCache(bits, group_size)

    caches = [one() if type(c) is KVCache else c for c in base]
    if not any(isinstance(c, CompressingKVCache) for c in caches):
        raise KVCacheError(f"{type(model).__name__} has no full-attention KV cache layers to apply {policy!r} to")
    return caches


def expect_prompt(caches: Sequence[Any], num_tokens: int) -> None:
    """Tell compressing caches that the next ``num_tokens`` tokens complete the prompt."""
    for c in caches:
        if isinstance(c, CompressingKVCache):
            c.expect_prompt(num_tokens)


def compress(caches: Sequence[Any]) -> None:
    """Compress now (after a manual prefill with ``model(prompt, cache=caches)``)."""
    for c in caches:
        if isinstance(c, CompressingKVCache):
            c.compress()


def cache_nbytes(caches: Any) -> int:
    """Bytes of the K/V rows in use (one cache or a list), quantization scales included."""
    if isinstance(caches, (list, tuple)):
        return sum(cache_nbytes(c) for c in caches)
    if isinstance(caches, CompressingKVCache):
        return used_nbytes(caches._store)
    if getattr(caches, "keys", None) is not None and hasattr(caches, "offset"):
        return used_nbytes(caches)
    return 0


def compression_stats(caches: Sequence[Any]) -> Optional[CompressionStats]:
    """Totals over layers of what compression did, or None when nothing was compressed."""
    stats = [c.stats for c in caches if isinstance(c, CompressingKVCache) and c.stats is not None]
    if not stats:
        return None
    return CompressionStats(
        rows_before=max(s.rows_before for s in stats), rows_after=max(s.rows_after for s in stats),
        bytes_before=sum(s.bytes_before for s in stats), bytes_after=sum(s.bytes_after for s in stats))


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def describe(caches: Sequence[Any]) -> str:
    """One line for ``--verbose``: KV bytes before and after compression, and now."""
    kinds = sorted({type(c).__name__ for c in caches})
    first = next((c for c in caches if isinstance(c, CompressingKVCache)), None)
    if first is None:
        return f"kv cache: full ({', '.join(kinds)}), {_mb(cache_nbytes(caches))} over {len(caches)} layers"
    params = f"C={first.capacity}"
    if isinstance(first, SnapKVCache):
        params += f" W={first.window} kernel={first.kernel} pool={first.pool}"
        params += " per-query-head" if first.per_query_head else ""
    if isinstance(first, StreamingCache):
        params += f" sinks={first.sinks}"
    if first.kv_bits:
        params += f" bits={first.kv_bits}"
    name = {"SnapKVCache": "snapkv", "StreamingCache": "streaming"}.get(type(first).__name__, "full")
    stats = compression_stats(caches)
    if stats is None:
        return f"kv cache: {name} ({params}): not compressed yet, {_mb(cache_nbytes(caches))}"
    ratio = stats.bytes_before / max(stats.bytes_after, 1)
    return (f"kv cache: {name} ({params}): {stats.rows_before} -> {stats.rows_after} rows per head, "
            f"{_mb(stats.bytes_before)} before compression -> {_mb(stats.bytes_after)} after "
            f"({ratio:.1f}x smaller); {_mb(cache_nbytes(caches))} after decoding")
