"""Vision Transformer frame encoder: the small one trained here, or a converted CLIP / SigLIP tower.

One module covers the three layouts (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words"):
CLIP's vision tower (class token, ``pre_layrnorm``, quick-GELU, no norm on the patch outputs),
SigLIP's (no class token, tanh-GELU, ``post_layernorm`` on every token) and our small ViT
(SigLIP's layout at 64 px). Parameter names follow Hugging Face's ``CLIPVisionTransformer`` /
``SiglipVisionTransformer`` so a converted state dict maps one to one (see
``convert/vision_tower.py``). The patch convolution is a linear map on flattened ``(kh, kw, c)``
patches: identical maths, and a plain matmul on every backend.

``features()`` returns the patch tokens (class token dropped) pooled to a ``pool_grid`` x
``pool_grid`` grid with adaptive average pooling, the per-frame tokens the video model caches.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import VideoError

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_tanh"
    class_token: bool = False
    pre_layernorm: bool = False
    post_layernorm: bool = True
    patch_bias: bool = True
    image_mean: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: List[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    pool_grid: int = 4
    kind: str = "small-vit"  # small-vit | clip | siglip
    source: str = ""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def tokens_per_frame(self) -> int:
        return self.pool_grid * self.pool_grid

    def validate(self) -> "ViTConfig":
        if self.image_size % self.patch_size:
            raise VideoError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise VideoError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise VideoError(f"hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        if not 1 <= self.pool_grid <= self.grid:
            raise VideoError(f"pool_grid must be in [1, {self.grid}] (got {self.pool_grid})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__}).validate()


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * mx.sigmoid(1.702 * x)
    if name == "gelu_tanh":
        return nn.gelu_approx
    return nn.gelu


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Linear(cfg.patch_size * cfg.patch_size * 3, cfg.hidden_size, bias=cfg.patch_bias)
        n = cfg.num_patches + (1 if cfg.class_token else 0)
        self.position_embedding = mx.zeros((n, cfg.hidden_size))
        if cfg.class_token:
            self.class_embedding = mx.zeros((cfg.hidden_size,))

    def __call__(self, pixels: mx.array) -> mx.array:
        B, H, W, C = pixels.shape
        p = self.cfg.patch_size
        x = pixels.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, -1, p * p * C)
        x = self.patch_embedding(x)
        if self.cfg.class_token:
            cls = mx.broadcast_to(self.class_embedding, (B, 1, x.shape[-1]))
            x = mx.concatenate([cls, x], axis=1)
        return x + self.position_embedding


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        h = self.heads

        def split(t):
            return t.reshape(B, L, h, D // h).transpose(0, 2, 1, 3)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


def adaptive_pool_matrix(grid: int, out: int) -> np.ndarray:
    """``[out*out, grid*grid]`` averaging weights of adaptive average pooling (PyTorch's bins:
    ``floor(i * grid / out)`` to ``ceil((i + 1) * grid / out)``)."""
    bins = [(math.floor(i * grid / out), math.ceil((i + 1) * grid / out)) for i in range(out)]
    P = np.zeros((out * out, grid * grid), dtype=np.float32)
    for a, (r0, r1) in enumerate(bins):
        for b, (c0, c1) in enumerate(bins):
            cells = [r * grid + c for r in range(r0, r1) for c in range(c0, c1)]
            P[a * out + b, cells] = 1.0 / len(cells)
    return P


class VisionTransformer(nn.Module):
    """``__call__(pixels) -> last_hidden_state`` with Hugging Face's semantics for the layout."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embeddings = Embeddings(cfg)
        if cfg.pre_layernorm:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)
        if cfg.post_layernorm:
            self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self._pool = mx.array(adaptive_pool_matrix(cfg.grid, cfg.pool_grid))
        self._mean = mx.array(np.asarray(cfg.image_mean, dtype=np.float32))
        self._std = mx.array(np.asarray(cfg.image_std, dtype=np.float32))

    def __call__(self, pixels: mx.array) -> mx.array:
        """``pixels [B, H, W, 3]`` already normalised (see :meth:`normalise`)."""
        x = self.embeddings(pixels)
        if self.cfg.pre_layernorm:
            x = self.pre_layrnorm(x)
        x = self.encoder(x)
        if self.cfg.post_layernorm:
            x = self.post_layernorm(x)
        return x

    def normalise(self, frames: mx.array) -> mx.array:
        """uint8 RGB ``[B, H, W, 3]`` to the model's normalised float input."""
        return (frames.astype(mx.float32) / 255.0 - self._mean) / self._std

    def features(self, frames: mx.array) -> mx.array:
        """uint8 frames ``[B, H, W, 3]`` -> pooled patch tokens ``[B, pool_grid**2, hidden]``."""
        x = self(self.normalise(frames))
        if self.cfg.class_token:
            x = x[:, 1:]
        return self._pool @ x


# --- encoder folders: encoder.json + encoder.safetensors ---------------------------------------

ENCODER_CONFIG = "encoder.json"
ENCODER_WEIGHTS = "encoder.safetensors"


def save_encoder(folder, model: VisionTransformer, dtype=mx.float16) -> None:
    """Write a frame-encoder folder atomically (weights as float16: they are small and exact enough)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    with atomic_file(folder / ENCODER_WEIGHTS) as tmp:
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    with atomic_file(folder / ENCODER_CONFIG) as tmp:
        tmp.write_text(json.dumps(model.cfg.to_dict(), indent=2))


def load_encoder(folder) -> VisionTransformer:
    """A frame encoder from a folder written by :func:`save_encoder` or ``mlx-elm video convert-tower``."""
    folder = Path(folder)
    cfg_path, w_path = folder / ENCODER_CONFIG, folder / ENCODER_WEIGHTS
    if not cfg_path.exists() or not w_path.exists():
        raise VideoError(f"{folder} is not a frame-encoder folder ({ENCODER_CONFIG} + {ENCODER_WEIGHTS}); "
                         "train one with `mlx-elm video train-encoder` or convert one with `mlx-elm video convert-tower`")
    try:
        cfg = ViTConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise VideoError(f"{cfg_path} is not a valid encoder config ({e}); re-create the folder") from None
    model = VisionTransformer(cfg)
    weights = mx.load(str(w_path))
    try:
        model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=True)
    except ValueError as e:
        raise VideoError(f"{w_path} does not match {ENCODER_CONFIG} ({str(e).splitlines()[0]}); re-create the folder") from None
    mx.eval(model.parameters())
    model.eval()
    return model
