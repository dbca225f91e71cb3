"""StreamingLLM-style baseline: keep the first ``sinks`` positions and the most recent rows.

Applied once after the prompt, at the same budget and in the same cache machinery as SnapKV (the
kvpress ``StreamingLLMPress`` semantics), so the comparison isolates the choice of rows. mlx-lm's
``RotatingKVCache(max_size, keep=4)`` is the true streaming variant (it also evicts while the
prompt is being read).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from mlx_elm.kv.base import CompressingKVCache


def streaming_positions(length: int, capacity: int, sinks: int) -> mx.array:
    """Sorted positions kept: ``[0, sinks)`` and the last ``capacity - sinks``."""
    return mx.concatenate([mx.arange(sinks, dtype=mx.int32),
                           mx.arange(length - (capacity - sinks), length, dtype=mx.int32)])


class StreamingCache(CompressingKVCache):
    """Attention sinks plus a recent window, ``capacity`` rows per head in total."""

    policy = "streaming"

    def __init__(self, capacity: int, sinks: int = 4, bits: Optional[int] = None, group_size: int = 64):
        super().__init__(capacity, window=0, bits=bits, group_size=group_size)
        self.sinks = sinks

    def select(self, keys: mx.array) -> Optional[mx.array]:
        B, H, L, _ = keys.shape
        if L < self.capacity:
            return None
        return mx.broadcast_to(streaming_positions(L, self.capacity, self.sinks), (B, H, self.capacity))
