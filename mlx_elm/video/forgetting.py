"""Forgetting: the decoder's text-only perplexity before (base) and after (base + video adapters)."""

from __future__ import annotations

import time
from typing import Callable

from mlx_elm.loading import load_with_info
from mlx_elm.video import textdata


def measure_forgetting(assistant, log: Callable[[str], None] = print) -> dict:
    """Perplexity of held-out prose and of the base model's own answers to held-out prompts,
    for the base decoder and for the tuned one (relative change in percent)."""
    t0 = time.time()
    base, tok, _ = load_with_info(assistant.cfg.decoder)
    tuned = assistant.decoder.base
    answers = textdata.self_distill(base, tok, textdata.HELDOUT_PROMPTS)
    out = {}
    for name, model in (("base", base), ("tuned", tuned)):
        out[name] = {"prose_ppl": textdata.prose_perplexity(model, tok),
                     "answer_ppl": textdata.answer_perplexity(model, tok, textdata.HELDOUT_PROMPTS, answers)}
    for k in ("prose_ppl", "answer_ppl"):
        out[f"{k}_change_pct"] = 100.0 * (out["tuned"][k] / out["base"][k] - 1.0)
    out["seconds"] = time.time() - t0
    log(f"forgetting: prose ppl {out['base']['prose_ppl']:.2f} -> {out['tuned']['prose_ppl']:.2f} "
        f"({out['prose_ppl_change_pct']:+.1f}%), answer ppl {out['base']['answer_ppl']:.2f} -> "
        f"{out['tuned']['answer_ppl']:.2f} ({out['answer_ppl_change_pct']:+.1f}%)")
    return out
