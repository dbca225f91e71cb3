"""A KV cache that stores the whole prompt, then keeps a chosen subset of rows per head.

Policies (SnapKV, StreamingLLM-style, keep-all + quantization) differ only in ``select``. The
cache follows mlx-lm's protocol (``update_and_fetch``, ``offset``, ``state``, ``make_mask``) and
keeps two numbers apart: ``offset`` is the LOGICAL position (models rotate new tokens with it, so
RoPE continues from the true prompt length) and ``size()`` is the number of STORED rows (masks
are built from it, and it is what attention sees).

Compression happens once, inside the ``update_and_fetch`` call that completes the prompt: that
call still returns the full keys/values (the prompt's own attention is exact, as in the paper),
and later calls see only the kept rows plus what decoding appends. Which call completes the prompt
is never guessed from chunk sizes (mlx-lm's loop sends a 1-token chunk mid-prompt for some
lengths): the caller declares the prompt length with :meth:`expect_prompt` first
(``mlx_elm.generate`` does), or compresses by hand with ``auto_compress = False`` + :meth:`compress`.

Attention-guided policies also read queries: a cache with ``wants_queries`` set receives the
post-RoPE queries of each chunk through :meth:`observe_queries` before ``update_and_fetch``, from
the model's attention itself (OpenELM) or from a query tap (``mlx_elm.kv.taps``, mlx-lm models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    _BaseCache,
    create_attention_mask,
)

from mlx_elm.errors import KVCacheError


@dataclass
class CompressionStats:
    """What one layer's compression did (rows and bytes of the stored K/V, window included)."""

    rows_before: int
    rows_after: int
    bytes_before: int
    bytes_after: int


def used_nbytes(store) -> int:
    """Bytes of the rows in use (mlx-lm caches pre-allocate in steps of 256 rows)."""
    keys = getattr(store, "keys", None)
    if keys is None:
        return 0
    size = store.offset
    arrays = list(keys) + list(store.values) if isinstance(keys, (tuple, list)) else [keys, store.values]
    return int(sum(a.nbytes * min(size, a.shape[2]) // a.shape[2] for a in arrays if a.shape[2]))


class CompressingKVCache(_BaseCache):
    """Base class: full storage while the prompt streams in, ``select`` once it is complete."""

    policy = "full"  # the name in mlx_elm.kv.registry.POLICIES

    def __init__(self, capacity: Optional[int], window: int = 0, bits: Optional[int] = None,
                 group_size: int = 64):
        self.capacity = capacity
        self.window = window
        self.kv_bits = bits
        self.kv_group_size = group_size
        self.offset = 0  # logical position: RoPE of the next token
        self.prompt_end: Optional[int] = None  # logical position at which the prompt is complete
        self.compressed = False
        self.kept: Optional[mx.array] = None  # (B, H, rows) original positions of kept prompt rows
        self.stats: Optional[CompressionStats] = None
        self._store = KVCache()
        self._repeat = 1  # > 1 after per-query-head selection: appended K/V are repeated per group
        self._rows_at_compression = 0
        self._pending_bits = False
        self.auto_compress = True  # False: only ``compress()`` compresses (one prefill, many policies)

    # --- protocol ---------------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self._pending_bits:  # switch SDPA to the quantized path only from the next call on
            self.bits, self.group_size = self._store.bits, self._store.group_size
            self._pending_bits = False
        if self._repeat > 1:
            keys = mx.repeat(keys, self._repeat, axis=1)
            values = mx.repeat(values, self._repeat, axis=1)
        n = keys.shape[2]
        out = self._store.update_and_fetch(keys, values)
        self.offset += n
        if not self.compressed and self._prompt_complete(n):
            self.compress()
        return out

    def size(self) -> int:
        return self._store.offset

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        # Masks follow the stored rows, not the logical position.
        return create_attention_mask(N, self.size(), return_array, window_size)

    @property
    def state(self):
        arrays = self._store.state[:2] if not self._store.empty() else ()
        extra = getattr(self, "_queries", None)
        return tuple(arrays) + ((extra,) if extra is not None else ())

    @state.setter
    def state(self, v):
        raise NotImplementedError(f"{type(self).__name__} cannot be restored from a saved state")

    def empty(self) -> bool:
        return self._store.empty()

    @property
    def nbytes(self) -> int:
        return 0 if self._store.empty() else self._store.nbytes

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Before compression like ``KVCache``; after it only the appended suffix is trimmable."""
        limit = self.size() - (self._rows_at_compression if self.compressed else 0)
        n = self._store.trim(min(n, limit))
        self.offset -= n
        return n

    # --- prompt bookkeeping -----------------------------------------------------------------
    def expect_prompt(self, num_tokens: int) -> None:
        """Declare that the next ``num_tokens`` tokens complete the prompt (compress after them)."""
        if not self.compressed:
            self.prompt_end = self.offset + num_tokens

    def _prompt_complete(self, n: int) -> bool:
        if not self.auto_compress:
            return False
        if self.prompt_end is None:
            raise KVCacheError(
                f"a {self.policy} cache got tokens before the prompt length was declared; call "
                "mlx_elm.kv.expect_prompt(caches, len(prompt)) first (mlx_elm.generate does it for you)")
        return self.offset >= self.prompt_end

    # --- attention queries (attention-guided policies override) -----------------------------
    @property
    def wants_queries(self) -> bool:
        """True while this cache still needs the queries of incoming tokens."""
        return False

    def observe_queries(self, queries: mx.array, scale: float, start: Optional[int] = None) -> None:
        """Post-RoPE queries (B, Hq, n, d) of positions ``start..`` (default: ``offset``)."""

    # --- compression ------------------------------------------------------------------------
    def select(self, keys: mx.array) -> Optional[mx.array]:
        """Kept positions, (B, H', rows) ascending, or None to keep every row."""
        raise NotImplementedError

    def expand_heads(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Hook for per-query-head selection (stores one K/V copy per query head)."""
        return keys, values

    def compress(self) -> None:
        """Keep the selected rows; later calls append to them. Idempotent."""
        if self.compressed:
            return
        self.compressed = True
        store = self._store
        before_rows, before_bytes = store.offset, used_nbytes(store)
        if store.empty():
            kept_k = kept_v = None
        else:
            keys, values = store.keys_and_values()
            idx = self.select(keys)
            if idx is None:
                kept_k, kept_v = keys, values
                B, H, L, _ = keys.shape
                self.kept = mx.broadcast_to(mx.arange(L), (B, H, L))
            else:
                keys, values = self.expand_heads(keys, values)
                gather = idx[..., None]
                kept_k = mx.take_along_axis(keys, gather, axis=2)
                kept_v = mx.take_along_axis(values, gather, axis=2)
                self.kept = idx
        self._queries = None
        if self.kv_bits is not None:
            head_dim = kept_k.shape[-1] if kept_k is not None else 64
            gs = next((g for g in (self.kv_group_size, 32) if head_dim % g == 0), None)
            if gs is None:
                raise KVCacheError(f"head dimension {head_dim} is not a multiple of 32; "
                                   "quantized KV caches need one (drop --kv-bits)")
            self._store = QuantizedKVCache(group_size=gs, bits=self.kv_bits)
            self._pending_bits = True
        else:
            self._store = KVCache()
        if kept_k is not None:
            self._store.update_and_fetch(kept_k, kept_v)
        self._rows_at_compression = self._store.offset
        self.stats = CompressionStats(before_rows, self._store.offset, before_bytes,
                                      used_nbytes(self._store))

    def load_prefill(self, keys: mx.array, values: mx.array, offset: int) -> "CompressingKVCache":
        """Start from an uncompressed prefill's keys/values (one prefill, many policies)."""
        if self.compressed or self.offset:
            raise KVCacheError("load_prefill needs a fresh cache; build a new one with mlx_elm.kv.make_cache")
        self._store = KVCache()
        self._store.update_and_fetch(keys, values)
        self.offset = offset
        self.prompt_end = offset
        return self


class KeepAllCache(CompressingKVCache):
    """Full cache that only changes representation after the prompt (e.g. to 4/8-bit)."""

    policy = "full"

    def __init__(self, bits: Optional[int] = None, group_size: int = 64):
        super().__init__(capacity=None, window=0, bits=bits, group_size=group_size)

    def select(self, keys: mx.array) -> Optional[mx.array]:
        return None
