"""HiFi-GAN generator (Kong, Kim, Bae, NeurIPS 2020) in MLX, for checkpoints converted by
``convert/hifigan.py``. Our mels follow HiFi-GAN's feature convention (:mod:`mlx_elm.speech.audio`),
so a public 22.05 kHz / 80-band / hop-256 generator reads them directly.

Layout mirrors the public PyTorch code (``conv_pre``, ``ups.i``, ``resblocks.i.convs1/convs2.j``,
``conv_post``) with weight norm folded into plain weights and MLX's channel-last layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

LRELU_SLOPE = 0.1


@dataclass
class HiFiGANArgs:
    model_type: str = "hifigan"
    num_mels: int = 80
    sampling_rate: int = 22050
    upsample_rates: list = field(default_factory=lambda: [8, 8, 2, 2])
    upsample_kernel_sizes: list = field(default_factory=lambda: [16, 16, 4, 4])
    upsample_initial_channel: int = 512
    resblock: str = "1"
    resblock_kernel_sizes: list = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]])

    @classmethod
    def from_dict(cls, d: dict) -> "HiFiGANArgs":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _leaky(x: mx.array, slope: float = LRELU_SLOPE) -> mx.array:
    return mx.where(x > 0, x, slope * x)


def _padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class ConvTranspose1d(nn.Module):
    """Transposed convolution with torch's padding semantics; weight (out, kernel, in)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.weight = mx.zeros((c_out, kernel, c_in))
        self.bias = mx.zeros((c_out,))
        self.stride, self.padding = stride, padding

    def __call__(self, x: mx.array) -> mx.array:
        return mx.conv_transpose1d(x, self.weight, stride=self.stride, padding=self.padding) + self.bias


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: list):
        super().__init__()
        self.convs1 = [nn.Conv1d(channels, channels, kernel, dilation=d, padding=_padding(kernel, d)) for d in dilations]
        self.convs2 = [nn.Conv1d(channels, channels, kernel, dilation=1, padding=_padding(kernel, 1)) for _ in dilations]

    def __call__(self, x: mx.array) -> mx.array:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(_leaky(c1(_leaky(x))))
        return x


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: list):
        super().__init__()
        self.convs = [nn.Conv1d(channels, channels, kernel, dilation=d, padding=_padding(kernel, d)) for d in dilations]

    def __call__(self, x: mx.array) -> mx.array:
        for c in self.convs:
            x = x + c(_leaky(x))
        return x


class Generator(nn.Module):
    """Log-mel (B, T, num_mels) -> waveform (B, T * prod(upsample_rates)) in [-1, 1]."""

    def __init__(self, args: HiFiGANArgs):
        super().__init__()
        self.args = args
        ch0 = args.upsample_initial_channel
        self.conv_pre = nn.Conv1d(args.num_mels, ch0, 7, padding=3)
        self.ups = [ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, (k - u) // 2)
                    for i, (u, k) in enumerate(zip(args.upsample_rates, args.upsample_kernel_sizes))]
        block = ResBlock1 if str(args.resblock) == "1" else ResBlock2
        self.resblocks = [block(ch0 // 2 ** (i + 1), k, d) for i in range(len(self.ups))
                          for k, d in zip(args.resblock_kernel_sizes, args.resblock_dilation_sizes)]
        self.conv_post = nn.Conv1d(ch0 // 2 ** len(self.ups), 1, 7, padding=3)

    @property
    def hop(self) -> int:
        h = 1
        for r in self.args.upsample_rates:
            h *= r
        return h

    def __call__(self, mel: mx.array) -> mx.array:
        x = self.conv_pre(mel)
        k = len(self.args.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(_leaky(x))
            x = sum(self.resblocks[i * k + j](x) for j in range(k)) / k
        x = self.conv_post(_leaky(x, 0.01))  # torch's default slope here, as in the original code
        return mx.tanh(x)[..., 0]
