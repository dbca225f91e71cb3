"""A multi-turn chat that keeps the KV cache between turns.

Each turn renders the whole conversation, finds how much of it the cache already holds (common
token prefix), trims the rest, and feeds only the new tokens, so a long chat costs one prefill.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

from mlx_elm.generation import GenerationStats, SamplingOptions, build_prompt, stream_tokens


def common_prefix_length(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, model, tokenizer, config: dict, options: SamplingOptions,
                 system: Optional[str] = None, prompt_cache=None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.options, self.system = options, system
        self._custom_cache = prompt_cache
        self.reset()

    def reset(self) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.history: List[dict] = []
        self.cache = self._custom_cache if self._custom_cache is not None else make_prompt_cache(self.model)
        self.cached_tokens: List[int] = []
        self.last_stats = GenerationStats()
        self.last_reused = 0

    def _rewind_to(self, keep: int) -> int:
        """Drop cached tokens past ``keep``; returns how many are kept (0 if the cache can't trim)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        extra = len(self.cached_tokens) - keep
        if extra > 0:
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, extra)
            else:
                self.cache = make_prompt_cache(self.model)
                keep = 0
        self.cached_tokens = self.cached_tokens[:keep]
        return keep

    def send(self, message: str) -> Iterator[str]:
        """Stream the reply to ``message`` and remember both in the history."""
        full = build_prompt(self.tokenizer, message, self.system, None, self.history)
        keep = min(common_prefix_length(self.cached_tokens, full), len(full) - 1)
        keep = self._rewind_to(keep)
        self.last_reused = keep
        stats = GenerationStats()
        reply = []
        for text in stream_tokens(self.model, self.tokenizer, full[keep:], self.options,
                                  self._config_for(len(full), keep), prompt_cache=self.cache, stats=stats):
            reply.append(text)
            yield text
        seen = full + stats.tokens
        self.cached_tokens = seen[: self.cache[0].offset] if self.cache else []
        self.history += [{"role": "user", "content": message},
                         {"role": "assistant", "content": "".join(reply)}]
        self.last_stats = stats

    def _config_for(self, total: int, keep: int) -> dict:
        """Context checks must count the cached part of the conversation too."""
        from mlx_elm.generation import context_length

        limit = context_length(self.config)
        return {} if limit is None else {"max_context_length": limit - keep}
