"""Replay greedy outputs to compare proposers without running the model again.

Greedy decoding is deterministic, so once plain decoding has produced a task's answer, any proposer
can be scored offline: propose from the history, accept the prefix that matches the true
continuation, move on. That gives tokens per target pass exactly, and a modelled speed-up under
a verification cost of ``1 + beta * k`` per pass of k proposed tokens (measure beta for your
machine; ~0.1 for SmolLM2-135M float32 on a 2-core x86 CPU, smaller on a Mac GPU).

Compared here: prompt lookup with the adaptive length (what ``--draft lookup`` ships), with a
fixed length, an n-gram language model fitted on the history (most frequent continuation with
backoff — the optional third draft kind of issue 16), and an oracle that proposes exactly the
tokens lookup would get accepted (the ceiling of any length controller).

    python examples/speculative_replay.py                       # the shipped task set, embedded model
    python examples/speculative_replay.py --outputs runs/outputs.json   # reuse collected answers
    python examples/speculative_replay.py --fast                # a tiny random model, seconds
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import mlx.core as mx

from mlx_elm.platform import maybe_reexec_with_fast_blas


class NgramLMProposer:
    """An n-gram LM of the history (counts of every context of length 1..n): proposes the most
    frequent continuation, token by token with backoff; length chosen like lookup's."""

    kind = "ngram-lm"

    def __init__(self, max_ngram: int = 4, **lookup_options):
        from mlx_elm.speculative import LookupProposer

        self.max_ngram = max_ngram
        self.lookup = LookupProposer(max_ngram=max_ngram, **lookup_options)  # length control and feedback
        self.counts: Dict[tuple, Counter] = defaultdict(Counter)
        self.seen = 0

    def begin(self, history: Sequence[int]) -> None:
        self.lookup.begin(history)

    def feedback(self, proposed: int, accepted: int) -> None:
        self.lookup.feedback(proposed, accepted)

    def propose(self, history: Sequence[int], max_len: int):
        from mlx_elm.speculative.proposers import Draft

        for p in range(max(self.seen, 1), len(history)):
            for n in range(1, min(self.max_ngram, p) + 1):
                self.counts[tuple(history[p - n: p])][history[p]] += 1
        self.seen = len(history)
        k = len(self.lookup.propose(history, max_len))
        context, out = list(history), []
        for _ in range(k):
            for n in range(min(self.max_ngram, len(context)), 0, -1):
                c = self.counts.get(tuple(context[-n:]))
                if c:
                    out.append(c.most_common(1)[0][0])
                    context.append(out[-1])
                    break
            else:
                break
        return Draft(mx.array(out, dtype=mx.uint32))


def replay(outputs: List[dict], make: Callable, max_len: int, beta: float, oracle: bool = False) -> tuple:
    """(tokens per pass, modelled speed-up) over ``outputs`` ({"prompt": ids, "output": ids})."""
    tokens = passes = cost = 0.0
    for item in outputs:
        history, out = list(item["prompt"]), item["output"]
        proposer = make()
        proposer.begin(history)
        history.append(out[0])
        pos = 0
        while pos + 1 < len(out):
            draft = proposer.propose(history, min(max_len, len(out) - pos - 2)).tokens.tolist()
            truth = out[pos + 1: pos + 1 + len(draft)]
            n = 0
            while n < len(draft) and n < len(truth) and draft[n] == truth[n]:
                n += 1
            proposer.feedback(len(draft), n)
            history.extend(out[pos + 1: pos + 2 + n])
            pos += n + 1
            passes += 1
            cost += 1 + beta * (n if oracle else len(draft))
        tokens += len(out) - 1
    return tokens / passes, tokens / cost


def collect(fast: bool, kinds: Sequence[str], gen_tokens: int) -> Dict[str, List[dict]]:
    """Plain greedy answers per task kind (the bench's prefill and plain loop)."""
    import mlx_elm
    from mlx_elm import kv
    from mlx_elm.generation import build_prompt
    from mlx_elm.speculative.bench import plain_run
    from mlx_elm.speculative.tasks import load_tasks

    if fast:
        import tempfile

        from mlx_elm.train.tiny import make_tiny_openelm, train_tiny_spm

        tmp = Path(tempfile.mkdtemp())
        model, tok = mlx_elm.load(str(make_tiny_openelm(tmp / "m", train_tiny_spm(tmp / "spm"), seed=3)))
        prompts = {"grounded": ["the sky is blue because light from the sun scatters in the air " * 4],
                   "chat": ["a small model learns fast on a device near the river"]}
        encode = lambda text: list(tok.encode(text))  # noqa: E731
    else:
        model, tok = mlx_elm.load()
        prompts = defaultdict(list)
        for task in load_tasks(kinds=kinds):
            prompts[task.kind].append(task.prompt)
        encode = lambda text: build_prompt(tok, text)  # noqa: E731
    eos = set(tok.eos_token_ids)
    out: Dict[str, List[dict]] = {}
    for kind in kinds:
        for text in prompts.get(kind, []):
            prompt = encode(text)
            pre = kv.prefill(model, prompt, window=min(32, len(prompt) - 1))
            run = plain_run(model, pre.caches(model, "full"), pre.logits, gen_tokens, eos)
            out.setdefault(kind, []).append({"prompt": prompt, "output": run.tokens})
            print(f"[collect] {kind}: {len(prompt)} prompt tokens -> {len(run.tokens)} tokens", flush=True)
    return out


def main(argv: Sequence[str] = None) -> Dict[tuple, list]:
    """Prints the comparison table; returns {(kind, beta): [(tokens/pass, speed-up) per column]}."""
    from mlx_elm.speculative import LookupProposer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="tiny random model and prompts (a smoke test)")
    ap.add_argument("--tasks", default="grounded,chat")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--outputs", type=Path, help="JSON of collected answers: read if it exists, else written")
    ap.add_argument("--max-len", type=int, default=16)
    ap.add_argument("--betas", default="0.05,0.1,0.2")
    args = ap.parse_args(argv)
    kinds = [k for k in args.tasks.split(",") if k]
    if args.outputs is not None and args.outputs.exists():
        outputs = json.loads(args.outputs.read_text())
    else:
        outputs = collect(args.fast, kinds, 16 if args.fast else args.gen_tokens)
        if args.outputs is not None:
            args.outputs.parent.mkdir(parents=True, exist_ok=True)
            args.outputs.write_text(json.dumps(outputs))
    K = args.max_len
    results = {}
    print(f"| kind | beta | lookup, adaptive | lookup, fixed K={K} | n-gram LM, adaptive | oracle length |")
    print("|---|---:|---|---|---|---|")
    for kind in kinds:
        items = outputs.get(kind, [])
        if not items:
            continue
        for beta in (float(b) for b in args.betas.split(",")):
            cells = [replay(items, lambda: LookupProposer(cost_per_token=beta), K, beta),
                     replay(items, lambda: LookupProposer(adaptive=False), K, beta),
                     replay(items, lambda: NgramLMProposer(cost_per_token=beta), K, beta),
                     replay(items, lambda: LookupProposer(adaptive=False), K, beta, oracle=True)]
            results[(kind, beta)] = cells
            print(f"| {kind} ({len(items)}) | {beta} | " + " | ".join(f"{t:.2f} tok/pass, {s:.2f}x" for t, s in cells)
                  + " |")
    return results


if __name__ == "__main__":
    maybe_reexec_with_fast_blas()
    main()
