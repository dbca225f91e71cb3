"""``mlx-elm bench lora``: our LoRA against mlx-lm's on the same model, data and settings."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def lora(
    model: str = typer.Option("smollm2", "--model", help="smollm2 | openelm-270m"),
    workdir: Path = typer.Option(Path("/tmp/mlx-elm-bench-lora"), "--workdir"),
    iters: int = typer.Option(5, "--iters"),
    batch_size: int = typer.Option(2, "--batch-size"),
    rank: int = typer.Option(8, "--rank"),
    max_seq_length: int = typer.Option(64, "--max-seq-length"),
    repeats: int = typer.Option(1, "--repeats"),
) -> None:
    """Tokens/s and peak memory of `mlx-elm lora` vs `mlx_lm.lora` (ratio > 1: ours is faster)."""
    from mlx_elm.train.bench import compare

    typer.echo(json.dumps(compare(model, workdir, iters, batch_size, rank, max_seq_length, repeats), indent=2))
