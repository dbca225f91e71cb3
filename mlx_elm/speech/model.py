"""FlashSpeech-mini: a small NaturalSpeech-2-style text-to-mel model with consistency sampling.

Phonemes -> phoneme encoder (style-adaptive LayerNorm on the prompt's mean encoding) -> duration
predictor (+ consistency refiner on its residual) -> length regulator -> pitch predictor
(+ refiner) -> pitch embedding -> frame condition; a WaveNet-style consistency model with the
boundary-condition parameterization (``f(x, sigma_min) = x``) maps noise to a normalised mel in one
or two evaluations, attending to a few prompt tokens pooled from a reference mel (zero-shot voice).
FlashSpeech: Ye et al., arXiv 2404.14700; NaturalSpeech 2: Shen et al., arXiv 2304.09116.

Dilated convolutions are written as shift-and-concatenate followed by a Linear layer (the same
operator; fast on every backend) and the WaveNet gate is the hard sigmoid-tanh gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from mlx_elm.diffusion import consistency as C


@dataclass
class ModelArgs:
    model_type: str = "flashspeech-mini"
    symbols: list = field(default_factory=list)  # phoneme inventory; index 0 pad, 1 unknown
    n_mels: int = 80
    d_model: int = 96
    heads: int = 2
    enc_layers: int = 2
    prompt_layers: int = 1
    prompt_tokens: int = 8
    pred_layers: int = 2
    pitch_bins: int = 128
    pitch_fmin: float = 50.0
    pitch_fmax: float = 1100.0
    wn_channels: int = 96
    wn_dilations: list = field(default_factory=lambda: [1, 2, 4, 8, 1, 2])
    wn_attn_every: int = 3
    refiner_channels: int = 48
    refiner_dilations: list = field(default_factory=lambda: [1, 2, 4, 1])
    sigma_min: float = C.SIGMA_MIN
    sigma_max: float = C.SIGMA_MAX
    sigma_data: float = C.SIGMA_DATA
    dur_residual_scale: float = 1.0  # residual / scale has std ~ sigma_data (set before refiner training)
    pitch_residual_scale: float = 1.0
    mel_mean: list = field(default_factory=list)  # de-normalisation of model mels to log-mels
    mel_std: list = field(default_factory=list)
    mel: dict = field(default_factory=dict)  # audio.MelConfig fields

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def timestep_embedding(c_noise: mx.array, dim: int) -> mx.array:
    """Sinusoidal embedding of ``1000 c_noise`` (consistency_models' convention)."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
    a = 1000.0 * c_noise[:, None] * freqs[None, :]
    return mx.concatenate([mx.cos(a), mx.sin(a)], axis=-1)


def positions(length: int, dim: int) -> mx.array:
    half = dim // 2
    freqs = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
    a = mx.arange(length, dtype=mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.sin(a), mx.cos(a)], axis=-1)


def shift(x: mx.array, d: int) -> mx.array:
    """``y[:, t] = x[:, t - d]`` with zeros outside (d may be negative); x is (B, T, C)."""
    if d == 0:
        return x
    t = x.shape[1]
    if abs(d) >= t:
        return mx.zeros_like(x)
    if d > 0:
        return mx.concatenate([mx.zeros_like(x[:, :d]), x[:, : t - d]], axis=1)
    return mx.concatenate([x[:, -d:], mx.zeros_like(x[:, :(-d)])], axis=1)


class DilatedConv(nn.Module):
    """Kernel-3 dilated convolution as [x(t-d), x(t), x(t+d)] -> Linear."""

    def __init__(self, c_in: int, c_out: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.proj = nn.Linear(3 * c_in, c_out)

    def __call__(self, x: mx.array) -> mx.array:
        d = self.dilation
        return self.proj(mx.concatenate([shift(x, d), x, shift(x, -d)], axis=-1))


class Attention(nn.Module):
    """Multi-head attention with a key padding mask (1 = keep)."""

    def __init__(self, dims: int, heads: int, kv_dims: int | None = None):
        super().__init__()
        self.heads = heads
        kv_dims = kv_dims or dims
        self.q = nn.Linear(dims, dims)
        self.k = nn.Linear(kv_dims, dims)
        self.v = nn.Linear(kv_dims, dims)
        self.o = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, kv: mx.array, key_mask: mx.array | None = None) -> mx.array:
        b, lq, d = x.shape
        lk = kv.shape[1]
        h = self.heads
        q = self.q(x).reshape(b, lq, h, -1).transpose(0, 2, 1, 3)
        k = self.k(kv).reshape(b, lk, h, -1).transpose(0, 2, 1, 3)
        v = self.v(kv).reshape(b, lk, h, -1).transpose(0, 2, 1, 3)
        mask = None
        if key_mask is not None:
            mask = mx.where(key_mask[:, None, None, :] > 0, 0.0, -1e9).astype(q.dtype)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d // h), mask=mask)
        return self.o(out.transpose(0, 2, 1, 3).reshape(b, lq, d))


class StyleNorm(nn.Module):
    """Style-adaptive LayerNorm: scale and shift predicted from a style vector (NS2 / FlashSpeech)."""

    def __init__(self, dims: int, style_dims: int):
        super().__init__()
        self.norm = nn.LayerNorm(dims, affine=False)
        self.to_scale_shift = nn.Linear(style_dims, 2 * dims)
        self.to_scale_shift.weight = mx.zeros_like(self.to_scale_shift.weight)
        self.to_scale_shift.bias = mx.zeros_like(self.to_scale_shift.bias)

    def __call__(self, x: mx.array, style: mx.array | None) -> mx.array:
        y = self.norm(x)
        if style is None:
            return y
        scale, bias = mx.split(self.to_scale_shift(style)[:, None, :], 2, axis=-1)
        return y * (1 + scale) + bias


class ConvFFN(nn.Module):
    """Kernel-3 convolution FFN of the NS2 Transformer."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.conv = DilatedConv(dims, hidden, 1)
        self.out = nn.Linear(hidden, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out(nn.relu(self.conv(x)))


class TransformerLayer(nn.Module):
    def __init__(self, dims: int, heads: int, style_dims: int):
        super().__init__()
        self.norm1 = StyleNorm(dims, style_dims)
        self.attn = Attention(dims, heads)
        self.norm2 = StyleNorm(dims, style_dims)
        self.ffn = ConvFFN(dims, 2 * dims)

    def __call__(self, x, mask, style=None):
        h = self.norm1(x, style)
        x = x + self.attn(h, h, mask)
        x = (x + self.ffn(self.norm2(x, style))) * mask[..., None]
        return x


class PhonemeEncoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.d_model
        self.symbol = nn.Embedding(max(len(args.symbols), 2), d)
        self.stress = nn.Embedding(3, d)
        self.word = nn.Embedding(2, d)
        self.layers = [TransformerLayer(d, args.heads, d) for _ in range(args.enc_layers)]
        self.norm = nn.LayerNorm(d)

    def __call__(self, phones: mx.array, mask: mx.array, style: mx.array) -> mx.array:
        x = self.symbol(phones[..., 0]) + self.stress(phones[..., 1]) + self.word(phones[..., 2])
        x = (x + positions(x.shape[1], x.shape[2])) * mask[..., None]
        for layer in self.layers:
            x = layer(x, mask, style)
        return self.norm(x) * mask[..., None]


class PromptEncoder(nn.Module):
    """Reference mel -> (style vector (B, d), prompt tokens (B, K, d)) by learned-query attention pooling."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.d_model
        self.inp = nn.Linear(args.n_mels, d)
        self.layers = [TransformerLayer(d, args.heads, d) for _ in range(args.prompt_layers)]
        self.queries = mx.random.normal((args.prompt_tokens, d)) * 0.02
        self.pool = Attention(d, args.heads)
        self.norm = nn.LayerNorm(d)

    def __call__(self, mel: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        x = self.inp(mel) * mask[..., None]
        for layer in self.layers:
            x = layer(x, mask)
        style = mx.sum(x * mask[..., None], axis=1) / mx.maximum(mx.sum(mask, axis=1, keepdims=True), 1.0)
        q = mx.broadcast_to(self.queries[None], (x.shape[0],) + self.queries.shape)
        tokens = self.norm(self.pool(q, x, mask))
        return style, tokens


class ProsodyPredictor(nn.Module):
    """Conv stack (ReLU -> LayerNorm) with one cross-attention to the prompt tokens, regressing a
    log-domain target per position; returns (prediction, pre-projection hidden)."""

    def __init__(self, args: ModelArgs, kernel_dilation: int = 1):
        super().__init__()
        d = args.d_model
        self.convs = [DilatedConv(d, d, kernel_dilation if i % 2 else 1) for i in range(args.pred_layers)]
        self.norms = [nn.LayerNorm(d) for _ in range(args.pred_layers)]
        self.attn_norm = nn.LayerNorm(d)
        self.attn = Attention(d, args.heads)
        self.out = nn.Linear(d, 1)

    def __call__(self, x: mx.array, mask: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = x + norm(nn.relu(conv(x)))
            if i == 0:
                x = x + self.attn(self.attn_norm(x), tokens)
            x = x * mask[..., None]
        return self.out(x)[..., 0] * mask, x


def hard_gate(a: mx.array, b: mx.array) -> mx.array:
    """``hard_sigmoid(a) * hard_tanh(b)``: WaveNet's gate with piecewise-linear nonlinearities."""
    return mx.clip(0.2 * a + 0.5, 0.0, 1.0) * mx.clip(b, -1.0, 1.0)


class WaveNetBlock(nn.Module):
    def __init__(self, channels: int, cond_dims: int, dilation: int, attn: bool, heads: int, token_dims: int):
        super().__init__()
        self.noise = nn.Linear(channels, channels)
        self.conv = DilatedConv(channels, 2 * channels, dilation)
        self.cond = nn.Linear(cond_dims, 2 * channels)
        self.out = nn.Linear(channels, 2 * channels)
        self.attn = Attention(channels, heads, token_dims) if attn else None
        self.attn_norm = nn.LayerNorm(channels) if attn else None

    def __call__(self, x, temb, cond, tokens, mask):
        y = x + self.noise(temb)[:, None, :]
        if self.attn is not None:
            y = y + self.attn(self.attn_norm(y), tokens)
        a, b = mx.split(self.conv(y * mask[..., None]) + self.cond(cond), 2, axis=-1)
        res, skip = mx.split(self.out(hard_gate(a, b)), 2, axis=-1)
        return (x + res) * (1 / math.sqrt(2.0)), skip


class WaveNet(nn.Module):
    """The raw network F(c_in x, c_noise, condition, prompt tokens) on (B, T, channels_in)."""

    def __init__(self, c_in: int, channels: int, cond_dims: int, dilations: list, attn_every: int, heads: int,
                 token_dims: int):
        super().__init__()
        self.channels = channels
        self.inp = nn.Linear(c_in, channels)
        self.temb1 = nn.Linear(channels, 4 * channels)
        self.temb2 = nn.Linear(4 * channels, channels)
        self.cond_norm = nn.LayerNorm(cond_dims)
        self.blocks = [WaveNetBlock(channels, cond_dims, d, attn_every > 0 and i % attn_every == 0, heads,
                                    token_dims) for i, d in enumerate(dilations)]
        self.skip_out = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, c_in)
        self.out.weight = mx.zeros_like(self.out.weight)  # the last layer (adaptive adversarial weight)
        self.out.bias = mx.zeros_like(self.out.bias)

    def features(self, x, c_noise, cond, tokens, mask):
        """Everything before the last layer ``out`` (the adversarial weight needs that split)."""
        temb = self.temb2(nn.silu(self.temb1(timestep_embedding(c_noise, self.channels))))
        cond = self.cond_norm(cond)
        h = self.inp(x)
        skips = 0.0
        for block in self.blocks:
            h, s = block(h, temb, cond, tokens, mask)
            skips = skips + s
        return nn.relu(self.skip_out(skips * (1 / math.sqrt(len(self.blocks)))))

    def __call__(self, x, c_noise, cond, tokens, mask):
        return self.out(self.features(x, c_noise, cond, tokens, mask))


def _bc(a: mx.array, ndim: int) -> mx.array:
    return a.reshape((-1,) + (1,) * (ndim - 1))


class ConsistencyHead(nn.Module):
    """``f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` around a WaveNet (acoustic or prosody)."""

    def __init__(self, net: WaveNet, sigma_min: float, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_min = sigma_min
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        return C.boundary_scalings(sigma, self.sigma_min, self.sigma_data)

    def __call__(self, x, sigma, cond, tokens, mask):
        c_skip, c_out, c_in = self.scalings(sigma)
        raw = self.net(_bc(c_in, x.ndim) * x, C.noise_conditioning(sigma), cond, tokens, mask)
        return (_bc(c_skip, x.ndim) * x + _bc(c_out, x.ndim) * raw) * mask[..., None]


def pitch_bins(f0: mx.array, args: ModelArgs) -> mx.array:
    """F0 in Hz -> bucket ids: 0 = unvoiced, 1..bins-1 log-spaced between fmin and fmax."""
    lo, hi = math.log(args.pitch_fmin), math.log(args.pitch_fmax)
    pos = (mx.log(mx.maximum(f0, 1e-3)) - lo) / (hi - lo) * (args.pitch_bins - 2)
    idx = mx.clip(mx.round(pos), 0, args.pitch_bins - 2).astype(mx.int32) + 1
    return mx.where(f0 > 0, idx, 0)


class Model(nn.Module):
    """All trained parts of the text-to-mel model (vocoding is separate: Griffin-Lim or a converted vocoder)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d = args.d_model
        self.phone_encoder = PhonemeEncoder(args)
        self.prompt_encoder = PromptEncoder(args)
        self.duration = ProsodyPredictor(args)
        self.pitch = ProsodyPredictor(args, kernel_dilation=2)
        self.pitch_embed = nn.Embedding(args.pitch_bins, d)
        self.mel_prior = nn.Linear(d, args.n_mels)  # training-only probe: a regression mel from the condition
        self.acoustic = ConsistencyHead(
            WaveNet(args.n_mels, args.wn_channels, d, args.wn_dilations, args.wn_attn_every, args.heads, d),
            args.sigma_min, args.sigma_data)
        self.dur_refiner = ConsistencyHead(
            WaveNet(1, args.refiner_channels, d, args.refiner_dilations, 0, 1, d), args.sigma_min, args.sigma_data)
        self.pitch_refiner = ConsistencyHead(
            WaveNet(1, args.refiner_channels, d, args.refiner_dilations, 0, 1, d), args.sigma_min, args.sigma_data)

    # --- pieces shared by training and inference -------------------------------------------
    def encode(self, phones, phone_mask, prompt, prompt_mask):
        """Phone hidden states (B, P, d), prompt tokens (B, K, d)."""
        style, tokens = self.prompt_encoder(prompt, prompt_mask)
        return self.phone_encoder(phones, phone_mask, style), tokens

    def frame_condition(self, frame_h, f0):
        """Expanded phone features plus the pitch embedding: the acoustic model's condition."""
        return frame_h + self.pitch_embed(pitch_bins(f0, self.args))

    def __call__(self, phones, phone_mask, prompt, prompt_mask):  # pragma: no cover - see synthesize
        return self.encode(phones, phone_mask, prompt, prompt_mask)


def expand(h: mx.array, frame_phone: mx.array) -> mx.array:
    """Length regulator: frame features ``h[b, frame_phone[b, t]]`` (B, T, d)."""
    idx = mx.broadcast_to(frame_phone[..., None], frame_phone.shape + (h.shape[-1],))
    return mx.take_along_axis(h, idx, axis=1)


def frame_index(durations: mx.array, n_frames: int) -> tuple[mx.array, mx.array]:
    """Phone index of every frame (B, T) and the frame mask, from integer durations (B, P)."""
    ends = mx.cumsum(durations, axis=1)  # (B, P)
    t = mx.arange(n_frames)[None, :, None]
    idx = mx.sum(t >= ends[:, None, :], axis=-1)
    mask = (mx.arange(n_frames)[None, :] < ends[:, -1:]).astype(mx.float32)
    return mx.minimum(idx, durations.shape[1] - 1).astype(mx.int32), mask
