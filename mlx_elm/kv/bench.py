"""Decode speed and KV bytes, full cache vs SnapKV, on a random-weight OpenELM-shaped model.

Each prompt length is prefilled once (random tokens); the full cache and the SnapKV cache are
built from that same prefill, then each decodes ``tokens`` greedy steps. Only ratios measured in
one run are meaningful on a shared machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
from tqdm import tqdm

from mlx_elm.kv.prefill import prefill
from mlx_elm.kv.registry import options
from mlx_elm.kv.report import cache_nbytes
from mlx_elm.model_folder import random_model_args
from mlx_elm.models.openelm import Model


@dataclass
class KVBenchRow:
    prompt: int
    policy: str
    decode_tps: float
    kv_bytes: int


def random_openelm(preset_name: str = "OpenELM-270M", seed: int = 0):
    """A float32 OpenELM with the preset's shapes and random weights (speed only)."""
    mx.random.seed(seed)
    model = Model(random_model_args(preset_name))
    mx.eval(model.parameters())
    return model


def _decode_tps(model, caches, first: mx.array, tokens: int, warmup: int = 1) -> float:
    y = first
    for i in range(warmup + tokens):
        if i == warmup:
            mx.eval(y)
            start = time.perf_counter()
        logits = model(y.reshape(1, 1), cache=caches)
        y = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(y)
    return tokens / (time.perf_counter() - start)


def run(model, lengths: Sequence[int], capacity: int = 1024, window: int = 32, tokens: int = 16,
        chunk: int = 512, bits: Optional[int] = None, seed: int = 0, rounds: int = 3,
        progress: Optional[Callable[[str], None]] = None) -> List[KVBenchRow]:
    """Rows for every prompt length: full and SnapKV(capacity) decode tokens/s and KV bytes.

    All prompts are prefilled first; then ``rounds`` interleaved timing rounds run every
    (length, policy) pair and the best round counts, so background load hits all pairs alike.
    """
    vocab = model.args.vocab_size
    runs = []  # (L, name, caches, first, nbytes)
    for L in lengths:
        prompt = mx.random.randint(0, vocab, (1, L), key=mx.random.key(seed + L))
        pre = prefill(model, prompt, window=window, chunk=chunk)
        first = mx.argmax(pre.logits, axis=-1)
        for name, caches in (("full", pre.caches(model, "full")),
                             (f"snapkv C={capacity}", pre.caches(model, "snapkv", capacity=capacity,
                                                                 window=window, bits=bits))):
            mx.eval([c.state for c in caches], first)
            runs.append((L, name, caches, first, cache_nbytes(caches)))
        del pre
        mx.clear_cache()
        if progress:
            progress(f"prefilled {L}")
    best = {}
    for r in range(rounds):
        for L, name, caches, first, _ in runs:
            tps = _decode_tps(model, caches, first, tokens)
            best[(L, name)] = max(best.get((L, name), 0.0), tps)
        if progress:
            progress(f"round {r + 1}/{rounds}")
    return [KVBenchRow(L, name, best[(L, name)], nbytes) for L, name, _, _, nbytes in runs]


def table(rows: List[KVBenchRow]) -> str:
    """Markdown with the ratios the issue asks for (SnapKV vs full; vs full at the shortest prompt)."""
    lengths = sorted({r.prompt for r in rows})
    get = {(r.prompt, r.policy.split(" ")[0]): r for r in rows}
    base = get[(lengths[0], "full")].decode_tps
    out = ["| prompt | full tok/s | SnapKV tok/s | SnapKV ÷ full | SnapKV ÷ full@%d | full KV MB | SnapKV KV MB | bytes SnapKV ÷ full |" % lengths[0],
           "|---|---|---|---|---|---|---|---|"]
    for L in lengths:
        f, s = get[(L, "full")], get[(L, "snapkv")]
        out.append(f"| {L} | {f.decode_tps:.2f} | {s.decode_tps:.2f} | {s.decode_tps / f.decode_tps:.2f} | "
                   f"{s.decode_tps / base:.2f} | {f.kv_bytes / 2**20:.1f} | {s.kv_bytes / 2**20:.1f} | "
                   f"{s.kv_bytes / f.kv_bytes:.3f} |")
    return "\n".join(out)


def run_report(lengths: Sequence[int], capacity: int, window: int, bits: Optional[int], tokens: int, chunk: int,
               preset_name: str, rounds: int, seed: int) -> List[str]:
    """``mlx-elm bench kv``: validate, build the model, run with a progress bar, return the lines to print."""
    options("snapkv", capacity=capacity, window=window, bits=bits)
    t0 = time.time()
    model = random_openelm(preset_name, seed)
    with tqdm(total=len(lengths) + rounds, desc="bench kv", unit="run") as bar:
        def progress(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)

        rows = run(model, lengths, capacity, window, tokens, chunk, bits, seed, rounds, progress)
    return [table(rows), f"{preset_name} (random weights, float32), {len(rows)} runs in {time.time() - t0:.0f} s | "
                         f"peak memory: {mx.get_peak_memory() / 2**30:.3f} GB"]
