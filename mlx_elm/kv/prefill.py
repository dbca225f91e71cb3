"""Prefill once, try several policies: the prompt's keys, values and window queries, kept whole.

Comparing policies on one long prompt (benchmarks, the passkey evaluation, a notebook) should not
pay for one prefill per policy, nor reach into cache internals. :func:`prefill` runs the prompt
once and keeps everything any policy needs; :meth:`Prefill.caches` then builds a ready,
compressed cache list for each policy from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from mlx_elm.errors import KVCacheError
from mlx_elm.kv.base import CompressingKVCache
from mlx_elm.kv.caches import expect_prompt, make_cache
from mlx_elm.kv.registry import options as kv_options
from mlx_elm.kv.snapkv import SnapKVCache
from mlx_elm.kv.taps import query_taps


@dataclass
class Prefill:
    """Per layer: the prompt's full keys/values (B, H, L, d) and its last ``window`` queries."""

    keys: List[mx.array]
    values: List[mx.array]
    queries: List[mx.array]
    scales: List[float]
    length: int
    window: int
    logits: mx.array  # (B, V) next-token logits after the prompt

    def caches(self, model: nn.Module, policy: str = "full", **options: Any) -> List[Any]:
        """A cache list holding this prompt under ``policy`` (compressed now), ready to decode."""
        opts = kv_options(policy, **options)
        if policy == "full" and opts.bits is None:
            out = []
            for k, v in zip(self.keys, self.values):
                c = KVCache()
                c.update_and_fetch(k, v)
                out.append(c)
            return out
        if policy == "snapkv" and opts.window > self.window:
            raise KVCacheError(f"this prefill kept {self.window} window queries but the policy asks for "
                               f"{opts.window}; prefill with window={opts.window}")
        caches = make_cache(model, policy, **options)
        for c, k, v, q, s in zip(caches, self.keys, self.values, self.queries, self.scales):
            c.load_prefill(k, v, self.length)
            if isinstance(c, SnapKVCache):
                c.load_queries(q, s)
            c.compress()
        return caches


def prefill(model: nn.Module, prompt: Union[Sequence[int], mx.array], window: int = 32,
            chunk: int = 512) -> Prefill:
    """Run ``prompt`` (token ids, or a (1, L) array) through ``model`` once, keeping what every
    policy needs (``window`` = the largest SnapKV window you will try)."""
    tokens = prompt if isinstance(prompt, mx.array) else mx.array(list(prompt), dtype=mx.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    length = tokens.shape[1]
    if length <= window:
        raise KVCacheError(f"the prompt has {length} tokens, not more than the window {window}; use a longer "
                           "prompt or a smaller window")
    caches = make_cache(model, "snapkv", capacity=length + 1, window=window)
    for c in caches:
        c.auto_compress = False
    expect_prompt(caches, length)
    with query_taps(model):
        for start in range(0, length, chunk):
            logits = model(tokens[:, start:start + chunk], cache=caches)
            mx.eval(logits, [c.state for c in caches])
    if not all(isinstance(c, CompressingKVCache) for c in caches):
        raise KVCacheError("prefill needs a model whose every layer has a full-attention KV cache")
    keys, values = zip(*(c._store.keys_and_values() for c in caches))
    return Prefill(list(keys), list(values), [c._queries for c in caches], [c._query_scale for c in caches],
                   length, window, logits[:, -1])
