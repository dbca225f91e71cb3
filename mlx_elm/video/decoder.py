"""Feeding input embeddings to any decoder ``mlx_elm.load`` returns, without patching mlx-lm.

:class:`EmbeddingDecoder` wraps the loaded model and exposes the three pieces the video model
needs: ``embed(tokens)`` (the decoder's own token embedding), ``hidden(embeddings, cache)`` (its
blocks and final norm) and ``head(hidden)`` (tied embedding or ``lm_head``). Called like a model,
``wrapper(tokens, cache=..., input_embeddings=...)`` returns logits, which is the signature
mlx-lm's ``stream_generate`` uses for ``input_embeddings``, so generation streams with mlx-lm's KV
cache. Models whose inner module already takes ``input_embeddings`` (mlx-lm's Llama, Qwen2, ...)
are run through it; others with the common ``embedding / layers / norm`` layout (our OpenELM) are
run block by block here.
"""

from __future__ import annotations

import inspect
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache

from mlx_elm.errors import VideoError

EMBEDDING_NAMES = ("embed_tokens", "token_embeddings", "wte", "tok_embeddings", "embedding")
INNER_NAMES = ("model", "transformer")


def _inner(model: nn.Module) -> nn.Module:
    for name in INNER_NAMES:
        m = getattr(model, name, None) if name in model else None
        if isinstance(m, nn.Module):
            return m
    raise VideoError(f"{type(model).__name__} has no inner 'model' or 'transformer' module; "
                     "this decoder layout cannot take video embeddings, use a Llama-style model")


def _embedding(inner: nn.Module) -> nn.Module:
    for name in EMBEDDING_NAMES:
        if name in inner and isinstance(inner[name], nn.Module):
            return inner[name]
    raise VideoError(f"{type(inner).__name__} has no token embedding ({', '.join(EMBEDDING_NAMES)}); "
                     "this decoder layout cannot take video embeddings")


def _takes_embeddings(module: nn.Module) -> bool:
    try:
        return "input_embeddings" in inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
        return False


class EmbeddingDecoder(nn.Module):
    """A decoder that can be fed embeddings: ``embed``, ``hidden``, ``head`` and ``__call__``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base = model
        inner = _inner(model)
        self._native = _takes_embeddings(inner)
        emb = _embedding(inner)
        if not self._native and not ("layers" in inner and "norm" in inner):
            raise VideoError(f"{type(model).__name__}: no input_embeddings argument and no layers/norm to run "
                             "block by block; use a Llama-style decoder")
        self._inner_name = next(n for n in INNER_NAMES if n in model and model[n] is inner)
        self._emb_name = next(n for n in EMBEDDING_NAMES if n in inner and inner[n] is emb)

    # Paths are looked up on every call so that LoRA wrappers put in place later are used.
    @property
    def inner(self) -> nn.Module:
        return self.base[self._inner_name]

    @property
    def embedding(self) -> nn.Module:
        return self.inner[self._emb_name]

    @property
    def layers(self) -> list:
        return self.base.layers

    @property
    def dim(self) -> int:
        w = self.embedding.weight
        return int(w.shape[1] * (32 // self.embedding.bits if isinstance(self.embedding, nn.QuantizedEmbedding) else 1))

    def make_cache(self) -> List[Any]:
        return make_prompt_cache(self.base)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.embedding(tokens)

    def hidden(self, embeddings: mx.array, cache: Optional[List[Any]] = None, tokens: Optional[mx.array] = None) -> mx.array:
        """Final-norm hidden states for input ``embeddings [B, L, D]``."""
        inner = self.inner
        if self._native:
            if tokens is None:
                tokens = mx.zeros(embeddings.shape[:2], dtype=mx.int32)
            return inner(tokens, cache=cache, input_embeddings=embeddings)
        cache = cache if cache is not None else [None] * len(inner.layers)
        h = embeddings
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(inner.layers, cache):
            h = layer(h, mask, c)
        return inner.norm(h)

    def head(self, h: mx.array) -> mx.array:
        if "lm_head" in self.base:
            return self.base.lm_head(h)
        return self.embedding.as_linear(h)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None,
                 input_embeddings: Optional[mx.array] = None) -> mx.array:
        emb = input_embeddings if input_embeddings is not None else self.embed(inputs)
        return self.head(self.hidden(emb, cache, inputs if input_embeddings is not None else None))

    def embedding_rms(self) -> float:
        """RMS of the token embedding rows: the scale visual tokens are projected to."""
        w = self.embedding.weight
        if isinstance(self.embedding, nn.QuantizedEmbedding):
            w = mx.dequantize(w, self.embedding.scales, self.embedding.biases, self.embedding.group_size,
                              self.embedding.bits)
        return float(mx.sqrt(mx.mean(w.astype(mx.float32) ** 2)).item())
