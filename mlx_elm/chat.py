"""A multi-turn chat that keeps the KV cache between turns.

Each turn renders the whole conversation, finds how much of it the cache already holds (common
token prefix), trims the rest, and feeds only the new tokens, so a long chat costs one prefill.

With a draft (``draft="lookup"`` or a draft model) every turn decodes speculatively; prompt lookup
searches the whole conversation (a document pasted in the first turn keeps paying off later).

With a compressing KV policy (``kv_options``, e.g. SnapKV) the first turn's prompt — typically a
long pasted document plus a question — is compressed once, when it is complete. Later turns append
their tokens (and the replies) to the compressed cache; they are not compressed again. A cache can
be rewound only within what was appended after compression: if a new turn differs from the cached
conversation inside the compressed part (``/reset``, an edited history), the cache is rebuilt from
the whole conversation with a fresh policy cache, and ``last_note`` says so.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

from mlx_elm import kv, speculative
from mlx_elm.generation import (
    GenerationStats,
    SamplingOptions,
    build_prompt,
    context_length,
    stream_tokens,
)


def common_prefix_length(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, model, tokenizer, config: dict, options: SamplingOptions,
                 system: Optional[str] = None, kv_options: Optional["kv.KVOptions"] = None,
                 draft: "speculative.DraftSpec" = None, num_draft: Optional[int] = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.options, self.system = options, system
        self.kv_options = kv_options
        # One proposer for the whole chat: lookup keeps its n-gram index, a draft model its cache.
        self.draft, self.num_draft = None, None
        if draft is not None:
            rule = speculative.SamplingRule(options)
            self.draft, self.num_draft = speculative.make_proposer(draft, model, tokenizer, rule, num_draft)
        self.reset()

    def _new_cache(self) -> list:
        if self.kv_options is None:
            return make_prompt_cache(self.model)
        return kv.make_cache(self.model, **vars(self.kv_options))

    def reset(self) -> None:
        self.history: List[dict] = []
        self.cache = self._new_cache()
        self.cached_tokens: List[int] = []
        self.last_stats = GenerationStats()
        self.last_reused = 0
        self.last_note: Optional[str] = None

    def _rewind_to(self, keep: int) -> int:
        """Drop cached tokens past ``keep``; returns how many are kept (0 after a rebuild)."""
        extra = len(self.cached_tokens) - keep
        if extra > 0:
            trimmed = 0
            if can_trim_prompt_cache(self.cache):
                trimmed = min(c.trim(extra) for c in self.cache)
            if trimmed != extra:  # the point lies inside a compressed prompt: start over
                self.cache = self._new_cache()
                self.last_note = ("note: the conversation changed inside the compressed prompt; "
                                  "the KV cache was rebuilt from the whole conversation")
                keep = 0
        self.cached_tokens = self.cached_tokens[:keep]
        return keep

    def send(self, message: str) -> Iterator[str]:
        """Stream the reply to ``message`` and remember both in the history."""
        self.last_note = None
        full = build_prompt(self.tokenizer, message, self.system, None, self.history)
        keep = min(common_prefix_length(self.cached_tokens, full), len(full) - 1)
        keep = self._rewind_to(keep)
        self.last_reused = keep
        stats = GenerationStats()
        reply = []
        drafting = {} if self.draft is None else dict(draft=self.draft, num_draft=self.num_draft, context=full[:keep])
        for text in stream_tokens(self.model, self.tokenizer, full[keep:], self.options,
                                  self._config_for(keep), prompt_cache=self.cache, stats=stats, **drafting):
            reply.append(text)
            yield text
        seen = full + stats.tokens
        self.cached_tokens = seen[: self.cache[0].offset] if self.cache else []
        self.history += [{"role": "user", "content": message},
                         {"role": "assistant", "content": "".join(reply)}]
        self.last_stats = stats

    def describe_cache(self) -> str:
        return kv.describe(self.cache)

    def _config_for(self, keep: int) -> dict:
        """Context checks must count the cached part of the conversation too."""
        limit = context_length(self.config)
        return {} if limit is None else {"max_context_length": limit - keep}
