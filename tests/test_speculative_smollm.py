"""Speculative decoding on the embedded SmolLM2-135M: greedy output identical to plain decoding for
each draft kind and KV policy, prompts below and above the compressing capacity, and chat."""

from __future__ import annotations

import functools

import pytest

from mlx_elm import kv
from mlx_elm.chat import ChatSession
from mlx_elm.generation import GenerationStats, SamplingOptions, build_prompt, stream_tokens
from mlx_elm.speculative.tasks import load_tasks

pytestmark = pytest.mark.slow

POLICIES = {
    "full": dict(policy="full"),
    "kv-bits-8": dict(policy="full", bits=8),
    "streaming": dict(policy="streaming", capacity=128, sinks=4),
    "snapkv": dict(policy="snapkv", capacity=128, window=16),
}
TOKENS = 20


@pytest.fixture(scope="module")
def smollm(embedded):
    model, tok, info = embedded
    return model, tok, info.config


@functools.lru_cache(maxsize=None)
def _prompt(which: str):
    tasks = {t.id: t for t in load_tasks()}
    return tasks["rewrite-typos" if which == "short" else "summarize-exceptions"].prompt


def _run(smollm, which, policy, **draft):
    model, tok, config = smollm
    prompt = build_prompt(tok, _prompt(which))
    cache = kv.make_cache(model, **POLICIES[policy])
    stats = GenerationStats()
    for _ in stream_tokens(model, tok, prompt, SamplingOptions(max_tokens=TOKENS), config, prompt_cache=cache,
                           stats=stats, **draft):
        pass
    return stats, cache, len(prompt)


_plain = {}


def plain(smollm, which, policy):
    if (which, policy) not in _plain:
        _plain[(which, policy)] = _run(smollm, which, policy)[0].tokens
    return _plain[(which, policy)]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("which", ["short", "long"])  # ~170 tokens; ~460 tokens (compressed to 128)
def test_lookup_is_plain_decoding(smollm, policy, which):
    stats, cache, n_prompt = _run(smollm, which, policy, draft="lookup")
    assert stats.tokens == plain(smollm, which, policy)
    assert stats.speculative.accepted > 0  # the copy-heavy prompts exercise acceptance and trimming
    if which == "long" and policy in ("snapkv", "streaming"):
        assert n_prompt > 128 and cache[0].compressed and cache[0].size() < n_prompt


@pytest.mark.parametrize("policy", ["full", "snapkv"])
def test_draft_model_is_plain_decoding(smollm, policy):
    """The embedded model as its own draft. With the full cache the two are the same model, so every
    proposal should be accepted (up to float ties). Under SnapKV only the target's cache is
    compressed (the draft keeps a full one), so they disagree now and then: still plain output."""
    model = smollm[0]
    stats, _, _ = _run(smollm, "long", policy, draft=model, num_draft=3)
    assert stats.tokens == plain(smollm, "long", policy)
    assert stats.speculative.acceptance_rate > (0.9 if policy == "full" else 0.3)
    assert stats.speculative.accepted > 0


def test_chat_with_lookup_and_snapkv_replies_as_plain_chat(smollm):
    model, tok, config = smollm
    options = SamplingOptions(max_tokens=12)
    kv_options = kv.KVOptions(**POLICIES["snapkv"]).validate()
    plain_chat = ChatSession(model, tok, config, options, kv_options=kv_options)
    spec_chat = ChatSession(model, tok, config, options, kv_options=kv_options, draft="lookup")
    for message in (_prompt("long"), "Now list the same steps in one sentence each."):
        assert "".join(spec_chat.send(message)) == "".join(plain_chat.send(message))
    assert spec_chat.last_reused > 128 and spec_chat.cache[0].compressed
