"""Video files in and out through PyAV (the ``av`` wheel bundles FFmpeg).

Reading samples a file at a fixed rate: frame ``k`` is the picture on screen at time
``(k + 0.5) / fps`` (the middle of its interval), centre-cropped to a square and resized with
FFmpeg's area filter. Writing encodes RGB frames as H.264 (yuv420p, which every player opens) at a
low constant rate factor, so a synthetic clip reads back within a few grey levels of what was drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import av
import numpy as np

from mlx_elm.atomic import atomic_file
from mlx_elm.errors import VideoError

PathLike = Union[str, Path]
DEFAULT_MAX_SECONDS = 15 * 60.0  # Pegasus-1's stated limit; raise it with --max-minutes


@dataclass
class VideoInfo:
    """What a container says about its first video stream."""

    path: Path
    duration: float  # seconds (0 when the container does not say)
    fps: float
    width: int
    height: int


@dataclass
class Frames:
    """Frames sampled from a video: ``pixels [T, S, S, 3]`` uint8 and their times in seconds."""

    pixels: np.ndarray
    times: np.ndarray
    duration: float
    fps: float
    source: Optional[Path] = None

    def __len__(self) -> int:
        return len(self.times)


def _open(path: Path):
    if not path.exists():
        raise VideoError(f"{path} does not exist; pass the path of a video file (e.g. an .mp4)")
    if path.is_dir():
        raise VideoError(f"{path} is a folder; pass a video file (e.g. an .mp4)")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"cannot read {path.name}: FFmpeg does not recognise it as a video ({type(e).__name__}); "
                         "check the file or re-encode it with ffmpeg") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path.name} has no video stream (audio only or empty); pass a file with video")
    return container


def _stream_duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def probe(path: PathLike) -> VideoInfo:
    """Duration, rate and size of the first video stream, without decoding."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        return VideoInfo(path, _stream_duration(container, stream), rate, stream.width, stream.height)
    finally:
        container.close()


def _square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``size`` x ``size`` (FFmpeg's area filter)."""
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.ascontiguousarray(rgb[top : top + side, left : left + side])
    if side == size:
        return crop
    frame = av.VideoFrame.from_ndarray(crop, format="rgb24")
    return frame.reformat(width=size, height=size, format="rgb24", interpolation="AREA").to_ndarray()


def sample_times(duration: float, fps: float) -> np.ndarray:
    """Times ``(k + 0.5) / fps`` for every whole interval of ``1 / fps`` (at least one)."""
    n = max(1, int(math.floor(duration * fps + 1e-6)))
    return ((np.arange(n) + 0.5) / fps).astype(np.float64)


def read_frames(path: PathLike, fps: float = 2.0, size: int = 64,
                max_seconds: float = DEFAULT_MAX_SECONDS) -> Frames:
    """Decode ``path`` and sample it at ``fps`` frames per second, ``size`` x ``size`` pixels.

    Raises one-line :class:`VideoError` s for missing or unreadable files, videos without frames,
    and videos longer than ``max_seconds`` (checked before decoding when the container states
    its length, and again after).
    """
    if fps <= 0:
        raise VideoError(f"--fps must be positive (got {fps})")
    if size < 8:
        raise VideoError(f"--size must be at least 8 pixels (got {size})")
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stated = _stream_duration(container, stream)
        _check_budget(path, stated, max_seconds)
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        pts, pictures = [], []
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                pts.append(float(frame.time))
                pictures.append(frame)
                if pts[-1] > max_seconds + 1.0:
                    break
        except av.error.FFmpegError as e:
            if not pictures:
                raise VideoError(f"cannot decode {path.name} ({type(e).__name__}); the file is corrupt or "
                                 "truncated, re-encode it with ffmpeg") from e
    finally:
        container.close()
    if not pictures:
        raise VideoError(f"{path.name} has no decodable video frames (zero-length video); pass a non-empty file")
    order = np.argsort(pts, kind="stable")
    pts_sorted = np.asarray(pts)[order]
    start = pts_sorted[0]
    duration = float(pts_sorted[-1] - start) + 1.0 / rate  # the last picture stays up for one frame
    _check_budget(path, duration, max_seconds)
    times = sample_times(duration, fps)
    # the picture on screen at time t: the last frame that starts at or before t
    idx = np.clip(np.searchsorted(pts_sorted - start, times, side="right") - 1, 0, len(pts_sorted) - 1)
    cache: dict = {}
    pixels = np.empty((len(times), size, size, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        if i not in cache:
            cache = {i: _square(pictures[order[i]].to_ndarray(format="rgb24"), size)}
        pixels[j] = cache[i]
    return Frames(pixels, times.astype(np.float32), duration, fps, path)


def _check_budget(path: Path, seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise VideoError(f"{path.name} is {seconds / 60:.1f} min long but the budget is {max_seconds / 60:.1f} min; "
                         "cut the video or raise --max-minutes")


def write_mp4(path: PathLike, frames: Union[np.ndarray, Sequence[np.ndarray]], fps: float = 4.0,
              crf: int = 8) -> Path:
    """Encode RGB frames ``[T, H, W, 3]`` (even H and W) as H.264 MP4, atomically."""
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise VideoError(f"frames must be a non-empty [T, H, W, 3] array, got shape {frames.shape}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise VideoError(f"H.264 needs even frame sizes, got {w}x{h}; pad or resize the frames")
    with atomic_file(path) as tmp:
        container = av.open(str(tmp), mode="w", format="mp4")
        try:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "animation"}
            for rgb in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()
    return path
