"""The speculative decoding loop: propose, verify in one forward pass, keep what the target keeps.

Why not mlx-lm's ``speculative_generate_step``: it feeds the last prompt token together with the
first drafts, so a compressing KV cache (SnapKV, StreamingLLM), which compresses in the call that
completes the prompt, would compress drafted rows into the kept set, where they can no longer be
trimmed; it accepts a draft only when the target's own sample equals it (valid, but below the
``min(1, p/q)`` acceptance of speculative sampling for a non-degenerate draft); and it knows
only draft models. Here the prompt is prefilled exactly as plain decoding does it (chunks, then
the last token alone, so compression happens at the prompt's end and the first token is the
plain one), and every verification chunk after that is a decode-time append, trimmable under
every policy. Rejected rows are trimmed; a compressing cache's ``offset`` (the RoPE position)
goes back with them.

Cache invariant (chat relies on it): whenever the loop hands out a token, the target's cache holds
at most the prompt and the tokens handed out so far, so ``cache.offset`` never counts a token the
caller has not seen; rows verified but not yet handed out are trimmed when the consumer stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, generation_stream, wired_limit
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_elm.errors import SpeculativeError
from mlx_elm.speculative.distribution import SamplingRule
from mlx_elm.speculative.proposers import Proposer
from mlx_elm.speculative.verify import verify


@dataclass
class SpeculativeStats:
    """Counts over one or more generations."""

    verifications: int = 0  # target forward passes after the prompt
    with_draft: int = 0  # ... of which checked at least one proposed token
    drafted: int = 0  # proposed tokens checked
    accepted: int = 0  # ... of which the target kept
    emitted: int = 0  # tokens handed out (the first one, from the prompt, included)
    trace: List[Tuple[int, int]] = field(default_factory=list)  # (proposed, accepted) per verification

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accepted_per_verification(self) -> float:
        """Mean accepted tokens per verification that checked a proposal."""
        return self.accepted / self.with_draft if self.with_draft else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens per target forward pass while decoding (1.0 = plain decoding)."""
        return (self.emitted - 1) / self.verifications if self.verifications else 1.0

    def add(self, other: "SpeculativeStats") -> None:
        for name in ("verifications", "with_draft", "drafted", "accepted", "emitted", "trace"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        return (f"speculative: {self.accepted}/{self.drafted} proposed tokens accepted "
                f"({100 * self.acceptance_rate:.0f}%), {self.accepted_per_verification:.2f} per verification, "
                f"{self.tokens_per_pass:.2f} tokens per target pass")


def check_trimmable(cache: List[Any]) -> None:
    if not can_trim_prompt_cache(cache):
        kinds = sorted({type(c).__name__ for c in cache if not c.is_trimmable()})
        raise SpeculativeError(f"speculative decoding must trim rejected tokens from the KV cache, and "
                               f"{', '.join(kinds)} cannot be trimmed; drop --draft or use another KV policy")


def prefill(model, prompt: Sequence[int], cache: List[Any], step: int = 2048) -> mx.array:
    """The prompt into ``cache`` as mlx-lm's ``generate_step`` feeds it (chunks of ``step``, then the
    last token alone); returns the (1, V) logits after the prompt."""
    tokens = mx.array(list(prompt), dtype=mx.uint32)
    while tokens.size > 1:
        n = min(step, tokens.size - 1)
        model(tokens[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[n:]
        mx.clear_cache()
    return model(tokens[None], cache=cache)[:, -1, :]


def speculative_decode(
    model,
    cache: List[Any],
    logits: mx.array,
    prompt: Sequence[int],
    proposer: Proposer,
    rule: SamplingRule,
    max_tokens: int,
    num_draft: int,
    context: Sequence[int] = (),
    stats: Optional[SpeculativeStats] = None,
) -> Iterator[Tuple[int, mx.array, bool]]:
    """Yield ``(token, logprobs, from_draft)`` after a prefilled ``prompt`` whose last logits are ``logits``.

    ``context`` are tokens the cache held before ``prompt`` (earlier chat turns): the proposer
    sees them, the logits processors (like plain decoding's) see only ``prompt`` onwards.
    """
    stats = stats if stats is not None else SpeculativeStats()
    processed = mx.array(list(prompt), dtype=mx.uint32)  # what the processors see, as in generate_step
    history = list(context) + list(prompt)
    logprobs = rule.logprobs(logits, processed)
    token, _ = rule.choose(logprobs)
    y, row, from_draft = int(token.item()), logprobs[0], False
    proposer.begin(history)
    produced, unconfirmed = 0, 0
    try:
        while True:
            yield y, row, from_draft
            produced += 1
            stats.emitted += 1
            history.append(y)
            if produced >= max_tokens:
                return
            draft = proposer.propose(history, min(num_draft, max_tokens - produced - 1))
            k = len(draft)
            step_in = mx.array([y], dtype=mx.uint32)
            seen = mx.concatenate([processed, step_in]) if rule.processors else processed
            out = model(mx.concatenate([step_in, draft.tokens])[None] if k else step_in[None], cache=cache)
            if draft.q is not None and draft.q.shape[-1] != out.shape[-1]:
                raise SpeculativeError(f"the draft proposes from {draft.q.shape[-1]} token ids but the model "
                                       f"predicts {out.shape[-1]}; use a draft with the target's vocabulary")
            verdict = verify(rule, out[0], seen, draft.tokens, draft.q)
            n = verdict.accepted
            trim_prompt_cache(cache, k - n)  # rows of y and d_1..d_n stay
            stats.verifications += 1
            stats.with_draft += int(k > 0)
            stats.drafted += k
            stats.accepted += n
            stats.trace.append((k, n))
            proposer.feedback(k, n)
            if rule.processors:
                processed = mx.concatenate([seen, draft.tokens[:n]]) if n else seen
            for i in range(n):
                unconfirmed = n - i - 1
                yield verdict.drafted[i], verdict.logprobs[i], True
                produced += 1
                stats.emitted += 1
                history.append(verdict.drafted[i])
            unconfirmed = 0
            y, row, from_draft = verdict.token, verdict.logprobs[n], False
            if stats.verifications % 256 == 0:
                mx.clear_cache()
    finally:
        if unconfirmed:
            trim_prompt_cache(cache, unconfirmed)


def speculative_generate_step(
    prompt: Sequence[int],
    model,
    proposer: Proposer,
    rule: SamplingRule,
    *,
    max_tokens: int = 256,
    num_draft: int = 4,
    prompt_cache: Optional[List[Any]] = None,
    context: Sequence[int] = (),
    prefill_step_size: int = 2048,
    stats: Optional[SpeculativeStats] = None,
) -> Iterator[Tuple[int, mx.array, bool]]:
    """Like mlx-lm's ``generate_step`` (``(token, logprobs, from_draft)``), drafting with ``proposer``."""
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    check_trimmable(cache)
    with mx.stream(generation_stream):
        logits = prefill(model, prompt, cache, prefill_step_size)
        yield from speculative_decode(model, cache, logits, prompt, proposer, rule, max_tokens, num_draft,
                                      context, stats)


def stream_responses(model, tokenizer, prompt: Sequence[int], proposer: Proposer, rule: SamplingRule, *,
                     max_tokens: int, num_draft: int, prompt_cache: Optional[List[Any]] = None,
                     context: Sequence[int] = (), prefill_step_size: int = 2048,
                     stats: Optional[SpeculativeStats] = None) -> Iterator[GenerationResponse]:
    """mlx-lm's ``GenerationResponse`` stream (text segments, speeds, ``from_draft``), with the
    stopping rules of mlx-lm's ``stream_generate``: stop at an EOS token or after ``max_tokens``."""
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    detokenizer = tokenizer.detokenizer
    steps = speculative_generate_step(prompt, model, proposer, rule, max_tokens=max_tokens, num_draft=num_draft,
                                      prompt_cache=prompt_cache, context=context,
                                      prefill_step_size=prefill_step_size, stats=stats)
    n_prompt = len(prompt)

    def response(text, token, logprobs, from_draft, n, finish=None):
        return GenerationResponse(text=text, token=token, logprobs=logprobs, from_draft=from_draft,
                                  prompt_tokens=n_prompt, prompt_tps=prompt_tps, generation_tokens=n + 1,
                                  generation_tps=(n + 1) / (time.perf_counter() - tic),
                                  peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish)

    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        prompt_tps = 0.0
        try:
            for n, (token, logprobs, from_draft) in enumerate(steps):
                if n == 0:
                    prompt_tps = n_prompt / (time.perf_counter() - tic)
                    tic = time.perf_counter()
                if token in tokenizer.eos_token_ids:
                    break
                detokenizer.add_token(token)
                if (n + 1) == max_tokens:
                    break
                yield response(detokenizer.last_segment, token, logprobs, from_draft, n)
        finally:
            steps.close()  # trims verified-but-unseen rows before the caller looks at the cache
        detokenizer.finalize()
        finish = "stop" if token in tokenizer.eos_token_ids else "length"
        yield response(detokenizer.last_segment, token, logprobs, from_draft, n, finish)
