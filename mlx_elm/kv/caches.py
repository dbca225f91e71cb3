"""Building policy caches for a model, and telling them where the prompt ends."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_elm.errors import KVCacheError
from mlx_elm.kv.base import CompressingKVCache
from mlx_elm.kv.registry import KVOptions, policy_spec
from mlx_elm.kv.registry import options as kv_options
from mlx_elm.kv.taps import supports_queries


def validate(policy: str = "full", capacity: Optional[int] = None, window: int = 32, kernel: int = 7,
             pool: str = "max", bits: Optional[int] = None, sinks: int = 4, **more: Any) -> KVOptions:
    """Raise ``KVCacheError`` (one line: problem and fix) for inconsistent options."""
    return kv_options(policy, capacity=capacity, window=window, kernel=kernel, pool=pool, bits=bits,
                      sinks=sinks, **more)


def make_cache(model: nn.Module, policy: str = "full", **options: Any) -> List[Any]:
    """Per-layer caches for ``policy`` (options: see ``KVOptions``); plain ``KVCache`` layers are
    replaced, others (sliding-window, SSM, ...) kept as the model's own ``make_cache`` made them.

    Compressing caches need the prompt length first (:func:`expect_prompt`); attention-guided ones
    (SnapKV) need the model's queries, which our models hand over and mlx-lm's models give through
    :func:`query_taps`. ``mlx_elm.generate`` does both.
    """
    opts = kv_options(policy, **options)
    spec = policy_spec(policy)
    base = make_prompt_cache(model)
    if policy == "full" and opts.bits is None:
        return base
    if spec.needs_queries:
        able = supports_queries(model)
        if len(able) != len(base) or not all(ok for ok, c in zip(able, base) if type(c) is KVCache):
            raise KVCacheError(
                f"{policy} needs the attention queries of {type(model).__name__} "
                f"({getattr(model, 'model_type', '?')}) and cannot get them (llama-family and OpenELM "
                "attention are supported); use --kv-policy streaming or full")

    def one() -> CompressingKVCache:
        cache = spec.build(opts)
        cache.options = opts
        return cache

    caches = [one() if type(c) is KVCache else c for c in base]
    if not any(isinstance(c, CompressingKVCache) for c in caches):
        raise KVCacheError(f"{type(model).__name__} has no full-attention KV cache layers to apply {policy!r} to")
    return caches


def wants_queries(caches: Sequence[Any]) -> bool:
    """True while some cache of the list still needs attention queries (taps must be on)."""
    return any(getattr(c, "wants_queries", False) for c in caches)


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
