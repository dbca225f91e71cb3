"""Segment encoder, resampler and projector: cached frame tokens -> M decoder embeddings per segment.

- **Segment encoder** (our small stand-in for a video encoder such as Pegasus-1's Marengo): the
  ``F x P`` frame tokens of a segment get a spatial embedding (which pooled cell), a temporal one
  (which frame of the segment) and an absolute-time embedding (sinusoids of the frame's time in
  seconds, Vaswani et al. 2017), then a few pre-norm Transformer layers mix them.
- **Resampler**: ``M`` learned queries cross-attend to the segment's tokens (Perceiver resampler,
  Alayrac et al. 2022, "Flamingo"), so every segment costs exactly ``M`` decoder tokens however
  many frames it has: this is the token reduction.
- **Projector**: a two-layer MLP into the decoder's embedding width (LLaVA-1.5's connector), with
  its output scaled to the RMS of the decoder's token embeddings so visual tokens start at the
  scale the decoder expects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn

from mlx_elm.video.vit import Attention


@dataclass
class AlignerConfig:
    feature_dim: int = 64  # frame-encoder width
    tokens_per_frame: int = 16
    frames_per_segment: int = 8
    dim: int = 128
    heads: int = 4
    segment_layers: int = 2
    queries: int = 8  # M
    resampler_layers: int = 2
    decoder_dim: int = 576
    time_embedding: bool = True
    time_frequencies: int = 16
    max_period: float = 4096.0  # seconds; sinusoids from 1 s to this period
    output_rms: float = 1.0  # RMS of the decoder's token embeddings (set from the decoder)
    attention: str = "divided"  # "divided" (time within a cell, then space) or "joint" (all F x P tokens)
    frame_differences: bool = True  # also feed each frame's change from the previous one

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AlignerConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def time_features(t: mx.array, n: int, max_period: float) -> mx.array:
    """``[..., 2n]`` sin/cos of ``2 pi t / period`` for periods geometric from 1 s to ``max_period``."""
    periods = mx.exp(mx.linspace(0.0, math.log(max_period), n))
    angles = 2 * math.pi * t[..., None] / periods
    return mx.concatenate([mx.sin(angles), mx.cos(angles)], axis=-1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm self-attention block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, q: mx.array, kv: mx.array) -> mx.array:
        B, M, D = q.shape
        N = kv.shape[1]
        h = self.heads
        qh = self.q_proj(q).reshape(B, M, h, D // h).transpose(0, 2, 1, 3)
        kh = self.k_proj(kv).reshape(B, N, h, D // h).transpose(0, 2, 1, 3)
        vh = self.v_proj(kv).reshape(B, N, h, D // h).transpose(0, 2, 1, 3)
        o = mx.fast.scaled_dot_product_attention(qh, kh, vh, scale=self.scale)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, M, D))


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim)

    def __call__(self, q: mx.array, kv: mx.array) -> mx.array:
        q = q + self.attn(self.norm_q(q), self.norm_kv(kv))
        return q + self.mlp(self.norm2(q))


class DividedBlock(nn.Module):
    """Attention over time within each pooled cell, then over space within each frame
    (divided space-time attention, Bertasius et al. 2021, "TimeSformer"): motion is a change of a
    cell's content from frame to frame, which the temporal step sees directly."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.time = Block(dim, heads)
        self.space = Block(dim, heads)

    def __call__(self, x: mx.array) -> mx.array:
        N, F, P, D = x.shape
        x = self.time(x.transpose(0, 2, 1, 3).reshape(N * P, F, D)).reshape(N, P, F, D).transpose(0, 2, 1, 3)
        return self.space(x.reshape(N * F, P, D)).reshape(N, F, P, D)


class SegmentEncoder(nn.Module):
    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(2 * cfg.feature_dim if cfg.frame_differences else cfg.feature_dim, cfg.dim)
        self.spatial = 0.02 * mx.random.normal((cfg.tokens_per_frame, cfg.dim))
        self.temporal = 0.02 * mx.random.normal((cfg.frames_per_segment, cfg.dim))
        if cfg.time_embedding:
            self.time_proj = nn.Linear(2 * cfg.time_frequencies, cfg.dim)
        block = DividedBlock if cfg.attention == "divided" else Block
        self.layers = [block(cfg.dim, cfg.heads) for _ in range(cfg.segment_layers)]

    def __call__(self, feats: mx.array, times: mx.array) -> mx.array:
        """``feats [N, F, P, C]``, frame ``times [N, F]`` (seconds) -> tokens ``[N, F * P, dim]``."""
        N, F, P, _ = feats.shape
        if self.cfg.frame_differences:  # what changed since the previous frame (zero for the first)
            diff = mx.concatenate([mx.zeros_like(feats[:, :1]), feats[:, 1:] - feats[:, :-1]], axis=1)
            feats = mx.concatenate([feats, diff], axis=-1)
        x = self.in_proj(feats) + self.spatial[None, None] + self.temporal[None, :F, None]
        if self.cfg.time_embedding:
            x = x + self.time_proj(time_features(times, self.cfg.time_frequencies, self.cfg.max_period))[:, :, None]
        if self.cfg.attention == "divided":
            for layer in self.layers:
                x = layer(x)
            return x.reshape(N, F * P, -1)
        x = x.reshape(N, F * P, -1)
        for layer in self.layers:
            x = layer(x)
        return x


class Resampler(nn.Module):
    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.queries = 0.02 * mx.random.normal((cfg.queries, cfg.dim))
        self.layers = [ResamplerLayer(cfg.dim, cfg.heads) for _ in range(cfg.resampler_layers)]
        self.norm = nn.LayerNorm(cfg.dim)

    def __call__(self, tokens: mx.array) -> mx.array:
        """``[N, T, dim]`` -> ``[N, M, dim]``."""
        q = mx.broadcast_to(self.queries, (tokens.shape[0],) + self.queries.shape)
        for layer in self.layers:
            q = layer(q, tokens)
        return self.norm(q)


class Projector(nn.Module):
    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.decoder_dim)
        self.fc2 = nn.Linear(cfg.decoder_dim, cfg.decoder_dim)
        self.scale = cfg.output_rms

    def __call__(self, x: mx.array) -> mx.array:
        y = self.fc2(nn.gelu_approx(self.fc1(x)))
        return self.scale * y * mx.rsqrt(mx.mean(y * y, axis=-1, keepdims=True) + 1e-6)


class Aligner(nn.Module):
    """Frame tokens of every segment -> ``M`` decoder embeddings per segment."""

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.cfg = cfg
        self.segment_encoder = SegmentEncoder(cfg)
        self.resampler = Resampler(cfg)
        self.projector = Projector(cfg)

    def summarise(self, feats: mx.array, times: mx.array) -> mx.array:
        """``feats [B, S, F, P, C]``, ``times [B, S, F]`` -> resampled ``[B, S, M, dim]`` (before projection)."""
        B, S, F, P, C = feats.shape
        tokens = self.segment_encoder(feats.reshape(B * S, F, P, C), times.reshape(B * S, F))
        return self.resampler(tokens).reshape(B, S, self.cfg.queries, self.cfg.dim)

    def __call__(self, feats: mx.array, times: mx.array) -> mx.array:
        """-> ``[B, S, M, decoder_dim]``."""
        return self.projector(self.summarise(feats, times))
