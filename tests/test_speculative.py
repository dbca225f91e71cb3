"""Speculative decoding on tiny models: greedy identity under every draft kind and KV policy, the
sampling distribution (chi-square against an exact NumPy reference), chat, and bad input."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step, speculative_generate_step as mlx_lm_speculative_step
from mlx_lm.models.cache import make_prompt_cache

import mlx_elm
from mlx_elm import kv, speculative
from mlx_elm.chat import ChatSession
from mlx_elm.errors import SpeculativeError
from mlx_elm.generation import GenerationStats, SamplingOptions, stream_tokens
from mlx_elm.speculative import (LookupProposer, SamplingRule, SpeculativeStats, best_length, expected_tokens,
                                 speculative_generate_step)
from openelm_fixtures import random_model, save_mlx_folder, tiny_args
from speculative_fixtures import (TrigramModel, chi_square_pvalue, random_table, reference_probs, repeated_prompt,
                                  sequence_distribution)

POLICIES = {
    "full": dict(policy="full"),
    "kv-bits-8": dict(policy="full", bits=8),
    "streaming": dict(policy="streaming", capacity=48, sinks=4),
    "snapkv": dict(policy="snapkv", capacity=48, window=8),
}


@pytest.fixture(scope="module")
def tiny(tiny_openelm_folder):
    """The suite's tiny OpenELM with the tiny SentencePiece tokenizer, loaded like a user's folder."""
    model, tok, _ = mlx_elm.load_with_info(str(tiny_openelm_folder))
    return model, tok


@pytest.fixture(scope="module")
def target(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def drafts(target):
    """A draft that often agrees (the target's weights, perturbed) and one that rarely does."""
    from mlx.utils import tree_flatten

    close = random_model(target.args, seed=0)
    close.load_weights([(k, mx.array(v)) for k, v in tree_flatten(target.parameters())])
    rng = np.random.default_rng(5)
    close.load_weights([(k, v + mx.array(rng.normal(0, 1e-4, v.shape).astype(np.float32)))
                        for k, v in tree_flatten(close.parameters())])
    other = random_model(tiny_args(num_transformer_layers=2, max_context_length=1024), seed=22)
    return {"close": close, "other": other}


def run_tokens(model, tok, prompt, max_tokens, policy, options=None, **draft):
    """The tokens ``stream_tokens`` (what generate/chat run) yields, and the cache it filled."""
    options = options or SamplingOptions(max_tokens=max_tokens)
    cache = kv.make_cache(model, **POLICIES[policy])
    stats = GenerationStats()
    for _ in stream_tokens(model, tok, prompt, options, prompt_cache=cache, stats=stats, **draft):
        pass
    return stats.tokens, cache


# --- greedy identity -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("length", [12, 40, 130])  # below, near and far above the compressing capacity (48)
def test_lookup_greedy_output_is_plain_output(target, tok, policy, length):
    prompt = repeated_prompt(512, length, seed=length)
    ref, _ = run_tokens(target, tok, prompt, 40, policy)
    got, cache = run_tokens(target, tok, prompt, 40, policy, draft="lookup", num_draft=6)
    assert got == ref
    assert len(prompt) + len(got) - 1 <= cache[0].offset <= len(prompt) + len(got)
    if policy in ("snapkv", "streaming") and length > 48:
        assert cache[0].compressed and cache[0].size() <= 48 + 40


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("which", ["close", "other"])
def test_draft_model_greedy_output_is_plain_output(target, tok, drafts, policy, which):
    prompt = repeated_prompt(512, 70, seed=3)
    ref, _ = run_tokens(target, tok, prompt, 32, policy)
    got, _ = run_tokens(target, tok, prompt, 32, policy, draft=drafts[which], num_draft=4)
    assert got == ref


def test_greedy_identity_with_repetition_penalty(target, tok, drafts):
    """The penalty at draft position i must see the drafted tokens before it."""
    options = SamplingOptions(max_tokens=40, repetition_penalty=1.3)
    prompt = repeated_prompt(512, 60, seed=9)
    ref, _ = run_tokens(target, tok, prompt, 40, "full", options)
    for draft in ("lookup", drafts["close"]):
        got, _ = run_tokens(target, tok, prompt, 40, "full", options, draft=draft, num_draft=6)
        assert got == ref


def test_accepted_drafts_are_most_tokens_with_a_close_draft(target, drafts):
    prompt = repeated_prompt(512, 50, seed=4)
    stats = SpeculativeStats()
    rule = SamplingRule(SamplingOptions())
    proposer, k = speculative.make_proposer(drafts["close"], target, None, rule, 4)
    tokens = [t for t, _, _ in speculative_generate_step(prompt, target, proposer, rule, max_tokens=40, num_draft=k,
                                                         stats=stats)]
    assert len(tokens) == 40 and stats.emitted == 40
    assert stats.acceptance_rate > 0.8 and stats.tokens_per_pass > 3  # the path under test is the draft path
    assert stats.verifications < 40


def test_draft_model_matches_mlx_lm_speculative_step(target, drafts):
    """Greedy with a full cache: the same tokens as mlx-lm's own speculative decoding."""
    prompt = repeated_prompt(512, 30, seed=8)
    ref = [int(t) for t, _, _ in mlx_lm_speculative_step(mx.array(prompt), target, drafts["close"],
                                                         num_draft_tokens=3, max_tokens=30)]
    rule = SamplingRule(SamplingOptions())
    proposer, _ = speculative.make_proposer(drafts["close"], target, None, rule, 3)
    got = [t for t, _, _ in speculative_generate_step(prompt, target, proposer, rule, max_tokens=30, num_draft=3)]
    assert got == ref


def test_cache_holds_only_what_the_consumer_saw(target):
    """Stopping inside a run of accepted drafts trims the rows the caller never received."""
    prompt = [7, 8, 9, 10, 11] * 8
    cache = make_prompt_cache(target)
    rule = SamplingRule(SamplingOptions())
    steps = speculative_generate_step(prompt, target, LookupProposer(adaptive=False), rule, max_tokens=60,
                                      num_draft=8, prompt_cache=cache)
    seen = []
    for token, _, from_draft in steps:
        seen.append(token)
        if from_draft and len(seen) > 3:
            break
    steps.close()
    assert cache[0].offset <= len(prompt) + len(seen)
    # ... and decoding on from there continues the plain sequence.
    ref = [t for t, _ in generate_step(mx.array(prompt), target, max_tokens=len(seen) + 5)]
    assert seen == ref[: len(seen)]


# --- chat ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["full", "snapkv", "streaming"])
def test_chat_keeps_its_cache_and_replies_as_plain_chat(tiny_openelm_folder, policy):
    model, tok, info = mlx_elm.load_with_info(str(tiny_openelm_folder))
    kv_options = kv.KVOptions(**POLICIES[policy]).validate() if policy != "full" else None
    options = SamplingOptions(max_tokens=12)
    plain = ChatSession(model, tok, info.config, options, kv_options=kv_options)
    spec = ChatSession(model, tok, info.config, options, kv_options=kv_options, draft="lookup")
    document = "the sky is blue because light from the sun scatters in the air " * 5
    for message in (document + "why is the sky blue", "and the water of a river", "the sky is blue"):
        assert "".join(spec.send(message)) == "".join(plain.send(message))
        # plain decoding has already fed its last token; speculative decoding stops one short
        assert plain.cached_tokens[: len(spec.cached_tokens)] == spec.cached_tokens
        assert spec.cache[0].offset == len(spec.cached_tokens) >= len(plain.cached_tokens) - 1
    assert spec.last_reused > 0


# --- the sampling distribution ---------------------------------------------------------------------------------
SAMPLING_CASES = {
    "all": dict(temp=0.9, top_p=0.95, top_k=2, min_p=0.05, repetition_penalty=1.3),
    "temperature": dict(temp=0.8),
    "top-p+top-k": dict(temp=1.0, top_p=0.8, top_k=2),
    "min-p+repetition": dict(temp=1.3, min_p=0.2, repetition_penalty=1.5),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_rule_is_the_reference_distribution(case):
    """SamplingRule's p equals the NumPy reference, row by row, with the drafted prefix."""
    sampling = SAMPLING_CASES[case]
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4, 16)).astype(np.float32)
    seen, drafted = [3, 5, 5, 9], [1, 3, 7]
    rule = SamplingRule(SamplingOptions(**sampling))
    lp = rule.logprobs(mx.array(logits), mx.array(seen, dtype=mx.uint32), mx.array(drafted, dtype=mx.uint32))
    got = np.array(rule.probs(lp))
    for i in range(4):
        want = reference_probs(logits[i], seen + drafted[:i], **sampling)
        np.testing.assert_allclose(got[i], want, atol=2e-6)


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_reference_is_what_mlx_lm_sampler_draws(case):
    """The reference (and so the rule) is the distribution SamplingOptions.sampler() samples from."""
    sampling = SAMPLING_CASES[case]
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, 8).astype(np.float32)
    seen = [2, 2, 6]
    options = SamplingOptions(**sampling)
    x = mx.array(logits)[None]
    for process in options.logits_processors():
        x = process(mx.array(seen, dtype=mx.uint32), x)
    logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
    mx.random.seed(0)
    n = 40000
    draws = np.array(options.sampler()(mx.broadcast_to(logprobs, (n, 8))))
    want = reference_probs(logits, seen, **sampling)
    counts = Counter((int(t),) for t in draws)
    assert chi_square_pvalue(counts, {(i,): p for i, p in enumerate(want) if p > 0}, n) > 1e-3


def _speculative_samples(target_table, draft, prompt, n, length, sampling, num_draft):
    target = TrigramModel(target_table)
    options = SamplingOptions(max_tokens=length, seed=0, **sampling)
    rule = SamplingRule(options)
    mx.random.seed(0)
    counts, stats = Counter(), SpeculativeStats()
    for _ in range(n):
        proposer = (LookupProposer(max_ngram=2, adaptive=False) if isinstance(draft, str)
                    else speculative.DraftModelProposer(TrigramModel(draft), rule))
        seq = [t for t, _, _ in speculative_generate_step(prompt, target, proposer, rule, max_tokens=length,
                                                          num_draft=num_draft, stats=stats)]
        counts[tuple(seq)] += 1
    return counts, stats


def _check_distribution(draft_kind, case, n, length=4, vocab=3):
    """Chi-square over whole continuations: speculative samples vs the exact target law."""
    sampling = SAMPLING_CASES[case]
    table = random_table(vocab, seed=1)
    prompt = [0, 1, 2, 0, 1] if draft_kind == "lookup" else [0, 1]  # lookup needs matches to propose
    draft = "lookup" if draft_kind == "lookup" else random_table(vocab, seed=2)
    counts, stats = _speculative_samples(table, draft, prompt, n, length, sampling, num_draft=3)
    expected = sequence_distribution(table, prompt, length, **sampling)
    assert chi_square_pvalue(counts, expected, n) > 1e-3
    assert stats.drafted > n and 0 < stats.accepted < stats.drafted  # both branches of the rule ran


@pytest.mark.parametrize("draft_kind", ["model", "lookup"])
def test_speculative_sampling_keeps_the_target_distribution(draft_kind):
    """Every sampling option at once (temperature, top-p, top-k, min-p, repetition penalty)."""
    _check_distribution(draft_kind, "all", n=1000)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["temperature", "top-p+top-k", "min-p+repetition"])
def test_speculative_sampling_keeps_the_target_distribution_per_option(case):
    _check_distribution("model", case, n=3000)


def test_chi_square_detects_a_wrong_rule(monkeypatch):
    """Power check: accepting every proposal (no rejection) fails the same test."""
    from mlx_elm.speculative import loop

    def accept_all(rule, logits, tokens, drafted, q=None):
        k = drafted.shape[0]
        lp = rule.logprobs(logits, tokens, drafted)
        token = mx.random.categorical(mx.log(rule.probs(lp)[k])).item()
        return speculative.Verdict(k, token, lp, drafted.tolist())

    monkeypatch.setattr(loop, "verify", accept_all)
    vocab, length, n = 3, 4, 300
    sampling = SAMPLING_CASES["temperature"]
    table = random_table(vocab, seed=1)
    counts, _ = _speculative_samples(table, random_table(vocab, seed=2), [0, 1], n, length, sampling, 3)
    assert chi_square_pvalue(counts, sequence_distribution(table, [0, 1], length, **sampling), n) < 1e-6


# --- proposal length and lookup --------------------------------------------------------------------------------
def test_expected_tokens_and_best_length():
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 5) == 6
    assert best_length(0.05, 10, beta=0.1) == 0  # a guess accepted less often than it costs: don't
    assert best_length(0.99, 10, beta=0.02) == 10
    lengths = [best_length(a, 16, 0.1) for a in np.linspace(0, 0.99, 30)]
    assert lengths == sorted(lengths)  # more acceptance, longer proposals


def test_lookup_takes_the_longest_most_recent_match():
    p = LookupProposer(max_ngram=3, adaptive=False)
    history = [1, 2, 3, 9, 9, 5, 2, 3, 4, 4, 1, 2, 3]
    p.begin(history)
    draft = p.propose(history, 3)
    assert draft.tokens.tolist() == [9, 9, 5]  # "1 2 3" occurred at 0..2, followed by 9 9 5
    p2 = LookupProposer(max_ngram=3, adaptive=False)
    history2 = [7, 2, 3, 8, 5, 2, 3, 6, 2, 3]
    p2.begin(history2)
    assert p2.propose(history2, 2).tokens.tolist() == [6, 2]  # no 3-gram match: the latest "2 3"
    p3 = LookupProposer(max_ngram=3, adaptive=False)
    p3.begin([1, 2, 3])
    assert len(p3.propose([1, 2, 3], 4)) == 0  # the suffix never matches itself


def test_lookup_stops_proposing_where_guesses_fail_and_recovers():
    p = LookupProposer(max_ngram=2, cost_per_token=0.1)
    history = [1, 2] + list(range(10, 40))
    p.begin(history)
    for _ in range(30):  # "1 2" keeps being proposed and rejected
        history += [1, 2]
        d = p.propose(history, 8)
        p.feedback(len(d), 0)
        history.append(99)
    assert len(p.propose(history + [1, 2], 8)) == 0
    for _ in range(40):  # now the guess would have been right: shadow scoring lifts the estimate
        history += [1, 2]
        d = p.propose(history, 8)
        p.feedback(len(d), len(d))
        history.append(history[history.index(2) + 1] if not len(d) else int(d.tokens[0]))
    assert len(p.propose(history + [1, 2], 8)) > 0


# --- bad input -------------------------------------------------------------------------------------------------
def test_num_draft_out_of_range_is_one_line():
    for k in (0, 65, -1, 2.5, True):
        with pytest.raises(SpeculativeError, match=r"--num-draft must be an integer in \[1, 64\]"):
            speculative.check_num_draft(k, "lookup")


def test_draft_with_another_vocabulary_is_refused(target, tok):
    other = random_model(tiny_args(vocab_size=320), seed=3)
    with pytest.raises(SpeculativeError, match="predicts 320 token ids but the target predicts 512"):
        mlx_elm.generate(target, tok, [5, 6, 7], draft_model=other, max_tokens=4)


def test_api_lookup_with_an_empty_prompt_is_one_line(target, tok):
    with pytest.raises(SpeculativeError, match="prompt, which is empty"):
        mlx_elm.generate(target, tok, "   ", draft_model="lookup")


def test_api_takes_mlx_lm_keywords(target, tok, drafts):
    prompt = repeated_prompt(512, 40, seed=2)
    plain = [r.token for r in mlx_elm.stream_generate(target, tok, prompt, max_tokens=20)]
    for draft in ("lookup", drafts["close"]):
        responses = list(mlx_elm.stream_generate(target, tok, prompt, max_tokens=20, draft_model=draft,
                                                 num_draft_tokens=4))
        assert [r.token for r in responses] == plain
        assert any(r.from_draft for r in responses)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, spm_model_path, tiny_openelm_folder):
    from mlx_elm.train.tiny import train_tiny_spm

    tmp_path = tmp_path_factory.mktemp("spec-folders")
    other_spm = train_tiny_spm(tmp_path / "spm2", vocab_size=300)
    return {
        "target": tiny_openelm_folder,
        "draft": save_mlx_folder(random_model(tiny_args(num_transformer_layers=2), seed=42), tmp_path / "draft",
                                 spm_model_path),
        "other-tokenizer": save_mlx_folder(random_model(tiny_args(), seed=43), tmp_path / "other-tok", other_spm),
        "other-vocab": save_mlx_folder(random_model(tiny_args(vocab_size=320), seed=44), tmp_path / "other-vocab",
                                       spm_model_path),
    }


def test_cli_generate_with_each_draft_kind(cli, folders):
    base = ["generate", "the sky is blue because the sky is blue because", "--model", folders["target"],
            "--max-tokens", "12", "--no-chat-template"]
    plain = cli(*base)
    assert plain.code == 0, plain.stderr
    for extra in (["--draft", "lookup"], ["--draft-model", folders["draft"], "--num-draft", "3"],
                  ["--draft", folders["draft"], "--kv-policy", "snapkv", "--kv-capacity", "16", "--kv-window", "4"]):
        result = cli(*base, *extra, "--verbose")
        assert result.code == 0, result.stderr
        if "--kv-policy" not in extra:
            assert result.stdout == plain.stdout
        assert "proposed tokens accepted" in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--draft", "lookup", "--num-draft", "0"], "--num-draft must be an integer in [1, 64]"),
    (["--draft", "lookup", "--num-draft", "65"], "--num-draft must be an integer in [1, 64]"),
    (["--num-draft", "3"], "--num-draft needs --draft"),
    (["--draft", "lookup", "--draft-model", "x"], "either --draft or --draft-model"),
])
def test_cli_bad_draft_options_are_one_line(cli, folders, args, needle):
    result = cli("generate", "hi there", "--model", folders["target"], *args)
    assert result.code != 0 and len(result.error_lines) == 1 and needle in result.error_lines[0], result.stderr


def test_cli_lookup_with_an_empty_prompt_is_one_line(cli, folders):
    result = cli("generate", "", "--model", folders["target"], "--draft", "lookup")
    assert result.code == 1 and len(result.error_lines) == 1
    assert "prompt, which is empty" in result.error_lines[0]


@pytest.mark.parametrize("which,needle", [("other-tokenizer", "has another tokenizer (300 tokens vs the target's 320)"),
                                          ("other-vocab", "predicts 320 token ids but the target predicts 512")])
def test_cli_refuses_a_draft_of_another_vocabulary(cli, folders, which, needle):
    result = cli("generate", "hi there", "--model", folders["target"], "--draft", folders[which])
    assert result.code == 1 and len(result.error_lines) == 1 and needle in result.error_lines[0], result.stderr


# --- bench and example -----------------------------------------------------------------------------------------
def test_bench_compares_plain_and_speculative_from_one_prefill(target, tok):
    from mlx_elm.speculative import bench
    from mlx_elm.speculative.tasks import Task

    tasks = [Task("copy", "grounded", "quote", "the sky is blue because the sky is blue because the sky", "test"),
             Task("free", "chat", "chat", "tell me about the river", "test")]
    snap = kv.KVOptions(policy="snapkv", capacity=16, window=4).validate()
    results = bench.run(target, tok, tasks, "lookup", None, gen_tokens=12, rounds=2, policies=[kv.KVOptions(), snap])
    assert [(r.task.id, r.policy) for r in results] == [("copy", "full"), ("copy", "snapkv C=16 W=4 kernel=7 pool=max"),
                                                        ("free", "full"), ("free", "snapkv C=16 W=4 kernel=7 pool=max")]
    assert all(r.identical and len(r.plain) == len(r.speculative) == 2 for r in results)
    summary = bench.summarize(results)
    assert set(summary) == {("grounded", "full"), ("grounded", results[1].policy), ("chat", "full"),
                            ("chat", results[1].policy)}
    assert all(s["identical"] == s["tasks"] == 1 and s["plain_tps"] > 0 for s in summary.values())
    rows = bench.table(results)
    assert len(rows) == 2 + 4 + 4 and "| copy | grounded | full |" in rows[2]


def test_cli_bench_generate_with_a_draft(cli, folders, tmp_path):
    import json

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t", "kind": "grounded", "task": "quote", "prompt": "the sky is blue " * 6,
                                 "source": "test"}) + "\n")
    result = cli("bench", "generate", "--model", folders["target"], "--draft", "lookup", "--tasks-file", tasks,
                 "--gen-tokens", "8", "--kv-policy", "streaming", "--kv-capacity", "16", "--with-full")
    assert result.code == 0, result.stderr
    assert "| t | grounded | full |" in result.stdout and "| t | grounded | streaming C=16 sinks=4 |" in result.stdout
    assert "speed-up under streaming C=16 sinks=4 is" in result.stdout and "identical 1/1" in result.stdout


def test_replay_example_fast_mode(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import speculative_replay
    finally:
        sys.path.pop(0)
    results = speculative_replay.main(["--fast", "--betas", "0.1"])
    for (kind, beta), (adaptive, fixed, ngram, oracle) in results.items():
        assert oracle[0] == fixed[0] and oracle[1] >= fixed[1]  # same proposals, paying only for accepted ones
        assert adaptive[0] >= 1 and ngram[0] >= 1
    assert "| grounded (1) | 0.1 |" in capsys.readouterr().out


def test_cli_draft_without_a_tokenizer_borrows_the_targets(cli, folders, spm_model_path, tmp_path):
    """OpenELM repos ship no tokenizer: --tokenizer then serves the draft too (and is still checked)."""
    bare = save_mlx_folder(random_model(tiny_args(num_transformer_layers=2), seed=45), tmp_path / "bare")
    base = ["generate", "the sky is blue", "--model", folders["target"], "--max-tokens", "6", "--draft", bare]
    refused = cli(*base)
    assert refused.code == 1 and len(refused.error_lines) == 1 and "--tokenizer" in refused.error_lines[0]
    result = cli(*base, "--tokenizer", spm_model_path)
    assert result.code == 0, result.stderr
