"""``mlx-elm bench moe``: SMoE vs MH-MoE vs a dense FFN of equal FLOPs, per expert dispatch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _ints(text: str, name: str) -> list:
    from mlx_elm.errors import MoEError

    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MoEError(f"{name} takes comma-separated integers (got {text!r})") from None


def moe(
    dim: int = typer.Option(768, "--dim", help="Model width d (the papers: 768)."),
    experts: int = typer.Option(8, "--experts", help="SMoE experts; the others are sized from it by the v2 rule."),
    ffn: int = typer.Option(2048, "--ffn", help="SMoE expert (and dense FFN) SwiGLU width."),
    layers: str = typer.Option("dense,smoe,fine-grained,mhmoe-h2,mhmoe-h3", "--layers",
                               help="Comma-separated: dense, smoe, fine-grained, mhmoe-h2, mhmoe-h3, mhmoe-h4."),
    tokens: str = typer.Option("1,2048", "--tokens", help="Token counts per call (1 = decode, 2048 = prefill)."),
    modes: str = typer.Option("forward,forward+backward", "--modes", help="forward and/or forward+backward."),
    dispatch: str = typer.Option("gather,blocked", "--dispatch", help="Expert dispatches to time: gather, blocked."),
    runs: int = typer.Option(3, "--runs", help="Timed runs per row after one warm-up (median reported; >= 1)."),
    out_json: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON here."),
) -> None:
    """Tokens/s and peak memory of one MoE layer per dispatch; MH-MoE's time relative to SMoE's."""
    import time

    import mlx.core as mx
    from tqdm import tqdm

    from mlx_elm.atomic import atomic_file
    from mlx_elm.moe.bench import auto_choice, bench_moe, describe_backend, format_table

    names = [s.strip() for s in layers.split(",") if s.strip()]
    toks = _ints(tokens, "--tokens")
    mode_list = [s.strip() for s in modes.split(",") if s.strip()]
    disp = [s.strip() for s in dispatch.split(",") if s.strip()]
    total = sum((1 if n == "dense" else len(disp)) * len(toks) * len(mode_list) for n in names)
    tic = time.perf_counter()
    with tqdm(total=total, desc="bench moe", leave=False) as bar:
        rows = bench_moe(names, dim, experts, ffn, toks, mode_list, disp, runs, progress=bar.update)
    typer.echo(f"one layer, d {dim}, SMoE {experts} x SwiGLU {ffn} top-1, v2-sized peers; {describe_backend()}; "
               f"median of {runs}")
    for line in format_table(rows):
        typer.echo(line)
    for t in toks:
        for m in mode_list:
            best = {}
            for r in rows:
                if r.tokens == t and r.mode == m and r.layer != "dense":
                    best[r.layer] = min(best.get(r.layer, float("inf")), r.ms)
            if "smoe" in best:
                parts = [f"{n} {best[n] / best['smoe']:.2f}x" for n in best if n != "smoe"]
                typer.echo(f"best dispatch, {t} tokens, {m}: vs smoe " + ", ".join(parts))
    if out_json is not None:
        with atomic_file(out_json) as tmp:
            Path(tmp).write_text(json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
    auto = auto_choice(max(toks), experts, 1)
    typer.echo(f"{len(rows)} rows in {time.perf_counter() - tic:.0f}s, peak memory {mx.get_peak_memory() / 2**20:.0f} MB; "
               f"auto dispatch here at {max(toks)} tokens: {auto}" + (f"; json {out_json}" if out_json else ""))
