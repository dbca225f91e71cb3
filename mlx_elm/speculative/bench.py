"""``mlx-elm bench generate --draft lookup|MODEL``: speculative vs plain decoding on the task set.

Each task's prompt is prefilled once (``mlx_elm.kv.prefill``); every run starts from a fresh copy
of that state under the chosen KV policy, so plain and speculative runs decode from the same
cache and their greedy outputs can be compared token for token. Runs alternate plain /
speculative (and reverse the order every other round) so a machine whose speed drifts hits both
alike; only ratios from one run are meaningful on a shared machine.

Decode tokens/s counts the tokens after the first (which the prompt's logits give) over the time
from the first token to the last, for both modes alike. Greedy only: speculative sampling keeps
the distribution, not the tokens, so its outputs cannot be compared one to one.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_elm import kv
from mlx_elm.generation import SamplingOptions, build_prompt, context_length
from mlx_elm.speculative import make_proposer
from mlx_elm.speculative.distribution import SamplingRule
from mlx_elm.speculative.loop import SpeculativeStats, speculative_decode
from mlx_elm.speculative.tasks import Task


@dataclass
class Run:
    mode: str  # "plain" or "speculative"
    tokens: List[int]
    seconds: float  # from the first token to the last
    stats: Optional[SpeculativeStats] = None

    @property
    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.seconds if len(self.tokens) > 1 and self.seconds > 0 else float("nan")


@dataclass
class TaskResult:
    task: Task
    prompt_tokens: int
    policy: str = "full"
    plain: List[Run] = field(default_factory=list)
    speculative: List[Run] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        ref = self.plain[0].tokens
        return all(r.tokens == ref for r in self.plain + self.speculative)

    @property
    def ratio(self) -> float:
        """Median over rounds of speculative / plain decode tokens/s (paired within a round)."""
        return statistics.median(s.decode_tps / p.decode_tps for p, s in zip(self.plain, self.speculative))

    @property
    def stats(self) -> SpeculativeStats:
        total = SpeculativeStats()
        for r in self.speculative:
            total.add(r.stats)
        return total


def plain_run(model, caches, logits, max_tokens: int, eos: set) -> Run:
    """Greedy plain decoding (mlx-lm's ``generate_step``) from a prefilled cache and its last logits."""
    y = int(mx.argmax(logits, axis=-1).item())
    tokens = [y]
    tic = time.perf_counter()
    if y not in eos and max_tokens > 1:
        for t, _ in generate_step(mx.array([y], dtype=mx.uint32), model, prompt_cache=caches,
                                  max_tokens=max_tokens - 1):
            tokens.append(int(t))
            if t in eos:
                break
    return Run("plain", tokens, time.perf_counter() - tic)


def speculative_run(model, caches, logits, prompt, proposer, rule, max_tokens: int, num_draft: int, eos: set) -> Run:
    """Speculative decoding from the same state (``prompt`` is what the cache holds)."""
    stats = SpeculativeStats()
    tokens, tic = [], None
    steps = speculative_decode(model, caches, logits, prompt, proposer, rule, max_tokens, num_draft, stats=stats)
    for t, _, _ in steps:
        if tic is None:
            tic = time.perf_counter()
        tokens.append(t)
        if t in eos:
            break
    steps.close()
    return Run("speculative", tokens, time.perf_counter() - tic, stats)


def policy_label(options: kv.KVOptions) -> str:
    return f"{options.policy} {options.describe()}".strip()


def run(model, tokenizer, tasks: Sequence[Task], draft, num_draft: Optional[int] = None, gen_tokens: int = 96,
        rounds: int = 1, policies: Sequence[kv.KVOptions] = (), config: Optional[dict] = None,
        progress: Optional[Callable[[str], None]] = None) -> List[TaskResult]:
    """Plain and speculative greedy decoding of every task under every KV policy (default: the full
    cache), alternating, all from one prefill per task."""
    rule = SamplingRule(SamplingOptions())
    policies = list(policies) or [kv.KVOptions()]
    eos = set(getattr(tokenizer, "eos_token_ids", ()) or ())
    limit = context_length(config or {})
    proposer, k = make_proposer(draft, model, tokenizer, rule, num_draft)  # a draft model is loaded once
    window = max([o.window for o in policies if o.policy == "snapkv"] or [1])  # only SnapKV reads window queries
    results = []
    for task in tasks:
        prompt = build_prompt(tokenizer, task.prompt)
        budget = gen_tokens if limit is None else max(1, min(gen_tokens, limit - len(prompt)))
        pre = kv.prefill(model, prompt, window=min(window, len(prompt) - 1))
        mx.eval(pre.logits)
        for options in policies:
            result = TaskResult(task, len(prompt), policy_label(options))
            extra = {k_: v for k_, v in vars(options).items() if k_ != "policy"}
            for r in range(rounds):
                order = ("plain", "speculative") if r % 2 == 0 else ("speculative", "plain")
                for mode in order:
                    caches = pre.caches(model, options.policy, **extra)
                    if mode == "plain":
                        result.plain.append(plain_run(model, caches, pre.logits, budget, eos))
                    else:
                        if proposer.kind == "lookup":  # it learns acceptance rates: every run starts afresh
                            proposer, k = make_proposer(draft, model, tokenizer, rule, num_draft)
                        result.speculative.append(speculative_run(model, caches, pre.logits, prompt, proposer, rule,
                                                               budget, k, eos))
                    del caches
                    mx.clear_cache()
                    if progress:
                        progress(f"{task.id} {result.policy} {mode}")
            results.append(result)
        del pre
    return results


def summarize(results: Iterable[TaskResult]) -> Dict[tuple, dict]:
    """Per (task kind, KV policy): decode tokens/s of both modes (all tokens over all time), their
    ratio, the median per-task ratio, acceptance, accepted per verification, identical outputs."""
    groups: Dict[tuple, List[TaskResult]] = {}
    for r in results:
        groups.setdefault((r.task.kind, r.policy), []).append(r)
    out = {}
    for key, rs in groups.items():
        def tps(attr):
            runs = [x for r in rs for x in getattr(r, attr)]
            return sum(len(x.tokens) - 1 for x in runs) / sum(x.seconds for x in runs)

        stats = SpeculativeStats()
        for r in rs:
            stats.add(r.stats)
        plain, spec = tps("plain"), tps("speculative")
        out[key] = dict(tasks=len(rs), plain_tps=plain, speculative_tps=spec, ratio=spec / plain,
                        median_task_ratio=statistics.median(r.ratio for r in rs),
                        acceptance=stats.acceptance_rate, accepted_per_verification=stats.accepted_per_verification,
                        tokens_per_pass=stats.tokens_per_pass, identical=sum(r.identical for r in rs))
    return out


def table(results: List[TaskResult]) -> List[str]:
    """Markdown rows per task (and policy), then one summary row per task kind (and policy)."""
    rows = ["| task | kind | KV | prompt | tokens | plain tok/s | spec tok/s | spec ÷ plain | accepted | per verification "
            "| tokens/pass | identical |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        s = r.stats
        rows.append(f"| {r.task.id} | {r.task.kind} | {r.policy} | {r.prompt_tokens} | {len(r.plain[0].tokens)} | "
                    f"{statistics.median(x.decode_tps for x in r.plain):.2f} | "
                    f"{statistics.median(x.decode_tps for x in r.speculative):.2f} | {r.ratio:.2f}x | "
                    f"{100 * s.acceptance_rate:.0f}% | {s.accepted_per_verification:.2f} | {s.tokens_per_pass:.2f} | "
                    f"{'yes' if r.identical else 'NO'} |")
    for (kind, policy), s in summarize(results).items():
        rows.append(f"| **all {kind}** ({s['tasks']}) | {kind} | {policy} | | | {s['plain_tps']:.2f} | "
                    f"{s['speculative_tps']:.2f} | **{s['ratio']:.2f}x** (median {s['median_task_ratio']:.2f}x) | "
                    f"{100 * s['acceptance']:.0f}% | {s['accepted_per_verification']:.2f} | {s['tokens_per_pass']:.2f} | "
                    f"{s['identical']}/{s['tasks']} |")
    return rows
