"""``mlx-elm convert``: PyTorch OpenELM checkpoints (Hugging Face or corenet) to MLX folders."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer


def convert(
    source: str = typer.Argument(..., help="Hub repo id (apple/OpenELM-270M), local HF folder, or corenet .pt file."),
    out_dir: Path = typer.Argument(..., help="Output folder (must not exist unless --force)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Size preset (270M, 450M, 1_1B, 3B); default: inferred from shapes."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32 | bfloat16 | float16."),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize the projection matrices."),
    bits: int = typer.Option(4, "--bits", help="Quantization bits: 4 or 8."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size: 32, 64 or 128."),
    quantize_embedding: bool = typer.Option(True, "--quantize-embedding/--no-quantize-embedding",
                                            help="With --quantize, also quantize the tied embedding (and head)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="SentencePiece .model, tokenizer folder, or Hub repo id to include."),
    keep_padding: bool = typer.Option(False, "--keep-padding", help="Keep corenet's padded vocabulary rows (32128)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Rows of the embedding to keep (default: 32000 for 32128-row corenet files)."),
    merge_lora: bool = typer.Option(True, "--merge-lora/--no-merge-lora", help="Merge a LoRA checkpoint, or export adapters/ for mlx-lm."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="LoRA alpha / rank (not stored in corenet files; its recipe gives 1.0)."),
    verify: bool = typer.Option(False, "--verify", help="Compare logits with a PyTorch reference of the source (needs torch)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists."),
    force_float16: bool = typer.Option(False, "--force-float16", help="Allow float16 for the 3B model (its activations overflow)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest safetensors shard."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag, or commit)."),
    check_crc: bool = typer.Option(True, "--check-crc/--no-check-crc",
                                   help="Check the CRC-32 of every .pt/.bin zip entry before using it (default); "
                                        "--no-check-crc skips it, saving one pass over the file."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Convert an OpenELM PyTorch checkpoint into an MLX folder; no code from the file is executed."""
    from convert import convert as run

    command = "mlx-elm convert " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    report = run(source, out_dir, preset=preset, dtype=dtype, quantize=quantize, bits=bits, group_size=group_size,
                 quantize_embedding=quantize_embedding, tokenizer=tokenizer, keep_padding=keep_padding,
                 vocab_size=vocab_size, merge_lora=merge_lora, lora_scale=lora_scale, verify=verify, force=force,
                 force_float16=force_float16, max_shard_size=max_shard_size, revision=revision,
                 progress=not quiet, command=command, check_crc=check_crc)
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(report.summary())


def register(app: typer.Typer) -> None:
    """Add ``convert`` to the CLI."""
    app.command("convert")(convert)
