"""OpenELM (arXiv 2404.14619): a decoder whose attention and FFN widths grow with depth.

Follows mlx-lm's model protocol (``ModelArgs``, ``Model(args)``, ``__call__(inputs, cache)``,
``.layers``, ``sanitize``) and Hugging Face weight names, so HF checkpoints load without renaming
and a saved folder loads in mlx-lm too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)


@dataclass
class ModelArgs(BaseModelArgs):
    """The Hugging Face ``OpenELMConfig`` fields, with per-layer lists filled in."""

    model_type: str = "openelm"
    head_dim: int = 64
    num_transformer_layers: int = 16
    model_dim: int = 1280
    vocab_size: int = 32000
    ffn_dim_divisor: int = 256
    num_query_heads: Optional[List[int]] = None
    num_kv_heads: Optional[List[int]] = None
    ffn_multipliers: Union[float, List[float], Tuple[float, float]] = (0.5, 4.0)
    qkv_multipliers: Union[float, List[float], Tuple[float, float]] = (0.5, 1.0)
    num_gqa_groups: int = 4
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rms_norm_eps: float = 1e-6
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    max_context_length: int = 2048

    def __post_init__(self):
        n = self.num_transformer_layers
        if self.num_query_heads is None:
            alphas = _layer_multipliers(self.qkv_multipliers, n)
            divisor = self.head_dim * self.num_gqa_groups
            q_dims = [make_divisible(self.model_dim * a, divisor) for a in alphas]
            self.num_query_heads = [int(d // self.head_dim) for d in q_dims]
        if self.num_kv_heads is None:
            self.num_kv_heads = [q // self.num_gqa_groups for q in self.num_query_heads]
        self.ffn_multipliers = _layer_multipliers(self.ffn_multipliers, n)
        self.num_query_heads = [int(h) for h in self.num_query_heads]
        self.num_kv_heads = [int(h) for h in self.num_kv_heads]
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"config.{name} has {len(getattr(self, name))} entries but "
                    f"num_transformer_layers is {n}; give one entry per layer."
                )
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if kv <= 0 or q % kv:
                raise ValueError(
                    f"layer {i}: {q} query heads is not a multiple of {kv} KV heads; "
                    "fix num_query_heads / num_kv_heads in config.json."
                )

    @property
    def ffn_dims(self) -> List[int]:
        return [
            int(make_divisible(m * self.model_dim, self.ffn_dim_divisor))
            for m in self.ffn_multipliers
        ]

    def to_dict(self) -> dict:
        """The config.json content (HF-compatible, per-layer lists explicit)."""
        return {
            "model_type": self.model_type,
            "architectures": ["OpenELMForCausalLM"],
            "head_dim": self.head_dim,
            "num_transformer_layers": self.num_transformer_layers,
            "model_dim": self.model_dim,
            "vocab_size": self.vocab_size,
            "ffn_dim_divisor": self.ffn_dim_divisor,
            "num_query_heads": list(self.num_query_heads),
            "num_kv_heads": list(self.num_kv_heads),
            "ffn_multipliers": list(self.ffn_multipliers),
            "qkv_multipliers": _as_list(self.qkv_multipliers),
            "num_gqa_groups": self.num_gqa_groups,
            "ffn_with_glu": self.ffn_with_glu,
            "normalize_qk_projections": self.normalize_qk_projections,
            "share_input_output_layers": self.share_input_output_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_freq_constant": self.rope_freq_constant,
            "rope_max_length": self.rope_max_length,
            "max_context_length": self.max_context_length,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` without losing more than 10% (corenet's rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _as_list(x) -> Union[float, List[float]]:
    return list(x) if isinstance(x, (list, tuple)) else x


def _layer_multipliers(spec, num_layers: int) -> List[float]:
    """Per-layer multipliers: a scalar, a (start, end) pair interpolated linearly, or a full list.

    The pair goes through ``np.linspace`` and each value is rounded to two decimals as a NumPy
    float64, as corenet and the HF config do: NumPy rounds the scaled value half to even, which
    differs from Python's ``round`` on a float for some layer counts (e.g. 21 layers). The rounding
    is what makes e.g. layers 13 and 14 of OpenELM-1.1B share one FFN width.
    """
    if isinstance(spec, (int, float)):
        return [float(spec)] * num_layers
    spec = [float(s) for s in spec]
    if len(spec) == num_layers:
        return spec
    if len(spec) == 2:
        return [float(round(v, 2)) for v in np.linspace(spec[0], spec[1], num=num_layers, dtype=float)]
    raise ValueError(
        f"multipliers {spec} must be a number, a (start, end) pair, or one value per layer "
        f"({num_layers})."
    )


PRESETS = {
    "OpenELM-270M": dict(num_transformer_layers=16, model_dim=1280, head_dim=64),
    "OpenELM-450M": dict(num_transformer_layers=20, model_dim=1536, head_dim=64),
    "OpenELM-1_1B": dict(num_transformer_layers=28, model_dim=2048, head_dim=64),
    "OpenELM-3B": dict(num_transformer_layers=36, model_dim=3072, head_dim=128),
}
PRESET_ALIASES = {"270m": "OpenELM-270M", "450m": "OpenELM-450M", "1.1b": "OpenELM-1_1B",
                  "1_1b": "OpenELM-1_1B", "3b": "OpenELM-3B"}


def preset(name: str, **overrides: Any) -> ModelArgs:
    """ModelArgs of a released size, e.g. ``preset("OpenELM-270M")`` or ``preset("3b")``.

    ``-Instruct`` variants share the base geometry. Overrides replace any field.
    """
    key = name.removeprefix("apple/").removesuffix("-Instruct")
    key = PRESET_ALIASES.get(key.lower().removeprefix("openelm-"), key)
    if key not in PRESETS:
        raise ValueError(
            f"unknown OpenELM preset {name!r}; choose one of {', '.join(PRESETS)} "
            "(optionally with -Instruct)."
        )
    kwargs = dict(PRESETS[key], vocab_size=32000)
    kwargs.update(overrides)
    return ModelArgs(**kwargs)


def count_parameters(args: ModelArgs) -> int:
    """Parameter count from the config alone (no arrays are created)."""
    d, hd = args.model_dim, args.head_dim
    total = args.vocab_size * d + d  # embedding + final norm
    if not args.share_input_output_layers:
        total += args.vocab_size * d
    for q, kv, f in zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims):
        total += d * (q + 2 * kv) * hd + q * hd * d  # qkv_proj, out_proj
        total += 2 * hd if args.normalize_qk_projections else 0
        total += d * (2 * f if args.ffn_with_glu else f) + f * d  # proj_1, proj_2
        total += 2 * d  # attn_norm, ffn_norm
    return total


class Attention(nn.Module):
    # Hands post-RoPE queries to caches that ask for them (attention-guided KV policies such as
    # SnapKV) through the cache protocol's ``observe_queries``; a plain KV cache never asks.
    HANDS_QUERIES_TO_CACHE = True

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.head_dim = hd = args.head_dim
        self.n_heads = args.num_query_heads[layer_id]
        self.n_kv_heads = args.num_kv_heads[layer_id]
        self.scale = hd**-0.5
        self.qkv_proj = nn.Linear(args.model_dim, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, args.model_dim, bias=False)
        if args.normalize_qk_projections:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.normalize_qk = args.normalize_qk_projections
        self.rope = nn.RoPE(hd, traditional=False, base=args.rope_freq_constant)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        qkv = qkv.transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)
        if self.normalize_qk:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            if getattr(cache, "wants_queries", False):
                cache.observe_queries(q, self.scale)
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        hidden = args.ffn_dims[layer_id]
        self.glu = args.ffn_with_glu
        self.proj_1 = nn.Linear(args.model_dim, 2 * hidden if self.glu else hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.proj_1(x)
        if self.glu:
            gate, up = mx.split(h, 2, axis=-1)  # gate is the FIRST half
            return self.proj_2(swiglu(gate, up))
        return self.proj_2(nn.silu(h))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn = Attention(args, layer_id)
        self.ffn = FeedForward(args, layer_id)
        self.attn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class OpenELMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_transformer_layers)]
        self.norm = nn.RMSNorm(args.model_dim, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: Optional[Sequence[Any]] = None) -> mx.array:
        h = self.token_embeddings(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.transformer = OpenELMModel(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[Sequence[Any]] = None) -> mx.array:
        h = self.transformer(inputs, cache)
        if self.args.share_input_output_layers:
            return self.transformer.token_embeddings.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list:
        return self.transformer.layers

    def sanitize(self, weights: dict) -> dict:
        """Drop non-persistent buffers and an unused head; trim corenet's padded vocabulary."""
        weights = {k: v for k, v in weights.items() if "rotary" not in k and "inv_freq" not in k}
        if self.args.share_input_output_layers:
            weights.pop("lm_head.weight", None)
        emb = weights.get("transformer.token_embeddings.weight")
        if emb is not None and emb.ndim == 2 and emb.shape[0] > self.args.vocab_size:
            weights["transformer.token_embeddings.weight"] = emb[: self.args.vocab_size]
        return weights
