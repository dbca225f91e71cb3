"""Speculative decoding: the same tokens (greedy) or the same distribution (sampling), fewer passes.

Decoding one token reads every weight once; verifying a few proposed tokens in the same forward
pass costs about as much, so each accepted proposal is a step saved. Two kinds of proposal:

* ``"lookup"`` (prompt lookup): continue the longest recent n-gram match in the prompt and the
  text so far. No second model; wins on grounded work (quote, extract, rewrite, edit a file);
  the proposal length follows the measured acceptance, so free text runs at plain speed.
* a draft model (``draft_model=`` a loaded model or a reference; ``--draft MODEL``) with the
  target's vocabulary.

Modules: ``distribution`` (the toolkit's sampling distribution as numbers), ``verify`` (the
accept/reject rule), ``proposers`` and ``adaptive`` (what and how much to propose), ``loop`` (the
decoding loop, stats, the response stream), ``bench`` (``mlx-elm bench generate --draft``).
``mlx_elm.generate(..., draft_model=..., num_draft_tokens=...)`` dispatches here.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from mlx_elm.errors import SpeculativeError
from mlx_elm.loading import load_with_info, resolve_model_path
from mlx_elm.tokenizers import has_tokenizer
from mlx_elm.speculative.adaptive import AcceptanceEstimate, best_length, expected_tokens
from mlx_elm.speculative.distribution import SamplingRule, sampler_filters
from mlx_elm.speculative.loop import (SpeculativeStats, prefill, speculative_decode, speculative_generate_step,
                                      stream_responses)
from mlx_elm.speculative.proposers import Draft, DraftModelProposer, LookupProposer, Proposer
from mlx_elm.speculative.verify import Verdict, verify

LOOKUP = "lookup"
MAX_DRAFT = 64
DEFAULT_NUM_DRAFT = {"lookup": 16, "model": 3}

DraftSpec = Union[None, str, nn.Module, Proposer]

__all__ = [
    "LOOKUP", "MAX_DRAFT", "DEFAULT_NUM_DRAFT", "SamplingRule", "sampler_filters", "verify", "Verdict", "Draft",
    "Proposer", "LookupProposer", "DraftModelProposer", "SpeculativeStats", "prefill", "speculative_decode",
    "speculative_generate_step", "stream_responses", "make_proposer", "check_num_draft", "check_vocabularies",
    "AcceptanceEstimate", "best_length", "expected_tokens",
]


def check_num_draft(num_draft: Optional[int], kind: str) -> int:
    """The proposal length cap K, its default for ``kind`` when None; one-line error out of range."""
    if num_draft is None:
        return DEFAULT_NUM_DRAFT.get(kind, DEFAULT_NUM_DRAFT["model"])
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or not 1 <= num_draft <= MAX_DRAFT:
        raise SpeculativeError(f"--num-draft must be an integer in [1, {MAX_DRAFT}] (got {num_draft!r}); "
                               f"it caps the tokens proposed per verification")
    return num_draft


def _vocabulary(tokenizer) -> Optional[dict]:
    get = getattr(tokenizer, "get_vocab", None)
    try:
        return dict(get()) if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        return None


def output_size(model: nn.Module) -> int:
    """How many token ids the model predicts (from its config, else from a one-token forward)."""
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    return int(model(mx.array([[0]], dtype=mx.uint32)).shape[-1])


def check_vocabularies(target: nn.Module, draft: nn.Module, target_tokenizer=None, draft_tokenizer=None,
                       name: str = "the draft model") -> None:
    """One-line error unless the draft speaks the target's token ids (same tokenizer, same output size)."""
    if target_tokenizer is not None and draft_tokenizer is not None:
        a, b = _vocabulary(target_tokenizer), _vocabulary(draft_tokenizer)
        if a is not None and b is not None and a != b:
            detail = (f"{len(b)} tokens vs the target's {len(a)}" if len(a) != len(b)
                      else f"the same size, but {sum(a.get(t) != i for t, i in b.items())} tokens have other ids")
            raise SpeculativeError(f"{name} has another tokenizer ({detail}); use a draft of the target's "
                                   "family that shares its tokenizer, or --draft lookup")
    t, d = output_size(target), output_size(draft)
    if t != d:
        raise SpeculativeError(f"{name} predicts {d} token ids but the target predicts {t}; use a draft with "
                               "the target's vocabulary, or --draft lookup")


def make_proposer(draft: DraftSpec, model: nn.Module, tokenizer, rule: SamplingRule,
                  num_draft: Optional[int] = None, representation: str = "auto",
                  tokenizer_ref: Optional[str] = None) -> Tuple[Proposer, int]:
    """A proposer and its proposal cap K for ``draft``: ``"lookup"``, a model reference (folder, Hub
    id, alias; loaded with its own tokenizer, or with ``tokenizer_ref`` — the target's
    ``--tokenizer`` — when it ships none, as OpenELM repos do), a loaded model, or a ready
    :class:`Proposer`."""
    if isinstance(draft, str):
        if not draft.strip():
            raise SpeculativeError("--draft is empty; pass lookup or a draft model (folder, Hub id, alias)")
        if draft == LOOKUP:
            return LookupProposer(), check_num_draft(num_draft, "lookup")
        path = resolve_model_path(draft)
        own = has_tokenizer(path) or tokenizer_ref is None
        draft_model, draft_tok, _ = load_with_info(str(path), None if own else tokenizer_ref,
                                                   representation=representation)
        check_vocabularies(model, draft_model, tokenizer, draft_tok, name=f"draft model {draft}")
        return DraftModelProposer(draft_model, rule), check_num_draft(num_draft, "model")
    if isinstance(draft, nn.Module):
        check_vocabularies(model, draft)
        return DraftModelProposer(draft, rule), check_num_draft(num_draft, "model")
    if all(hasattr(draft, m) for m in ("begin", "propose", "feedback")):
        return draft, check_num_draft(num_draft, getattr(draft, "kind", "model"))
    raise SpeculativeError("draft_model= takes 'lookup', a model reference, a loaded model, or a "
                           "mlx_elm.speculative proposer")


def check_lookup_prompt(text: Any) -> None:
    """Prompt lookup copies from the prompt, so an empty one is a mistake worth one line."""
    if isinstance(text, str) and not text.strip():
        raise SpeculativeError("--draft lookup copies continuations from the prompt, which is empty; pass "
                               "the text to work on")
