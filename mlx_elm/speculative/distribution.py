"""The distribution the toolkit samples a token from, written out so speculative sampling can use it.

Plain decoding (mlx-lm's ``generate_step`` with ``SamplingOptions.sampler()`` and
``.logits_processors()``) draws the next token like this:

1. the logits processors (repetition penalty) rewrite the logits, given every token so far
   (prompt and generated);
2. the logits are normalised to log-probabilities;
3. the sampler's filters cut the support, in ``make_sampler``'s order: top-p, min-p, top-k
   (each on the temperature-1 log-probabilities);
4. the token is drawn from ``softmax(filtered / temp)``, or is the argmax when ``temp == 0``.

The accept/reject rule of speculative sampling needs that distribution ``p`` as numbers, at every
drafted position, so :class:`SamplingRule` computes it with the same mlx-lm functions. Step 1 is
why a drafted position cannot reuse its neighbours' processing: the repetition penalty at draft
position i depends on the drafted tokens before it, so row i is processed with the prefix
``tokens + drafted[:i]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

if TYPE_CHECKING:  # generation dispatches to this package, so it is imported only for the types
    from mlx_elm.generation import SamplingOptions

Filter = Callable[[mx.array], mx.array]


def sampler_filters(options: "SamplingOptions") -> List[Filter]:
    """The support filters ``options.sampler()`` applies, in ``mlx_lm.sample_utils.make_sampler``'s
    order (top-p, min-p, top-k); a test checks the resulting distribution against that sampler."""
    filters: List[Filter] = []
    if 0 < options.top_p < 1:
        filters.append(lambda x: apply_top_p(x, options.top_p))
    if options.min_p != 0:
        filters.append(lambda x: apply_min_p(x, options.min_p))
    if options.top_k > 0:
        filters.append(lambda x: apply_top_k(x, options.top_k))
    return filters


class SamplingRule:
    """Per-position log-probabilities and sampling distributions, exactly as plain decoding has them."""

    def __init__(self, options: "SamplingOptions"):
        self.options = options
        self.greedy = options.temp == 0
        self.processors = options.logits_processors()
        self.filters = sampler_filters(options)

    def logprobs(self, logits: mx.array, tokens: Optional[mx.array], drafted: Optional[mx.array] = None) -> mx.array:
        """(n, V) log-probabilities after the processors; row i has seen ``tokens`` + ``drafted[:i]``.

        ``logits`` is (n, V): row i predicts the token after ``tokens + drafted[:i]``.
        """
        if self.processors:
            rows = []
            for i in range(logits.shape[0]):
                seen = tokens if i == 0 or drafted is None else mx.concatenate([tokens, drafted[:i]])
                row = logits[i: i + 1]
                for process in self.processors:
                    row = process(seen, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def probs(self, logprobs: mx.array) -> mx.array:
        """(n, V) sampling distribution for ``temp > 0``: filters, then ``softmax(x / temp)``."""
        for cut in self.filters:
            logprobs = cut(logprobs)
        return mx.softmax(logprobs * (1.0 / self.options.temp), axis=-1)

    def choose(self, logprobs: mx.array) -> tuple:
        """One token per row (argmax, or a draw from :meth:`probs`) and the distribution drawn from
        (None for argmax: a point mass)."""
        if self.greedy:
            return mx.argmax(logprobs, axis=-1).astype(mx.uint32), None
        p = self.probs(logprobs)
        return mx.random.categorical(mx.log(p), axis=-1).astype(mx.uint32), p
