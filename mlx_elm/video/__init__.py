"""Video-language model in the Pegasus-1 pattern: frame encoder -> aligner (M tokens per segment)
-> decoder (any model ``mlx_elm.load`` loads, LoRA), trained and measured on synthetic clips.

>>> from mlx_elm import video
>>> video.make_demo("demo.mp4")                                   # a synthetic clip to try
>>> video.ask("demo.mp4", "Which way does the red circle move?")   # the shipped model
'left'
>>> assistant = video.VideoAssistant()                            # keep it loaded for many questions
>>> for piece in assistant.stream("demo.mp4", "List the events in order."):
...     print(piece, end="")

It is a small open model of the same shape, trained here on moving shapes; it is not a
reproduction of the 17B Pegasus-1.
"""

from __future__ import annotations

from mlx_elm.lazy import lazy_exports

__all__ = ["ask", "describe", "make_demo", "VideoAssistant", "make_dataset", "DataConfig", "train_video_model",
           "VideoTrainConfig", "EvalConfig", "read_frames", "write_mp4", "LayoutConfig", "plan_segments"]

# Imported on first use, as at the package top: mlx-lm and transformers take seconds to import.
# (No export may share a submodule's name: `from mlx_elm.video import evaluate` must give the module.)
_LAZY = {
    "VideoAssistant": "mlx_elm.video.assistant", "make_dataset": "mlx_elm.video.dataset",
    "DataConfig": "mlx_elm.video.dataset", "train_video_model": "mlx_elm.video.training",
    "VideoTrainConfig": "mlx_elm.video.training",
    "EvalConfig": "mlx_elm.video.evaluate", "read_frames": "mlx_elm.video.io", "write_mp4": "mlx_elm.video.io",
    "LayoutConfig": "mlx_elm.video.layout", "plan_segments": "mlx_elm.video.layout",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


def ask(video, question: str, transcript=None, model_dir=None, max_tokens: int = 64) -> str:
    """One question about one video file, answered by the shipped model (or ``model_dir``)."""
    from mlx_elm.generation import SamplingOptions
    from mlx_elm.video.assistant import VideoAssistant

    return VideoAssistant(model_dir).ask(video, question, transcript, SamplingOptions(max_tokens=max_tokens)).text


def describe(video, transcript=None, model_dir=None, max_tokens: int = 160) -> str:
    """A segment-by-segment description of a video file."""
    from mlx_elm.video.assistant import DESCRIBE_PROMPT

    return ask(video, DESCRIBE_PROMPT, transcript, model_dir, max_tokens)


def make_demo(out, seed: int = 0, duration: float = 8.0, size: int = 64):
    """Write a synthetic demo clip (and its .srt narration); returns its scene (the ground truth)."""
    from mlx_elm.video.dataset import write_demo

    return write_demo(out, seed, duration, size)
