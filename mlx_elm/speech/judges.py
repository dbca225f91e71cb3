"""Small networks trained on ground-truth mels that judge speech: a phone recognizer (intelligibility,
and the frozen feature extractor of the adversarial discriminator, standing in for FlashSpeech's
WavLM), a speaker encoder (voice similarity), and the discriminator head itself.

The recognizer is framewise: each frame is classified into its phone and flagged when a phone
starts there (exact alignments come with the corpus, so no CTC is needed); decoding starts a new
phone at every change of class or onset flag. Its phone error rate on ground-truth mels is the
ceiling that generated speech is measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_elm.speech.model import DilatedConv


@dataclass
class JudgeArgs:
    model_type: str = "speech-judge"
    kind: str = "recognizer"  # or "speaker"
    n_mels: int = 80
    channels: int = 128
    dilations: list = field(default_factory=lambda: [1, 2, 4, 1, 2])
    n_classes: int = 2  # phone symbols (recognizer) or training speakers (speaker encoder)
    embed_dims: int = 64  # speaker embedding size
    labels: list = field(default_factory=list)  # symbols or speaker names, for reading results

    @classmethod
    def from_dict(cls, d: dict) -> "JudgeArgs":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _relu(x: mx.array) -> mx.array:
    # plain ops rather than nn.relu (an mx.compile'd function): the adversarial stage takes a gradient
    # inside a gradient through these layers, and compiled primitives have no second-order vjp
    return mx.maximum(x, 0.0)


def _leaky_relu(x: mx.array, slope: float = 0.1) -> mx.array:
    return mx.where(x > 0, x, slope * x)


class ConvStack(nn.Module):
    """Residual dilated conv blocks on (B, T, n_mels); returns every block's output."""

    def __init__(self, n_mels: int, channels: int, dilations: list):
        super().__init__()
        self.inp = nn.Linear(n_mels, channels)
        self.convs = [DilatedConv(channels, channels, d) for d in dilations]
        self.norms = [nn.LayerNorm(channels) for _ in dilations]

    def __call__(self, mel: mx.array, mask: mx.array) -> list[mx.array]:
        x = self.inp(mel) * mask[..., None]
        hidden = []
        for conv, norm in zip(self.convs, self.norms):
            x = (x + _relu(conv(norm(x)))) * mask[..., None]
            hidden.append(x)
        return hidden


class PhoneRecognizer(nn.Module):
    def __init__(self, args: JudgeArgs):
        super().__init__()
        self.args = args
        self.stack = ConvStack(args.n_mels, args.channels, args.dilations)
        self.norm = nn.LayerNorm(args.channels)
        self.classify = nn.Linear(args.channels, args.n_classes + 1)  # last column: onset logit

    def features(self, mel: mx.array, mask: mx.array) -> mx.array:
        """All hidden states stacked on the channel axis (B, T, layers * channels), like stacking
        every WavLM layer for the discriminator."""
        return mx.concatenate(self.stack(mel, mask), axis=-1)

    def __call__(self, mel: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        out = self.classify(self.norm(self.stack(mel, mask)[-1]))
        return out[..., :-1], out[..., -1]

    def transcribe(self, mel: mx.array, mask: mx.array | None = None) -> list[list[int]]:
        """Greedy decoding of each utterance in the batch into phone ids (pauses dropped by the caller)."""
        if mel.ndim == 2:
            mel = mel[None]
        mask = mx.ones(mel.shape[:2]) if mask is None else mask
        logits, onset = self(mel, mask)
        cls = np.array(mx.argmax(logits, axis=-1))
        on = np.array(onset) > 0
        lengths = np.array(mx.sum(mask, axis=1)).astype(int)
        out = []
        for b in range(cls.shape[0]):
            seq, prev = [], -1
            for t in range(lengths[b]):
                c = int(cls[b, t])
                if c != prev or on[b, t]:
                    seq.append(c)
                prev = c
            out.append(seq)
        return out


class SpeakerEncoder(nn.Module):
    def __init__(self, args: JudgeArgs):
        super().__init__()
        self.args = args
        self.stack = ConvStack(args.n_mels, args.channels, args.dilations)
        self.embed = nn.Linear(2 * args.channels, args.embed_dims)
        self.classes = mx.random.normal((args.n_classes, args.embed_dims)) * 0.1

    def __call__(self, mel: mx.array, mask: mx.array) -> mx.array:
        """Unit-length speaker embeddings (B, embed_dims) from mean and std pooling."""
        h = self.stack(mel, mask)[-1]
        n = mx.maximum(mx.sum(mask, axis=1, keepdims=True), 1.0)
        mean = mx.sum(h * mask[..., None], axis=1) / n
        var = mx.sum(((h - mean[:, None]) ** 2) * mask[..., None], axis=1) / n
        e = self.embed(mx.concatenate([mean, mx.sqrt(var + 1e-5)], axis=-1))
        return e / mx.sqrt(mx.sum(e * e, axis=-1, keepdims=True) + 1e-8)

    def logits(self, emb: mx.array, scale: float = 15.0) -> mx.array:
        w = self.classes / mx.sqrt(mx.sum(self.classes**2, axis=-1, keepdims=True) + 1e-8)
        return scale * emb @ w.T


class DiscriminatorHead(nn.Module):
    """Trainable head over frozen recognizer features, conditioned by projection on the time-mean of
    the prompt's features (FlashSpeech's WavLM head, scaled down): per-frame real/fake scores."""

    def __init__(self, feature_dims: int, channels: int = 128):
        super().__init__()
        self.inp = nn.Linear(feature_dims, channels)
        self.convs = [DilatedConv(channels, channels, 1), DilatedConv(channels, channels, 2)]
        self.cond = nn.Linear(feature_dims, channels)
        self.out = nn.Linear(channels, 1)
        self.channels = channels

    def __call__(self, feats: mx.array, prompt_feats: mx.array) -> mx.array:
        h = _leaky_relu(self.inp(feats))
        for conv in self.convs:
            h = h + _leaky_relu(conv(h))
        proj = mx.sum(h * self.cond(prompt_feats)[:, None, :], axis=-1) / math.sqrt(self.channels)
        return self.out(h)[..., 0] + proj


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]
