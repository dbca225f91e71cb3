"""Training the small ViT frame encoder on rendered frames with dense targets.

Our stand-in for a pretrained image tower: frames come from the moving-shapes generator, and for
every cell of the pooled ``pool_grid`` x ``pool_grid`` grid the encoder must say, per colour,
how much of the cell an object covers, where its centre is (relative to the cell), its shape and
its size. The pooled tokens therefore carry *what* and *where* with sub-cell precision, which
the segment encoder needs to see motion. Frames are rendered on the fly from integer seeds, so the
data set is a list of ints and the shared training loop (checkpoints, exact resume) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_elm.train.data import Dataset, TokenizedSplit
from mlx_elm.train.loop import train
from mlx_elm.video import synthetic as S
from mlx_elm.video.vit import ViTConfig, VisionTransformer, save_encoder

COLOUR_NAMES = list(S.COLOURS)
N_COLOURS = len(COLOUR_NAMES)
N_SHAPES = len(S.SHAPES)
PER_COLOUR = 1 + 2 + N_SHAPES + 1  # presence, (dx, dy), shape logits, size


class DenseHead(nn.Module):
    """Per pooled cell and colour: presence, centre offset, shape, size."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, N_COLOURS * PER_COLOUR)

    def __call__(self, tokens: mx.array) -> mx.array:
        B, P, _ = tokens.shape
        return self.proj(tokens).reshape(B, P, N_COLOURS, PER_COLOUR)


class FramePretrainModel(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.encoder = VisionTransformer(cfg)
        self.head = DenseHead(cfg.hidden_size)

    def __call__(self, frames: mx.array) -> mx.array:
        return self.head(self.encoder.features(frames))


def frame_targets(scene: S.Scene, t: float, grid: int, size: int = 64) -> np.ndarray:
    """``[grid*grid, colours, 5]``: coverage (share of the cell's pixels the object covers, 0 when
    absent), the object's centre relative to the cell centre (dx, dy in cells), shape id and
    size (1 = large), for every cell an object of that colour touches."""
    y = np.zeros((grid * grid, N_COLOURS, 5), dtype=np.float32)
    coords = (np.arange(size) + 0.5) / size
    xs, ys = np.meshgrid(coords, coords)
    cell = size // grid
    for o in scene.objects:
        s = S.object_state(o, t)
        if not s.visible:
            continue
        mask = S.shape_mask(s.shape, xs, ys, s.x, s.y, S.SIZES[s.size])
        cover = mask.reshape(grid, cell, grid, cell).mean(axis=(1, 3)).ravel()
        c = COLOUR_NAMES.index(s.colour)
        for k in np.nonzero(cover)[0]:
            cy, cx = divmod(int(k), grid)
            y[k, c] = (min(1.0, cover[k] * 4.0), s.x * grid - cx - 0.5, s.y * grid - cy - 0.5, S.SHAPES.index(s.shape),
                       float(s.size == "large"))
    return y


FRAME_SPLIT = S.SplitConfig("frames", min_objects=1, max_objects=6, held_out="any", p_event=0.5, p_narration=0.0)


def render_example(seed: int, size: int, grid: int, base_seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One random frame of a random scene, and its dense targets; a pure function of the seeds."""
    rng = np.random.default_rng([base_seed, 7919, seed])
    scene = S.sample_scene(rng, FRAME_SPLIT)
    t = float(rng.uniform(0.0, scene.duration))
    return S.render_frame(scene, t, size), frame_targets(scene, t, grid, size)


def make_collate(size: int, grid: int, base_seed: int = 0):
    def collate(seeds: List[int]) -> Tuple[np.ndarray, np.ndarray]:
        frames, targets = zip(*(render_example(int(s), size, grid, base_seed) for s in seeds))
        return np.stack(frames), np.stack(targets)

    return collate


def dense_loss(model: FramePretrainModel, frames: mx.array, targets: mx.array):
    """Summed per-frame loss (presence BCE + masked offset MSE, shape CE, size BCE) and frame count."""
    out = model(frames)
    cover = targets[..., 0]
    present = (cover > 0).astype(mx.float32)
    bce = nn.losses.binary_cross_entropy(out[..., 0], cover, with_logits=True, reduction="none")
    off = ((out[..., 1:3] - targets[..., 1:3]) ** 2).sum(-1) * 4.0
    shape = nn.losses.cross_entropy(out[..., 3 : 3 + N_SHAPES], targets[..., 3].astype(mx.int32), reduction="none")
    size = nn.losses.binary_cross_entropy(out[..., 3 + N_SHAPES], targets[..., 4], with_logits=True, reduction="none")
    per = bce + present * (off + shape + size)
    total = per.sum()
    n = mx.array(float(frames.shape[0]))
    acc = ((out[..., 0] > 0) == (cover >= 0.5)).astype(mx.float32).mean()
    return total, n, {"presence_acc": acc}


@dataclass
class FramePretrainConfig:
    examples: int = 20000
    size: int = 64
    seed: int = 0


def train_frame_encoder(out_dir, vit_cfg: ViTConfig, train_cfg, examples: int = 20000, seed: int = 0,
                        log=print):
    """Train a small ViT with :func:`dense_loss`; writes the encoder folder into ``out_dir``."""
    out_dir = Path(out_dir)
    mx.random.seed(seed)
    model = FramePretrainModel(vit_cfg)
    _init_positions(model.encoder)
    mx.eval(model.parameters())
    grid = vit_cfg.pool_grid
    train_seeds = list(range(examples))
    valid_seeds = list(range(10_000_000, 10_000_000 + 256))
    data = Dataset(TokenizedSplit(train_seeds), TokenizedSplit(valid_seeds),
                   collate=make_collate(vit_cfg.image_size, grid, seed), length=lambda s: 0)
    result = train(model, data, train_cfg, out_dir, lambda m: save_encoder(out_dir, m.encoder),
                   fingerprint={"vit": vit_cfg.to_dict(), "examples": examples, "task": "frame-encoder"},
                   loss_fn=dense_loss, log=log)
    return model, result


def _init_positions(encoder) -> None:
    """Small random position embeddings (zeros would make all patches look alike at the start)."""
    pe = encoder.embeddings.position_embedding
    encoder.embeddings.position_embedding = 0.02 * mx.random.normal(pe.shape)
