"""Frame features on disk: videos are decoded and encoded once, training and evaluation read the cache.

A cache entry is one safetensors file holding a video's pooled frame tokens ``[T, P, C]`` (float16)
and their times, keyed by the file's path, size and modification time, the sampling rate and a
hash of the encoder's weights, so a changed video or encoder never reads stale features. Data-set
splits are packed into one file per split (thousands of short clips load in one read).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import VideoError
from mlx_elm.platform import cache_home
from mlx_elm.video.dataset import read_split
from mlx_elm.video.io import DEFAULT_MAX_SECONDS, Frames, read_frames
from mlx_elm.video.vit import VisionTransformer


@dataclass
class FrameFeatures:
    """Pooled tokens of sampled frames: ``tokens [T, P, C]`` float16 and ``times [T]`` seconds."""

    tokens: np.ndarray
    times: np.ndarray
    duration: float

    def __len__(self) -> int:
        return len(self.times)


def encoder_id(encoder: VisionTransformer) -> str:
    """A short hash of the encoder's configuration and weights."""
    h = hashlib.sha1(json.dumps(encoder.cfg.to_dict(), sort_keys=True).encode())
    for k, v in sorted(tree_flatten(encoder.parameters()), key=lambda kv: kv[0]):
        h.update(k.encode())
        h.update(np.asarray(v.astype(mx.float32)).tobytes())
    return h.hexdigest()[:12]


def encode_frames(encoder: VisionTransformer, pixels: np.ndarray, batch: int = 64,
                  progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """uint8 frames ``[T, H, W, 3]`` -> float16 tokens ``[T, P, C]``, ``batch`` frames at a time."""
    size = encoder.cfg.image_size
    if pixels.shape[1:3] != (size, size):
        raise VideoError(f"frames are {pixels.shape[2]}x{pixels.shape[1]} but the encoder takes {size}x{size}; "
                         "decode with size = the encoder's image_size")
    out = []
    for i in range(0, len(pixels), batch):
        f = encoder.features(mx.array(pixels[i : i + batch]))
        out.append(np.asarray(f.astype(mx.float16)))
        if progress is not None:
            progress(min(batch, len(pixels) - i))
    return np.concatenate(out, axis=0)


def features_from_frames(encoder: VisionTransformer, frames: Frames, batch: int = 64) -> FrameFeatures:
    return FrameFeatures(encode_frames(encoder, frames.pixels, batch), frames.times.astype(np.float32), frames.duration)


class FeatureCache:
    """Per-video cache under ``root/<encoder id>/`` (default: the mlx-elm cache folder)."""

    def __init__(self, encoder: VisionTransformer, fps: float, root: Optional[Path] = None):
        self.encoder, self.fps = encoder, fps
        self.root = Path(root) if root is not None else cache_home() / "video-features"
        self.folder = self.root / encoder_id(encoder)

    def key(self, path: Path) -> str:
        st = path.stat()
        raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.fps}|{self.encoder.cfg.image_size}"
        return hashlib.sha1(raw.encode()).hexdigest()[:20]

    def get(self, path, max_seconds: float = DEFAULT_MAX_SECONDS) -> Tuple[FrameFeatures, bool]:
        """Features of ``path`` and whether they came from the cache."""
        path = Path(path)
        if not path.is_file():
            raise VideoError(f"{path} does not exist; pass the path of a video file (e.g. an .mp4)")
        file = self.folder / f"{self.key(path)}.safetensors"
        if file.exists():
            try:
                loaded, meta = mx.load(str(file), return_metadata=True)
                feats = FrameFeatures(np.asarray(loaded["tokens"]), np.asarray(loaded["times"]), float(meta["duration"]))
                if feats.duration <= max_seconds:
                    return feats, True
            except (RuntimeError, KeyError, ValueError):
                pass  # unreadable entry: recompute and overwrite
        frames = read_frames(path, self.fps, self.encoder.cfg.image_size, max_seconds)
        feats = features_from_frames(self.encoder, frames)
        save_features(file, feats)
        return feats, False


def save_features(file: Path, feats: FrameFeatures) -> None:
    with atomic_file(file) as tmp:
        mx.save_safetensors(str(tmp), {"tokens": mx.array(feats.tokens), "times": mx.array(feats.times)},
                            metadata={"duration": str(feats.duration)})


# --- packed data-set splits --------------------------------------------------------------------


def split_feature_file(data_dir: Path, split: str, encoder: VisionTransformer) -> Path:
    return Path(data_dir) / "features" / encoder_id(encoder) / f"{split}.safetensors"


def extract_split(clips: Sequence[Tuple[int, Path]], encoder: VisionTransformer, fps: float, out_file: Path,
                  progress: Optional[Callable[[int], None]] = None, batch: int = 128) -> int:
    """Decode and encode every ``(clip id, path)`` into one file (frames of several clips share a
    batch, which keeps the encoder busy on short clips). Returns the number of frames."""
    arrays: Dict[str, mx.array] = {}
    pending: List[Tuple[int, Frames]] = []
    total = 0

    def flush():
        nonlocal pending, total
        if not pending:
            return
        pixels = np.concatenate([f.pixels for _, f in pending])
        tokens = encode_frames(encoder, pixels, batch)
        at = 0
        for cid, f in pending:
            arrays[f"tokens/{cid}"] = mx.array(tokens[at : at + len(f)])
            arrays[f"times/{cid}"] = mx.array(f.times.astype(np.float32))
            arrays[f"duration/{cid}"] = mx.array(np.array([f.duration], dtype=np.float32))
            at += len(f)
            total += len(f)
            if progress is not None:
                progress(1)
        pending = []

    n_pending = 0
    for cid, path in clips:
        frames = read_frames(path, fps, encoder.cfg.image_size, max_seconds=1e9)
        pending.append((cid, frames))
        n_pending += len(frames)
        if n_pending >= batch * 4:
            flush()
            n_pending = 0
    flush()
    with atomic_file(out_file) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata={"fps": str(fps), "encoder": encoder_id(encoder)})
    return total


def load_split(file: Path) -> Dict[int, FrameFeatures]:
    """``clip id -> FrameFeatures`` from a file written by :func:`extract_split`."""
    if not Path(file).exists():
        raise VideoError(f"{file} does not exist; extract features first (`mlx-elm video features`)")
    arrays = mx.load(str(file))
    out: Dict[int, FrameFeatures] = {}
    for key, v in arrays.items():
        kind, cid = key.split("/")
        if kind == "tokens":
            c = int(cid)
            out[c] = FrameFeatures(np.asarray(v), np.asarray(arrays[f"times/{cid}"]),
                                   float(np.asarray(arrays[f"duration/{cid}"])[0]))
    return out


def prepare_split_features(data_dir: Path, encoder, fps: float, splits: Sequence[str], log=print) -> Dict[str, Path]:
    """Pack the frame features of ``splits`` once per encoder (skipped when already there)."""
    out = {}
    for split in splits:
        file = split_feature_file(data_dir, split, encoder)
        out[split] = file
        if file.exists():
            continue
        scenes, _ = read_split(data_dir, split)
        clips = [(cid, Path(data_dir) / split / f"clips/{cid:06d}.mp4") for cid in sorted(scenes)]
        t0 = time.time()
        bar = tqdm(total=len(clips), desc=f"features {split}", unit="clip")
        n = extract_split(clips, encoder, fps, file, progress=bar.update)
        bar.close()
        log(f"features {split}: {len(clips)} clips, {n} frames in {time.time() - t0:.0f}s -> {file}")
    return out
