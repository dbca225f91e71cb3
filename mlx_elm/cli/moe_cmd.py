"""``mlx-elm moe …``: MoE sizing rules and routing statistics (thin over ``mlx_elm.moe``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlx_elm.cli import options as O

moe_app = typer.Typer(help="Mixture-of-experts models: sizing rules, routing statistics, expert-load plots.",
                      no_args_is_help=True)


@moe_app.command("sizes")
def sizes(
    base: Annotated[str, typer.Option("--base", help="Backbone: paper (d 768, 12 blocks) or tiny (d 128, 4 blocks).")] = "paper",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """The v1 / v2 sizing rules: each preset's experts, top-k, width, parameters and FLOPs per token."""
    from mlx_elm.errors import MoEError
    from mlx_elm.models.openelm_moe import BASES, sizing_table

    if base not in BASES:
        raise MoEError(f"unknown --base {base!r}; choose {', '.join(BASES)}")
    rows = sizing_table(base)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    smoe = next(r for r in rows if r["preset"].endswith("-smoe"))
    typer.echo(f"{'preset':<20}{'type':<7}{'h':>3}{'E':>5}{'k':>3}{'d_ff':>6}{'total':>10}{'active':>9}"
               f"{'MFLOP/tok':>11}{'vs smoe':>9}")
    for r in rows:
        typer.echo(f"{r['preset']:<20}{r['type']:<7}{r['heads']:>3}{r['experts']:>5}{r['top_k']:>3}{r['expert_ffn']:>6}"
                   f"{r['total_parameters'] / 1e6:>9.2f}M{r['active_parameters'] / 1e6:>8.2f}M"
                   f"{r['flops_per_token'] / 1e6:>11.2f}{r['flops_per_token'] / smoe['flops_per_token']:>8.2f}x")
    typer.echo("FLOPs: 2 per multiply-add of every matmul per token, attention scores excluded; active: parameters "
               "a token can touch (min(E, h*k) experts)")


@moe_app.command("stats")
def stats(
    model: Annotated[str, typer.Argument(help="An MoE model folder (e.g. from `mlx-elm train` with an OpenELM-MoE config).")],
    data: Annotated[Path, typer.Option("--data", help="Text file, .jsonl file, or data folder (valid.jsonl or train.jsonl).")],
    tokenizer: O.Tokenizer = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, max=1 << 20, help="Tokens per sequence.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096, help="Sequences per forward pass.")] = 4,
    batches: Annotated[int, typer.Option("--batches", min=1, max=1 << 20, help="Forward passes at most.")] = 16,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Save the layer x expert load heat map here (.png, .svg or .pdf).")] = None,
    out_json: Annotated[Optional[Path], typer.Option("--json", help="Write per-layer statistics and load shares here.")] = None,
) -> None:
    """Expert load, activation ratios, entropy and dead experts per MoE layer on some text."""
    import time

    import mlx.core as mx
    from tqdm import tqdm

    from mlx_elm.atomic import atomic_file
    from mlx_elm.loading import load
    from mlx_elm.moe.stats import (
        empty_stats, model_summary, moe_layers, plot_load, read_texts, routing_stats, summary_table, token_batches,
    )

    m, tok = load(model, tokenizer=tokenizer)
    empty_stats(m)  # fails in one line for a model without MoE layers, before any work
    texts = read_texts(data)
    chunks = token_batches(tok, texts, seq_len, batch_size, batches)
    ids = [i for i, _ in moe_layers(m)]
    tic = time.perf_counter()
    mx.reset_peak_memory()
    with tqdm(total=len(chunks), desc="routing", unit="batch", leave=False) as bar:
        st = routing_stats(m, chunks, progress=bar.update)
    seconds = time.perf_counter() - tic
    rows = summary_table(st, ids)
    typer.echo(f"{'block':>5}{'E':>5}{'entropy':>9}{'cv':>7}{'min':>8}{'max':>8}{'dead':>6}{'cold':>6}"
               f"{'act@.05 tok':>13}{'sub':>7}{'cover':>7}{'dropped':>9}")
    for r in rows:
        typer.echo(f"{r['layer'] + 1:>5}{r['experts']:>5}{r['entropy']:>9.3f}{r['cv']:>7.2f}{r['min_share']:>8.4f}"
                   f"{r['max_share']:>8.4f}{r['dead']:>6}{r['cold']:>6}{r['act_token@0.05']:>13.3f}"
                   f"{r['act_subtoken@0.05']:>7.3f}{r['act_coverage@0.05']:>7.3f}{r['dropped']:>9.3f}")
    summary = model_summary(st)
    if plot is not None:
        plot_load(st, ids, plot, title=f"expert load of {Path(model).name}")
        typer.echo(f"plot: {plot}")
    if out_json is not None:
        doc = {"model": model, "layers": rows, "summary": summary, "load_share": [s.share.tolist() for s in st]}
        with atomic_file(out_json) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=1) + "\n")
        typer.echo(f"json: {out_json}")
    n_tok = sum(c.size for c in chunks)
    typer.echo(f"{n_tok} tokens in {seconds:.1f}s ({n_tok / max(seconds, 1e-9):.0f} tok/s), peak memory "
               f"{mx.get_peak_memory() / 1e9:.2f} GB; activation (paper basis, tau 0.05) {summary['act_token@0.05']:.3f}, "
               f"per sub-token {summary['act_subtoken@0.05']:.3f}, dead experts {summary['dead']}")


def register(app: typer.Typer) -> None:
    """Add the ``moe`` sub-app."""
    app.add_typer(moe_app, name="moe")
