"""Speed and memory figures users can reproduce: prefill and decode tokens/s, peak memory.

With a peer (mlx-lm's own loader) the two are run alternately in one process, so the ratio holds
even when the machine's speed drifts.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model

from mlx_elm.errors import MlxElmError
from mlx_elm.loading import load_model, resolve_model_path
from mlx_elm.model_folder import write_random_model

RANDOM_PREFIX = "random:"


@dataclass
class RunFigures:
    prefill_tps: float
    decode_tps: float
    peak_gb: float


@dataclass
class BenchSummary:
    name: str
    runs: List[RunFigures] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def time_generation(model, prompt: mx.array, gen_tokens: int, prefill_step: int = 2048) -> RunFigures:
    """One run of mlx-lm's generation loop: time to first token → prefill, the rest → decode."""
    gc.collect()
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    first = None
    for i, _ in enumerate(generate_step(prompt, model, max_tokens=gen_tokens, prefill_step_size=prefill_step)):
        if i == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    weights = sum(v.nbytes for v in _leaves(model))
    peak = mx.get_peak_memory() - base + weights
    decode = (gen_tokens - 1) / (end - first) if gen_tokens > 1 else float("nan")
    return RunFigures(prompt.size / (first - tic), decode, peak / 1e9)


def _leaves(model) -> list:
    return [v for _, v in tree_flatten(model.parameters())]


def bench_generate(
    model_ref: Optional[str],
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    runs: int = 3,
    vs: Optional[str] = None,
    dtype: str = "float32",
    representation: str = "auto",
    progress: Optional[Callable] = None,
) -> Dict[str, BenchSummary]:
    """Median prefill/decode tokens/s and peak memory for ours (and mlx-lm's loader with ``vs``)."""
    if prompt_tokens < 1 or gen_tokens < 2 or runs < 1:
        raise MlxElmError("need --prompt-tokens >= 1, --gen-tokens >= 2 and --runs >= 1")
    if vs not in (None, "mlx-lm"):
        raise MlxElmError(f"unknown peer {vs!r}; the supported peer is --vs mlx-lm")
    tmp = None
    if model_ref and model_ref.startswith(RANDOM_PREFIX):
        tmp = tempfile.TemporaryDirectory(prefix="mlx-elm-bench-")
        path = write_random_model(model_ref[len(RANDOM_PREFIX):], dtype, Path(tmp.name))
    else:
        path = resolve_model_path(model_ref)
    try:
        contenders = {}
        model, config, info = load_model(path, representation)
        contenders[f"mlx-elm ({info.representation})"] = model
        if vs == "mlx-lm":
            contenders["mlx-lm"] = mlx_lm_load_model(path)[0]
        vocab = config.get("vocab_size") or 32000
        rng = np.random.default_rng(0)
        prompt = mx.array(rng.integers(3, vocab, size=prompt_tokens), dtype=mx.uint32)
        results = {name: BenchSummary(name) for name in contenders}
        for name, m in contenders.items():  # warm-up: compile kernels, fault pages in
            time_generation(m, prompt[: min(64, prompt_tokens)], 4)
        for r in range(runs):
            for name, m in contenders.items():  # alternate A B A B so drift hits both
                results[name].runs.append(time_generation(m, prompt, gen_tokens))
                if progress:
                    progress()
        return results
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_table(results: Dict[str, BenchSummary]) -> List[str]:
    rows = [f"{'':26}{'prefill tok/s':>15}{'decode tok/s':>15}{'peak GB':>10}"]
    for name, s in results.items():
        rows.append(f"{name:26}{s.median('prefill_tps'):15.1f}{s.median('decode_tps'):15.1f}"
                    f"{s.median('peak_gb'):10.3f}")
    names = list(results)
    if len(names) == 2:
        a, b = results[names[0]], results[names[1]]
        ratio = lambda attr: statistics.median(  # noqa: E731  pair by pair, then the median
            getattr(x, attr) / getattr(y, attr) for x, y in zip(a.runs, b.runs))
        rows.append(f"{'ratio (ours / mlx-lm)':26}{ratio('prefill_tps'):14.2f}x"
                    f"{ratio('decode_tps'):14.2f}x{ratio('peak_gb'):9.2f}x")
    return rows
