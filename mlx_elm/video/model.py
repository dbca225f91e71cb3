"""The video-language model: frame encoder -> aligner -> decoder, and its folder on disk.

:class:`VideoLM` is what training sees: the aligner (segment encoder, resampler, projector) and the
decoder (wrapped in :class:`~mlx_elm.video.decoder.EmbeddingDecoder`, LoRA adapters optional). Its
input is a token sequence whose visual slots are filled with the aligner's outputs
(:func:`splice`). The frame encoder is not part of it: training runs on cached frame features.

A video-model folder holds::

    video_config.json        decoder reference, encoder/aligner/layout settings, how it was trained
    encoder/                 frame encoder (encoder.json + encoder.safetensors)
    aligner.safetensors      segment encoder + resampler + projector (float16)
    adapters/                LoRA adapters of the decoder (mlx_elm.adapters layout), optional
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_elm.adapters import ADAPTER_FILE
from mlx_elm.adapters import CONFIG_FILE as ADAPTER_CONFIG
from mlx_elm.atomic import atomic_file, atomic_folder
from mlx_elm.errors import VideoError
from mlx_elm.video.aligner import Aligner, AlignerConfig
from mlx_elm.video.decoder import EmbeddingDecoder
from mlx_elm.video.layout import LayoutConfig

CONFIG_FILE = "video_config.json"
ALIGNER_FILE = "aligner.safetensors"
ENCODER_DIR = "encoder"
ADAPTER_DIR = "adapters"
FORMAT = "mlx-elm-video/1"


@dataclass
class VideoModelConfig:
    decoder: str = "smollm2-135m-instruct"  # any mlx_elm.load reference
    fps: float = 2.0  # frame sampling rate of the feature cache
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    training: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "decoder": self.decoder, "fps": self.fps, "aligner": self.aligner.to_dict(),
                "layout": self.layout.to_dict(), "training": self.training}

    @classmethod
    def from_dict(cls, d: dict) -> "VideoModelConfig":
        if d.get("format") != FORMAT:
            raise VideoError(f"video_config.json has format {d.get('format')!r}, expected {FORMAT!r}; "
                             "re-train or re-export the video model")
        return cls(d["decoder"], float(d["fps"]), AlignerConfig.from_dict(d["aligner"]),
                   LayoutConfig.from_dict(d["layout"]), d.get("training", {}))


def splice(text_embeddings: mx.array, visual: mx.array, visual_index: mx.array, visual_mask: mx.array) -> mx.array:
    """Put ``visual [B, N, D]`` rows into the slots of ``text_embeddings [B, L, D]``:
    position ``j`` takes ``visual[visual_index[j]]`` where ``visual_mask[j]`` is set."""
    gathered = mx.take_along_axis(visual, visual_index[..., None].astype(mx.int32), axis=1)
    return mx.where(visual_mask[..., None] > 0, gathered.astype(text_embeddings.dtype), text_embeddings)


class VideoLM(nn.Module):
    """Aligner + decoder. ``__call__`` gives hidden states for a batch of spliced sequences."""

    def __init__(self, aligner: Aligner, decoder: EmbeddingDecoder):
        super().__init__()
        self.aligner = aligner
        self.decoder = decoder

    @property
    def layers(self) -> list:  # the training loop's gradient checkpointing walks these
        return self.decoder.layers

    def visual_tokens(self, feats: mx.array, times: mx.array) -> mx.array:
        """``[B, S, F, P, C]`` features -> ``[B, S * M, D]`` decoder embeddings."""
        v = self.aligner(feats, times)
        B, S, M, D = v.shape
        return v.reshape(B, S * M, D)

    def embed(self, tokens: mx.array, visual: Optional[mx.array], visual_index: mx.array,
              visual_mask: mx.array) -> mx.array:
        e = self.decoder.embed(tokens)
        if visual is None:
            return e
        return splice(e, visual, visual_index, visual_mask)

    def __call__(self, tokens, visual_index, visual_mask, feats, times, cache=None) -> mx.array:
        visual = self.visual_tokens(feats, times) if feats.shape[1] > 0 else None
        return self.decoder.hidden(self.embed(tokens, visual, visual_index, visual_mask), cache, tokens)


def video_loss(model: VideoLM, tokens, visual_index, visual_mask, feats, times, target_pos, target_ids, target_w):
    """Summed cross-entropy over answer tokens, and their number.

    The head runs only at the ``target_pos [B, K]`` positions (answers are a small part of a
    sequence; the 49k-row head on every position would cost a fifth of the step for nothing).
    """
    h = model(tokens, visual_index, visual_mask, feats, times)
    ht = mx.take_along_axis(h, target_pos[..., None].astype(mx.int32), axis=1)
    logits = model.decoder.head(ht).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, target_ids.astype(mx.int32)) * target_w
    correct = ((mx.argmax(logits, axis=-1) == target_ids) * target_w).sum()
    n = target_w.sum()
    return ce.sum(), n, {"token_acc": correct / mx.maximum(n, 1.0)}


# --- folders -----------------------------------------------------------------------------------


def save_aligner(folder: Path, aligner: Aligner) -> None:
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(aligner.parameters())}
    with atomic_file(Path(folder) / ALIGNER_FILE) as tmp:
        mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})


def write_config(folder: Path, cfg: VideoModelConfig) -> None:
    with atomic_file(Path(folder) / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(cfg.to_dict(), indent=2))


def read_config(folder: Path) -> VideoModelConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise VideoError(f"{folder} is not a video-model folder (no {CONFIG_FILE}); pass the --model-dir "
                         "written by `mlx-elm video train`, or omit it to use the shipped model")
    try:
        return VideoModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise VideoError(f"{path} is not a valid video config ({type(e).__name__}: {e}); re-train the model") from None


def load_weights_f32(module: nn.Module, path: Path) -> None:
    """Load a (float16) safetensors file into ``module`` as float32, strictly."""
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path} is missing; the video model is incomplete, re-train it")
    weights = mx.load(str(path))
    try:
        module.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=True)
    except ValueError as e:
        raise VideoError(f"{path} does not match {CONFIG_FILE} ({str(e).splitlines()[0]}); re-train the model") from None
    mx.eval(module.parameters())


def load_aligner(folder: Path, cfg: AlignerConfig) -> Aligner:
    aligner = Aligner(cfg)
    load_weights_f32(aligner, Path(folder) / ALIGNER_FILE)
    return aligner


def default_model_dir() -> Path:
    """The small video model shipped with the package (see docs/video.md for how it was trained)."""
    return Path(__file__).parent / "pretrained"


def export_model_folder(src: Path, dst: Path) -> Path:
    """A compact copy of a trained model folder for shipping: configs, the encoder and aligner
    (float16 already) and the adapters cast to float16; atomically replaces ``dst``."""
    src, dst = Path(src), Path(dst)
    read_config(src)
    with atomic_folder(dst) as tmp:
        shutil.copyfile(src / CONFIG_FILE, tmp / CONFIG_FILE)
        shutil.copyfile(src / ALIGNER_FILE, tmp / ALIGNER_FILE)
        shutil.copytree(src / ENCODER_DIR, tmp / ENCODER_DIR, ignore=shutil.ignore_patterns("checkpoints", ".*"))
        if (src / ADAPTER_DIR / ADAPTER_FILE).exists():
            (tmp / ADAPTER_DIR).mkdir()
            weights = mx.load(str(src / ADAPTER_DIR / ADAPTER_FILE))
            mx.save_safetensors(str(tmp / ADAPTER_DIR / ADAPTER_FILE), {k: v.astype(mx.float16) for k, v in weights.items()},
                                metadata={"format": "mlx"})
            shutil.copyfile(src / ADAPTER_DIR / ADAPTER_CONFIG, tmp / ADAPTER_DIR / ADAPTER_CONFIG)
    return dst
