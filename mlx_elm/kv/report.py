"""What a cache list holds: bytes in use, what compression did, one line for ``--verbose``."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from mlx_elm.kv.base import CompressingKVCache, CompressionStats, used_nbytes


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
    opts = getattr(first, "options", None)
    params = opts.describe() if opts is not None else ""
    name = first.policy
    stats = compression_stats(caches)
    if stats is None:
        return f"kv cache: {name} ({params}): not compressed yet, {_mb(cache_nbytes(caches))}"
    ratio = stats.bytes_before / max(stats.bytes_after, 1)
    return (f"kv cache: {name} ({params}): {stats.rows_before} -> {stats.rows_after} rows per head, "
            f"{_mb(stats.bytes_before)} before compression -> {_mb(stats.bytes_after)} after "
            f"({ratio:.1f}x smaller); {_mb(cache_nbytes(caches))} after decoding")
