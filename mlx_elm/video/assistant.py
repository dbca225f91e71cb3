"""Asking a trained video model about a video: features -> segments -> layout -> streamed answer.

``VideoAssistant`` loads a video-model folder (the shipped one by default), reads or computes the
frame features of a file through the on-disk cache, plans segments under the token budget, builds
the ``[time tag][M visual tokens][transcript]`` layout, splices the aligner's embeddings in and
streams the answer through mlx-lm's generation loop (with its KV cache). It also implements the
evaluation controls (question only, one middle frame, shuffled frames, reversed video).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from mlx_elm.adapters import ADAPTER_LEAVES, ADAPTER_TYPES, load_adapters
from mlx_elm.errors import VideoError
from mlx_elm.loading import load_with_info
from mlx_elm.generation import GenerationStats, SamplingOptions, stream_tokens
from mlx_elm.video import transcript as TR
from mlx_elm.video.decoder import EmbeddingDecoder
from mlx_elm.video.features import FeatureCache, FrameFeatures
from mlx_elm.video.io import DEFAULT_MAX_SECONDS
from mlx_elm.video.layout import Layout, LayoutConfig, SegmentPlan, build_layout, plan_segments
from mlx_elm.video.model import (
    ADAPTER_DIR,
    ENCODER_DIR,
    VideoLM,
    default_model_dir,
    load_aligner,
    read_config,
    splice,
)
from mlx_elm.video.vit import load_encoder

CONTROLS = ("full", "question", "middle", "shuffle", "reverse")
DESCRIBE_PROMPT = "Describe the video segment by segment."
SUMMARY_PROMPT = "List the events in order."


@dataclass
class Answer:
    """An answer and what it cost."""

    text: str
    layout: Layout
    plan: Optional[SegmentPlan]
    seconds_features: float = 0.0  # decoding + frame encoding (0 when cached)
    seconds_to_first_token: float = 0.0  # from the call to the first generated token
    features_cached: bool = False
    stats: GenerationStats = field(default_factory=GenerationStats)

    def budget_line(self, cfg: LayoutConfig) -> str:
        return self.layout.describe(cfg, self.plan.num_segments if self.plan else 0)


def apply_control(feats: FrameFeatures, control: str, seed: int = 0) -> FrameFeatures:
    """The features a control condition shows the model (times are kept, only content moves)."""
    if control in ("full", "question"):
        return feats
    tokens = feats.tokens
    if control == "reverse":
        tokens = tokens[::-1]
    elif control == "shuffle":
        tokens = tokens[np.random.default_rng([seed, len(tokens)]).permutation(len(tokens))]
    elif control == "middle":
        tokens = np.broadcast_to(tokens[len(tokens) // 2], tokens.shape)
    else:
        raise VideoError(f"unknown control {control!r}; choose from {', '.join(CONTROLS)}")
    return FrameFeatures(np.ascontiguousarray(tokens), feats.times, feats.duration)


def _match_adapter_dtype(model) -> None:
    """Shipped adapters are float16; compute them in the dtype of the weights they adapt."""
    for _, m in model.named_modules():
        if isinstance(m, ADAPTER_TYPES):
            base = m["linear"] if "linear" in m else m.get("embedding")
            dtype = base["weight"].dtype if base is not None and "weight" in base else mx.float32
            dtype = dtype if dtype in (mx.float32, mx.float16, mx.bfloat16) else mx.float32
            m.update({k: v.astype(dtype) for k, v in m.parameters().items() if k in ADAPTER_LEAVES})


class VideoAssistant:
    """A loaded video model. ``ask`` streams an answer about a file; ``ask_features`` about cached features."""

    def __init__(self, model_dir: Optional[Path] = None, decoder: Optional[str] = None,
                 feature_cache: Optional[Path] = None, layout: Optional[LayoutConfig] = None,
                 use_adapters: bool = True):
        self.folder = Path(model_dir) if model_dir is not None else default_model_dir()
        self.cfg = read_config(self.folder)
        self.layout = layout or self.cfg.layout
        self.layout.validate()
        if self.layout.queries != self.cfg.aligner.queries:
            raise VideoError(f"this model has {self.cfg.aligner.queries} queries per segment; the layout cannot change it")
        self.encoder = load_encoder(self.folder / ENCODER_DIR)
        aligner = load_aligner(self.folder, self.cfg.aligner)
        base, self.tokenizer, info = load_with_info(decoder or self.cfg.decoder)
        self.decoder_config = info.config
        if use_adapters and (self.folder / ADAPTER_DIR).is_dir():
            load_adapters(base, self.folder / ADAPTER_DIR)
            _match_adapter_dtype(base)
        self.decoder = EmbeddingDecoder(base)
        if self.decoder.dim != self.cfg.aligner.decoder_dim:
            raise VideoError(f"the video model was trained for a decoder of width {self.cfg.aligner.decoder_dim}, "
                             f"but {decoder or self.cfg.decoder} has width {self.decoder.dim}; use --decoder {self.cfg.decoder}")
        self.model = VideoLM(aligner, self.decoder)
        self.model.eval()
        self.cache = FeatureCache(self.encoder, self.cfg.fps, feature_cache)

    # --- preparing inputs ----------------------------------------------------------------------

    def features(self, video: Path, max_seconds: float = DEFAULT_MAX_SECONDS) -> Tuple[FrameFeatures, bool, float]:
        t0 = time.perf_counter()
        feats, cached = self.cache.get(Path(video), max_seconds)
        return feats, cached, time.perf_counter() - t0

    def prompt(self, feats: Optional[FrameFeatures], question: str, lines: Sequence[TR.Line] = (),
               control: str = "full", reserve: int = 0, name: str = "the video") -> Tuple[Layout, Optional[SegmentPlan], Optional[FrameFeatures]]:
        if not question.strip():
            raise VideoError("the question is empty; ask something about the video")
        if control == "question" or feats is None:
            return build_layout(self.tokenizer, None, None, [(question, None)], self.layout, reserve=reserve), None, None
        shown = apply_control(feats, control)
        plan = plan_segments(feats.duration, feats.times, self.layout, name)
        trans = TR.assign(list(lines), plan.boundaries)
        lay = build_layout(self.tokenizer, plan, trans, [(question, None)], self.layout, reserve=reserve)
        return lay, plan, shown

    def embeddings(self, layout: Layout, plan: Optional[SegmentPlan], feats: Optional[FrameFeatures]) -> mx.array:
        tokens = mx.array(np.asarray(layout.tokens, dtype=np.int32))[None]
        text = self.decoder.embed(tokens)
        if plan is None:
            return text[0]
        f = mx.array(feats.tokens[plan.frame_index].astype(np.float32))[None]
        t = mx.array(feats.times[plan.frame_index].astype(np.float32))[None]
        visual = self.model.visual_tokens(f, t)
        n = len(layout.tokens)
        vidx = np.zeros((1, n), np.int32)
        vmask = np.zeros((1, n), np.float32)
        vidx[0, layout.visual_positions] = np.arange(len(layout.visual_positions))
        vmask[0, layout.visual_positions] = 1.0
        return splice(text, visual, mx.array(vidx), mx.array(vmask))[0]

    # --- answering -----------------------------------------------------------------------------

    def stream_features(self, feats: Optional[FrameFeatures], question: str, lines: Sequence[TR.Line] = (),
                        options: Optional[SamplingOptions] = None, control: str = "full",
                        answer: Optional[Answer] = None, t_start: Optional[float] = None) -> Iterator[str]:
        """Stream an answer; ``answer`` (if given) is filled with the layout, timing and stats."""
        options = (options or SamplingOptions(max_tokens=64)).validate()
        t0 = t_start if t_start is not None else time.perf_counter()
        lay, plan, shown = self.prompt(feats, question, lines, control, reserve=options.max_tokens)
        emb = self.embeddings(lay, plan, shown)
        stats = GenerationStats()
        out = answer if answer is not None else Answer("", lay, plan)
        out.layout, out.plan, out.stats = lay, plan, stats
        first = True
        for piece in stream_tokens(self.decoder, self.tokenizer, lay.tokens, options, self.decoder_config,
                                   stats=stats, input_embeddings=emb):
            if first:
                out.seconds_to_first_token = time.perf_counter() - t0
                first = False
            out.text += piece
            yield piece
        out.text = out.text.strip()

    def ask_features(self, feats: Optional[FrameFeatures], question: str, lines: Sequence[TR.Line] = (),
                     options: Optional[SamplingOptions] = None, control: str = "full") -> Answer:
        ans = Answer("", None, None)  # type: ignore[arg-type]
        for _ in self.stream_features(feats, question, lines, options, control, ans):
            pass
        return ans

    def stream(self, video: Path, question: str, transcript: Optional[Path] = None,
               options: Optional[SamplingOptions] = None, max_seconds: float = DEFAULT_MAX_SECONDS,
               answer: Optional[Answer] = None) -> Iterator[str]:
        """Stream an answer about a video file (features from the cache when possible)."""
        t0 = time.perf_counter()
        lines = TR.read_transcript(transcript) if transcript is not None else []
        feats, cached, secs = self.features(video, max_seconds)
        if answer is not None:
            answer.features_cached, answer.seconds_features = cached, secs
        yield from self.stream_features(feats, question, lines, options, "full", answer, t_start=t0)

    def ask(self, video: Path, question: str, transcript: Optional[Path] = None,
            options: Optional[SamplingOptions] = None, max_seconds: float = DEFAULT_MAX_SECONDS) -> Answer:
        ans = Answer("", None, None)  # type: ignore[arg-type]
        for _ in self.stream(video, question, transcript, options, max_seconds, ans):
            pass
        return ans
