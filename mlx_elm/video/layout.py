"""Segments and the token layout: how a video becomes decoder input, within a token budget.

A video of ``D`` seconds is cut into ``ceil(D / segment_seconds)`` segments; each segment becomes
``[time tag][M visual tokens][that segment's transcript]`` (the tag is plain text such as
``[12s]``; the visual tokens are slots whose embeddings the aligner supplies). When the segments
would need more than ``max_visual_tokens`` visual tokens, the ``long_video`` policy decides:

- ``stretch`` (default): segments grow in whole seconds until ``segments x M <= max_visual_tokens``;
  every segment still gets ``frames_per_segment`` frames, evenly spaced, so a long video is
  subsampled in time rather than truncated (10 min at M = 8: 120 segments of 5 s = 960 tokens);
- ``refuse``: a one-line error says how many tokens the video needs.

The whole prompt (template + tags + visual + transcript + question) must fit
``max_prompt_tokens``; transcripts are truncated first (the same cap for every segment, as large as
fits), and a prompt that does not fit without any transcript is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mlx_elm.errors import VideoError

VIDEO_PLACEHOLDER = "<<VIDEO>>"
LONG_VIDEO_POLICIES = ("stretch", "refuse")
DEFAULT_SYSTEM = "You watch a video and answer briefly."


@dataclass
class LayoutConfig:
    """Segmenting and token-budget settings (saved with a trained video model)."""

    segment_seconds: int = 4
    frames_per_segment: int = 8
    queries: int = 8  # M visual tokens per segment (the aligner's learned queries)
    time_tags: bool = True
    transcript: bool = True
    max_visual_tokens: int = 1024
    max_prompt_tokens: int = 2048
    long_video: str = "stretch"
    system: str = DEFAULT_SYSTEM

    def validate(self) -> "LayoutConfig":
        checks = [
            (self.segment_seconds >= 1, f"--segment-seconds must be >= 1 (got {self.segment_seconds})"),
            (self.frames_per_segment >= 1, f"--frames-per-segment must be >= 1 (got {self.frames_per_segment})"),
            (self.queries >= 1, f"the number of queries per segment must be >= 1 (got {self.queries})"),
            (self.max_visual_tokens >= self.queries,
             f"--max-visual-tokens ({self.max_visual_tokens}) must hold at least one segment ({self.queries} tokens)"),
            (self.max_prompt_tokens > self.queries, f"--max-prompt-tokens must exceed {self.queries} (got {self.max_prompt_tokens})"),
            (self.long_video in LONG_VIDEO_POLICIES,
             f"--long-video must be one of {', '.join(LONG_VIDEO_POLICIES)} (got {self.long_video!r})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise VideoError(msg)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayoutConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class SegmentPlan:
    """Segment boundaries and, per segment, which sampled frames it sees."""

    boundaries: List[Tuple[float, float]]
    segment_seconds: int
    frame_index: np.ndarray  # [S, F] indices into the sampled frames
    stretched: bool = False

    @property
    def num_segments(self) -> int:
        return len(self.boundaries)


def plan_segments(duration: float, frame_times: np.ndarray, cfg: LayoutConfig, name: str = "the video") -> SegmentPlan:
    """Cut ``duration`` seconds into segments under the visual budget (see the module docstring)."""
    cfg.validate()
    if duration <= 0 or len(frame_times) == 0:
        raise VideoError(f"{name} has no frames (zero length); pass a non-empty video")
    seg = cfg.segment_seconds
    n = max(1, math.ceil(duration / seg - 1e-9))
    max_segments = cfg.max_visual_tokens // cfg.queries
    stretched = False
    if n > max_segments:
        if cfg.long_video == "refuse":
            raise VideoError(
                f"{name} ({duration:.0f} s) needs {n} segments x {cfg.queries} = {n * cfg.queries} visual tokens, over the "
                f"budget of {cfg.max_visual_tokens}; use --long-video stretch, raise --max-visual-tokens or cut the video")
        seg = math.ceil(duration / max_segments - 1e-9)
        n = max(1, math.ceil(duration / seg - 1e-9))
        stretched = True
    bounds = [(float(i * seg), float(min((i + 1) * seg, duration))) for i in range(n)]
    F = cfg.frames_per_segment
    times = np.asarray(frame_times, dtype=np.float64)
    index = np.zeros((n, F), dtype=np.int64)
    for s, (a, b) in enumerate(bounds):
        want = a + (np.arange(F) + 0.5) * (b - a) / F
        index[s] = np.abs(times[None, :] - want[:, None]).argmin(axis=1)
    return SegmentPlan(bounds, seg, index, stretched)


def time_tag(start: float) -> str:
    """The plain-text tag that opens a segment: ``[12s]``."""
    return f"[{int(round(start))}s]"


# --- prompts -----------------------------------------------------------------------------------


@dataclass
class Layout:
    """Decoder input: token ids with visual slots, where they are, and what the budget went on."""

    tokens: List[int]
    visual_positions: List[int]  # in segment order, M per segment
    targets: List[int] = field(default_factory=list)  # 1 where the token is a training target
    counts: Dict[str, int] = field(default_factory=dict)

    def describe(self, cfg: LayoutConfig, segments: int) -> str:
        c = self.counts
        return (f"tokens: {len(self.tokens)}/{cfg.max_prompt_tokens} = {c.get('visual', 0)} visual "
                f"({segments} segments x {cfg.queries}) + {c.get('tags', 0)} time tags + {c.get('transcript', 0)} "
                f"transcript + {c.get('text', 0)} text; visual budget {c.get('visual', 0)}/{cfg.max_visual_tokens}")


def _hf(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)


def _encode(tokenizer, text: str) -> List[int]:
    return list(_hf(tokenizer).encode(text, add_special_tokens=False)) if text else []


def _render(tokenizer, messages: List[dict], add_generation_prompt: bool) -> str:
    hf = _hf(tokenizer)
    if getattr(hf, "chat_template", None) is None:
        parts = [m["content"] for m in messages]
        text = "\n".join(parts)
        return text + ("\nAnswer:" if add_generation_prompt else "")
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def conversation_pieces(tokenizer, system: str, turns: Sequence[Tuple[str, Optional[str]]],
                        with_video: bool = True) -> List[Tuple[str, int]]:
    """Render ``turns`` (question, answer or None) with the chat template as ``(text, is_target)``
    pieces. The video placeholder opens the first user turn; the last turn may have no answer
    (a prompt for generation). Pieces split exactly where the prompt of a generation call ends, so
    training and inference tokenize the same text the same way."""
    messages = [{"role": "system", "content": system}] if system else []
    pieces: List[Tuple[str, int]] = []
    done = ""
    for i, (question, answer) in enumerate(turns):
        user = (VIDEO_PLACEHOLDER + "\n" if with_video and i == 0 else "") + question
        messages.append({"role": "user", "content": user})
        prompt = _render(tokenizer, messages, add_generation_prompt=True)
        if not prompt.startswith(done):
            raise VideoError("the chat template is not prefix-consistent, so turns cannot be located; use another decoder")
        pieces.append((prompt[len(done):], 0))
        done = prompt
        if answer is None:
            break
        messages.append({"role": "assistant", "content": answer})
        full = _render(tokenizer, messages, add_generation_prompt=False)
        if not full.startswith(done):
            raise VideoError("the chat template is not prefix-consistent, so answers cannot be located; use another decoder")
        end = full[len(done):]
        eos = getattr(_hf(tokenizer), "eos_token", None) or ""
        cut = end.find(eos) + len(eos) if eos and eos in end else len(end)
        pieces.append((end[:cut], 1))  # the answer and its end-of-turn token are targets
        if end[cut:]:
            pieces.append((end[cut:], 0))
        done = full
    return pieces


def _fit_transcripts(lengths: List[int], room: int) -> int:
    """The largest per-segment cap ``c`` with ``sum(min(l, c)) <= room``."""
    if sum(lengths) <= room:
        return max(lengths, default=0)
    lo, hi = 0, max(lengths, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(l, mid) for l in lengths) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def build_layout(tokenizer, plan: Optional[SegmentPlan], transcripts: Optional[Sequence[Sequence[str]]],
                 turns: Sequence[Tuple[str, Optional[str]]], cfg: LayoutConfig, placeholder_id: int = 0,
                 reserve: int = 0) -> Layout:
    """Token ids for a conversation about a video (``plan=None``: no video, the question-only control).

    ``reserve`` tokens (the answer to come) count against ``max_prompt_tokens`` too.
    """
    pieces = conversation_pieces(tokenizer, cfg.system, turns, with_video=plan is not None)
    text_ids: List[Tuple[List[int], int]] = []
    video_at = None
    for text, flag in pieces:
        if VIDEO_PLACEHOLDER in text:
            before, after = text.split(VIDEO_PLACEHOLDER, 1)
            text_ids.append((_encode(tokenizer, before), flag))
            video_at = len(text_ids)
            text_ids.append(([], 0))
            text_ids.append((_encode(tokenizer, after), flag))
        else:
            text_ids.append((_encode(tokenizer, text), flag))
    n_text = sum(len(t) for t, _ in text_ids)
    counts = {"text": n_text, "tags": 0, "visual": 0, "transcript": 0}
    segments: List[Tuple[List[int], List[int]]] = []
    if plan is not None:
        tags = [_encode(tokenizer, time_tag(a)) if cfg.time_tags else [] for a, _ in plan.boundaries]
        counts["tags"] = sum(len(t) for t in tags)
        counts["visual"] = plan.num_segments * cfg.queries
        if counts["visual"] > cfg.max_visual_tokens:
            raise VideoError(f"{counts['visual']} visual tokens exceed --max-visual-tokens {cfg.max_visual_tokens}; "
                             "plan the segments with plan_segments")
        trans = [[] for _ in plan.boundaries]
        if cfg.transcript and transcripts is not None:
            trans = [_encode(tokenizer, " " + " ".join(lines)) if lines else [] for lines in transcripts]
        fixed = n_text + counts["tags"] + counts["visual"] + reserve
        if fixed > cfg.max_prompt_tokens:
            raise VideoError(
                f"the prompt needs {fixed} tokens without any transcript ({counts['visual']} visual, {counts['tags']} tags, "
                f"{n_text} text, {reserve} for the answer) but --max-prompt-tokens is {cfg.max_prompt_tokens}; "
                "raise it, lower --max-visual-tokens or shorten the question")
        cap = _fit_transcripts([len(t) for t in trans], cfg.max_prompt_tokens - fixed)
        trans = [t[:cap] for t in trans]
        counts["transcript"] = sum(len(t) for t in trans)
        segments = list(zip(tags, trans))
    elif n_text + reserve > cfg.max_prompt_tokens:
        raise VideoError(f"the question needs {n_text + reserve} tokens but --max-prompt-tokens is {cfg.max_prompt_tokens}; "
                         "shorten it or raise the budget")
    tokens: List[int] = []
    targets: List[int] = []
    visual: List[int] = []
    for k, (ids, flag) in enumerate(text_ids):
        if k == video_at:
            for tag, tr in segments:
                tokens += tag
                visual += list(range(len(tokens), len(tokens) + cfg.queries))
                tokens += [placeholder_id] * cfg.queries
                tokens += tr
            targets += [0] * (len(tokens) - len(targets))
            continue
        tokens += ids
        targets += [flag] * len(ids)
    return Layout(tokens, visual, targets, counts)
