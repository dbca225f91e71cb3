"""Token-budget arithmetic: segments x M + tags + transcript + text never exceed the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_elm.errors import VideoError
from mlx_elm.video.io import sample_times
from mlx_elm.video.layout import VIDEO_PLACEHOLDER, LayoutConfig, build_layout, conversation_pieces, plan_segments, time_tag


class CharTokenizer:
    """One token per byte; a ChatML-like template (prefix-consistent, like SmolLM2's)."""

    eos_token = "<e>"
    chat_template = "chatml"

    def encode(self, text, add_special_tokens=False):
        return [b % 250 + 5 for b in text.encode()]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        out = "".join(f"<{m['role']}>{m['content']}<e>\n" for m in messages)
        return out + ("<assistant>" if add_generation_prompt else "")


TOK = CharTokenizer()
QUESTION = "Which way does the red circle move?"


def test_ten_minutes_fit_under_1024_visual_tokens():
    cfg = LayoutConfig()  # 4 s segments, M = 8, 1024 visual tokens, stretch
    plan = plan_segments(600.0, sample_times(600.0, 2.0), cfg)
    assert plan.stretched and plan.segment_seconds == 5 and plan.num_segments == 120
    assert plan.num_segments * cfg.queries == 960 <= cfg.max_visual_tokens
    short = plan_segments(8.0, sample_times(8.0, 2.0), cfg)
    assert not short.stretched and short.boundaries == [(0.0, 4.0), (4.0, 8.0)]
    np.testing.assert_array_equal(short.frame_index, [list(range(8)), list(range(8, 16))])
    with pytest.raises(VideoError, match="1200 visual tokens") as e:
        plan_segments(600.0, sample_times(600.0, 2.0), LayoutConfig(long_video="refuse"))
    assert "\n" not in str(e.value)


def test_layout_puts_tag_slots_transcript_in_segment_order():
    cfg = LayoutConfig(queries=3)
    plan = plan_segments(8.0, sample_times(8.0, 2.0), cfg)
    lay = build_layout(TOK, plan, [["hello"], []], [("q?", None)], cfg, placeholder_id=0)
    toks = lay.tokens
    tag0, tag1 = TOK.encode(time_tag(0.0)), TOK.encode(time_tag(4.0))
    hello = TOK.encode(" hello")
    start = lay.visual_positions[0] - len(tag0)
    assert toks[start : start + len(tag0)] == tag0
    assert lay.visual_positions[:3] == [start + len(tag0) + k for k in range(3)]
    after = lay.visual_positions[2] + 1
    assert toks[after : after + len(hello)] == hello
    assert toks[after + len(hello) : after + len(hello) + len(tag1)] == tag1
    assert all(toks[p] == 0 for p in lay.visual_positions)
    assert lay.counts == {"text": len(toks) - 6 - len(tag0) - len(tag1) - len(hello), "tags": len(tag0) + len(tag1),
                          "visual": 6, "transcript": len(hello)}


def test_training_targets_are_the_answers_and_end_of_turn():
    cfg = LayoutConfig(queries=2)
    plan = plan_segments(4.0, sample_times(4.0, 2.0), cfg)
    lay = build_layout(TOK, plan, None, [("first?", "left"), ("second?", "fast")], cfg)
    target_text = bytes((t - 5) for t, m in zip(lay.tokens, lay.targets) if m).decode()
    assert target_text == "left<e>fast<e>"
    # the prompt part of a training sequence is exactly the prompt of a generation call
    gen = build_layout(TOK, plan, None, [("first?", None)], cfg)
    assert lay.tokens[: len(gen.tokens)] == gen.tokens


def test_question_only_has_no_video():
    lay = build_layout(TOK, None, None, [("q?", None)], LayoutConfig())
    assert lay.visual_positions == [] and lay.counts["visual"] == 0
    pieces = conversation_pieces(TOK, "sys", [("q?", None)], with_video=False)
    assert "<<VIDEO>>" not in "".join(p for p, _ in pieces)


@settings(max_examples=150, deadline=None)
@given(duration=st.floats(0.5, 3600.0), queries=st.sampled_from([1, 4, 8, 16]), seg=st.integers(1, 8),
       visual=st.integers(16, 1500), prompt=st.integers(200, 4000), reserve=st.integers(0, 64),
       lines=st.lists(st.tuples(st.floats(0, 3600), st.text(min_size=0, max_size=80)), max_size=40),
       tags=st.booleans())
def test_budget_is_never_exceeded(duration, queries, seg, visual, prompt, reserve, lines, tags):
    cfg = LayoutConfig(segment_seconds=seg, queries=queries, max_visual_tokens=max(visual, queries),
                       max_prompt_tokens=prompt, time_tags=tags)
    plan = plan_segments(duration, sample_times(duration, 2.0), cfg)
    assert plan.num_segments * queries <= cfg.max_visual_tokens
    assert plan.boundaries[0][0] == 0.0 and plan.boundaries[-1][1] == pytest.approx(duration)
    assert plan.num_segments == math.ceil(duration / plan.segment_seconds - 1e-9)
    from mlx_elm.video.transcript import Line, assign

    trans = assign([Line(t, s) for t, s in lines], plan.boundaries)
    try:
        lay = build_layout(TOK, plan, trans, [(QUESTION, None)], cfg, reserve=reserve)
    except VideoError as e:  # refused only when the prompt cannot fit even without transcript
        pieces = conversation_pieces(TOK, cfg.system, [(QUESTION, None)])
        text = len(TOK.encode("".join(p for p, _ in pieces).replace(VIDEO_PLACEHOLDER, "")))
        tag_tokens = sum(len(TOK.encode(time_tag(a))) for a, _ in plan.boundaries) if tags else 0
        assert text + tag_tokens + plan.num_segments * queries + reserve > prompt and "\n" not in str(e)
        return
    assert len(lay.tokens) + reserve <= cfg.max_prompt_tokens
    assert lay.counts["visual"] == len(lay.visual_positions) == plan.num_segments * queries
    assert sum(lay.counts.values()) == len(lay.tokens)
