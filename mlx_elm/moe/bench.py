"""``mlx-elm bench moe``: one MoE layer's speed and memory, SMoE vs MH-MoE vs a dense FFN.

Every layer is sized by the v2 rule (``mlx_elm.models.openelm_moe``) so that all of them cost the
same FLOPs per token as the dense SwiGLU FFN of the SMoE's expert width; the question is how close
each dispatch gets to that ideal. Timed: forward, and forward + backward (gradients of all
weights), at 1 token (decode) and 2,048 tokens (prefill), for both expert dispatches (``gather``:
mlx-lm's switch layers; ``blocked``: expert-sorted blocks of real matrix products), each layer
compiled, the best of ``runs`` interleaved rounds. Routers are random, so loads are roughly even.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu

from mlx_elm.errors import MoEError
from mlx_elm.models import openelm_moe
from mlx_elm.models.moe import DISPATCHES, MHMoE, SparseMoE
from mlx_elm.platform import backend_name, expert_dispatch

LAYERS = ("dense", "smoe", "fine-grained", "mhmoe-h2", "mhmoe-h3", "mhmoe-h4")
MODES = ("forward", "forward+backward")


class DenseFFN(nn.Module):
    """The dense SwiGLU FFN of equal active FLOPs (the SMoE's expert, applied to every token)."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@dataclass
class BenchRow:
    layer: str
    experts: int
    top_k: int
    heads: int
    dispatch: str
    tokens: int
    mode: str
    ms: float
    tokens_per_second: float
    peak_memory_mb: float  # allocated by the call, above the resident weights
    gflops: float  # matmul FLOPs of one call (forward) at this size

    def as_dict(self) -> dict:
        return asdict(self)


def build_layer(name: str, dims: int, experts: int, ffn: int) -> nn.Module:
    """One layer of the v2-sized family around an SMoE of ``experts`` x SwiGLU(``ffn``), top-1."""
    if name == "dense":
        return DenseFFN(dims, ffn)
    if name == "smoe":
        return SparseMoE(dims, experts, ffn, top_k=1)
    if name == "fine-grained":
        s = openelm_moe.fine_grained_sizing(experts, 1, ffn)
        return SparseMoE(dims, s["num_experts"], s["expert_ffn_dim"], top_k=s["top_k"])
    if name.startswith("mhmoe-h"):
        heads = int(name[len("mhmoe-h"):])
        if dims % heads:
            raise MoEError(f"--dim {dims} is not divisible by {heads} heads; drop {name} or change --dim")
        s = openelm_moe.v2_sizing(dims, experts, 1, ffn, heads)
        return MHMoE(dims, heads, s["num_experts"], s["expert_ffn_dim"], top_k=s["top_k"])
    raise MoEError(f"unknown layer {name!r}; choose among {', '.join(LAYERS)}")


def _inner(layer: nn.Module) -> Optional[SparseMoE]:
    return layer.moe if isinstance(layer, MHMoE) else layer if isinstance(layer, SparseMoE) else None


def _shape(layer: nn.Module) -> tuple:
    inner = _inner(layer)
    if inner is None:
        return 0, 0, 0
    return inner.num_experts, inner.top_k, layer.heads if isinstance(layer, MHMoE) else 1


def layer_gflops(layer: nn.Module, dims: int, tokens: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward call."""
    if isinstance(layer, DenseFFN):
        return 2 * 3 * dims * layer.up_proj.weight.shape[0] * tokens / 1e9
    inner = _inner(layer)
    e, k, h = _shape(layer)
    hidden = inner.experts.up_proj.weight.shape[1]
    flops = 2 * 3 * dims * hidden * k * tokens + 2 * dims * e * tokens
    if isinstance(layer, MHMoE):
        flops += 2 * 2 * dims * dims * tokens
    return flops / 1e9


def _set_dispatch(layer: nn.Module, dispatch: str) -> None:
    inner = _inner(layer)
    if inner is not None:
        inner.dispatch = dispatch


def _prepare(layer: nn.Module, dims: int, tokens: int, mode: str) -> Callable[[], object]:
    """A compiled call of ``layer`` on ``tokens`` rows (forward, or value and weight gradients)."""
    x = mx.random.normal((1, tokens, dims))
    if mode == "forward":
        fn = mx.compile(lambda x: layer(x))
    else:
        cot = mx.random.normal((1, tokens, dims))
        grad = nn.value_and_grad(layer, lambda x: (layer(x) * cot).sum())
        fn = mx.compile(lambda x: grad(x), inputs=[layer.state], outputs=[layer.state])
    mx.eval(x)
    return lambda: fn(x)


def _time_once(call: Callable[[], object]) -> Tuple[float, int]:
    """Seconds of one call, and the peak memory it allocated above what was already resident
    (every layer of the benchmark stays loaded, so the process peak would not say much)."""
    mx.synchronize()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    mx.eval(call())
    return time.perf_counter() - tic, max(0, mx.get_peak_memory() - resident)


def bench_moe(layers: Sequence[str] = LAYERS, dims: int = 768, experts: int = 8, ffn: int = 2048,
              tokens: Sequence[int] = (1, 2048), modes: Sequence[str] = MODES,
              dispatches: Sequence[str] = ("gather", "blocked"), runs: int = 3, seed: int = 0,
              progress: Optional[Callable[[int], None]] = None) -> List[BenchRow]:
    """Time every (layer, dispatch, tokens, mode); dense rows carry dispatch ``-``.

    Rows are timed in interleaved rounds (each round calls every row once, after one warm-up
    call), and the best round counts, so a load spike on a shared machine hits one round of every
    row rather than all rounds of one row.
    """
    for d in dispatches:
        if d not in DISPATCHES or d == "auto":
            raise MoEError(f"unknown --dispatch {d!r}; choose gather and/or blocked")
    for m in modes:
        if m not in MODES:
            raise MoEError(f"unknown mode {m!r}; choose among {', '.join(MODES)}")
    if runs < 1 or any(t < 1 for t in tokens):
        raise MoEError("--runs and --tokens must be >= 1")
    cases = []
    for name in layers:
        mx.random.seed(seed)
        layer = build_layer(name, dims, experts, ffn)
        mx.eval(layer.parameters())
        e, k, h = _shape(layer)
        for dispatch in (dispatches if e else ("-",)):
            for t in tokens:
                for mode in modes:
                    cases.append((name, layer, e, k, h, dispatch, t, mode))
    best: Dict[int, Tuple[float, int]] = {}
    calls: Dict[int, Callable[[], object]] = {}
    for _ in range(runs + 1):  # round 0 compiles and warms up
        for i, (name, layer, e, k, h, dispatch, t, mode) in enumerate(cases):
            if e:
                _set_dispatch(layer, dispatch)
            if i not in calls:  # compiled with this dispatch; later rounds reuse it
                calls[i] = _prepare(layer, dims, t, mode)
                mx.eval(calls[i]())
                continue
            seconds, peak = _time_once(calls[i])
            if i not in best or seconds < best[i][0]:
                best[i] = (seconds, max(peak, best.get(i, (0, 0))[1]))
            if progress is not None and _ == runs:
                progress(1)
    rows = []
    for i, (name, layer, e, k, h, dispatch, t, mode) in enumerate(cases):
        seconds, peak = best[i]
        rows.append(BenchRow(name, e, k, h, dispatch, t, mode, 1e3 * seconds, t / seconds, peak / 2**20,
                             layer_gflops(layer, dims, t)))
    return rows


def ratios(rows: Sequence[BenchRow], reference: str = "smoe") -> Dict[tuple, float]:
    """time(layer) / time(reference) for the same dispatch, tokens and mode (dense: vs its own row)."""
    ref = {(r.dispatch, r.tokens, r.mode): r.ms for r in rows if r.layer == reference}
    return {(r.layer, r.dispatch, r.tokens, r.mode): r.ms / ref[(r.dispatch, r.tokens, r.mode)]
            for r in rows if (r.dispatch, r.tokens, r.mode) in ref}


def format_table(rows: Sequence[BenchRow]) -> List[str]:
    rel = ratios(rows)
    best = {}
    for r in rows:
        if r.layer != "dense":
            key = (r.layer, r.tokens, r.mode)
            best[key] = min(best.get(key, float("inf")), r.ms)
    dense = {(r.tokens, r.mode): r.ms for r in rows if r.layer == "dense"}
    out = [f"{'layer':<14}{'E':>5}{'k':>3}{'h':>3}  {'dispatch':<9}{'tokens':>7}  {'mode':<17}{'ms':>10}"
           f"{'tok/s':>11}{'+MB':>9}{'vs smoe':>8}{'vs dense':>9}"]
    for r in rows:
        vs = rel.get((r.layer, r.dispatch, r.tokens, r.mode))
        vd = r.ms / dense[(r.tokens, r.mode)] if (r.tokens, r.mode) in dense else None
        out.append(f"{r.layer:<14}{r.experts:>5}{r.top_k:>3}{r.heads:>3}  {r.dispatch:<9}{r.tokens:>7}  {r.mode:<17}"
                   f"{r.ms:>10.2f}{r.tokens_per_second:>11.0f}{r.peak_memory_mb:>9.1f}"
                   f"{(f'{vs:.2f}x' if vs is not None else '-'):>8}{(f'{vd:.2f}x' if vd is not None else '-'):>9}")
    return out


def best_ratios(rows: Sequence[BenchRow]) -> List[str]:
    """One line per (tokens, mode): each layer's time over SMoE's, each at its faster dispatch."""
    out = []
    keys = sorted({(r.tokens, r.mode) for r in rows})
    for t, m in keys:
        best: Dict[str, float] = {}
        for r in rows:
            if r.tokens == t and r.mode == m:
                best[r.layer] = min(best.get(r.layer, float("inf")), r.ms)
        if "smoe" in best:
            parts = [f"{n} {best[n] / best['smoe']:.2f}x" for n in best if n != "smoe"]
            out.append(f"best dispatch, {t} tokens, {m}: vs smoe " + ", ".join(parts))
    return out


def auto_choice(tokens: int, experts: int, top_k: int, heads: int = 1) -> str:
    """What ``dispatch="auto"`` picks on this backend for this call (for the summary line)."""
    return expert_dispatch(tokens * heads * top_k, experts)


def describe_backend() -> str:
    return f"backend {backend_name()}, {mx.default_device()}"
