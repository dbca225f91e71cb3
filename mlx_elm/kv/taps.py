"""Query taps: let a SnapKV cache see the observation window's queries in mlx-lm's models.

mlx-lm's attention modules hand a cache only keys and values. A tap changes the class of one
attention module INSTANCE to a subclass whose ``__call__`` first recomputes the queries of the few
tokens the cache asks for (the window, at most W rows per call: projection, optional q-norm, RoPE
at the true positions) and hands them to the cache, then runs the original attention unchanged.
With any other cache, or once the window is collected, it is a pass-through. Parameters, weight
names and mlx-lm's modules are untouched.

Taps are installed explicitly, for as long as they are needed::

    with mlx_elm.kv.query_taps(model):
        model(prompt, cache=caches)        # or mlx-lm's stream_generate(...)

(``mlx_elm.generate`` does this whenever a cache wants queries). Our own models need no tap: their
attention calls ``cache.observe_queries`` itself (``HANDS_QUERIES_TO_CACHE``).

Family tapped: llama-like (``q_proj`` [+ ``q_norm``] + ``rope``; llama, mistral, qwen2/3, smollm).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn

QueryFn = Callable[[nn.Module, mx.array, int], mx.array]
_TAPPED: Dict[type, type] = {}


def _num_heads(attn: nn.Module) -> int:
    for name in ("n_heads", "num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            return getattr(attn, name)
    raise AttributeError("attention module has no head count")


def llama_queries(attn: nn.Module, x: mx.array, offset: int) -> mx.array:
    """Post-RoPE queries (B, H, n, d) of ``x`` (B, n, D) at positions offset.. (llama family)."""
    B, n, _ = x.shape
    q = attn.q_proj(x)
    norm = getattr(attn, "q_norm", None)
    if norm is not None and norm.weight.shape[-1] == q.shape[-1]:  # norm over the whole projection
        q, norm = norm(q), None
    q = q.reshape(B, n, _num_heads(attn), -1)
    if norm is not None:  # per-head norm (qwen3 style)
        q = norm(q)
    return attn.rope(q.transpose(0, 2, 1, 3), offset=offset)


def hands_queries(attn: nn.Module) -> bool:
    """True for attention modules that call ``cache.observe_queries`` themselves."""
    return bool(getattr(type(attn), "HANDS_QUERIES_TO_CACHE", False))


def query_fn_for(attn: nn.Module) -> Optional[QueryFn]:
    """The query recomputation for this attention module, or None when unsupported."""
    if all(hasattr(attn, a) for a in ("q_proj", "rope", "scale")):
        try:
            _num_heads(attn)
        except AttributeError:
            return None
        return llama_queries
    return None


def supports_queries(model: nn.Module) -> List[bool]:
    """Per layer: can a query-reading cache get its queries (natively or through a tap)?"""
    return [attn is not None and (hands_queries(attn) or query_fn_for(attn) is not None)
            for attn in attention_modules(model)]


def attention_modules(model: nn.Module) -> List[Optional[nn.Module]]:
    """Each layer's attention module (None where a layer has none we recognise)."""
    found = []
    for layer in model.layers:
        attn = None
        for name in ("self_attn", "attn", "attention"):
            cand = getattr(layer, name, None) if name in layer else None
            if isinstance(cand, nn.Module):
                attn = cand
                break
        found.append(attn)
    return found


def _tapped_class(cls: type, query_fn: QueryFn) -> type:
    if cls not in _TAPPED:
        def __call__(self, x, *args: Any, **kwargs: Any):
            cache = kwargs["cache"] if "cache" in kwargs else (args[1] if len(args) > 1 else None)
            span = cache.query_span(x.shape[1]) if getattr(cache, "wants_queries", False) else None
            if span is not None:
                lo, hi = span
                start = cache.offset + lo
                cache.observe_queries(query_fn(self, x[:, lo:hi], start), self.scale, start=start)
            return cls.__call__(self, x, *args, **kwargs)

        _TAPPED[cls] = type(f"QueryTapped{cls.__name__}", (cls,),
                            {"__call__": __call__, "_elm_base_class": cls,
                             "__module__": __name__})
    return _TAPPED[cls]


def install_query_taps(model: nn.Module) -> List[bool]:
    """Tap every mlx-lm attention module that needs it (idempotent); returns which layers can
    now hand queries to a cache (natively or tapped)."""
    for attn in attention_modules(model):
        if attn is None or hands_queries(attn) or hasattr(type(attn), "_elm_base_class"):
            continue
        fn = query_fn_for(attn)
        if fn is not None:
            attn.__class__ = _tapped_class(type(attn), fn)
    return supports_queries(model)


def remove_query_taps(model: nn.Module) -> None:
    """Give every tapped attention module its original class back."""
    for attn in attention_modules(model):
        base = getattr(type(attn), "_elm_base_class", None) if attn is not None else None
        if base is not None:
            attn.__class__ = base


@contextmanager
def query_taps(model: nn.Module) -> Iterator[nn.Module]:
    """Taps installed for the duration of the block (only the ones this block installed are removed)."""
    before = [attn is not None and hasattr(type(attn), "_elm_base_class") for attn in attention_modules(model)]
    install_query_taps(model)
    try:
        yield model
    finally:
        for attn, had in zip(attention_modules(model), before):
            base = getattr(type(attn), "_elm_base_class", None) if attn is not None else None
            if base is not None and not had:
                attn.__class__ = base
