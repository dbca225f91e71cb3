"""KV policies through generation and the CLI, on a saved tiny OpenELM with a real tokenizer."""

from __future__ import annotations


import mlx.core as mx
import pytest

import mlx_elm
from mlx_elm.generation import GenerationStats, SamplingOptions, stream_tokens
from mlx_elm.kv import expect_prompt, make_cache
from openelm_fixtures import random_model, save_mlx_folder, tiny_args


@pytest.fixture(scope="module")
def folder(tmp_path_factory, spm_model_path):
    model = random_model(tiny_args(max_context_length=1024), seed=21)
    return save_mlx_folder(model, tmp_path_factory.mktemp("kv") / "m", spm_model_path)


PROMPT = "the sky is blue because of rayleigh scattering " * 12


def test_stream_tokens_with_policies(folder):
    model, tok, info = mlx_elm.load_with_info(str(folder))
    tokens = tok.encode(PROMPT)
    assert len(tokens) > 100
    opts = SamplingOptions(max_tokens=6)
    runs = []
    for caches in (None, make_cache(model, "snapkv", capacity=len(tokens) + 1, window=16),
                   make_cache(model, "snapkv", capacity=48, window=16)):
        stats = GenerationStats()
        list(stream_tokens(model, tok, tokens, opts, info.config, prompt_cache=caches, stats=stats,
                           prefill_step_size=40))
        runs.append(stats.tokens)
    assert runs[0] == runs[1]  # nothing evicted: identical
    # with eviction: the same tokens as a manual greedy decode from a SnapKV cache
    caches = make_cache(model, "snapkv", capacity=48, window=16)
    expect_prompt(caches, len(tokens))
    logits = model(mx.array(tokens)[None], cache=caches)[:, -1]
    manual = []
    for _ in range(len(runs[2])):
        manual.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[manual[-1]]]), cache=caches)[:, -1]
    assert runs[2] == manual


def test_cli_snapkv_verbose_prints_bytes_before_and_after(cli, folder):
    result = cli("generate", PROMPT, "--model", folder, "--max-tokens", "4", "--verbose",
                 "--kv-policy", "snapkv", "--kv-capacity", "48", "--kv-window", "16", "--kv-bits", "8")
    assert result.code == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("kv cache: snapkv"))
    assert "-> 48 rows per head" in line and "before compression" in line and "bits=8" in line


def test_cli_bad_kv_options_are_one_line(cli, folder):
    # every rule is covered in-process by test_bad_options_raise_one_line_errors; one CLI round trip
    result = cli("generate", "hi", "--model", folder, "--kv-policy", "snapkv", "--kv-capacity", "16")
    assert result.code == 1
    assert len(result.error_lines) == 1 and "must exceed --kv-window" in result.error_lines[0]


def test_chat_compresses_the_first_prompt_once_and_appends_later_turns(folder):
    """`mlx-elm chat --kv-policy snapkv`: the pasted document is compressed once; the next turn
    reuses the compressed cache (only its new tokens are fed) and nothing is compressed again."""
    from mlx_elm.chat import ChatSession
    from mlx_elm.kv import KVOptions, compression_stats

    model, tok, info = mlx_elm.load_with_info(str(folder))
    opts = SamplingOptions(max_tokens=5)
    kv = KVOptions("snapkv", capacity=48, window=16).validate()
    session = ChatSession(model, tok, info.config, opts, kv_options=kv)
    "".join(session.send(PROMPT + " summarize this"))
    first = compression_stats(session.cache)
    assert first.rows_before > 100 and first.rows_after == 48
    "".join(session.send("and why is water blue"))
    # the compressed prompt came from the cache (only the re-rendered tail of the reply was re-fed)
    assert session.last_reused >= first.rows_before and session.last_note is None
    assert compression_stats(session.cache) == first  # not compressed again
    c = session.cache[0]
    assert c.size() == first.rows_after + (c.offset - first.rows_before)  # later turns stored whole
    session.history[0]["content"] = "an edited first turn"  # differs inside the compressed prompt
    "".join(session.send("again"))
    assert session.last_note and "rebuilt" in session.last_note


def test_chat_without_eviction_equals_the_full_cache_chat(folder):
    from mlx_elm.chat import ChatSession
    from mlx_elm.kv import KVOptions

    model, tok, info = mlx_elm.load_with_info(str(folder))
    opts = SamplingOptions(max_tokens=5)
    replies = []
    for kv in (None, KVOptions("snapkv", capacity=1000, window=16).validate()):
        session = ChatSession(model, tok, info.config, opts, kv_options=kv)
        replies.append(["".join(session.send(m)) for m in (PROMPT, "and the water?")])
    assert replies[0] == replies[1]
