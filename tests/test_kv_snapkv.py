"""SnapKV and baselines: exactness against the full cache, masked decoding, NumPy selection."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_elm.errors import KVCacheError
from mlx_elm.kv import (
    cache_nbytes,
    compression_stats,
    expect_prompt,
    make_cache,
    query_taps,
    snapkv_select,
)
from test_kv_reference import (
    assert_same_selection,
    np_layer0_qk,
    np_snapkv_select,
    tiny_llama,
    tiny_openelm,
)

L_PROMPT, DECODE = 200, [11, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def openelm():
    return tiny_openelm()


def prompt(n: int = L_PROMPT, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(3, 256, size=n), dtype=mx.int32)


def logprobs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def run(model, caches, tokens, chunk=48, declare=True, last_alone=True):
    """Prefill like mlx-lm's generate_step (chunks, last token alone), then teacher-forced decode.

    Returns log-probabilities (1 + len(DECODE), vocab): the prompt's last position, then each
    decode step.
    """
    n = len(tokens)
    if declare:
        expect_prompt(caches, n)
    body = tokens[:-1] if last_alone else tokens
    with query_taps(model):
        for s in range(0, len(body), chunk):
            out = model(body[None, s: s + chunk], cache=caches)
            mx.eval(out)
        if last_alone:
            out = model(tokens[None, -1:], cache=caches)
    outs = [out[:, -1]]
    for t in DECODE:
        outs.append(model(mx.array([[t]]), cache=caches)[:, -1])
    return logprobs(mx.concatenate(outs).astype(mx.float32))


# --- test-side masking: full-cache attention with per-layer, per-head masks ------------------

_MASKED = {}


def _masked_class(cls):
    if cls not in _MASKED:
        def __call__(self, x, mask=None, cache=None):
            keep = getattr(cache, "keep_prompt", None)  # (H_q, L) bool, set by the test
            if keep is not None:
                assert x.shape[1] == 1
                extra = cache.offset + 1 - keep.shape[1]
                m = np.concatenate([keep, np.ones((keep.shape[0], extra), bool)], 1)
                mask = mx.array(m[None, :, None, :])
            return cls.__call__(self, x, mask, cache)

        _MASKED[cls] = type("Masked" + cls.__name__, (cls,), {"__call__": __call__})
    return _MASKED[cls]


def masked_full_reference(model, tokens, kept_per_layer, n_q_heads):
    """Full-cache decode in which exactly the evicted prompt positions are masked out."""
    from mlx_elm.kv.taps import attention_modules

    caches = make_prompt_cache(model)
    attns = attention_modules(model)
    originals = [type(a) for a in attns]
    try:
        for a in attns:
            a.__class__ = _masked_class(type(a))
        n = len(tokens)
        for s in range(0, n, 64):
            out = model(tokens[None, s: s + 64], cache=caches)
        outs = [out[:, -1]]
        for c, kept, hq in zip(caches, kept_per_layer, n_q_heads):
            kept = np.array(kept[0])
            keep = np.zeros((kept.shape[0], n), bool)
            for h in range(kept.shape[0]):
                keep[h, kept[h]] = True
            c.keep_prompt = np.repeat(keep, hq // kept.shape[0], axis=0)  # q head h -> kv h // rep
        for t in DECODE:
            outs.append(model(mx.array([[t]]), cache=caches)[:, -1])
    finally:
        for a, cls in zip(attns, originals):
            a.__class__ = cls
    return logprobs(mx.concatenate(outs).astype(mx.float32))


def q_heads(model):
    from mlx_elm.kv.taps import _num_heads, attention_modules

    return [_num_heads(a) for a in attention_modules(model)]


# --- 1. capacity >= prompt: identical to the full cache -----------------------------------------


@pytest.mark.parametrize("policy", ["snapkv", "streaming"])
def test_capacity_at_least_prompt_is_identical_to_full(llama, policy):
    tokens = prompt()
    full = run(llama, make_prompt_cache(llama), tokens)
    caches = make_cache(llama, policy, capacity=L_PROMPT + 1, window=16)
    got = run(llama, caches, tokens)
    assert mx.array_equal(got, full).item()
    assert caches[0].compressed and caches[0].size() == L_PROMPT + len(DECODE)


# --- 2. decode from SnapKV == full decode with exactly the evicted positions masked ------------


CASES = [
    # model, capacity, window, kernel, pool, chunk, per_query_head
    ("llama", 64, 16, 7, "max", 48, False),
    ("llama", 64, 16, 5, "avg", 48, False),
    ("llama", 64, 16, 1, "max", 8, False),  # no pooling; chunks shorter than the window
    ("llama", 64, 16, 7, "max", 48, True),  # per-query-head selection
    ("openelm", 64, 16, 7, "max", 48, False),
    ("openelm", 96, 32, 7, "avg", 1000, False),  # one prefill chunk
]


@pytest.mark.parametrize("name,capacity,window,kernel,pool,chunk,pqh", CASES)
def test_snapkv_decode_equals_masked_full_decode(request, name, capacity, window, kernel, pool, chunk, pqh):
    model = request.getfixturevalue(name)
    tokens = prompt()
    caches = make_cache(model, "snapkv", capacity=capacity, window=window, kernel=kernel, pool=pool,
                        per_query_head=pqh)
    got = run(model, caches, tokens, chunk=chunk)
    kept = [c.kept for c in caches]
    from mlx_elm.kv.taps import attention_modules

    for c, hq, attn in zip(caches, q_heads(model), attention_modules(model)):
        assert c.offset == L_PROMPT + len(DECODE)  # logical position continues from L
        assert c.size() == capacity + len(DECODE)  # stored rows drive masks
        heads = hq if pqh else attn.n_kv_heads
        assert c.kept.shape == (1, heads, capacity) and c._store.keys.shape[1] == heads
    ref = masked_full_reference(model, tokens, kept, q_heads(model))
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=2e-4, rtol=0)
    unmasked = run(model, make_prompt_cache(model), tokens, chunk=chunk)
    assert mx.abs(got[0] - unmasked[0]).max().item() == 0  # the prompt's own step is exact
    assert mx.abs(got[1:] - unmasked[1:]).max().item() > 1e-3  # eviction is visible: the test can fail


def test_wrong_rope_position_is_detected(llama):
    """Counter-check: rotating new tokens at the compressed length breaks the equality."""
    tokens = prompt()
    caches = make_cache(llama, "snapkv", capacity=64, window=16)
    expect_prompt(caches, L_PROMPT)
    with query_taps(llama):
        llama(tokens[None], cache=caches)
    kept = [c.kept for c in caches]
    for c in caches:
        c.offset = c.size()  # the bug we guard against
    outs = [logprobs(llama(mx.array([[t]]), cache=caches)[:, -1]) for t in DECODE]
    ref = masked_full_reference(llama, tokens, kept, q_heads(llama))
    assert mx.abs(mx.concatenate(outs) - ref[1:]).max().item() > 1e-3


def test_gqa_cache_stays_kv_head_sized(llama):
    tokens = prompt()
    per_kv = make_cache(llama, "snapkv", capacity=64, window=16)
    per_q = make_cache(llama, "snapkv", capacity=64, window=16, per_query_head=True)
    full = make_prompt_cache(llama)
    for caches in (per_kv, per_q, full):
        run(llama, caches, tokens)
    assert per_kv[0]._store.keys.shape[1] == 2 and per_q[0]._store.keys.shape[1] == 8
    rows = 64 + len(DECODE)
    assert cache_nbytes(per_kv) * (L_PROMPT + len(DECODE)) == cache_nbytes(full) * rows
    assert cache_nbytes(per_q) == 4 * cache_nbytes(per_kv)
    stats = compression_stats(per_kv)
    assert (stats.rows_before, stats.rows_after) == (L_PROMPT, 64)
    assert stats.bytes_before * 64 == stats.bytes_after * L_PROMPT


# --- 3. the selection equals an independent NumPy implementation --------------------------------


@pytest.mark.parametrize("pool,kernel", [("max", 7), ("avg", 7), ("max", 1), ("avg", 3)])
@pytest.mark.parametrize("hq,hkv,pqh", [(4, 4, False), (8, 2, False), (8, 2, True)])
def test_selection_matches_numpy_on_random_inputs(pool, kernel, hq, hkv, pqh):
    rng = np.random.default_rng(hq * 10 + kernel)
    L, W, d, C = 300, 16, 32, 80
    q = rng.normal(size=(1, hq, W, d)).astype(np.float32)
    k = rng.normal(size=(1, hkv, L, d)).astype(np.float32)
    got = snapkv_select(mx.array(q), mx.array(k), C, d ** -0.5, kernel, pool, pqh)
    ref, votes = np_snapkv_select(q, k, C, d ** -0.5, kernel, pool, pqh)
    overlap = assert_same_selection(np.array(got), ref, votes, W)
    assert overlap > 0.97
    assert snapkv_select(mx.array(q), mx.array(k), L + 1, 1.0) is None  # prompt shorter than C


@pytest.mark.parametrize("name,chunk,pool", [("llama", 37, "max"), ("openelm", 48, "avg"), ("llama", 1000, "avg")])
def test_selection_in_the_model_matches_numpy_from_weights(request, name, chunk, pool):
    """Layer 0's kept rows equal the rule applied to queries/keys recomputed in NumPy."""
    model = request.getfixturevalue(name)
    tokens = prompt()
    W, C = 16, 64
    caches = make_cache(model, "snapkv", capacity=C, window=W, pool=pool)
    run(model, caches, tokens, chunk=chunk)
    q, k, scale = np_layer0_qk(model, np.array(tokens))
    ref, votes = np_snapkv_select(q[:, :, -W:], k, C, scale, 7, pool)
    assert assert_same_selection(np.array(caches[0].kept), ref, votes, W, rtol=1e-4) > 0.95


# --- edge cases, lengths around C, baselines, quantization -------------------------------------


@pytest.mark.parametrize("n", [63, 64, 65])
def test_prompt_lengths_around_capacity(llama, n):
    tokens = prompt(n)
    caches = make_cache(llama, "snapkv", capacity=64, window=16)
    got = run(llama, caches, tokens, chunk=20)
    full = run(llama, make_prompt_cache(llama), tokens, chunk=20)
    assert caches[0].size() == min(n, 64) + len(DECODE)
    if n <= 64:  # kept whole (n == C goes through top-k: every row is kept)
        np.testing.assert_allclose(np.array(got), np.array(full), atol=2e-5)
    else:
        ref = masked_full_reference(llama, tokens, [c.kept for c in caches], q_heads(llama))
        np.testing.assert_allclose(np.array(got), np.array(ref), atol=2e-4)


def test_streaming_keeps_sinks_and_recent_and_matches_masked_full(llama):
    tokens = prompt()
    caches = make_cache(llama, "streaming", capacity=40, sinks=4)
    got = run(llama, caches, tokens)
    kept = np.array(caches[0].kept[0, 0])
    assert kept.tolist() == list(range(4)) + list(range(L_PROMPT - 36, L_PROMPT))
    ref = masked_full_reference(llama, tokens, [c.kept for c in caches], q_heads(llama))
    np.testing.assert_allclose(np.array(got), np.array(ref), atol=2e-4)


def test_undeclared_prompt_is_refused_not_guessed(llama):
    """mlx-lm's loop feeds a 1-token chunk mid-prompt when the length is 2 more than a multiple of
    the prefill step; a cache that guessed "1 token = end of prompt" compressed there, early. Now a
    compressing cache refuses tokens until the prompt length is declared."""
    caches = make_cache(llama, "snapkv", capacity=64, window=16)
    with pytest.raises(KVCacheError, match="expect_prompt") as e:
        run(llama, caches, prompt(), declare=False)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_prompt_of_2050_tokens_through_mlx_lm_stream_generate(llama, spm_model_path, tmp_path):
    """2050 = 2048 + 2: generate_step sends 2048, then 1, then the last token alone. Compression
    must happen after the whole prompt: the same kept rows and tokens as a manual prefill."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_elm.kv import wants_queries

    tokens = prompt(2050, seed=5)
    caches = make_cache(llama, "snapkv", capacity=64, window=16)
    expect_prompt(caches, len(tokens))
    assert wants_queries(caches)

    from mlx_elm.tokenizers import install_tokenizer, load_tokenizer

    install_tokenizer(spm_model_path, tmp_path)
    tok = load_tokenizer(tmp_path)
    tok._eos_token_ids = set()  # decode exactly 4 tokens whatever they are
    with query_taps(llama):
        out = [r.token for r in stream_generate(llama, tok, tokens, max_tokens=4, sampler=make_sampler(0.0),
                                                prompt_cache=caches)]
    ref = make_cache(llama, "snapkv", capacity=64, window=16)
    expect_prompt(ref, len(tokens))
    with query_taps(llama):
        logits = llama(tokens[None], cache=ref)
    greedy = [int(mx.argmax(logits[0, -1]).item())]
    for _ in range(3):
        greedy.append(int(mx.argmax(llama(mx.array([[greedy[-1]]]), cache=ref)[0, -1]).item()))
    assert out == greedy
    for a, b in zip(caches, ref):
        assert mx.array_equal(a.kept, b.kept).item()
        assert a.stats.rows_before == 2050


@pytest.mark.parametrize("bits", [4, 8])
def test_snapkv_with_quantized_cache(llama, bits):
    tokens = prompt()
    plain = run(llama, make_cache(llama, "snapkv", capacity=64, window=16), tokens)
    caches = make_cache(llama, "snapkv", capacity=64, window=16, bits=bits)
    got = run(llama, caches, tokens)
    c = caches[0]
    assert c.bits == bits and isinstance(c._store.keys, tuple)  # the quantized SDPA path was taken
    assert mx.array_equal(got[0], plain[0]).item()
    err = mx.abs(got[1:] - plain[1:]).max().item()
    assert 0 < err < (0.05 if bits == 8 else 0.5)
    per_row_float = 2 * 2 * 32 * 4  # K+V, 2 KV heads, d 32, float32
    assert cache_nbytes(c) < per_row_float * c.size()
    full_q = make_cache(llama, "full", bits=bits)
    run(llama, full_q, tokens)
    assert full_q[0].bits == bits and full_q[0].size() == L_PROMPT + len(DECODE)


def test_trim_only_the_appended_suffix(llama):
    caches = make_cache(llama, "snapkv", capacity=64, window=16)
    run(llama, caches, prompt())
    c = caches[0]
    assert c.trim(100) == len(DECODE)
    assert c.size() == 64 and c.offset == L_PROMPT


def test_full_policy_is_plain_kvcache_and_taps_are_explicit(llama, openelm):
    assert all(type(c) is KVCache for c in make_cache(llama, "full"))
    make_cache(llama, "snapkv", capacity=64, window=16)
    assert type(llama.layers[0].self_attn).__name__ == "Attention"  # building caches installs nothing
    with query_taps(llama):
        assert type(llama.layers[0].self_attn).__name__.startswith("QueryTapped")
    assert type(llama.layers[0].self_attn).__name__ == "Attention"
    with query_taps(openelm):  # our attention hands queries over itself: no class swap
        assert type(openelm.layers[0].attn).__name__ == "Attention"
    assert set(k for k, _ in llama.parameters()["model"]["layers"][0]["self_attn"].items()) >= {"q_proj"}


@pytest.mark.parametrize("kwargs,needle", [
    (dict(policy="lru", capacity=64), "unknown KV policy"),
    (dict(policy="snapkv", capacity=16, window=32), "must exceed --kv-window"),
    (dict(policy="snapkv", capacity=64, kernel=4), "odd"),
    (dict(policy="snapkv", capacity=64, kernel=0), "odd"),
    (dict(policy="snapkv", capacity=64, pool="min"), "max or avg"),
    (dict(policy="snapkv", capacity=64, bits=3), "4 or 8"),
    (dict(policy="streaming", capacity=None), "--kv-capacity"),
])
def test_bad_options_raise_one_line_errors(llama, kwargs, needle):
    with pytest.raises(KVCacheError, match=needle) as e:
        make_cache(llama, **kwargs)
    assert "\n" not in str(e.value)


def test_unsupported_architecture_is_refused():
    import mlx.nn as nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(2, 2)]

    with pytest.raises(KVCacheError, match="attention queries"):
        make_cache(Odd(), "snapkv", capacity=64)
