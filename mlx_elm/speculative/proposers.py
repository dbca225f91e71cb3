"""Proposers: where the drafted tokens come from.

A proposer sees the whole token history (earlier chat turns, the prompt, what was generated so
far) and proposes up to ``max_len`` next tokens, with the distribution it drew them from (``q``;
None for a deterministic proposal, which is a point mass). The loop tells it, after each
verification, how many of its tokens the target kept.

* :class:`LookupProposer` (prompt lookup, as in llama.cpp's ``lookup`` and Saxena's "prompt lookup
  decoding"): the continuation of the longest, most recent earlier occurrence of the history's
  last n tokens, n = ``max_ngram`` down to ``min_ngram``. Costs no model call. Its length follows
  the acceptance rate measured for matches of that n (``adaptive``).
* :class:`DraftModelProposer`: a small model with the same vocabulary drafts autoregressively
  with the same sampling settings; it keeps its own (full) KV cache in step with the history by
  trimming what the target rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from mlx_elm.speculative.adaptive import AcceptanceEstimate, best_length
from mlx_elm.speculative.distribution import SamplingRule

# beta in mlx_elm.speculative.adaptive: the price of one more verified token, relative to a plain
# decoding step. Measured for SmolLM2-135M (float32) on the CPU backend; see docs/speculative.md.
DEFAULT_COST_PER_TOKEN = 0.1


@dataclass
class Draft:
    """Proposed tokens (k,) and the distribution each was drawn from ((k, V), None = point mass)."""

    tokens: mx.array
    q: Optional[mx.array] = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def empty_draft() -> Draft:
    return Draft(mx.array([], dtype=mx.uint32))


class Proposer(Protocol):
    kind: str

    def begin(self, history: Sequence[int]) -> None:
        """A generation starts; ``history`` is every token the target's cache will hold."""

    def propose(self, history: Sequence[int], max_len: int) -> Draft:
        """Up to ``max_len`` tokens to follow ``history`` (which only grows between ``begin`` calls)."""

    def feedback(self, proposed: int, accepted: int) -> None:
        """The target kept ``accepted`` of the last ``proposed`` tokens."""


def common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LookupProposer:
    """Prompt lookup: copy what followed the last time the recent tokens occurred.

    ``index[n]`` maps each n-gram of the history to the position right after its latest
    occurrence, so a proposal is one dictionary probe per n. Each match order n keeps its own
    acceptance estimate (a 4-token match in a quoted passage is a far better bet than a 1-token
    one in free text); the proposal length is :func:`~mlx_elm.speculative.adaptive.best_length`
    of that estimate. When it says 0, the first token of the match is still remembered and scored
    against what the target produced (that costs nothing and is an unbiased sample of the
    acceptance probability), so an estimate that fell can recover.
    """

    kind = "lookup"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, adaptive: bool = True,
                 cost_per_token: float = DEFAULT_COST_PER_TOKEN):
        self.orders = list(range(max_ngram, min_ngram - 1, -1))
        self.adaptive = adaptive
        self.cost_per_token = cost_per_token
        self.estimates: Dict[int, AcceptanceEstimate] = {n: AcceptanceEstimate() for n in self.orders}
        self._reset_index()

    def _reset_index(self) -> None:
        self.tokens: List[int] = []
        self.index: Dict[int, Dict[Tuple[int, ...], int]] = {n: {} for n in self.orders}
        self._indexed = 1  # positions p < _indexed have been entered (p = 0 follows no n-gram)
        self._last_order: Optional[int] = None
        self._shadow: Optional[Tuple[int, int, int]] = None  # (position, guessed token, order)

    def begin(self, history: Sequence[int]) -> None:
        n = len(self.tokens)
        if len(history) < n or list(history[:n]) != self.tokens:
            self._reset_index()  # not a continuation of what is indexed (a new chat, an edit)
        self._shadow = None
        self._extend(history)

    def _extend(self, history: Sequence[int]) -> None:
        """Append the new history and index every position that has a token after it; the
        history's own suffix is entered only once a token follows it, so it never finds itself."""
        tokens = self.tokens
        tokens.extend(history[len(tokens):])
        for p in range(self._indexed, len(tokens)):
            for n in self.orders:
                if p >= n:
                    self.index[n][tuple(tokens[p - n: p])] = p
        self._indexed = max(self._indexed, len(tokens))

    def match(self, max_len: int) -> Tuple[Optional[int], List[int]]:
        """(order, up to ``max_len`` continuation tokens) of the longest recent match of the suffix.

        A match that overlaps the suffix itself (a repeating pattern, e.g. a model stuck in a loop)
        is continued as an overlapping copy, LZ77-style: the pattern keeps repeating.
        """
        tokens = self.tokens
        L = len(tokens)
        for n in self.orders:
            if L > n:
                p = self.index[n].get(tuple(tokens[-n:]))
                if p is not None:
                    out: List[int] = []
                    for i in range(max_len):
                        j = p + i
                        out.append(tokens[j] if j < L else out[j - L])
                    return n, out
        return None, []

    def propose(self, history: Sequence[int], max_len: int) -> Draft:
        self._extend(history)
        self._score_shadow()
        self._last_order = None
        order, continuation = self.match(max(max_len, 1))
        if order is None or max_len <= 0:
            return empty_draft()
        k = len(continuation)
        if self.adaptive:
            k = min(k, best_length(self.estimates[order].alpha, max_len, self.cost_per_token))
        if k == 0:
            self._shadow = (len(self.tokens), continuation[0], order)
            return empty_draft()
        self._last_order = order
        return Draft(mx.array(continuation[:k], dtype=mx.uint32))

    def _score_shadow(self) -> None:
        if self._shadow is None:
            return
        position, guess, order = self._shadow
        if position < len(self.tokens):
            hit = self.tokens[position] == guess
            self.estimates[order].update(int(hit), int(not hit))
            self._shadow = None

    def feedback(self, proposed: int, accepted: int) -> None:
        if self._last_order is not None and proposed > 0:
            self.estimates[self._last_order].update(accepted, int(accepted < proposed))


class DraftModelProposer:
    """A small model of the same vocabulary drafts ``k`` tokens with the target's sampling settings.

    Its cache holds ``_fed``: the history it has read plus its own drafts but the last; before
    each proposal it is trimmed back to the common prefix with the target's history (what the
    target rejected goes) and fed the rest, so it also follows a chat across turns.
    """

    kind = "model"

    def __init__(self, model, rule: SamplingRule, prefill_step_size: int = 2048,
                 processor_context: int = 256):
        self.model = model
        self.rule = rule
        self.prefill_step_size = prefill_step_size
        self.processor_context = processor_context  # the draft's q may use any context; keep it short
        self.cache = make_prompt_cache(model)
        self._fed: List[int] = []
        self._pending: Optional[mx.array] = None  # drafts fed to the cache, not yet known as ints
        self._synced = 0  # history[:_synced] is known to equal _fed[:_synced]

    def _resolve(self) -> None:
        if self._pending is not None:
            self._fed.extend(self._pending.tolist())
            self._pending = None

    def _sync(self, history: Sequence[int], start: int) -> None:
        """Trim the cache to the common prefix with ``history``; feed all but its last token."""
        self._resolve()
        keep = common_prefix(self._fed, history, start)
        if keep == len(history):  # never hold the last token: its logits are needed
            keep -= 1
        trim_prompt_cache(self.cache, len(self._fed) - keep)
        del self._fed[keep:]
        todo = list(history[keep:-1])
        step = self.prefill_step_size
        for i in range(0, len(todo), step):
            chunk = todo[i: i + step]
            self.model(mx.array(chunk, dtype=mx.uint32)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            self._fed.extend(chunk)
        self._synced = len(history) - 1

    def begin(self, history: Sequence[int]) -> None:
        self._sync(history, 0)

    def propose(self, history: Sequence[int], max_len: int) -> Draft:
        self._sync(history, min(self._synced, len(history)))
        if max_len <= 0:
            return empty_draft()
        y = mx.array([history[-1]], dtype=mx.uint32)
        self._fed.append(history[-1])
        recent = mx.array(list(history[-self.processor_context:]), dtype=mx.uint32)
        drafted, qs = [], []
        for i in range(max_len):
            logits = self.model(y[None], cache=self.cache)[0, -1:]
            seen = recent if not drafted else mx.concatenate([recent] + drafted)
            logprobs = self.rule.logprobs(logits, seen)
            y, q = self.rule.choose(logprobs)
            drafted.append(y)
            if q is not None:
                qs.append(q)
        tokens = mx.concatenate(drafted)
        # The cache now holds every draft but the last; they become ints after verification.
        self._pending = tokens[:-1]
        return Draft(tokens, mx.concatenate(qs) if qs else None)

    def feedback(self, proposed: int, accepted: int) -> None:
        pass
