"""``mlx-elm bench …``: speed and memory figures, thin over ``mlx_elm.bench`` and friends."""

from __future__ import annotations

from typing import Optional

import typer

bench_app = typer.Typer(help="Reproducible speed and memory benchmarks.", no_args_is_help=True)


@bench_app.command("generate")
def generate(
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Model folder, Hub id, alias, or random:PRESET (e.g. random:OpenELM-270M).",
    ),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens"),
    gen_tokens: int = typer.Option(128, "--gen-tokens"),
    runs: int = typer.Option(3, "--runs"),
    vs: Optional[str] = typer.Option(None, "--vs", help="Peer to compare with: mlx-lm."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype for random: models."),
    representation: str = typer.Option("auto", "--weights", help="auto | as-stored | float32."),
) -> None:
    """Median prefill and decode tokens/s and peak memory (optionally against mlx-lm)."""
    from tqdm import tqdm

    from mlx_elm.bench import bench_generate, format_table

    total = runs * (2 if vs else 1)
    with tqdm(total=total, desc="bench runs", leave=False) as bar:
        results = bench_generate(model, prompt_tokens, gen_tokens, runs, vs, dtype, representation,
                                 progress=bar.update)
    typer.echo(f"model {model or 'default'}, prompt {prompt_tokens}, generate {gen_tokens}, "
               f"median of {runs} runs")
    for row in format_table(results):
        typer.echo(row)


def register(app: typer.Typer) -> None:
    from mlx_elm.cli import bench_kv, bench_lora, bench_moe

    bench_app.command("kv")(bench_kv.kv)
    bench_app.command("lora")(bench_lora.lora)
    bench_app.command("moe")(bench_moe.moe)
    app.add_typer(bench_app, name="bench")
