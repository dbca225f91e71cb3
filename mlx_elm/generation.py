"""Text generation: prompt building, option checks, and streaming on top of mlx-lm's loop.

``generate(model, tokenizer, prompt, ...)`` and ``stream_generate(...)`` are the one-call API
(exported at the package top, keyword names as in mlx-lm where the meaning is the same); the
pieces below them (``SamplingOptions``, ``prompt_tokens``, ``stream_tokens``) serve the CLI, chat
and the benchmarks. The loop accepts an external ``prompt_cache`` so KV-cache policies
(``mlx_elm.kv``) plug in, and so a chat session can keep its cache between turns.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_elm import kv, speculative
from mlx_elm.errors import GenerationError, SpeculativeError

MAX_TOKENS = 2**31 - 1


@dataclass
class SamplingOptions:
    """Sampling settings; ``validate`` turns bad values into one-line errors."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    def validate(self) -> "SamplingOptions":
        finite = all(math.isfinite(v) for v in (self.temp, self.top_p, self.min_p, self.repetition_penalty))
        checks = [
            (finite, "--temp, --top-p, --min-p and --repetition-penalty must be finite numbers"),
            (1 <= self.max_tokens <= MAX_TOKENS, f"--max-tokens must be in [1, {MAX_TOKENS}] (got {self.max_tokens})"),
            (0 <= self.temp <= 100, f"--temp must be >= 0 (got {self.temp}); use 0 for greedy decoding"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p}); use 1 to disable"),
            (0 <= self.top_k <= MAX_TOKENS, f"--top-k must be >= 0 (got {self.top_k}); use 0 to disable"),
            (0 <= self.min_p < 1, f"--min-p must be in [0, 1) (got {self.min_p}); use 0 to disable"),
            (0 < self.repetition_penalty <= 100,
             f"--repetition-penalty must be > 0 (got {self.repetition_penalty}); use 1 to disable"),
            (self.seed is None or 0 <= self.seed < 2**32, f"--seed must be in [0, 2^32) (got {self.seed})"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)
        return self

    def sampler(self):
        return make_sampler(
            temp=self.temp,
            top_p=self.top_p if self.top_p < 1 else 0.0,
            min_p=self.min_p,
            top_k=self.top_k,
        )

    def logits_processors(self) -> list:
        penalty = self.repetition_penalty if self.repetition_penalty != 1.0 else None
        return make_logits_processors(repetition_penalty=penalty)


def context_length(config: dict) -> Optional[int]:
    """The model's context window from its config, if it states one."""
    for key in ("max_context_length", "max_position_embeddings", "n_ctx", "max_seq_len"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return context_length(text) if isinstance(text, dict) else None


def build_prompt(
    tokenizer,
    prompt: str,
    system: Optional[str] = None,
    chat_template: Optional[bool] = None,
    history: Optional[Sequence[dict]] = None,
) -> List[int]:
    """Token ids for ``prompt``: through the chat template when there is one (or when asked)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    use_template = has_template if chat_template is None else chat_template
    if use_template and not has_template:
        raise GenerationError("this tokenizer has no chat template; pass --no-chat-template")
    if not use_template:
        if system:
            prompt = f"{system}\n\n{prompt}"
        return list(tokenizer.encode(prompt))
    messages = [{"role": "system", "content": system}] if system else []
    messages += list(history or []) + [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


Prompt = Union[str, Sequence[dict], Sequence[int], mx.array]


def prompt_tokens(tokenizer, prompt: Prompt, system: Optional[str] = None,
                  chat_template: Optional[bool] = None) -> List[int]:
    """Token ids for a prompt given as text, as chat messages, or already as token ids."""
    if isinstance(prompt, str):
        return build_prompt(tokenizer, prompt, system, chat_template)
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        if any("role" not in m or "content" not in m for m in items):
            raise GenerationError("each chat message needs 'role' and 'content', e.g. {'role': 'user', 'content': 'hi'}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise GenerationError("this tokenizer has no chat template; pass the prompt as text instead of messages")
        messages = ([{"role": "system", "content": system}] if system else []) + items
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return items
    raise GenerationError("prompt must be a string, a list of chat messages, or a list of token ids")


def model_config(model) -> dict:
    """What a model says about itself (its ``args``), for context-length checks."""
    args = getattr(model, "args", None)
    return {k: v for k, v in vars(args).items()} if args is not None else {}


def check_prompt_length(num_prompt: int, options: SamplingOptions, config: dict) -> int:
    """Max new tokens that fit the context; error when the prompt alone does not fit."""
    limit = context_length(config)
    if num_prompt == 0:
        raise GenerationError("the prompt is empty; pass some text")
    if limit is None:
        return options.max_tokens
    if num_prompt >= limit:
        raise GenerationError(
            f"the prompt has {num_prompt} tokens but the model's context is {limit}; shorten the prompt"
        )
    return min(options.max_tokens, limit - num_prompt)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: Optional[str] = None
    tokens: List[int] = field(default_factory=list)
    speculative: Optional["speculative.SpeculativeStats"] = None  # with a draft: what it proposed and kept

    def summary(self) -> str:
        line = (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s | "
            f"peak memory: {self.peak_memory_gb:.3f} GB"
        )
        return line if self.speculative is None else f"{line}\n{self.speculative.summary()}"


def _responses(model, tokenizer, tokens: Sequence[int], options: SamplingOptions, config: Optional[dict],
               prompt_cache: Optional[List[Any]], draft: "speculative.DraftSpec" = None,
               num_draft: Optional[int] = None, context: Sequence[int] = (),
               speculative_stats: Optional["speculative.SpeculativeStats"] = None, **generate_kwargs: Any):
    """mlx-lm's ``GenerationResponse`` stream, after our checks, KV bookkeeping and query taps.

    With ``draft`` (``"lookup"``, a draft model or a proposer) decoding is speculative
    (``mlx_elm.speculative``); ``context`` are the tokens ``prompt_cache`` already holds (earlier
    chat turns), which prompt lookup searches too.
    """
    options.validate()
    max_tokens = check_prompt_length(len(tokens), options, config or {})
    if draft is not None:
        rule = speculative.SamplingRule(options)
        proposer, num_draft = speculative.make_proposer(draft, model, tokenizer, rule, num_draft)
        unsupported = sorted(set(generate_kwargs) - {"prefill_step_size"})
        if unsupported:
            raise SpeculativeError(f"{', '.join(unsupported)} cannot be combined with a draft; drop them or the draft")
    if options.seed is not None:
        mx.random.seed(options.seed)
    if prompt_cache is not None:  # compressing KV policies compress once the prompt is complete
        kv.expect_prompt(prompt_cache, len(tokens))
    taps = kv.query_taps(model) if prompt_cache is not None and kv.wants_queries(prompt_cache) else nullcontext()
    with taps:
        if draft is not None:
            yield from speculative.stream_responses(
                model, tokenizer, tokens, proposer, rule, max_tokens=max_tokens, num_draft=num_draft,
                prompt_cache=prompt_cache, context=context, stats=speculative_stats, **generate_kwargs)
            return
        yield from mlx_lm_stream_generate(
            model,
            tokenizer,
            mx.array(list(tokens), dtype=mx.uint32),
            max_tokens=max_tokens,
            sampler=options.sampler(),
            logits_processors=options.logits_processors(),
            prompt_cache=prompt_cache,
            **generate_kwargs,
        )


def stream_tokens(
    model,
    tokenizer,
    prompt_tokens: Sequence[int],
    options: SamplingOptions,
    config: Optional[dict] = None,
    prompt_cache: Optional[List[Any]] = None,
    stats: Optional[GenerationStats] = None,
    **generate_kwargs: Any,
) -> Iterator[str]:
    """Yield text segments as they are generated; fills ``stats`` when done.

    ``prompt_cache`` (a list of per-layer caches) is updated in place, so a caller can keep it
    across turns or pass a compressed-cache policy. ``draft=`` / ``num_draft=`` / ``context=``
    make decoding speculative (see :func:`_responses`); ``stats.speculative`` then counts it.
    """
    stats = stats if stats is not None else GenerationStats()
    if generate_kwargs.get("draft") is not None:
        stats.speculative = generate_kwargs.setdefault("speculative_stats", speculative.SpeculativeStats())
    response = None
    for response in _responses(model, tokenizer, prompt_tokens, options, config, prompt_cache, **generate_kwargs):
        stats.tokens.append(int(response.token))  # includes a final EOS token
        yield response.text
    if response is not None:
        stats.prompt_tokens = response.prompt_tokens
        stats.prompt_tps = response.prompt_tps
        stats.generation_tokens = response.generation_tokens
        stats.generation_tps = response.generation_tps
        stats.peak_memory_gb = response.peak_memory
        stats.finish_reason = response.finish_reason


def generate_text(model, tokenizer, prompt_tokens: Sequence[int], options: SamplingOptions,
                  config: Optional[dict] = None, **kwargs: Any) -> str:
    """The whole generated text (no streaming)."""
    return "".join(stream_tokens(model, tokenizer, prompt_tokens, options, config, **kwargs))


KVSpec = Union[None, str, Dict[str, Any], "kv.KVOptions"]


def kv_cache_for(model, spec: KVSpec) -> Optional[List[Any]]:
    """A cache list for ``kv=`` (a policy name, a dict of ``make_cache`` options, or ``KVOptions``)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return kv.make_cache(model, spec)
    if isinstance(spec, kv.KVOptions):
        return kv.make_cache(model, **{k: v for k, v in vars(spec).items()})
    if isinstance(spec, dict):
        return kv.make_cache(model, **spec)
    raise GenerationError("kv= takes a policy name ('snapkv'), a dict such as {'policy': 'snapkv', "
                          "'capacity': 1024}, or mlx_elm.kv.KVOptions")


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    system: Optional[str] = None,
    chat_template: Optional[bool] = None,
    kv: KVSpec = None,
    prompt_cache: Optional[List[Any]] = None,
    draft_model: "speculative.DraftSpec" = None,
    num_draft_tokens: Optional[int] = None,
    **generate_kwargs: Any,
):
    """Yield mlx-lm ``GenerationResponse`` pieces (``.text``, ``.token``, speeds, peak memory).

    ``prompt`` is text (wrapped in the chat template when the tokenizer has one), a list of chat
    messages, or token ids. ``kv`` picks a KV-cache policy (``"snapkv"``, or
    ``{"policy": "snapkv", "capacity": 1024}``); ``prompt_cache`` passes a cache list you keep
    (e.g. across turns). Sampling keywords are mlx-lm's ``make_sampler`` / ``make_logits_processors``
    ones.

    ``draft_model`` makes decoding speculative (same greedy tokens, same sampling distribution):
    ``"lookup"`` (prompt lookup, no second model), a draft model with the target's tokenizer (a
    loaded model or a reference), or a ``mlx_elm.speculative`` proposer; ``num_draft_tokens`` caps
    the tokens proposed per verification (mlx-lm's name; default 16 for lookup, 3 for a model).
    Each response's ``from_draft`` says whether its token was a proposal the target accepted.
    """
    options = SamplingOptions(max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed)
    if isinstance(draft_model, str) and draft_model == speculative.LOOKUP:
        speculative.check_lookup_prompt(prompt)
    tokens = prompt_tokens(tokenizer, prompt, system, chat_template)
    if kv is not None and prompt_cache is not None:
        raise GenerationError("pass either kv= (a policy to build a cache with) or prompt_cache=, not both")
    if draft_model is None and num_draft_tokens is not None:
        raise GenerationError("num_draft_tokens= needs draft_model= ('lookup' or a draft model)")
    cache = prompt_cache if prompt_cache is not None else kv_cache_for(model, kv)
    yield from _responses(model, tokenizer, tokens, options, model_config(model), cache, draft=draft_model,
                          num_draft=num_draft_tokens, **generate_kwargs)


def generate(model, tokenizer, prompt: Prompt, *, verbose: bool = False, **kwargs: Any) -> str:
    """The generated text for ``prompt`` (see :func:`stream_generate` for the keywords)::

        model, tokenizer = mlx_elm.load()
        print(mlx_elm.generate(model, tokenizer, "Why is the sky blue?", max_tokens=64))

    ``verbose=True`` streams the text to stdout and prints speeds and peak memory.
    """
    pieces, last, from_draft = [], None, 0
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(last.text)
        from_draft += int(last.from_draft)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | generation: "
              f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
              f"peak memory: {last.peak_memory:.3f} GB")
        if kwargs.get("draft_model") is not None:
            print(f"speculative: {from_draft} of {last.generation_tokens} tokens were accepted proposals")
    return "".join(pieces)
