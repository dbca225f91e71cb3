"""Passkey retrieval with compressed KV caches on the embedded SmolLM2-135M-Instruct.

A 5-digit pass key is hidden at a given depth inside repetitive filler; the prompt ends with the
question and the forced answer prefix "The pass key is", so every digit is decoded from the
(compressed) cache. Each prompt is prefilled ONCE; every policy then starts from a copy of that
prefill and compresses it, so the methods differ only in which rows they keep.

Scores per method: exact match (every digit is the top-1 prediction under teacher forcing), the
summed log-probability of the digits, and the mean KL(full || method) of the next-token
distributions over the answer continuation (digits and the final period).

    python examples/kv_passkey_eval.py                      # 1K, 2K, 4K x depths 10/50/90%
    python examples/kv_passkey_eval.py --lengths 8192 --depths 0.5
    python examples/kv_passkey_eval.py --fast               # a ~300-token smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import mlx.core as mx
from tqdm import tqdm

import mlx_elm
from mlx_elm import kv

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
TASK = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it."
QUESTION = "What is the pass key?"
PREFIX = "The pass key is"


@dataclass
class Row:
    length: int
    depth: float
    method: str
    budget: int
    exact: bool
    digit_logprob: float
    kl: float


def build(tok, target_len: int, depth: float, key: str):
    """(prompt ids, answer ids) with about ``target_len`` prompt tokens."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

    def ids(n_filler: int) -> List[int]:
        at = int(round(n_filler * depth))
        hay = FILLER * at + needle + FILLER * (n_filler - at)
        msgs = [{"role": "user", "content": f"{TASK}\n\n{hay}\n{QUESTION}"}]
        return list(tok.apply_chat_template(msgs, add_generation_prompt=True)) + list(tok.encode(PREFIX))

    per = len(tok.encode(FILLER))
    n = max(1, (target_len - len(ids(0))) // per)
    return ids(n), list(tok.encode(" " + key + "."))


def methods(budgets: List[int], window: int) -> Dict[str, dict]:
    out = {"full": dict(policy="full")}
    for c in budgets:
        out[f"snapkv C={c}"] = dict(policy="snapkv", capacity=c, window=window, kernel=7, pool="max")
        out[f"snapkv-nopool C={c}"] = dict(policy="snapkv", capacity=c, window=window, kernel=1)
        out[f"streaming C={c}"] = dict(policy="streaming", capacity=c)
    return out


def score(model, pre: kv.Prefill, answer: List[int], spec: dict):
    """Log-prob rows (one per answer token) decoding from ``pre`` under one policy."""
    caches = pre.caches(model, **spec)
    rows = [pre.logits]
    for t in answer[:-1]:
        rows.append(model(mx.array([[t]]), cache=caches)[:, -1])
    logits = mx.concatenate(rows).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def evaluate(model, tok, lengths, depths, budgets, window=32, chunk=512, seed=0) -> List[Row]:
    rng = random.Random(seed)
    specs = methods(budgets, window)
    cells = [(L, d) for L in lengths for d in depths]
    rows: List[Row] = []
    bar = tqdm(cells, desc="passkey", unit="prompt")
    for L, depth in bar:
        key = str(rng.randint(10000, 99999))
        prompt, answer = build(tok, L, depth, key)
        bar.set_postfix(tokens=len(prompt))
        pre = kv.prefill(model, prompt, window, chunk)
        digits = mx.array(answer)
        ref = None
        for name, spec in specs.items():
            lp = score(model, pre, answer, spec)
            if ref is None:
                ref = lp
            # rows 1..len(key) predict the digits (row 0 predicts the space, from the prompt)
            dig = lp[1: 1 + len(key)]
            exact = bool(mx.all(mx.argmax(dig, axis=-1) == digits[1: 1 + len(key)]).item())
            dlp = float(mx.take_along_axis(dig, digits[1: 1 + len(key), None], axis=-1).sum().item())
            p = mx.exp(ref[1:])
            kl = float((p * (ref[1:] - lp[1:])).sum(axis=-1).mean().item())
            rows.append(Row(len(prompt), depth, name.split(" ")[0], spec.get("capacity", 0), exact, dlp, kl))
    return rows


def table(rows: List[Row], budgets: List[int]) -> str:
    """Markdown: exact matches per method and length (over depths), mean digit log-prob and KL."""
    def bucket(r):  # prompts land near the requested length (976 tokens for 1K)
        return round(r.length / 1024) * 1024 or r.length

    lengths = sorted({bucket(r) for r in rows})

    names = [("full", 0)] + [(m, c) for c in budgets for m in ("snapkv", "snapkv-nopool", "streaming")]
    head = "| method | C | " + " | ".join(f"~{L} exact" for L in lengths) + " | digit logp | KL(full‖m) |"
    lines = [head, "|" + "---|" * (len(lengths) + 4)]
    for m, c in names:
        sel = [r for r in rows if r.method == m and r.budget == c]
        if not sel:
            continue
        cells = []
        for L in lengths:
            s = [r for r in sel if bucket(r) == L]
            cells.append(f"{sum(r.exact for r in s)}/{len(s)}")
        lp = sum(r.digit_logprob for r in sel) / len(sel)
        kl = sum(r.kl for r in sel) / len(sel)
        lines.append(f"| {m} | {c or '-'} | " + " | ".join(cells) + f" | {lp:.3f} | {kl:.4f} |")
    return "\n".join(lines)


def depth_table(rows: List[Row]) -> str:
    """Markdown: which (length, depth) cells each method got right."""
    cells = sorted({(r.length, r.depth) for r in rows})
    names = list(dict.fromkeys((r.method, r.budget) for r in rows))
    lines = ["| method | C | " + " | ".join(f"{L}@{d:.0%}" for L, d in cells) + " |",
             "|" + "---|" * (len(cells) + 2)]
    for m, c in names:
        marks = []
        for L, d in cells:
            r = next(r for r in rows if (r.method, r.budget, r.length, r.depth) == (m, c, L, d))
            marks.append("✓" if r.exact else "✗")
        lines.append(f"| {m} | {c or '-'} | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def main(argv=None) -> List[Row]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--window", type=int, default=16,
                    help="observation window (16: the paper's needle-in-a-haystack setting)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (smaller is faster on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--fast", action="store_true", help="one ~300-token prompt, budgets 64 and 128")
    args = ap.parse_args(argv)
    if args.fast:
        args.lengths, args.depths, args.budgets = [300], [0.5], [64, 128]
    t0 = time.time()
    model, tok = mlx_elm.load()
    rows = evaluate(model, tok, args.lengths, args.depths, args.budgets, args.window, args.chunk, args.seed)
    print(table(rows, args.budgets))
    print()
    print(depth_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    print(f"{len(rows)} scores over {len(rows) // len(methods(args.budgets, args.window))} prompts in "
          f"{time.time() - t0:.0f} s | peak memory: {mx.get_peak_memory() / 2**30:.3f} GB")
    return rows


if __name__ == "__main__":
    main()
